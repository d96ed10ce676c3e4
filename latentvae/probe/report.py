"""The probe's report: summary.json's figures per cache, the paired differences, and what compares.

    s = summarize(datas, results, opts, precision, processes)
    s["comparison"]                      # shapes per cache, groups of one shape, which figures compare across them
    report_markdown(s)                   # report.md

Caches of different families have latents of different shapes (kl 4 x H/8 x W/8; flux2, patchified,
128 x H/16 x W/16). The held-out loss is per element in normalized units, but a different shape is a
different task (other channels, other tokens per image), so losses and their differences compare only
between caches of one shape; the pixel-side figures compare across shapes. The report says so, and a
difference between shapes is never called resolved.
"""
from __future__ import annotations

import numpy as np

from ..options import ProbeOptions
from .data import ProbeData

ACROSS_SHAPES = ("scale_equivariance_psnr", "image_hf_share", "latent_hf_share", "train_seconds_mean")
WITHIN_SHAPE = ("heldout_loss_mean", "heldout_loss_std", "per_level_mean", "differences")
COMPARISON_NOTE = ("Across latent shapes compare: the scale-equivariance PSNR (on pixels), the image HF share (the "
                   "same images), the latent HF share (a share of each latent's own spectrum) and the training "
                   "seconds. The held-out loss, its levels and the differences compare only between caches of "
                   "one latent shape (the same channels and tokens per image): another shape is another task.")


def shape_text(shape) -> str:
    return "x".join(map(str, shape))


def comparison(datas: list[ProbeData]) -> dict:
    """Which caches compare with which: the learned shape of each, the groups of one shape, and the figures
    that compare across groups."""
    groups: dict[tuple, list[str]] = {}
    for d in datas:
        groups.setdefault(d.shape, []).append(d.label)
    return {"shapes": {d.label: shape_text(d.shape) for d in datas},
            "groups": [labels for labels in groups.values()], "one_shape": len(groups) == 1,
            "across_shapes": list(ACROSS_SHAPES), "within_shape_only": list(WITHIN_SHAPE), "note": COMPARISON_NOTE}


def shapes_warning(datas: list[ProbeData]) -> str | None:
    """The one line said when the caches' learned latents differ in shape; None when they are all one shape."""
    if len({d.shape for d in datas}) < 2:
        return None
    each = "; ".join(f"{d.label} {d.describe()}" for d in datas)
    return (f"note: the caches' latents differ in shape ({each}): held-out losses compare only between caches of "
            "one shape; the report says which figures compare across shapes")


def summarize(datas: list[ProbeData], results: dict, opts: ProbeOptions, precision: str, processes: int) -> dict:
    caches = {}
    for d in datas:
        rs = results[d.label]
        losses = [r["loss"] for r in rs]
        caches[d.label] = {
            "cache": str(d.cache), "vae": d.manifest["vae"].get("path"), "family": d.family, "class": d.class_name,
            "latent_shape": list(d.shape), "vae_latent_shape": list(d.vae_shape), "patch": d.patch,
            "tokens_per_image": d.tokens_per_image, "values_per_image": int(np.prod(d.shape)),
            "pixels_per_token": d.pixels_per_token,
            "train_rows": len(d.train_mean), "held_out_rows": len(d.val), "images": d.images,
            "held_out_images": d.held_out_images, "normalization": d.statistics,
            "heldout_loss_mean": float(np.mean(losses)), "heldout_loss_std": float(np.std(losses, ddof=1)) if len(rs) > 1 else None,
            "per_level_mean": np.mean([r["per_level"] for r in rs], axis=0).tolist(),
            "levels": rs[0]["levels"], "seeds": [{k: v for k, v in r.items() if k != "latent_statistics"} for r in rs],
            "train_seconds_mean": float(np.mean([r["train_seconds"] for r in rs])),
            "latent_statistics": next((r["latent_statistics"] for r in rs if "latent_statistics" in r), None),
        }
    labels = list(caches)
    base = labels[0]
    diffs = {}
    for other in labels[1:]:  # paired by seed: the same seed gives the same batches and noise
        d = [a["loss"] - b["loss"] for a, b in zip(results[other], results[base])]
        spread = float(np.std(d, ddof=1)) if len(d) > 1 else None
        same = caches[other]["latent_shape"] == caches[base]["latent_shape"]
        diffs[f"{other} - {base}"] = {"mean": float(np.mean(d)), "per_seed": d, "std_over_seeds": spread,
                                      "comparable": same,
                                      "resolved": None if spread is None or not same else bool(abs(np.mean(d)) > 2 * spread)}
    return {"recipe": {"preset": opts.preset, "objective": opts.objective, "steps": opts.steps,
                       "batch_size": opts.batch_size, "processes": processes, "lr": opts.lr,
                       "warmup_steps": opts.warmup_steps, "ema_decay": opts.ema_decay, "holdout": opts.holdout,
                       "noise_levels": opts.noise_levels, "seeds": opts.seeds, "precision": precision,
                       "units": "MSE per latent element, latents normalized per channel by each cache's measured "
                                "mean and std, in the layout its family's diffusion model sees"},
            "caches": caches, "differences": diffs, "comparison": comparison(datas)}


def _resolved(d: dict) -> str:
    if not d.get("comparable", True):
        return "not comparable: other latent shape"
    return "-" if d["resolved"] is None else str(d["resolved"])


def report_markdown(s: dict) -> str:
    r = s["recipe"]
    lines = ["# Diffusion probe", "",
             f"UNet2DModel preset `{r['preset']}`, {r['objective']} objective, {r['steps']} steps x batch "
             f"{r['batch_size']} x {r['processes']} process(es), lr {r['lr']}, EMA {r['ema_decay']}, precision "
             f"{r['precision']}, {r['seeds']} seed(s). Held-out loss: {r['units']}; mean over "
             f"{r['noise_levels']} noise levels (lower: easier to learn).", "",
             "| cache | family | latent learned (VAE latent) | tokens/image | held-out loss | std over seeds | "
             "train rows | held-out rows (images) | latent HF share | image HF share | scale-equivariance PSNR | "
             "train s |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, c in s["caches"].items():
        ls = c.get("latent_statistics") or {}
        spec = ls.get("spectrum") or {}
        std = "-" if c["heldout_loss_std"] is None else f"{c['heldout_loss_std']:.4f}"
        eq = ls.get("scale_equivariance_psnr")
        learned = shape_text(c["latent_shape"])
        if c.get("patch", 1) > 1:
            learned += f" ({shape_text(c['vae_latent_shape'])}, patchified {c['patch']}x{c['patch']})"
        lines.append(f"| {label} | {c.get('family', '-')} | {learned} | {c.get('tokens_per_image', '-')} | "
                     f"{c['heldout_loss_mean']:.4f} | {std} | {c['train_rows']} | "
                     f"{c['held_out_rows']} ({c['held_out_images']}) | "
                     f"{spec.get('latent_hf_share', float('nan')):.3f} | {spec.get('image_hf_share', float('nan')):.3f} | "
                     f"{'-' if eq is None else f'{eq:.2f}'} | {c['train_seconds_mean']:.0f} |")
    cmp = s.get("comparison") or {}
    if not cmp.get("one_shape", True):
        groups = "; ".join(", ".join(g) + f" ({cmp['shapes'][g[0]]})" for g in cmp["groups"])
        lines += ["", f"The caches' learned latents differ in shape: {groups}. {cmp['note']}"]
    if s["differences"]:
        lines += ["", "| difference (paired by seed) | mean | std over seeds | beyond 2 std |", "|---|---:|---:|---|"]
        for name, d in s["differences"].items():
            sd = "-" if d["std_over_seeds"] is None else f"{d['std_over_seeds']:.4f}"
            lines.append(f"| {name} | {d['mean']:+.4f} | {sd} | {_resolved(d)} |")
    levels = next(iter(s["caches"].values()))["levels"]
    lines += ["", "Per noise level (t: 0 clean, 1 pure noise):", "",
              "| cache | " + " | ".join(f"t={t:.2f}" for t in levels) + " |", "|---|" + "---:|" * len(levels)]
    for label, c in s["caches"].items():
        lines.append(f"| {label} | " + " | ".join(f"{v:.4f}" for v in c["per_level_mean"]) + " |")
    lines += ["", "Latent statistics (HF shares, scale equivariance) are of the VAE latent as stored, before any "
                  "patchify.", "", "Samples: " + ", ".join(f"`{g}`" for g in s.get("sample_grids", {}).values()), ""]
    return "\n".join(lines)
