"""What the export writes for the latent factors, and where, per family: measured, kept, or the placeholder.

    plan = factor_plan(src, stats, fp16)     # before the module is saved
    plan.apply(src.vae)                      # into config.json entries / flux2's BatchNorm buffers

Three cases, one rule each (docs/export.md):

- measured (`--calibrate`): the entries `conventions.diffusers_config` gives for the chosen formula,
  written where the family's pipeline reads them (`Family.write_factors`: config.json for kl,
  qwenimage, wan, dc, hunyuanimage; flux2's bn.running_mean / bn.running_var, which land in the
  weights file; nothing for tiny, whose latents are the target VAE's, already normalized);
- kept (any other VAE, uncalibrated): the source's own factors, as the record read them;
- placeholder (a training run or a bare LDM file, uncalibrated): the identity for the family's formula, which no real
  model has (kl, dc, hunyuanimage: scaling_factor 1.0; qwenimage, wan: latents_mean 0, latents_std 1;
  flux2: BatchNorm's initial running_mean 0, running_var 1), so it is never passed off as measured.

Config keys a class's constructor does not take are never written (force_upcast exists for
AutoencoderKL and AutoencoderTiny only; sample_size not for every class).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Optional

from ..vae.conventions import CONVENTIONS
from .calibrate import Fp16Report, LatentStats
from .source import Source

UNMEASURED_SCALING = 1.0  # identity: diffusers needs some value; 1.0 is not passed off as measured
TILE_SAMPLE_SIZE = 512  # a run's exported sample_size at least (the SD VAE's): diffusers tiles by it
WHERE = {"flux2": "diffusion_pytorch_model.safetensors (bn.running_mean, bn.running_var: BatchNorm buffers its "
                  "encode/decode never apply; its pipeline reads them)",
         "ltx2": "diffusion_pytorch_model.safetensors (latents_mean, latents_std: buffers its pipelines read) and "
                 "config.json (scaling_factor)",
         "tiny": "nothing: TAESD latents are the target VAE's latents, already normalized"}


def config_params(vae) -> set[str]:
    """The config entries the VAE's class takes (its constructor's arguments)."""
    return set(inspect.signature(type(vae).__init__).parameters) - {"self"}


def written_where(src: Source) -> str:
    keys = src.lv.family.config_keys
    return WHERE.get(src.lv.family.name, "config.json (" + ", ".join(keys) + ")")


def placeholder(src: Source) -> dict:
    """The identity entries of the family's formula (a run's uncalibrated export)."""
    lv = src.lv
    name, c = lv.family.name, lv.layout.channels
    if name == "flux2":
        n = lv.layout.diffusion_channels
        return {"bn_running_mean": [0.0] * n, "bn_running_var": [1.0] * n}
    if name in ("qwenimage", "wan"):
        return {"latents_mean": [0.0] * c, "latents_std": [1.0] * c}
    if name == "ltx2":
        return {"latents_mean": [0.0] * c, "latents_std": [1.0] * c, "scaling_factor": 1.0}
    if name == "tiny":
        return {}
    return {"scaling_factor": UNMEASURED_SCALING, "shift_factor": None, "latents_mean": None, "latents_std": None}


def gets_placeholder(src: Source) -> bool:
    """Uncalibrated, a run (its config holds diffusers' defaults) and an LDM file (which holds no factors) get
    the placeholder; any other VAE keeps its own, and so does a decoder-only fine-tune of a pretrained VAE
    (its encoder, and so its latents, are those of the VAE it started from: the record says so)."""
    return src.lv.factors_origin in ("run", "none")


@dataclass(frozen=True)
class FactorPlan:
    origin: str  # "measured" | "placeholder" | where the kept ones come from (scaling_origin of the record)
    entries: Optional[dict]  # written by Family.write_factors; None: kept as they are
    config: dict = field(default_factory=dict)  # further config.json entries (force_upcast, sample_size)
    force_upcast: str = ""  # the model card's words for what became of force_upcast

    @property
    def measured(self) -> bool:
        return self.origin == "measured"

    def apply(self, vae) -> None:
        from ..vae.families import family_of
        if self.entries is not None:
            family_of(vae).write_factors(vae, self.entries)
        if self.config:
            vae.register_to_config(**self.config)


def kept_origin(src: Source) -> str:
    where = {"flux2": "BatchNorm buffers", "ltx2": "latents_mean/latents_std buffers"}.get(src.lv.family.name,
                                                                                             "config.json")
    return f"the source's {where} ({src.lv.provenance})"


def factor_plan(src: Source, stats: Optional[LatentStats], fp16: Optional[Fp16Report],
                resolution: int) -> FactorPlan:
    """What to write: the factors (measured, kept or placeholder) and the config entries the class takes."""
    vae, params = src.vae, config_params(src.vae)
    if stats is not None:
        origin, entries = "measured", stats.entries
    elif gets_placeholder(src):
        origin, entries = "placeholder", placeholder(src)
    else:
        origin, entries = kept_origin(src), None
    config: dict[str, Any] = {}
    if "force_upcast" not in params:
        upcast = (f"{src.lv.class_name} has no force_upcast config entry: its pipelines run the VAE in its own "
                  "dtype" + (f"; the fp16 check says fp16 {'is not' if fp16.force_upcast else 'is'} safe for it"
                             if fp16 else ""))
    elif fp16 is not None:
        config["force_upcast"] = fp16.force_upcast
        upcast = f"`force_upcast: {fp16.force_upcast}`, from the fp16 check"
    elif src.is_run:
        config["force_upcast"] = True
        upcast = "`force_upcast: True` kept (the fp16 safety was not checked)"
    else:
        upcast = f"`force_upcast: {vae.config.get('force_upcast')}` kept as in the source (not checked)"
    if src.is_run and "sample_size" in params:
        # diffusers' tiling decodes in tiles of sample_size pixels (and normalizes per tile): 512, as the
        # SD VAE, or the training/calibration size if larger; diffusers' default (32) made 32-px tiles
        config["sample_size"] = max(TILE_SAMPLE_SIZE, src.cfg.data.resolution, resolution)
    return FactorPlan(origin, entries, config, upcast)


def latent_config(vae) -> dict:
    """The config.json entries of the exported module that its pipelines read for the latents."""
    keys = ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast")
    params = config_params(vae)
    return {k: vae.config.get(k) for k in keys if k in params}


def formula(convention: str) -> dict:
    """The record's words for a convention: its formula and where diffusers applies it (conventions.py)."""
    from ..vae.conventions import CITES
    return {"convention": convention, "formula": CONVENTIONS[convention], "diffusers": CITES[convention]}
