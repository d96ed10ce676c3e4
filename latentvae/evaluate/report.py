"""The evaluation report: per_image.csv, summary.json, report.md and spectrum.png, published whole.

    write_report(out, results, summary, settings)   # staged beside `out`, renamed into place (fsutil.staged_folder)
    markdown_table(summary["vaes"])                 # the figures, VAEs side by side
    vaes_table(summary["vaes"])                     # what each VAE is: family, class, latent layout, formula
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from .. import metrics
from ..fsutil import staged_folder, write_durable
from .inputs import PROTOCOLS
from .scoring import CSV_COLUMNS, SPECTRUM_BINS, VaeResult

TABLE_COLUMNS = {  # summary key -> (header, format)
    "psnr": ("PSNR dB ↑", "{:.2f}"), "psnr_pooled": ("pooled PSNR", "{:.2f}"), "ssim": ("SSIM ↑", "{:.4f}"),
    "lpips_alex": ("LPIPS-Alex ↓", "{:.4f}"), "lpips_vgg": ("LPIPS-VGG ↓", "{:.4f}"),
    "rfid": ("rFID ↓", "{:.2f}"),
    "hf_energy_ratio": ("HF energy ratio", "{:.3f}"), "laplacian_var_ratio": ("Laplacian var ratio", "{:.3f}"),
    "kl_per_element": ("KL/elem (nats)", "{:.3g}"), "latent_shape": ("latent", "{}"),
    "compression_ratio": ("compression", "{:.0f}x"),
    "latent_hf_share": ("latent HF share", "{:.3f}"), "image_hf_share": ("image HF share", "{:.3f}"),
    "scale_equivariance_psnr": ("scale-equiv. PSNR", "{:.2f}"), "encode_s_per_megapixel": ("enc s/MP", "{:.2f}"),
    "decode_s_per_megapixel": ("dec s/MP", "{:.2f}"),
}


def finite_or_none(value):
    """JSON has no inf/nan: they are written as null (PSNR of an exact copy is inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    return value


def markdown_table(summary: dict[str, dict], columns: dict = TABLE_COLUMNS) -> str:
    """The figures of `columns` (summary key -> (header, format)) any VAE has, one row per VAE."""
    keys = [k for k in columns if any(s.get(k) is not None for s in summary.values())]
    lines = ["| VAE | " + " | ".join(columns[k][0] for k in keys) + " |",
             "|---|" + "---:|" * len(keys)]
    for label, s in summary.items():
        cells = ["—" if s.get(k) is None else columns[k][1].format(s[k]) for k in keys]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def vaes_table(summary: dict[str, dict]) -> str:
    """One row per VAE: its family, class, latent layout (the VAE's latent, and what the pipeline patchifies it
    to), posterior and the pipeline formula its factors are for."""
    lines = ["| VAE | family | class | latent layout | posterior | pipeline formula | factors |",
             "|---|---|---|---|---|---|---|"]
    for label, s in summary.items():
        posterior = "Gaussian (KL reported)" if s["stochastic"] else "deterministic (no KL)"
        lines.append(f"| {label} | {s['family']} | {s['class']} | {s['latent_layout']} | {posterior} | "
                     f"{s['convention']} | {s['factors']} |")
    return "\n".join(lines)


def write_text(path: Path, text: str) -> None:
    """A file of the staging folder, written and fsynced (fsutil.write_durable)."""
    write_durable(path, lambda f: f.write(text.encode()))


def csv_text(results: list[VaeResult]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for r in results:
        for row in r.rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})
    return buf.getvalue()


def plot_spectra(path: Path, results: list[VaeResult], bins: int = SPECTRUM_BINS) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    freqs = (np.arange(bins) + 0.5) / bins * 0.5
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.plot(freqs, np.mean(r.spectrum_log_ratio, axis=0), label=r.label)
    ax.axhline(0, color="gray", lw=0.8)
    ax.axvline(metrics.HF_CUTOFF, color="gray", ls=":", lw=0.8)
    ax.set(xlabel="radial frequency (cycles/pixel)", ylabel="log10 power: reconstruction / original",
           title="Where reconstructions lose detail")
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_durable(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def is_report(folder: Path) -> bool:
    """An earlier evaluation report (replaced whole by the next one)."""
    return (folder / "summary.json").is_file()


def write_report(out: Path, results: list[VaeResult], summary: dict, settings: dict) -> None:
    """The report's files, into a hidden staging folder beside `out` that then replaces it whole."""
    with staged_folder(out) as tmp:
        write_report_files(tmp, results, summary, settings)


def write_report_files(out: Path, results: list[VaeResult], summary: dict, settings: dict) -> None:
    """per_image.csv, summary.json, spectrum.png and report.md into the folder `out`."""
    write_text(out / "per_image.csv", csv_text(results))
    write_text(out / "summary.json", json.dumps(finite_or_none({"settings": settings, "vaes": summary}), indent=2)
               + "\n")
    plot_spectra(out / "spectrum.png", results, settings["spectrum_bins"])
    md = [f"# VAE evaluation: {settings['images']} images from `{settings['data']}`", "",
          report_settings_text(settings), "", markdown_table(summary), "", "The VAEs:", "", vaes_table(summary), ""]
    if len({s["family"] for s in summary.values()}) > 1:
        md += ["The families' latents differ in shape: the pixel figures (PSNR, SSIM, LPIPS, rFID, sharpness, "
               "scale-equivariance PSNR) compare across them, on the same pixels; KL per element, the latent "
               "statistics and the compression count the VAE latent as each class returns it (before any "
               "pipeline patchify).", ""]
    counts = sorted({s["rfid_images"] for s in summary.values() if s.get("rfid_images")})
    if counts:
        md += [f"rFID: FID (torch-fidelity's Inception-v3, 2048-d pool features) between the "
               f"{'/'.join(map(str, counts))} originals and their reconstructions. FID is biased upward at small "
               "counts (published rFIDs use 5,000-50,000 images): compare it only with figures from the same "
               "images.", ""]
    md += ["![spectrum](spectrum.png)", ""]
    write_text(out / "report.md", "\n".join(md))


def report_settings_text(settings: dict) -> str:
    """report.md's paragraph of what fixes the numbers: protocol, fit, latent, precision, tiling."""
    multiple = settings["fit_multiple"]
    if settings["protocol"] == "full":
        fit = {"crop": "center-cropped", "pad": "reflect-padded (scored on the original pixels)"}[settings["fit"]]
        scale = f"downscaled to at most {settings['max_side']} px on the long side, " if settings["max_side"] else ""
        images = (f"Protocol `full`: images {scale}{fit} to a multiple of {multiple} (every VAE's downsampling "
                  "factor: all see the same pixels)")
    else:
        images = f"Protocol `{settings['protocol']}`: {PROTOCOLS[settings['protocol']].description}"
    latent = "posterior mean" if settings["latent"] == "mean" else f"a posterior sample (seed {settings['seed']})"
    tiles = ""
    if settings["tiles"]:
        tiles = "; tiled encode/decode (diffusers): " + "; ".join(
            f"{label}: " + ", ".join(f"{k.removeprefix('tile_')} {v:g}" if isinstance(v, float) else
                                     f"{k.removeprefix('tile_')} {v}" for k, v in t.items())
            for label, t in settings["tiles"].items())
    return (f"{images}; z = {latent}; precision_resolved: {settings['precision_resolved']} "
            f"(--mixed-precision {settings['mixed_precision']}) on {settings['device']}{tiles}. Metrics on uint8 "
            "outputs; PSNR and the other columns are per-image means (pooled PSNR: MSE pooled over all images). "
            "Conventions: docs/evaluation.md.")
