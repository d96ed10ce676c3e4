"""What a trainer gets from a cache's stored columns: the latent its family's consumers take, in the units
its pipeline's formula gives (vae/conventions.py), patchified where that formula patchifies.

    norm = resolve(cache, manifest)                        # the manifest's convention, the VAE's own factors
    norm.convention, norm.factors, norm.entries            # "flux2", "vae", {"bn_running_mean": [...], ...}
    z = draw(mean, logvar, rows, seed, epoch)              # --store moments, a sampling family: mean + std * eps
    norm.into(x, z)                                        # x = to_diffusion(z, entries, convention), in place
    norm.output_shape((4, 16, 16))                         # flux2: (16, 8, 8)

The consumer rule (families.py): FLUX.2 and Wan take the posterior mode (the stored mean, never a
sample); SD/SDXL/SD3, Qwen-Image and HunyuanImage training scripts sample (from --store moments rows:
mean + exp(logvar / 2) * eps, eps seeded by (seed, epoch, row)); DC and TAESD latents are deterministic.

The formula is one of the conventions the family's pipelines apply (`lv.family.conventions`: kl has
sd, sdxl, sd3; flux2 has flux2; Qwen-Image and Wan qwenimage; DC and HunyuanImage sd), by default the
one the manifest records (the VAE's own: vae.formula.convention). The factors are the VAE's own
(`vae`: the entries its pipeline reads, recorded in the manifest), or those measured on the cache's
own latents (`cache`: manifest latent_statistics); `auto` (the default) takes the VAE's unless the
manifest says nobody measured them (a training run, an export without --calibrate, an LDM weight file).

Every formula is affine per channel of the (patchified) latent: conventions.affine gives the scale
and bias, so a batch is normalized by one widening copy (with flux2's 2x2 patchify as its
permutation) and a multiply and an add in place.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import BadInputError
from ..vae.conventions import PATCH, affine, check_convention
from .manifest import cache_family

FACTOR_SOURCES = ("auto", "cache", "vae")
# vae/loaded.py FACTOR_ORIGINS whose factors nobody measured: factors="auto" takes the cache's instead
UNMEASURED = ("placeholder", "run", "none")
# the entries each convention's formula cannot do without (conventions.to_diffusion)
READS = {"sd": ("scaling_factor",), "sdxl": ("scaling_factor",), "sd3": ("scaling_factor",),
         "flux2": ("bn_running_mean", "bn_running_var", "batch_norm_eps"), "qwenimage": ("latents_mean", "latents_std"),
         "ltx2": ("latents_mean", "latents_std", "scaling_factor")}


class _Default:
    def __repr__(self) -> str:
        return "the manifest's convention"


DEFAULT = _Default()  # LatentDataset(convention=DEFAULT): the formula the manifest records


def noise_seed(seed: int, epoch: int, row: int) -> int:
    """The seed of one row's posterior noise in one epoch: a pure function of (seed, epoch, row)."""
    return int(np.random.SeedSequence([seed, epoch, row]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def draw(mean: torch.Tensor, logvar: torch.Tensor, rows, seed: int, epoch: int) -> torch.Tensor:
    """Posterior samples of float32 (B, C, h, w) moments of cache rows `rows`, in place in `mean` (and `logvar`)."""
    eps = torch.empty_like(mean)
    for k, r in enumerate(rows.tolist()):
        g = torch.Generator().manual_seed(noise_seed(seed, epoch, r))
        eps[k] = torch.randn(mean.shape[1:], generator=g)
    return mean.addcmul_(logvar.mul_(0.5).exp_(), eps)


@dataclass(frozen=True)
class Normalization:
    """A cache read in one formula: `convention` (None: the raw VAE latents), its `entries`, where they came
    from (`factors`: "vae" or "cache"), and whether --store moments rows are sampled (`sample`)."""
    convention: Optional[str]
    entries: Optional[dict]
    factors: Optional[str]
    sample: bool
    patch: int = 1
    scale: Optional[torch.Tensor] = None  # (1, C', 1, 1) float32, C' the channels after patchify
    bias: Optional[torch.Tensor] = None

    @cached_property
    def bias_nonzero(self) -> bool:
        return self.bias is not None and bool(self.bias.any())  # sd: scaling only (adding 0 changes nothing)

    @cached_property
    def uniform_scale(self) -> Optional[float]:
        """The one factor of a formula that scales every channel alike (sd), else None."""
        if self.scale is None:
            return None
        s = self.scale.flatten()
        return float(s[0]) if bool((s == s[0]).all()) else None

    def output_shape(self, shape) -> tuple[int, ...]:
        """A stored latent's (C, h, w) -> the (C', h', w') a trainer gets; a clip's (C, T, h, w) -> (C', T, h', w')."""
        c, *rest, h, w = (int(v) for v in shape)
        p = self.patch
        return (c * p * p, *rest, h // p, w // p)

    def into(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x (new float32, (B,) + output_shape) = conventions.to_diffusion(z, entries, convention) for stored
        latents z (B, C, h, w) or clips (B, C, T, h, w) of any float dtype: z widened into x (patchified: the same copy, permuted, as
        pipeline_flux2.py `_patchify_latents`), then times scale, plus bias, in place."""
        if self.patch > 1:
            b, c, h, w = z.shape
            p = self.patch
            x.view(b, c, p, p, h // p, w // p).copy_(z.view(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4))
        else:
            x.copy_(z)
        if self.scale is not None:
            per_channel = (1, -1, *([1] * (x.dim() - 2)))  # clips (B, C, T, h, w): the same scale at every T
            x.mul_(self.scale.view(per_channel))
            if self.bias_nonzero:
                x.add_(self.bias.view(per_channel))
        return x


def vae_entries(manifest: dict) -> dict:
    """The entries the VAE's pipeline reads, as the manifest records them (vae.formula.entries; a cache written
    before formulas were recorded: its config's scaling and shift factors)."""
    vae = manifest["vae"]
    formula = vae.get("formula") or {}
    if formula.get("entries") is not None:
        return formula["entries"]
    return {"scaling_factor": vae.get("scaling_factor"), "shift_factor": vae.get("shift_factor"),
            "latents_mean": vae.get("latents_mean"), "latents_std": vae.get("latents_std")}


def _usable(entries: dict, convention: str) -> bool:
    return all(entries.get(k) is not None for k in READS[convention])


def _entries(cache: Path, manifest: dict, convention: str, factors: str) -> tuple[dict, str]:
    """(entries, "vae" | "cache") of `factors` (FACTOR_SOURCES) for `convention`."""
    if factors not in FACTOR_SOURCES:
        raise BadInputError(f"unknown factors {factors!r}; valid choices: {', '.join(FACTOR_SOURCES)}")
    provenance = str(manifest["vae"].get("factors") or "")
    own = vae_entries(manifest)
    measured = not provenance.startswith("NOT measured") and manifest["vae"].get("factors_origin") not in UNMEASURED
    if factors == "vae" or (factors == "auto" and measured and _usable(own, convention)):
        fix = ("use factors='cache' (measured on this cache's latents) or calibrate the VAE with "
               "`latentvae export --calibrate`")
        if provenance.startswith("NOT measured"):
            raise BadInputError(f"{cache}: the VAE's factors were never measured ({provenance}); {fix}")
        if not _usable(own, convention):
            raise BadInputError(f"{cache}: manifest.json records no {', '.join(READS[convention])} of the VAE for the "
                                f"{convention} formula; {fix}")
        return own, "vae"
    stats = manifest.get("latent_statistics")
    if not stats or convention not in (stats.get("factors") or {}):
        raise BadInputError(f"{cache}: manifest.json has no latent_statistics.factors[{convention!r}] (a cache written "
                            "before latentvae measured them); pass factors='vae' or re-encode")
    return stats["factors"][convention], "cache"


def resolve(cache: Path, manifest: dict, convention=DEFAULT, factors: str = "auto") -> Normalization:
    """The Normalization of LatentDataset(cache, convention, factors): the convention checked against the
    family's (one line naming the family and the conventions its pipelines apply)."""
    fam = cache_family(cache, manifest)
    vae = manifest["vae"]
    sample = manifest["store"] == "moments" and vae.get("consumer", fam.consumer) == "sample"
    if convention is DEFAULT:
        convention = (vae.get("formula") or {}).get("convention") or fam.conventions[0]
    if convention is None:
        return Normalization(None, None, None, sample)
    if convention not in fam.conventions:
        raise BadInputError(f"{cache}: convention {convention!r} is not one the pipelines of its VAE apply "
                            f"({fam.class_name}, {fam.name} family); valid choices: {', '.join(fam.conventions)} "
                            "(or None: the raw VAE latents)")
    channels = int((vae.get("layout") or {}).get("channels") or vae["latent_channels"])
    try:
        check_convention(convention, channels)
    except BadInputError as e:
        raise BadInputError(f"{cache}: {e}") from None
    entries, source = _entries(cache, manifest, convention, factors)
    p = PATCH.get(convention, 1)
    scale, bias = affine(entries, convention, channels * p * p)
    view = lambda t: t.to(torch.float32).view(1, -1, 1, 1)  # noqa: E731
    return Normalization(convention, entries, source, sample, p, view(scale), view(bias))
