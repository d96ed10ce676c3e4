"""The model card (README.md) of an export, made from its record (latentvae_export.json, built by job.py).

    text = model_card(meta)

Every fact in the card is a field of the record, so the two never disagree: where the weights
come from, the latent formula and what was written where (measured, kept or the placeholder), the
posterior, the fp16 finding, a run's data and training config, and the evaluation figures of these
very weights.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..fsutil import flatten

METADATA_FILE = "latentvae_export.json"
SOURCE_KINDS = {  # the record's origin["kind"] -> words for the model card
    "run": "latentvae training run", "folder": "diffusers folder", "pipeline": "the VAE of a diffusers pipeline",
    "hub": "Hugging Face hub repo", "single-file": "single weight file, LDM/SD layout",
    "taesd": "TAESD reference, AutoencoderTiny"}


def data_seen(cfg, state: dict) -> dict[str, Any]:
    """A run's training data, as far as its config and state.json tell."""
    d, t = cfg.data, cfg.train
    procs = int(state.get("num_processes", 1))
    seen = {"source": d.source, "kind": d.kind, "split": d.split, "val_source": d.val_source,
            "resolution": d.resolution, "short_side": [d.short_side_min, d.short_side_max], "flip": d.flip,
            "steps": int(state["step"]), "processes": procs,
            "crops_seen": int(state["step"]) * t.batch_size * t.grad_accum * procs,
            "bad_images": len(state.get("bad_images", []))}
    if Path(d.source).is_dir():
        from ..images import list_images
        try:
            seen["source_files"] = len(list_images(d.source))
        except FileNotFoundError:
            pass
    return seen


def _fmt(v) -> str:
    if v is None:
        return "not set"
    if isinstance(v, list):
        return ", ".join(f"{x:.4g}" for x in v)
    return str(v) if isinstance(v, bool) else f"{v:.6g}"


def _entries(factors: dict) -> list[str]:
    return ["| entry | value |", "|---|---|", *[f"| {k} | {_fmt(v)} |" for k, v in factors.items()]]


def scaling_section(meta: dict[str, Any]) -> list[str]:
    stats, f, where = meta["latent_statistics"], meta["formula"], meta["factors_written_to"]
    said = (f"The `{f['convention']}` formula: {f['formula']} (diffusers 0.42: pipelines/{f['diffusers']}; "
            "latentvae/vae/conventions.py).")
    factors = {k: v for k, v in meta["factors"].items() if k != "batch_norm_eps"}
    if stats is None and meta["scaling_origin"] == "placeholder":
        return ["**The latent factors were NOT measured** (exported without `--calibrate`).", "",
                f"{said} {where} holds the unmeasured placeholder, the identity of that formula, which no real "
                "model has. Measure them before training a diffusion model: "
                "`latentvae export SRC --out OUT --calibrate IMAGES`.", "", *_entries(factors)]
    if stats is None:
        return [f"**Not measured by this export**: the factors are those of {meta['scaling_origin']}, kept as "
                f"they were. {said} `latentvae export SRC --out OUT --calibrate IMAGES` measures them on your "
                "images.", "", *_entries(factors)]
    kl = stats["health"]["kl_per_element"]
    view = "the 2x2-patchified latent (per patchified channel), " if stats["patchified"] else ""
    lines = [f"Measured on {stats.get('inputs') or str(stats['images']) + ' images'} ({stats['resolution']}px, `{stats['source']}`), on {view}"
             f"{stats['measured']}, as its pipelines take it. {said} The entries below give latents of mean 0 "
             "and std 1 under it on those images (sd never shifts: std 1 only).", "", f"Written to: {where}.", "",
             *_entries(factors), "",
             "Measured per channel: mean " + _fmt(stats["channel_mean"]) + "; std " + _fmt(stats["channel_std"]) + ".",
             "", "Latent health (the posterior, per VAE latent channel): KL per element "
             + ("n/a (deterministic latent)" if kl is None else f"{kl:.4g} nats")
             + "; channels carrying no information: "
             + (", ".join(map(str, stats["health"]["dead_channels"])) or "none") + "."]
    return lines


def evaluation_section(meta: dict[str, Any]) -> list[str]:
    if meta["evaluation"] is None:
        return [meta["evaluation_note"]]
    settings = meta["evaluation_settings"] or {}
    on = ", ".join(f"{k} {settings[k]}" for k in ("images", "data", "fit", "max_side") if settings.get(k) is not None)
    lines = [f"From `{meta['evaluation_file']}`, {meta['evaluation_note']}" + (f" ({on})" if on else "") + ":", "",
             "| metric | value |", "|---|---|"]
    return lines + [f"| {k} | {v} |" for k, v in flatten(meta["evaluation"]).items()]


def fp16_section(meta: dict[str, Any]) -> list[str]:
    fp16 = meta["fp16"]
    found = f"Checked: {fp16['note']}." if fp16 else "Not checked (no calibration images, or --fp16-images 0)."
    return [f"{found} In the config: {meta['force_upcast']}."]


def model_card(meta: dict[str, Any]) -> str:
    cls, run = meta["class"], meta["checkpoint"] is not None
    origin = (f"From `{meta['checkpoint']}` (step {meta['step']}), {meta['weights']} weights" if run else
              f"Exported from `{meta['source']}` ({SOURCE_KINDS.get(meta['source_kind'], meta['source_kind'])}), "
              "with the weights it holds")
    lines = ["---", "library_name: diffusers", "tags: [autoencoder, vae, latentvae]", "---", "",
             f"# {cls} exported by latentvae", "", f"{origin}, stored as {meta['dtype']}. Family: "
             f"`{meta['family']}` ({meta['used_by']}).", "", "```python", f"from diffusers import {cls}",
             f"vae = {cls}.from_pretrained(\"path/to/this/folder\")", "```", "", "## Latent scaling", ""]
    lines += scaling_section(meta)
    lines += ["", "## Posterior", "", f"{meta['posterior']}.", "", "## fp16", "", *fp16_section(meta)]
    if run:
        lines += ["", "## Data seen in training", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in meta["data"].items()]
    else:
        lines += ["", "## Source", "", "Not trained by latentvae: no training config or training data is known to "
                  "this export.", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in (meta["source_origin"] or {"spec": meta["source"]}).items()
                  if v is not None]
    lines += ["", "## Evaluation", "", *evaluation_section(meta)]
    if run:
        lines += ["", "## Training config", "", "```json", json.dumps(meta["training_config"], indent=2,
                                                                      sort_keys=True), "```"]
    lines += ["", "## Export check", "",
              f"Reloaded with `{cls}.from_pretrained`: no missing or unexpected keys; weights identical to "
              f"the {'training' if run else 'source'} weights cast to {meta['dtype']}; max abs difference vs the "
              "source model: " + ", ".join(f"{k} {v:.3g}" for k, v in meta["max_abs_diff"].items()) + ".", ""]
    return "\n".join(lines)
