"""PatchGAN discriminator (Isola et al. 2017, https://arxiv.org/abs/1611.07004), as used by
taming-transformers and latent diffusion: stride-2 4x4 convs, a logit per overlapping patch.

diffusers has no discriminator, so this one is ours; it is small on purpose.
"""
from __future__ import annotations

from torch import nn


def _block(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 4, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, True)]


class PatchDiscriminator(nn.Sequential):
    """(B, 3, H, W) in [-1, 1] -> (B, 1, h, w) patch logits."""

    def __init__(self, layers: int = 3, channels: int = 64, in_channels: int = 3):
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = channels
        for n in range(1, layers):
            c_next = channels * min(2 ** n, 8)
            mods += _block(c, c_next, 2)
            c = c_next
        c_next = channels * min(2 ** layers, 8)
        mods += _block(c, c_next, 1)
        mods += [nn.Conv2d(c_next, 1, 4, 1, 1)]
        super().__init__(*mods)
        self.apply(_init)


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)

