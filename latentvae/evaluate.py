"""Evaluate any set of autoencoders side by side: PSNR, SSIM, LPIPS, rFID, sharpness, rate, speed.

    latentvae evaluate --vae runs/quickstart --vae taesd:sd --data IMAGES --out REPORT [--max-side 1024]
    latentvae evaluate --vae VAE --data user/dataset --split validation --image-column img --limit 100 --out REPORT
    latentvae evaluate --vae taesd:sd --data IMAGES --protocol imagenet256 --inception-weights W.safetensors --out R
    python eval/evaluate.py --vae VAE [--vae VAE ...] --data IMAGES --out REPORT      # the same command

Each VAE is a diffusers folder, a training run or checkpoint, an LDM .safetensors file or
`taesd:sd|sdxl|sd3|flux` (anything `loading.load_autoencoder` accepts). `--data` is an image folder
or a `datasets` dataset (sources.open_source; `--limit N`: its first N images). Under `--protocol
full` (default) every image is reconstructed whole, at full resolution (or downscaled to --max-side
first), center-cropped (--fit crop, default) or reflect-padded (--fit pad) to a multiple of the
downsampling factor; `imagenet256`/`coco256` take the central 256x256 after a bicubic short-side
resize to 256 (PROTOCOLS). z is the posterior mean (`--latent sample`: a seeded draw); the VAE runs
in fp32 unless --mixed-precision says otherwise; `--tiling` uses diffusers' tiled encode/decode.
rFID (fid.py, torch-fidelity's Inception) is reported where its weights are found. REPORT gets
`per_image.csv`, `summary.json` (its "settings": the options, as resolved), `report.md` (the
table side by side) and `spectrum.png` (radial power spectrum of the
reconstructions over the originals). Every input is checked before the work starts; the report is
written under a hidden name beside REPORT and renamed into place, so REPORT is always a whole
report (an earlier one is replaced only then; a signal's line says whether it was), and a folder that
is not a report is never written into. docs/evaluation.md states the conventions. This module owns the
evaluation loop and the report.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny

from . import fid, metrics, runs
from .errors import BadInputError
from .fsutil import fsync_dir, publish_folder, write_durable
from .images import BadImage, center_crop_to_multiple, cover_crop, downscale_long_side, load_rgb, to_tensor, to_uint8
from .vae.loading import NotAnAutoencoder, load_autoencoder, with_flag
from .vae.model import configure_tiling, decode, downsample_factor, encode_moments, latent_channels
from .options import EvaluateOptions
from .perceptual import load_lpips
from .precision import AUTOCAST_DTYPES, autocast, cpu_capability, resolve_mixed_precision
from .preprocess import peek_size
from .sources import ImageSource, open_source
from .train.losses import kl_per_element as kl_to_standard_normal

SPECTRUM_BINS = 32  # rings of spectrum.png, up to Nyquist
CSV_COLUMNS = ("vae", "image", "width", "height", "eval_width", "eval_height", "latent_shape", "psnr", "ssim",
               "lpips_alex", "lpips_vgg", "hf_energy_ratio", "laplacian_var_ratio", "kl_per_element",
               "encode_s", "decode_s")
# columns averaged over images into summary.json (per-image mean)
MEAN_COLUMNS = ("psnr", "ssim", "lpips_alex", "lpips_vgg", "hf_energy_ratio", "laplacian_var_ratio", "kl_per_element")


@dataclass(frozen=True)
class Protocol:
    resolution: int  # 0: each image whole; else short side resized to it (bicubic, antialiased), central square
    description: str


PROTOCOLS = {  # --protocol; docs/evaluation.md says which published figures used which
    "full": Protocol(0, "each image whole (after the optional --max-side downscale), fitted to the factor by --fit"),
    "imagenet256": Protocol(256, "short side resized to 256 (bicubic, antialiased), central 256x256 crop: the "
                                 "ImageNet-val protocol of LightningDiT / VA-VAE and EQ-VAE tables"),
    "coco256": Protocol(256, "short side resized to 256 (bicubic, antialiased), central 256x256 crop: the COCO 2017 "
                             "val protocol of the sd-vae-ft-mse / ft-ema model card"),
}


# ----------------------------------------------------------------------------- fitting images to the factor
def fit_crop(x: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(network input, reference): both the central crop to a multiple of `factor`."""
    x = center_crop_to_multiple(x, factor)
    return x, x


def fit_pad(x: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(network input, reference): the image reflect-padded right/bottom; the reference is the original."""
    h, w = x.shape[-2:]
    ph, pw = -h % factor, -w % factor
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), x


FITS: dict[str, Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]] = {"crop": fit_crop, "pad": fit_pad}


def open_images(opts: EvaluateOptions) -> ImageSource:
    """--data (a folder or a `datasets` dataset) as a source, cut to its first --limit images."""
    src = open_source(opts.data, opts.data_kind, opts.split, opts.image_column)
    return src.subset(list(range(min(opts.limit, len(src))))) if opts.limit else src


def image_name(src: ImageSource, i: int, data: str) -> str:
    """per_image.csv's name of image i: a file by its path below --data, a dataset row as `DATA:SPLIT[ROW]`."""
    name = src.name(i)
    try:
        return Path(name).relative_to(data).as_posix()
    except ValueError:
        return name


def load_eval_image(src: ImageSource, i: int, max_side: int = 0,
                    resolution: int = 0) -> tuple[torch.Tensor, tuple[int, int]]:
    """(1, 3, H, W) in [-1, 1] after the optional downscale (or, with `resolution`, the central square of that
    side after a bicubic short-side resize: images.cover_crop), and the image's own (width, height) as displayed.

    An image that cannot be decoded is a BadInputError: every VAE must see the same images."""
    try:
        item = src.raw(i)
        size = peek_size(item)  # from the header, EXIF orientation applied, as load_rgb does
        # a fixed-resolution protocol decodes at full scale, as the published tables' loaders did
        img = load_rgb(item, src.max_pixels, draft_size=(max_side, max_side) if max_side else None)
    except BadImage as e:
        where = "" if str(e).startswith(src.name(i)) else f"{src.name(i)}: "
        raise BadInputError(f"{where}{e}; every VAE is scored on the same images: remove or fix it in --data") from e
    img = cover_crop(img, (resolution, resolution))[0] if resolution else downscale_long_side(img, max_side)
    return to_tensor(img)[None], size or img.size


# ----------------------------------------------------------------------------- one image through one VAE
@dataclass
class Reconstruction:
    x_hat: torch.Tensor  # (1, 3, H, W) in [-1, 1], same size as the reference
    mean: torch.Tensor
    logvar: Optional[torch.Tensor]
    encode_s: float
    decode_s: float


@torch.no_grad()
def reconstruct(vae, x: torch.Tensor, reference_hw: tuple[int, int], dtype=None,
                generator: Optional[torch.Generator] = None) -> Reconstruction:
    """Encode, decode the posterior mean (or, with `generator`, a draw mean + std * eps; a deterministic
    encoder has only its mean), and cut the output back to the reference size."""
    device = next(vae.parameters()).device
    x = x.to(device)
    with autocast(device.type, dtype):
        t0 = time.perf_counter()
        mean, logvar = encode_moments(vae, x)
        z = mean
        if generator is not None and logvar is not None:
            eps = torch.randn(mean.shape, generator=generator).to(device, mean.dtype)  # CPU draws: any device alike
            z = mean + torch.exp(0.5 * logvar) * eps
        t1 = time.perf_counter()
        x_hat = decode(vae, z)
        t2 = time.perf_counter()
    h, w = reference_hw
    return Reconstruction(x_hat[..., :h, :w].float().cpu(), mean.float().cpu(),
                          None if logvar is None else logvar.float().cpu(), t1 - t0, t2 - t1)


def hwc_uint8(x: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1] -> (H, W, 3) uint8"""
    return to_uint8(x[0]).permute(1, 2, 0).numpy()


def hwc_float(x: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1] -> (H, W, 3) float64 in [0, 1], not quantized"""
    return ((x[0].double().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def warm_up(vae, factor: int, dtype=None) -> None:
    """One small forward first, so one-time kernel setup is not timed."""
    reconstruct(vae, torch.zeros(1, 3, 8 * factor, 8 * factor), (8 * factor, 8 * factor), dtype)


# ----------------------------------------------------------------------------- a whole evaluation
@dataclass
class VaeResult:
    label: str
    source: str
    rows: list[dict] = field(default_factory=list)
    spectrum_log_ratio: list[np.ndarray] = field(default_factory=list)
    squared_error: float = 0.0
    values: int = 0
    rfid: Optional[float] = None
    rfid_images: int = 0
    moments: Optional[object] = None  # moments.LatentMoments of the posteriors, merged over images
    latent_hf: list[float] = field(default_factory=list)  # per image: high-frequency share of the latent
    image_hf: list[float] = field(default_factory=list)  # ... and of the image (latent_stats.py)
    equivariance: list[tuple[float, int]] = field(default_factory=list)  # (squared error, values) per image

    def add(self, row: dict, ref_u8: np.ndarray, out_u8: np.ndarray, out_float: np.ndarray) -> None:
        """One image's CSV row, and its share of the pooled PSNR and of the spectrum."""
        self.rows.append(row)
        self.squared_error += metrics.squared_error_sum(ref_u8, out_u8)
        self.values += ref_u8.size
        _, p_ref = metrics.radial_power_spectrum(metrics.luma(ref_u8), SPECTRUM_BINS)
        _, p_out = metrics.radial_power_spectrum(metrics.luma(out_float), SPECTRUM_BINS)
        self.spectrum_log_ratio.append(np.log10(np.maximum(p_out, 1e-20) / np.maximum(p_ref, 1e-20)))


def score_image(result: VaeResult, name: str, size: tuple[int, int], ref: torch.Tensor, rec: Reconstruction,
                stochastic: bool, lpips_models: dict) -> dict:
    """One (VAE, image) row of per_image.csv, added to `result`."""
    ref_u8, out_u8, out_float = hwc_uint8(ref), hwc_uint8(rec.x_hat), hwc_float(rec.x_hat)
    kl = float(kl_to_standard_normal(rec.mean, rec.logvar).mean()) if stochastic and rec.logvar is not None else None
    row = {"vae": result.label, "image": name, "width": size[0], "height": size[1],
           "eval_width": ref.shape[-1], "eval_height": ref.shape[-2],
           "latent_shape": "x".join(map(str, rec.mean.shape[1:])),
           **metrics.image_metrics(ref_u8, out_u8, out_float, lpips_models),
           "kl_per_element": kl, "encode_s": rec.encode_s, "decode_s": rec.decode_s}
    result.add(row, ref_u8, out_u8, out_float)
    return row


@dataclass
class Rfid:
    """rFID's Inception and the originals' feature statistics, computed once per kind of reference."""
    extractor: torch.nn.Module
    weights: str  # where the weights came from, for the settings
    references: dict = field(default_factory=dict)  # (fit, factor) -> fid.FeatureStats of the reference images

    def reference_key(self, fit: str, factor: int) -> tuple:
        return (fit, factor if fit == "crop" else 0)  # padding scores the original pixels, whatever the factor


def evaluate_vae(label: str, source: str, vae, src: ImageSource, opts: EvaluateOptions, lpips_models: dict,
                 log=print, rfid: Optional[Rfid] = None) -> VaeResult:
    """Reconstruct every image with one VAE and score it; one CSV row per image; rFID where `rfid` is given."""
    factor, fit = downsample_factor(vae), FITS[opts.fit]
    device = next(vae.parameters()).device
    dtype = AUTOCAST_DTYPES[resolve_mixed_precision(opts.mixed_precision, device.type)]
    warm_up(vae, factor, dtype)
    stochastic = trained_stochastic(source, vae)
    generator = torch.Generator().manual_seed(opts.seed) if opts.latent == "sample" else None
    resolution = PROTOCOLS[opts.protocol].resolution
    key = rfid.reference_key(opts.fit, factor) if rfid else None
    ref_stats = fid.FeatureStats() if rfid and key not in rfid.references else None
    rec_stats = fid.FeatureStats() if rfid else None
    result = VaeResult(label, source)
    for i in range(len(src)):
        name = image_name(src, i, opts.data)
        x, size = load_eval_image(src, i, opts.max_side, resolution)
        try:
            x_in, ref = fit(x, factor)
        except BadInputError as e:
            raise BadInputError(f"{name}: {e}") from e
        rec = reconstruct(vae, x_in, ref.shape[-2:], dtype, generator)
        row = score_image(result, name, size, ref, rec, stochastic, lpips_models)
        add_latent_statistics(result, vae, x_in, rec, stochastic, factor, dtype)
        if rfid:  # the same uint8 pixels the other metrics see
            rec_stats.add(rfid.extractor, to_uint8(rec.x_hat))
            if ref_stats is not None:
                ref_stats.add(rfid.extractor, to_uint8(ref))
        log(f"  {label} {name} {ref.shape[-1]}x{ref.shape[-2]}: PSNR {row['psnr']:.2f} SSIM {row['ssim']:.4f} "
            f"enc {rec.encode_s:.2f}s dec {rec.decode_s:.2f}s")
    if rfid:
        if ref_stats is not None:
            rfid.references[key] = ref_stats
        result.rfid_images = rec_stats.n
        result.rfid = fid.frechet_distance(rfid.references[key], rec_stats) if rec_stats.n >= 2 else None
    return result


@torch.no_grad()
def add_latent_statistics(result: VaeResult, vae, x: torch.Tensor, rec: Reconstruction, stochastic: bool, factor: int,
                          dtype=None) -> None:
    """One image's share of the latent-space statistics (latent_stats.py): the posterior's channel moments,
    the high-frequency share of latent and image, and scale equivariance (decode of the 2x-downsampled
    latent against the 2x-downsampled image) where the image's sides are multiples of 2 x the factor."""
    from .latent_stats import downsample, high_frequency_share
    from .vae.moments import batch_moments, merge_moments

    result.moments = merge_moments(result.moments, batch_moments(rec.mean, rec.logvar if stochastic else None))
    result.latent_hf.append(high_frequency_share(rec.mean))
    result.image_hf.append(high_frequency_share(metrics.luma(hwc_uint8(x))))
    if x.shape[-1] % (2 * factor) or x.shape[-2] % (2 * factor):
        return
    device = next(vae.parameters()).device
    with autocast(device.type, dtype):
        y = decode(vae, downsample(rec.mean, 2).to(device)).float().cpu()
    a, b = to_uint8(downsample(x.float(), 2)).numpy(), to_uint8(y).numpy()
    result.equivariance.append((metrics.squared_error_sum(a, b), a.size))


def latent_summary(result: VaeResult) -> dict:
    """summary.json's latent-space statistics of one VAE (docs/probe.md explains them)."""
    from .vae.moments import channel_mean_std

    if result.moments is None:
        return {}
    mean, std = channel_mean_std(result.moments)
    kl = None if result.moments.kl_sum is None else (result.moments.kl_sum / result.moments.count).tolist()
    sq, n = sum(e for e, _ in result.equivariance), sum(k for _, k in result.equivariance)
    return {"latent_channel_mean": mean.tolist(), "latent_channel_std": std.tolist(), "latent_kl_per_channel": kl,
            "latent_hf_share": float(np.mean(result.latent_hf)), "image_hf_share": float(np.mean(result.image_hf)),
            "scale_equivariance_psnr": metrics.pooled_psnr(sq, n) if n else None,
            "scale_equivariance_images": len(result.equivariance)}


def trained_stochastic(spec: str, vae) -> bool:
    """Was z sampled from the posterior in training? False for deterministic encoders
    (AutoencoderTiny) and for `model.mode=ae` runs (their logvar head was never trained, so a KL
    would be meaningless); True for other AutoencoderKLs."""
    if isinstance(vae, AutoencoderTiny):
        return False
    source = getattr(vae, "latentvae_source", None) or {}
    if source.get("kind") == "run":  # the checkpoint folder loading.py read (whatever the spec's form)
        return runs.read_state(Path(source["path"]))["config"]["model"].get("mode", "vae") != "ae"
    return True


def _mean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarize(result: VaeResult, vae) -> dict:
    """summary.json's entry for one VAE: per-image means, pooled PSNR, rFID, shapes, rate, speed."""
    rows, f, c = result.rows, downsample_factor(vae), latent_channels(vae)
    megapixels = sum(r["eval_width"] * r["eval_height"] for r in rows) / 1e6
    out = {"source": result.source, "class": type(vae).__name__,
           "parameters": sum(p.numel() for p in vae.parameters()), "images": len(rows)}
    out.update({k: _mean([r.get(k) for r in rows]) for k in MEAN_COLUMNS})
    out["psnr_pooled"] = metrics.pooled_psnr(result.squared_error, result.values)
    if result.rfid_images:
        out.update(rfid=result.rfid, rfid_images=result.rfid_images)
    out.update({"latent_channels": c, "downsample_factor": f, "latent_shape": f"{c} x H/{f} x W/{f}",
                "compression_ratio": 3 * f * f / c,
                "encode_s_per_megapixel": sum(r["encode_s"] for r in rows) / megapixels,
                "decode_s_per_megapixel": sum(r["decode_s"] for r in rows) / megapixels})
    out.update(latent_summary(result))
    return out


def finite_or_none(value):
    """JSON has no inf/nan: they are written as null (PSNR of an exact copy is inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------- the report
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


def markdown_table(summary: dict[str, dict]) -> str:
    keys = [k for k in TABLE_COLUMNS if any(s.get(k) is not None for s in summary.values())]
    lines = ["| VAE | " + " | ".join(TABLE_COLUMNS[k][0] for k in keys) + " |",
             "|---|" + "---:|" * len(keys)]
    for label, s in summary.items():
        cells = ["—" if s.get(k) is None else TABLE_COLUMNS[k][1].format(s[k]) for k in keys]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
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


def check_report_folder(out: Path) -> None:
    """REPORT must be new, empty or an earlier report (it has summary.json): never someone's other folder."""
    if out.exists() and not out.is_dir():
        raise BadInputError(f"--out {out} exists and is not a folder; expected a new folder or an earlier report")
    if out.is_dir() and any(out.iterdir()) and not (out / "summary.json").is_file():
        raise BadInputError(f"--out {out} is a non-empty folder that is not an evaluation report (no summary.json); "
                            "choose a new or empty folder")


def write_report(out: Path, results: list[VaeResult], summary: dict, settings: dict) -> None:
    """The report's files, into a hidden staging folder beside `out` that then replaces it whole."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed evaluation: never published
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        write_report_files(tmp, results, summary, settings)
        fsync_dir(tmp)
        publish_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_report_files(out: Path, results: list[VaeResult], summary: dict, settings: dict) -> None:
    """per_image.csv, summary.json, spectrum.png and report.md into the folder `out`."""
    write_text(out / "per_image.csv", csv_text(results))
    write_text(out / "summary.json", json.dumps(finite_or_none({"settings": settings, "vaes": summary}), indent=2)
               + "\n")
    plot_spectra(out / "spectrum.png", results, settings["spectrum_bins"])
    md = [f"# VAE evaluation: {settings['images']} images from `{settings['data']}`", "",
          report_settings_text(settings), "", markdown_table(summary), ""]
    counts = sorted({s["rfid_images"] for s in summary.values() if s.get("rfid_images")})
    if counts:
        md += [f"rFID: FID (torch-fidelity's Inception-v3, 2048-d pool features) between the "
               f"{'/'.join(map(str, counts))} originals and their reconstructions. FID is biased upward at small "
               "counts (published rFIDs use 5,000-50,000 images): compare it only with figures from the same "
               "images.", ""]
    md += ["![spectrum](spectrum.png)", ""]
    write_text(out / "report.md", "\n".join(md))


def report_settings_text(settings: dict) -> str:
    """report.md's paragraph of what fixes the numbers: protocol, latent, precision, tiling."""
    if settings["protocol"] == "full":
        fit = {"crop": "center-cropped", "pad": "reflect-padded (scored on the original pixels)"}[settings["fit"]]
        scale = f"downscaled to at most {settings['max_side']} px on the long side, " if settings["max_side"] else ""
        images = f"Protocol `full`: images {scale}{fit} to a multiple of each VAE's downsampling factor"
    else:
        images = f"Protocol `{settings['protocol']}`: {PROTOCOLS[settings['protocol']].description}"
    latent = "posterior mean" if settings["latent"] == "mean" else f"a posterior sample (seed {settings['seed']})"
    tiles = ""
    if settings["tiles"]:
        tiles = "; tiled encode/decode (diffusers): " + ", ".join(
            f"{label} tiles {t['tile_sample_min_size']} px / {t['tile_latent_min_size']} latent, overlap "
            f"{t['tile_overlap_factor']:g}" for label, t in settings["tiles"].items())
    return (f"{images}; z = {latent}; precision_resolved: {settings['precision_resolved']} "
            f"(--mixed-precision {settings['mixed_precision']}) on {settings['device']}{tiles}. Metrics on uint8 "
            "outputs; PSNR and the other columns are per-image means (pooled PSNR: MSE pooled over all images). "
            "Conventions: docs/evaluation.md.")


def vae_label(spec: str, taken: set[str]) -> str:
    """A short unique column name: `taesd:sd` as is, a path by its folder/file name."""
    base = spec if ":" in spec and not Path(spec).exists() else (Path(spec).name or spec)
    label, i = base, 2
    while label in taken:
        label, i = f"{base}#{i}", i + 1
    taken.add(label)
    return label


def load_vae(spec: str, flag: str = "--vae"):
    """load_autoencoder, with `flag` leading the message of a NotAnAutoencoder."""
    try:
        return load_autoencoder(spec)
    except NotAnAutoencoder as e:
        raise with_flag(flag, spec, e) from e


def load_all(specs: tuple[str, ...], device: torch.device,
             flag: str = "--vae") -> dict[str, tuple[str, torch.nn.Module]]:
    """label -> (spec, VAE), all loaded before any work so that a bad path fails at once."""
    taken: set[str] = set()
    return {vae_label(s, taken): (s, load_vae(s, flag).to(device).eval()) for s in specs}


def resolve_device(device: str) -> torch.device:
    """--device: `auto` is cuda where a GPU is available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise BadInputError(f"--device {device}: not a device ({e})") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    return dev


def settings_record(opts: EvaluateOptions, images: int, dev: torch.device, tiles: Optional[dict] = None,
                    rfid: Optional[Rfid] = None) -> dict:
    """summary.json's "settings": every option, `device` and precision as resolved, and what else fixes the
    numbers (the protocol's resolution, each VAE's tiles, where rFID's Inception weights came from)."""
    return {**asdict(opts), "vae": list(opts.vae), "device": str(dev), "images": images,
            "precision_resolved": resolve_mixed_precision(opts.mixed_precision, dev.type),
            "protocol_resolution": PROTOCOLS[opts.protocol].resolution or None,
            "tiles": tiles or None, "inception": rfid.weights if rfid else None,
            "spectrum_bins": SPECTRUM_BINS, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_capability": cpu_capability() if dev.type == "cpu" else None}


def load_rfid(opts: EvaluateOptions, dev: torch.device, log=print) -> Optional[Rfid]:
    """rFID's Inception. Weights named (--inception-weights, $LATENTVAE_INCEPTION_WEIGHTS) must load, or
    InceptionUnavailable (exit 2) names them; none named and torch-fidelity's download failing: no rFID,
    one line saying how to provide them."""
    named = opts.inception_weights or os.environ.get(fid.INCEPTION_ENV) or None
    if named:
        return Rfid(fid.load_inception(opts.inception_weights, dev), str(Path(named).resolve()))
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # torch.hub's "Downloading: ..." of a failing download
            extractor = fid.load_inception(None, dev)
    except fid.InceptionUnavailable as e:
        log(f"rFID left out of the report: {e}")
        return None
    return Rfid(extractor, "torch-fidelity download (torch.hub cache)")


def run_evaluation(opts: EvaluateOptions, log=print, vae_flag: str = "--vae") -> dict:
    """The whole evaluation; returns summary.json's contents. Raises NotAnAutoencoder for a bad VAE path
    (its message led by `vae_flag`), other UserErrors for other bad inputs, all before any work; --out is
    written only at the end."""
    out = Path(opts.out)
    check_report_folder(out)
    dev = resolve_device(opts.device)
    vaes = load_all(opts.vae, dev, vae_flag)
    src = open_images(opts)
    # the tiles checked against each VAE before the LPIPS networks load (a bad --tile-size fails at once)
    tiles = {label: configure_tiling(label, vae, opts.tiling, opts.tile_size) for label, (_, vae) in vaes.items()}
    nets = () if opts.lpips == "none" else tuple(opts.lpips.split(","))
    lpips_models = {net: load_lpips(net, opts.lpips_dir, option="--lpips-dir") for net in nets}
    rfid = load_rfid(opts, dev, log)
    results, summary = [], {}
    for label, (spec, vae) in vaes.items():
        log(f"{label}: {type(vae).__name__}, /{downsample_factor(vae)}, {latent_channels(vae)} channels")
        result = evaluate_vae(label, spec, vae, src, opts, lpips_models, log, rfid)
        results.append(result)
        summary[label] = summarize(result, vae)
    settings = settings_record(opts, len(src), dev, tiles if opts.tiling else None, rfid)
    write_report(out, results, summary, settings)
    return finite_or_none({"settings": settings, "vaes": summary})


def run(opts: EvaluateOptions) -> dict:
    """`latentvae evaluate`: the evaluation, progress on stderr, the table on stdout. A signal: one line
    saying whether REPORT was written (interrupts.says_if_published)."""
    from .interrupts import says_if_published

    with says_if_published(opts.out, "report"):
        summary = run_evaluation(opts, log=lambda m: print(m, file=sys.stderr))
    print(markdown_table(summary["vaes"]))
    print(f"report: {opts.out}/report.md")
    return summary
