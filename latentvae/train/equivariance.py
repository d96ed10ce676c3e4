"""EQ-VAE's equivariance term (Kouzelis et al. 2025, https://arxiv.org/abs/2502.09509): decode a
transformed latent and match it to the same transform of the image.

    t = draw(cfg.loss.equivariance_transforms, seed, micro_step, latent_hw)   # one transform per micro-batch
    x_t_hat = vae.decode(t.latent(z))                                        # inside Autoencoder.forward
    term = reconstruction(t.image(x), x_t_hat)                               # losses.equivariance_loss

The transforms (TRANSFORMS) are EQ-VAE's: rotations by 90, 180 and 270 degrees, and downscaling by
1/2 and 3/4; a scale whose latent side would not be a whole number is not drawn. Downscaling is
bilinear with antialiasing (latent_stats.downsample's rule), to the same relative size for the
latent and the image (the image side = latent side x the VAE's factor). Which transform a
micro-batch gets is a pure function of (train.seed, micro-step): the same on every process and
after a resume.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import EQUIVARIANCE_TRANSFORMS as TRANSFORMS


@dataclass(frozen=True)
class Transform:
    name: str
    kind: str  # "rot" or "scale"
    amount: float  # quarter turns, or the scale factor

    def latent(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "rot":
            return torch.rot90(z, int(self.amount), dims=(-2, -1))
        h, w = z.shape[-2:]
        return _resize(z, (round(h * self.amount), round(w * self.amount)))

    def image(self, x: torch.Tensor, latent_hw: tuple[int, int], factor: int) -> torch.Tensor:
        """The same transform of the image, sized to match the decoded transformed latent."""
        if self.kind == "rot":
            return torch.rot90(x, int(self.amount), dims=(-2, -1))
        h, w = latent_hw
        return _resize(x, (round(h * self.amount) * factor, round(w * self.amount) * factor))


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x.float(), size=size, mode="bilinear", antialias=True, align_corners=False).to(x.dtype)


def usable(names, latent_hw: tuple[int, int]) -> list[str]:
    """The transforms of `names` that apply to a latent of this size (whole-number scaled sides)."""
    h, w = latent_hw
    out = []
    for n in names:
        kind, amount = TRANSFORMS[n]
        if kind == "scale" and (h * amount != int(h * amount) or w * amount != int(w * amount) or int(h * amount) < 1):
            continue
        if kind == "rot" and amount % 2 and h != w:  # a quarter turn of a non-square batch changes its shape
            continue
        out.append(n)
    return out


def draw(names, seed: int, micro_step: int, latent_hw: tuple[int, int]) -> Transform:
    """The transform of micro-batch `micro_step`: one of `names`, chosen by a hash of (seed, micro_step)."""
    choices = usable(names, latent_hw)
    if not choices:
        raise ValueError(f"no transform of {list(names)} applies to a {latent_hw[0]}x{latent_hw[1]} latent")
    digest = hashlib.blake2b(f"eq|{seed}|{micro_step}".encode(), digest_size=8).digest()
    name = choices[int.from_bytes(digest, "little") % len(choices)]
    kind, amount = TRANSFORMS[name]
    return Transform(name, kind, amount)
