"""The loaded VAE: one frozen record every job takes, whatever door the VAE came through.

    lv = load_vae("out/my-vae")            # loading.py
    lv.module                              # the diffusers module, eval mode
    lv.family                              # families.Family: the class and what follows from it
    lv.stochastic                          # is its posterior a trained Gaussian? (False: TAESD, DC, mode=ae runs)
    lv.layout                              # channels, spatial factor, patch size, 5-D input
    lv.factors, lv.factors_origin          # what its pipeline's formula reads; measured / placeholder / published / ...
    lv.origin                              # {"spec", "kind", "path", "repo_id", "revision", "subfolder", "variant", "weights"}
    lv.weights_sha256()                    # sha256 of its state dict (computed once, on demand)
    mean, logvar = lv.moments(x)           # images: 4-D, whatever the family (5-D classes get T=1 added and dropped)
    mean, logvar = lv.moments(clips)       # a video VAE's clips (B, 3, T, H, W): 5-D (B, C, T', H', W')
    z = lv.latent(x, generator)            # what the family's consumers take (sample or mode)
    x_hat = lv.decode(z)                   # 4-D -> images, 5-D -> clips
    lv.video, lv.layout.frames_ok(49)      # a video VAE? a clip length it takes?

Nothing downstream re-reads a config.json, walks parent folders or inspects weights to learn what
the loader already knew: it is all here.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional

import torch

from .families import Family, family_of

SOURCE_KEYS = ("spec", "kind", "path", "repo_id", "revision", "subfolder", "variant", "weights")
FACTOR_ORIGINS = {
    "measured": "measured by `latentvae export --calibrate`",
    "placeholder": "NOT measured: exported without --calibrate (the factors are placeholders)",
    "run": "NOT measured: a latentvae training run holds diffusers' default factors",
    "taesd": "none: TAESD latents are the SD/SDXL/SD3/FLUX latents and use that VAE's published factors",
    "published": "as published with this VAE (not measured by latentvae)",
    "none": "none: an LDM weight file holds no latent factors (its config has diffusers' defaults)",
}


@dataclass(frozen=True)
class LatentLayout:
    """The latent's shape: `channels` of the VAE latent at 1/`factor` the image size; the pipeline patchifies
    `patch` x `patch` of them into channels before its formula (flux2: 2); `five_d`: the class takes (B, C, T, H, W).
    A video VAE (`video`) downsamples time by `temporal`; its clips are 1 + `frame_step` * k frames long."""
    channels: int
    factor: int
    patch: int = 1
    five_d: bool = False
    temporal: int = 1
    frame_step: int = 1
    video: bool = False

    def frames_ok(self, n: int) -> bool:
        """Whether a clip of `n` frames decodes to `n` frames (1 + frame_step * k)."""
        return n >= 1 and (n - 1) % self.frame_step == 0

    def latent_frames(self, n: int) -> int:
        """T' of a clip of `n` frames: 1 + (n - 1) // temporal, as the pipelines compute it."""
        return 1 + (n - 1) // self.temporal

    def nearest_frames(self, n: int) -> tuple[int, int]:
        """The valid clip lengths either side of `n` (the lower at least 1)."""
        lo = 1 + max(0, (n - 1) // self.frame_step) * self.frame_step
        return lo, lo if lo == n else lo + self.frame_step

    @property
    def diffusion_channels(self) -> int:
        return self.channels * self.patch * self.patch

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this (the factor, times the patch)."""
        return self.factor * self.patch

    def describe(self) -> str:
        shape = f"{self.channels} x H/{self.factor} x W/{self.factor}"
        if self.patch > 1:
            shape += f" (patchified {self.patch}x{self.patch}: {self.diffusion_channels} x H/{self.multiple} x W/{self.multiple})"
        if self.video:
            return shape + f", clips of 1 + {self.frame_step}k frames -> 1 + (T-1)/{self.temporal} latent frames"
        return shape + (", 5-D (T=1)" if self.five_d else "")


@dataclass(frozen=True)
class LoadedVae:
    module: torch.nn.Module
    family: Family
    stochastic: bool
    layout: LatentLayout
    factors: dict
    factors_origin: str  # a key of FACTOR_ORIGINS, or "kept from ..." text of an export that kept its source's
    origin: dict
    convention: str  # the formula its pipeline applies by default (conventions.py)
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def factors_measured(self) -> bool:
        return self.factors_origin == "measured"

    @property
    def provenance(self) -> str:
        """One line: where the factors come from."""
        return FACTOR_ORIGINS.get(self.factors_origin, self.factors_origin)

    @property
    def kind(self) -> Optional[str]:
        return self.origin.get("kind")

    @property
    def path(self) -> Optional[str]:
        return self.origin.get("path")

    @property
    def video(self) -> bool:
        return self.layout.video

    @property
    def class_name(self) -> str:
        return type(self.module).__name__

    def weights_sha256(self) -> str:
        if "sha" not in self._memo:
            self._memo["sha"] = weights_sha256(self.module)
        return self._memo["sha"]

    # ------------------------------------------------------------------ running it
    def to(self, *args, **kwargs) -> "LoadedVae":
        self.module.to(*args, **kwargs)
        return self

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        mean, logvar = self.family.moments(self.module, x)
        return mean, (logvar if self.stochastic else None)

    def latent(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The latent this family's consumers take from `x` (a posterior sample or the mode)."""
        mean, logvar = self.moments(x)
        return self.family.consumer_latent(mean, logvar, generator)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.family.decode(self.module, z)

    def require(self, job: str, label: str = "") -> "LoadedVae":
        self.family.require(job, label or str(self.origin.get("spec") or ""))
        return self

    def describe(self) -> str:
        n = sum(p.numel() for p in self.module.parameters())
        return (f"{self.class_name} ({self.family.name}): {n / 1e6:.2f}M parameters, latent {self.layout.describe()}, "
                f"{'Gaussian posterior' if self.stochastic else 'deterministic latent'}")


def weights_sha256(module) -> str:
    """sha256 over the state dict (sorted keys; name, dtype, shape, raw bytes): same weights, same id."""
    h = hashlib.sha256()
    for k, t in sorted(module.state_dict().items()):
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        # flattened in logical order, so channels_last weights hash like contiguous ones (a (C, C, 1, 1)
        # channels_last weight counts as contiguous yet has stride(-1) != 1, which view(uint8) refuses)
        flat = t.detach().cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


def pinned_logvar(module) -> bool:
    """An AutoencoderKL-like posterior whose log-variance is pinned (model.make_posterior_deterministic)."""
    from .model import DETERMINISTIC_LOGVAR

    fam = family_of(module)
    if not fam.stochastic or not hasattr(module, "encoder") or not hasattr(module.encoder, "conv_out"):
        return False
    conv = getattr(module, "quant_conv", None) or module.encoder.conv_out
    if not isinstance(conv, (torch.nn.Conv2d, torch.nn.Conv3d)) or conv.bias is None:
        return False
    c = fam.channels(module)
    if conv.weight.shape[0] != 2 * c:
        return False
    return bool((conv.weight[c:] == 0).all() and (conv.bias[c:] == DETERMINISTIC_LOGVAR).all())


def make_record(module, origin: dict, *, stochastic: Optional[bool] = None, factors_origin: str = "published",
                convention: Optional[str] = None) -> LoadedVae:
    """The record of a loaded module: the family table answers everything else."""
    from .conventions import default_convention

    module = module.eval()
    fam = family_of(module)
    channels = fam.channels(module)
    layout = LatentLayout(channels, fam.factor(module), fam.patch, fam.five_d, fam.temporal(module),
                          fam.frame_step(module), fam.video)
    if stochastic is None:
        stochastic = fam.stochastic and not pinned_logvar(module)
    if convention is None:
        convention = fam.conventions[0]
        c = module.config
        if fam.name == "kl":
            convention = ("sdxl" if c.get("latents_mean") is not None and c.get("latents_std") is not None
                          else "sd3" if c.get("shift_factor") is not None else default_convention(channels))
        elif fam.name == "tiny":  # the formula of the VAE it mimics (convert.TAESD_VARIANTS)
            convention = "sd3" if fam.factors(module).get("shift_factor") else default_convention(channels)
    origin = {k: origin.get(k) for k in SOURCE_KEYS}
    if fam.name == "tiny" and factors_origin == "published":
        factors_origin = "taesd"
    return LoadedVae(module, fam, bool(stochastic and fam.stochastic), layout, fam.factors(module), factors_origin,
                     origin, convention)
