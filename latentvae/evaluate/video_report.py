"""The video evaluation's report: per_clip.csv, per_frame.csv, summary.json, report.md and strips/, written into
the staging folder video.py holds open (fsutil.staged_folder) and published whole.

    strip_png(clip_u8, reconstruction_u8, 5)                # PNG: 5 evenly spaced frames, original over rec.
    write_strip(folder, "wan", 0, "a.mp4#clip0", ...)       # into the staging folder, as clips are scored
    write_report_files(folder, results, summary, settings)  # the tables, at the end
    video_table(summary["vaes"])                             # the figures, VAEs side by side

A strip is (2H) x (K W) pixels: K frames (--strip-frames, evenly spaced over the clip, first and last included;
every frame of a shorter clip) of the original in the top row and of the reconstruction below, no gaps, one PNG
per clip and VAE at strips/VAE/NNNN-CLIP.png (NNNN: the clip's place in per_clip.csv).
"""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..fsutil import write_durable
from .report import TABLE_COLUMNS, finite_or_none, markdown_table, vaes_table, write_text

CLIP_COLUMNS = ("vae", "clip", "video_frames", "width", "height", "eval_width", "eval_height", "frames",
                "latent_shape", "psnr", "ssim", "lpips_alex", "lpips_vgg", "tpsnr", "kl_per_element",
                "encode_s", "decode_s")
FRAME_COLUMNS = ("vae", "clip", "frame", "source_frame", "psnr", "ssim", "lpips_alex", "lpips_vgg")
VIDEO_COLUMNS = {  # summary key -> (header, format)
    **{k: TABLE_COLUMNS[k] for k in ("psnr", "psnr_pooled", "ssim", "lpips_alex", "lpips_vgg")},
    "tpsnr": ("temporal PSNR dB ↑", "{:.2f}"), "fvd": ("FVD ↓", "{:.2f}"),
    "kl_per_element": TABLE_COLUMNS["kl_per_element"], "latent_shape": ("latent (C x T' x H' x W')", "{}"),
    "compression_ratio": ("compression", "{:.0f}x"), "encode_s_per_clip": ("enc s/clip", "{:.2f}"),
    "decode_s_per_clip": ("dec s/clip", "{:.2f}"),
}
STRIPS_SHOWN = 4  # clips whose strips report.md shows inline


def strip_frames(t: int, k: int) -> list[int]:
    """`k` evenly spaced frame indices of a `t`-frame clip, first and last included (all of them if t <= k)."""
    if t <= k:
        return list(range(t))
    return sorted({int(round(v)) for v in np.linspace(0, t - 1, k)})


def strip_png(ref_u8: torch.Tensor, out_u8: torch.Tensor, k: int) -> bytes:
    """uint8 (3, T, H, W) original and reconstruction -> a PNG: a row of `k` original frames over the same
    frames reconstructed, (2H) x (k W) pixels."""
    idx = strip_frames(ref_u8.shape[1], k)

    def row(x: torch.Tensor) -> torch.Tensor:  # (3, T, H, W) -> (H, k W, 3)
        return torch.cat([x[:, t] for t in idx], dim=2).permute(1, 2, 0)

    buf = io.BytesIO()
    Image.fromarray(torch.cat([row(ref_u8), row(out_u8)], dim=0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def safe_name(text: str) -> str:
    """A file name of a label or a clip name ("a/b.mp4#clip2" -> "a_b.mp4_clip2")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def strip_path(label: str, k: int, clip: str) -> str:
    return f"strips/{safe_name(label)}/{k:04d}-{safe_name(clip)}.png"


def video_table(summary: dict[str, dict]) -> str:
    return markdown_table(summary, VIDEO_COLUMNS)


def csv_text(rows: list[dict], columns: tuple[str, ...]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buf.getvalue()


def write_strip(folder: Path, label: str, k: int, clip: str, ref_u8: torch.Tensor, out_u8: torch.Tensor,
                frames: int) -> str:
    """Clip k's strip for VAE `label` into the report folder `folder`; returns its path there."""
    rel = strip_path(label, k, clip)
    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
    write_durable(folder / rel, lambda f: f.write(strip_png(ref_u8, out_u8, frames)))
    return rel


def write_report_files(out: Path, results: list, summary: dict, settings: dict) -> None:
    """per_clip.csv, per_frame.csv, summary.json and report.md into the report folder `out` (results:
    video.VideoResult per VAE; the strips are there already)."""
    write_text(out / "per_clip.csv", csv_text([row for r in results for row in r.rows], CLIP_COLUMNS))
    write_text(out / "per_frame.csv", csv_text([row for r in results for row in r.frame_rows], FRAME_COLUMNS))
    write_text(out / "summary.json", json.dumps(finite_or_none({"settings": settings, "vaes": summary}), indent=2)
               + "\n")
    write_text(out / "report.md", report_text(results, summary, settings))


def report_text(results: list, summary: dict, settings: dict) -> str:
    """report.md: what fixes the numbers, the figures side by side, what each VAE is, what each figure means,
    the clips left out and a few strips."""
    h, w = settings["eval_size"]
    fps = f"{settings['fps']:g} fps" if settings["fps"] else "each video's own frame rate"
    latent = ("posterior mean" if settings["latent"] == "mean"
              else f"a posterior sample (seed {settings['seed']} + the clip's index)")
    md = [f"# VAE evaluation: {settings['clips_scored']} clips of {settings['frames']} frames from "
          f"{settings['videos']} videos in `{settings['data']}`", "",
          f"Clips of {settings['frames']} frames at {fps} (1 + {settings['frame_step']}k: every VAE's clip rule), "
          f"each frame resized to cover {h}x{w} and center-cropped (sides multiples of {settings['fit_multiple']}: "
          f"every VAE's spatial multiple); z = {latent}; precision_resolved: {settings['precision_resolved']} "
          f"(--mixed-precision {settings['mixed_precision']}) on {settings['device']}"
          + ("; tiled encode/decode" if settings["tiles"] else "") + ".", "",
          video_table(summary), "", "The VAEs:", "", vaes_table(summary), "", *definitions(settings)]
    if settings["skipped"]:
        md += [f"Left out ({len(settings['skipped'])}):", ""]
        md += [f"- `{s['clip']}`: {s['reason']}" for s in settings["skipped"]] + [""]
    md += ["Strips (original frames over reconstructed frames; every clip's in `strips/`):", ""]
    for r in results:
        md += [f"![{r.label} {clip}]({path})" for clip, path in r.strips[:STRIPS_SHOWN]]
    return "\n".join(md + [""])


def definitions(settings: dict) -> list[str]:
    """What each figure is (docs/evaluation.md, Videos, says the same)."""
    lines = ["Figures: PSNR, SSIM and LPIPS are computed on each frame (uint8 pixels, as for images), averaged over "
             "the clip's frames, then over clips (per-frame values: per_frame.csv; per-clip: per_clip.csv); pooled "
             "PSNR pools the squared error over every frame of every clip. Temporal PSNR is the PSNR (peak 255) "
             "between the frame differences x[t+1] - x[t] of the reconstruction and of the original, over every "
             "frame pair and pixel, averaged over clips: an error that stays put from frame to frame cancels in "
             "the differences, flicker does not, so flicker lowers it far more than it lowers per-frame PSNR.", ""]
    i3d = settings["i3d"]
    if i3d:
        lines += [f"FVD: the Fréchet distance between I3D features ({i3d['features']} logits of `{i3d['weights']}`) "
                  f"of the original clips and of their reconstructions, on windows of {i3d['frames']} consecutive "
                  f"frames resized to {i3d['size']}x{i3d['size']}. FVD is biased upward at small counts (published "
                  "figures use thousands of clips): compare it only with figures from the same clips.", ""]
    else:
        lines += ["FVD left out: it needs I3D weights, `--i3d PATH` (docs/evaluation.md says how to convert them).",
                  ""]
    return lines
