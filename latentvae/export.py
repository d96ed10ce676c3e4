"""Export a training run to a diffusers folder, with measured latent statistics and a model card.

    latentvae export runs/quickstart --out out/my-vae --calibrate data/samples/train
    latentvae export runs/quickstart/checkpoints/checkpoint-00000300 --out out/my-vae --weights raw --dtype fp16

OUT gets `config.json` + `diffusion_pytorch_model.safetensors` (loadable by
`diffusers.AutoencoderKL.from_pretrained(OUT)`), `README.md` (model card: training config, data,
latent statistics, evaluation figures) and `latentvae_export.json` (the same facts, machine-readable,
including whether the scaling factors were measured). The folder is written beside OUT under a
hidden temporary name, reloaded and compared with the training model, and only then renamed into
place, so a folder named OUT is always complete. Every argument is checked before that (OUT is
neither inside RUN nor RUN inside OUT; an existing non-empty OUT needs --overwrite), and a failed
export leaves nothing behind. See docs/export.md.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from diffusers import AutoencoderKL

from . import runs
from .calibrate import (CalibrationConfig, Fp16Report, LatentStats, calibrate, fp16_check,
                        format_fp16, format_stats)
from .config import config_from_dict
from .conventions import FAMILIES
from .errors import BadInputError, MissingInputError, UserError
from .fsutil import atomic_write_bytes, atomic_write_json, flatten, publish_folder
from .loading import load_from_checkpoint
from .model import DETERMINISTIC_LOGVAR, decode, downsample_factor, encode_moments
from .options import ExportOptions, validated

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FP32_TOLERANCE = 1e-5
UNMEASURED_SCALING = 1.0  # identity: diffusers needs some value; 1.0 is not passed off as measured
METADATA_FILE = "latentvae_export.json"
TILE_SAMPLE_SIZE = 512  # the exported config's sample_size at least (the SD VAE's)


class ExportError(RuntimeError):
    """The export could not be completed or did not verify; OUT was left untouched."""


class ExportTargetExists(UserError, FileExistsError):
    """OUT exists and holds something that --overwrite was not given to replace."""


@dataclass(frozen=True)
class ExportResult:
    out: Path
    checkpoint: Path
    step: int
    stats: Optional[LatentStats]
    fp16: Optional[Fp16Report]
    max_diff: dict[str, float] = field(default_factory=dict)  # encode/decode vs the training model


# ----------------------------------------------------------------------------- small pieces
def run_folder(found_checkpoint: Path) -> Path:
    """RUN of RUN/checkpoints/checkpoint-XXXXXXXX."""
    return found_checkpoint.parent.parent


def find_eval_summary(found_checkpoint: Path, explicit: Optional[str]) -> Optional[Path]:
    if explicit is not None:
        if not Path(explicit).is_file():
            raise MissingInputError(f"--eval-summary {explicit} does not exist" if not Path(explicit).exists()
                                    else f"--eval-summary {explicit} is not a file")
        return Path(explicit)
    default = run_folder(found_checkpoint) / "eval" / "summary.json"
    return default if default.is_file() else None


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportTargetExists(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportTargetExists(f"{out} exists and is not empty; pass --overwrite to replace it")


def check_apart(run: str | Path, found: Path, out: Path) -> None:
    """OUT must not be RUN, lie inside it, or hold it: writing (or --overwrite replacing) OUT would
    change or delete the training run being exported."""
    sources = {found.resolve(): str(found), Path(run).resolve(): str(run)}  # resolved -> as the user wrote it
    if found.parent.name == "checkpoints":
        sources.setdefault(run_folder(found).resolve(), str(run_folder(found)))
    target = out.resolve()
    for src, shown in sorted(sources.items(), key=lambda kv: len(kv[0].parts)):
        if target == src:
            raise BadInputError(f"export target {out} is its source {shown}; choose a folder outside the training run")
        if src in target.parents:
            raise BadInputError(f"export target {out} is inside its source {shown}; choose a folder outside the "
                                "training run")
        if target in src.parents:
            raise BadInputError(f"export target {out} contains its source {shown}; choose a folder outside the "
                                "training run")


def find_source(run: str | Path) -> Path:
    """The checkpoint to export, or a MissingInputError/BadInputError naming RUN."""
    try:
        return runs.find_checkpoint(run)
    except FileNotFoundError as e:
        raise MissingInputError(str(e)) from e



def staging_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp-{os.getpid()}"


def clean_stale(out: Path) -> None:
    """Remove hidden leftovers of earlier interrupted exports to OUT."""
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def latent_config(stats: Optional[LatentStats], fp16: Optional[Fp16Report]) -> dict[str, Any]:
    """The diffusers config entries this export sets."""
    entries = stats.config_entries() if stats else {"scaling_factor": UNMEASURED_SCALING, "shift_factor": None,
                                                    "latents_mean": None, "latents_std": None}
    return {**entries, "force_upcast": True if fp16 is None else fp16.force_upcast}


def probe_images(vae, n: int = 2) -> torch.Tensor:
    """Fixed images to compare the export with the training model: seeded, smooth, in [-1, 1]."""
    f = downsample_factor(vae)
    g = torch.Generator().manual_seed(0)
    low = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(8 * f, 8 * f), mode="bilinear", align_corners=False)


@torch.no_grad()
def compare(a, b, x: torch.Tensor) -> dict[str, float]:
    """max |difference| of the encoder means, and of the decodes of a's mean, between two fp32 VAEs."""
    mean_a, _ = encode_moments(a, x)
    mean_b, _ = encode_moments(b, x)
    return {"encode": float((mean_a - mean_b).abs().max()), "decode": float((decode(a, mean_a) - decode(b, mean_a)).abs().max())}


def verify(folder: Path, vae: AutoencoderKL, dtype: str) -> dict[str, float]:
    """Reload `folder` with diffusers; no missing/unexpected keys, weights equal, outputs close."""
    loaded, info = AutoencoderKL.from_pretrained(str(folder), torch_dtype=DTYPES[dtype], use_safetensors=True,
                                                 output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise ExportError(f"{folder}: diffusers reloads it with {problems}")
    want = {k: v.to(DTYPES[dtype]) for k, v in vae.state_dict().items()}
    got = loaded.state_dict()
    if want.keys() != got.keys() or not all(torch.equal(want[k], got[k]) for k in want):
        raise ExportError(f"{folder}: reloaded weights differ from the training weights cast to {dtype}")
    # outputs: in fp32 the exported model must reproduce the training model; in fp16/bf16 the
    # difference is the weight rounding alone (compared in fp32 arithmetic), reported, not bounded
    diff = compare(vae, loaded.float().eval(), probe_images(vae))
    if dtype == "fp32" and max(diff.values()) >= FP32_TOLERANCE:
        raise ExportError(f"{folder}: reloaded fp32 model differs from the training model by {diff} "
                          f"(tolerance {FP32_TOLERANCE})")
    return diff


def umask_modes(folder: Path) -> None:
    """Give every file in `folder` the mode a plain `open()` would (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


# ----------------------------------------------------------------------------- the model card
def data_seen(cfg, state: dict) -> dict[str, Any]:
    d, t = cfg.data, cfg.train
    procs = int(state.get("num_processes", 1))
    seen = {"source": d.source, "kind": d.kind, "split": d.split, "val_source": d.val_source,
            "resolution": d.resolution, "short_side": [d.short_side_min, d.short_side_max], "flip": d.flip,
            "steps": int(state["step"]), "processes": procs,
            "crops_seen": int(state["step"]) * t.batch_size * t.grad_accum * procs,
            "bad_images": len(state.get("bad_images", []))}
    if Path(d.source).is_dir():
        from .images import list_images
        try:
            seen["source_files"] = len(list_images(d.source))
        except FileNotFoundError:
            pass
    return seen


def model_card(meta: dict[str, Any]) -> str:
    lc, stats, fp16 = meta["latent_config"], meta["latent_statistics"], meta["fp16"]
    lines = ["---", "library_name: diffusers", "tags: [autoencoder, vae, latentvae]", "---", "",
             "# AutoencoderKL exported by latentvae", "",
             f"From `{meta['checkpoint']}` (step {meta['step']}), {meta['weights']} weights, stored as {meta['dtype']}.",
             "", "```python", "from diffusers import AutoencoderKL",
             "vae = AutoencoderKL.from_pretrained(\"path/to/this/folder\")", "```", "", "## Latent scaling", ""]
    if stats is None:
        lines += ["**The latent scaling factors were NOT measured** (exported without `--calibrate`).",
                  f"`config.json` holds `scaling_factor: {UNMEASURED_SCALING}`, an unmeasured placeholder (identity), "
                  "with no shift_factor / latents_mean / latents_std. Measure them before training a diffusion "
                  "model: `latentvae export RUN OUT --calibrate IMAGES`."]
    else:
        def fmt(v):
            return "not set" if v is None else ", ".join(f"{x:.4g}" for x in v) if isinstance(v, list) else f"{v:.6g}"
        lines += [f"Measured on {stats['images']} images ({stats['resolution']}px, `{stats['source']}`), written for "
                  f"the `{stats['convention']}` convention: {FAMILIES[stats['convention']]}, which gives "
                  "unit-variance latents on those images.", "", "| config entry | value |", "|---|---|"]
        lines += [f"| {k} | {fmt(lc[k])} |" for k in ("scaling_factor", "shift_factor", "latents_mean", "latents_std")]
        lines += ["", "Measured per channel: mean " + fmt(stats["channel_mean"]) + "; std " + fmt(stats["channel_std"])
                  + ".", "",
                  "Latent health: KL per element "
                  + ("n/a" if stats["health"]["kl_per_element"] is None else f"{stats['health']['kl_per_element']:.4g} nats")
                  + "; channels carrying no information: " + (", ".join(map(str, stats["health"]["dead_channels"])) or "none")
                  + "."]
    lines += ["", "## Posterior", "", f"{meta['posterior']}."]
    lines += ["", "## fp16", "", f"`force_upcast: {lc['force_upcast']}`. "
              + (fp16["note"] if fp16 else "Not checked (no calibration images): force_upcast kept True.")]
    lines += ["", "## Data seen in training", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in meta["data"].items()]
    lines += ["", "## Evaluation", ""]
    if meta["evaluation"] is None:
        lines.append("No evaluation summary was found (RUN/eval/summary.json or --eval-summary).")
    else:
        lines += [f"From `{meta['evaluation_file']}`:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in flatten(meta["evaluation"]).items()]
    lines += ["", "## Training config", "", "```json", json.dumps(meta["training_config"], indent=2, sort_keys=True),
              "```", "", "## Export check", "",
              f"Reloaded with `AutoencoderKL.from_pretrained`: no missing or unexpected keys; weights identical to "
              f"the training weights cast to {meta['dtype']}; max abs difference vs the training model: "
              + ", ".join(f"{k} {v:.3g}" for k, v in meta["max_abs_diff"].items()) + ".", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the export
def measure(vae: AutoencoderKL, options: ExportOptions, use_mean: bool = False,
            log=print) -> tuple[Optional[LatentStats], Optional[Fp16Report]]:
    if options.calibrate is None:
        log(f"latent statistics: NOT measured (no --calibrate); config.json gets the unmeasured placeholder "
            f"scaling_factor={UNMEASURED_SCALING} and force_upcast=True")
        return None, None
    stats = calibrate(vae, CalibrationConfig(options.calibrate, options.limit, options.resolution, options.convention,
                                             keep_latents=options.fp16_images, use_mean=use_mean))
    log(format_stats(stats))
    fp16 = fp16_check(vae, stats.sample_latents) if options.fp16_images > 0 else None
    log(format_fp16(fp16) if fp16 else "fp16 check: skipped (--fp16-images 0); force_upcast kept True")
    return stats, fp16


def export_record(options: ExportOptions, found: Path, state: dict, cfg, lc: dict, stats: Optional[LatentStats],
                  fp16: Optional[Fp16Report], summary_file: Optional[Path], diff: dict) -> dict[str, Any]:
    """latentvae_export.json: every fact of the export, machine-readable (the model card is made from it)."""
    return {"format": "latentvae-export-1", "checkpoint": str(found), "step": int(state["step"]),
            "weights": options.weights, "dtype": options.dtype, "latent_config": lc,
            "scaling_measured": stats is not None,
            "latent_statistics": stats.to_dict() if stats else None, "fp16": fp16.to_dict() if fp16 else None,
            "data": data_seen(cfg, state), "training_config": cfg.to_dict(),
            "evaluation_file": str(summary_file) if summary_file else None,
            "evaluation": json.loads(summary_file.read_text()) if summary_file else None,
            "max_abs_diff": diff,
            "posterior": ("deterministic: model.mode ae never trained the log-variance, so it is pinned to "
                          f"{DETERMINISTIC_LOGVAR} (std ~3e-7) and latent_dist.sample() equals mode()"
                          if cfg.model.mode == "ae" else "Gaussian: latent_dist.sample() = mean + std * noise")}


def export(options: ExportOptions, log=print) -> ExportResult:
    """`options.src` (a training run or one checkpoint) -> verified diffusers folder `options.out`."""
    options = validated(options)  # the command line's checks for library callers too
    run, out = options.src, Path(options.out)
    found = find_source(run)
    check_apart(run, found, out)
    check_out(out, options.overwrite)
    try:
        state = runs.read_state(found)
    except ValueError as e:
        raise BadInputError(str(e)) from e
    cfg = config_from_dict(state["config"])
    vae = load_from_checkpoint(found, options.weights).float()
    summary_file = find_eval_summary(found, options.eval_summary)
    if options.calibrate is not None and options.resolution % downsample_factor(vae):
        raise BadInputError(f"--resolution {options.resolution} is not a multiple of the VAE's downsampling factor "
                            f"{downsample_factor(vae)}")
    log(f"exporting {found} (step {state['step']}, {options.weights} weights) -> {out} as {options.dtype}")

    stats, fp16 = measure(vae, options, use_mean=cfg.model.mode == "ae", log=log)
    lc = latent_config(stats, fp16)
    # diffusers' tiling decodes in tiles of sample_size pixels (and normalizes per tile): 512, as the
    # SD VAE, or the training/calibration size if larger; diffusers' default (32) made 32-px tiles
    vae.register_to_config(**lc, sample_size=max(TILE_SAMPLE_SIZE, cfg.data.resolution, options.resolution))

    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = staging_dir(out)
    try:
        tmp.mkdir()
        stored = copy.deepcopy(vae) if options.dtype == "fp32" else copy.deepcopy(vae).to(DTYPES[options.dtype])
        stored.save_pretrained(str(tmp), safe_serialization=True)
        umask_modes(tmp)  # safetensors writes its file 0600; the export is meant to be shared
        diff = verify(tmp, vae, options.dtype)
        meta = export_record(options, found, state, cfg, lc, stats, fp16, summary_file, diff)
        atomic_write_json(tmp / METADATA_FILE, meta)
        atomic_write_bytes(tmp / "README.md", model_card(meta).encode())
        publish_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log("reloaded with AutoencoderKL.from_pretrained: no missing/unexpected keys; max abs difference vs the "
        "training model: " + ", ".join(f"{k} {v:.3g}" for k, v in diff.items())
        + (f" (fp32 tolerance {FP32_TOLERANCE})" if options.dtype == "fp32" else f" (weights rounded to {options.dtype})"))
    log(f"wrote {out}")
    return ExportResult(out, found, int(state["step"]), stats, fp16, diff)


def run(options: ExportOptions) -> ExportResult:
    """`latentvae export SRC --out OUT` (a failed verification, ExportError, is not a user's mistake
    and keeps its traceback)."""
    return export(options)
