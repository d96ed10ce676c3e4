"""The export job: open SRC, measure, write the factors where the family's pipeline reads them, stage,
verify the reload, publish (the package doc has the whole story).

    result = export(ExportOptions(src="runs/quickstart", out="out/my-vae", calibrate="data/samples/train"))
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..fsutil import atomic_write_bytes, atomic_write_json, remove_stale_staging, staged_folder
from ..options import ExportOptions, validated
from ..vae.model import DETERMINISTIC_LOGVAR
from .calibrate import (CONSUMER_WORDS, CalibrationConfig, Fp16Report, LatentStats, calibrate, check_resolution,
                        choose_convention, format_fp16, format_stats, fp16_check)
from .card import METADATA_FILE, model_card
from .evaluation import Evaluation, pick_evaluation
from .factors import FactorPlan, factor_plan, formula, gets_placeholder, latent_config, written_where
from .single_file import write_single_file
from .source import Source, describe, open_source
from .verify import FP32_TOLERANCE, cast, verify


@dataclass(frozen=True)
class ExportResult:
    out: Path
    checkpoint: Optional[Path]  # None unless SRC was a training run or checkpoint
    step: Optional[int]
    stats: Optional[LatentStats]
    fp16: Optional[Fp16Report]
    max_diff: dict[str, float] = field(default_factory=dict)  # encode/decode vs the source model
    source: str = ""
    format: str = "diffusers"
    evaluation: Optional[str] = None  # the summary.json entry whose figures went into the model card
    family: str = ""


def posterior_words(src: Source) -> str:
    """The model card's words for what `encode` returns and what the family's pipelines take from it."""
    lv, fam = src.lv, src.lv.family
    if not fam.stochastic:
        return f"none: {lv.class_name}.encode returns the latent itself (deterministic)"
    if not lv.stochastic:
        why = "model.mode ae never trained the log-variance, so it is" if src.is_run else "the log-variance is"
        return (f"deterministic: {why} pinned to {DETERMINISTIC_LOGVAR} (std ~3e-7), so latent_dist.sample() "
                "equals mode()")
    return (f"Gaussian: latent_dist.sample() = mean + std * noise; the {fam.name} family's consumers take "
            f"{CONSUMER_WORDS[fam.consumer]} ({fam.consumer_cite})")


def measure(src: Source, options: ExportOptions, log) -> tuple[Optional[LatentStats], Optional[Fp16Report]]:
    if options.calibrate is None:
        kept = "the unmeasured placeholder (identity)" if gets_placeholder(src) else "the source's own factors"
        log(f"latent statistics: NOT measured (no --calibrate); {written_where(src)} gets {kept}")
        return None, None
    stats = calibrate(src.lv, CalibrationConfig(options.calibrate, options.limit, options.resolution,
                                                options.convention, keep_latents=options.fp16_images,
                                                frames=options.frames, fps=options.fps))
    log(format_stats(stats))
    fp16 = fp16_check(src.lv, stats.sample_latents) if options.fp16_images > 0 else None
    log(format_fp16(fp16) if fp16 else "fp16 check: skipped (--fp16-images 0); force_upcast kept as it was")
    return stats, fp16


def export_record(options: ExportOptions, src: Source, plan: FactorPlan, stats: Optional[LatentStats],
                  fp16: Optional[Fp16Report], evaluation: Evaluation, diff: dict) -> dict[str, Any]:
    """latentvae_export.json: every fact of the export, machine-readable (the model card is made from it)."""
    from .card import data_seen

    run, lv, fam = src.is_run, src.lv, src.lv.family
    convention = stats.convention if stats else lv.convention
    return {"format": "latentvae-export-1", "output_format": options.format, "source": src.spec,
            "source_kind": lv.kind, "source_origin": {k: v for k, v in lv.origin.items() if v is not None} or None,
            "class": lv.class_name, "family": fam.name, "used_by": fam.used_by,
            "checkpoint": str(src.checkpoint) if run else None, "step": src.step, "weights": src.weights,
            "dtype": options.dtype, "latent_config": latent_config(src.vae), "formula": formula(convention),
            "factors": fam.factors(src.vae), "factors_written_to": written_where(src),
            "scaling_measured": plan.measured, "scaling_origin": plan.origin,
            "latent_statistics": stats.to_dict() if stats else None, "fp16": fp16.to_dict() if fp16 else None,
            "force_upcast": plan.force_upcast, "data": data_seen(src.cfg, src.state) if run else None,
            "training_config": src.cfg.to_dict() if run else None,
            "evaluation_file": str(evaluation.file) if evaluation.file else None,
            "evaluation_entry": evaluation.label, "evaluation": evaluation.figures,
            "evaluation_settings": evaluation.settings, "evaluation_note": evaluation.note,
            "max_abs_diff": diff, "posterior": posterior_words(src)}


def umask_modes(folder: Path) -> None:
    """Give every file in `folder` the mode a plain `open()` would (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def write_folder(src: Source, options: ExportOptions, out: Path, record) -> dict[str, float]:
    """The diffusers folder, staged beside OUT (fsutil.staged_folder), reloaded and compared, then renamed to OUT."""
    with staged_folder(out) as tmp:
        stored = cast(copy.deepcopy(src.vae), options.dtype)
        stored.save_pretrained(str(tmp), safe_serialization=True)
        umask_modes(tmp)  # safetensors writes its file 0600; the export is meant to be shared
        diff = verify(tmp, src.lv, options.dtype)
        meta = record(diff)
        atomic_write_json(tmp / METADATA_FILE, meta)
        atomic_write_bytes(tmp / "README.md", model_card(meta).encode())
    return diff


def check_before_work(src: Source, options: ExportOptions) -> None:
    """What this family or format cannot do, refused in one line before anything is measured or written."""
    lv = src.lv
    lv.require("export")
    if options.format == "single-file":
        lv.require("single-file")
    if options.calibrate is not None:
        choose_convention(lv, options.convention)
        check_resolution(lv, options.resolution)


def export(options: ExportOptions, log=print) -> ExportResult:
    """`options.src` (a training run or checkpoint, or any VAE load_vae reads) -> a verified diffusers folder
    or LDM single file `options.out`."""
    options = validated(options)  # the command line's checks for library callers too
    out, single = Path(options.out), options.format == "single-file"
    src = open_source(options, out)
    check_before_work(src, options)
    evaluation = pick_evaluation(src, options.eval_summary)
    log(f"exporting {describe(src)} -> {out} as {options.dtype}{' (LDM single file)' if single else ''}: "
        f"{src.lv.describe()}")
    if evaluation.file is not None and evaluation.figures is None:
        log(f"evaluation figures left out: {evaluation.note}")

    stats, fp16 = measure(src, options, log)
    plan = factor_plan(src, stats, fp16, options.resolution)
    plan.apply(src.vae)

    def record(diff: dict) -> dict:
        return export_record(options, src, plan, stats, fp16, evaluation, diff)

    if single:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out)
        diff = write_single_file(src, options, out, record, log)
        check = ("LDM layout: diffusers' convert_ldm_vae_checkpoint maps every tensor back onto the source weights; "
                 "reloaded with AutoencoderKL.from_single_file")
    else:
        diff = write_folder(src, options, out, record)
        check = f"reloaded with {src.lv.class_name}.from_pretrained: no missing/unexpected keys"
    bound = f"fp32 tolerance {FP32_TOLERANCE}" if options.dtype == "fp32" else f"weights rounded to {options.dtype}"
    log(f"{check}; max abs difference vs the source model: "
        + ", ".join(f"{k} {v:.3g}" for k, v in diff.items()) + f" ({bound})")
    log(f"wrote {out}")
    return ExportResult(out, src.checkpoint, src.step, stats, fp16, diff, src.spec, options.format, evaluation.label,
                        src.lv.family.name)


def run(options: ExportOptions) -> ExportResult:
    """`latentvae export SRC --out OUT` (a failed verification, ExportError, is not a user's mistake
    and keeps its traceback). A signal: one line saying whether OUT was written (interrupts.says_if_published)."""
    from ..interrupts import says_if_published

    with says_if_published(options.out, "export"):
        return export(options)

