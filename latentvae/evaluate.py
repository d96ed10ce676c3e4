"""Evaluate any set of autoencoders side by side: PSNR, SSIM, LPIPS, sharpness, rate, speed.

    latentvae evaluate --vae runs/quickstart --vae taesd:sd --data IMAGES --out REPORT [--max-side 1024]
    python eval/evaluate.py --vae VAE [--vae VAE ...] --data IMAGES --out REPORT

Each VAE is a diffusers folder, a training run or checkpoint, an LDM .safetensors file or
`taesd:sd|sdxl|sd3|flux` (anything `io.load_autoencoder` accepts). Every image is reconstructed
whole, at full resolution (or downscaled to --max-side first), center-cropped (--fit crop,
default) or reflect-padded (--fit pad) to a multiple of the downsampling factor; z is the
posterior mean. REPORT gets `per_image.csv`, `summary.json`, `report.md` (the table side by
side) and `spectrum.png` (radial power spectrum of the reconstructions over the originals).
Every input is checked before the work starts; the report is written under a hidden name beside
REPORT and renamed into place, so REPORT is always a whole report (an earlier one is replaced
only then), and a folder that is not a report is never written into.
docs/evaluation.md states the conventions. This module owns the evaluation loop and the report.
"""
from __future__ import annotations

import argparse
import csv
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
from PIL import Image

from . import metrics
from .errors import BadInputError
from .images import BadImage, center_crop_to_multiple, list_images, load_rgb, oriented_size, to_tensor, to_uint8
from .loading import NotAnAutoencoder, load_autoencoder, with_flag
from .train.losses import kl_to_standard_normal
from .model import decode, downsample_factor, encode_moments, latent_channels
from .perceptual import load_lpips, lpips_distance
from .precision import resolve_mixed_precision

LPIPS_NETS = ("alex", "vgg")
PRECISIONS = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # after resolving "auto"
CSV_COLUMNS = ("vae", "image", "width", "height", "eval_width", "eval_height", "latent_shape", "psnr", "ssim",
               "lpips_alex", "lpips_vgg", "hf_energy_ratio", "laplacian_var_ratio", "kl_per_element",
               "encode_s", "decode_s")
# columns averaged over images into summary.json (per-image mean)
MEAN_COLUMNS = ("psnr", "ssim", "lpips_alex", "lpips_vgg", "hf_energy_ratio", "laplacian_var_ratio", "kl_per_element")


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


def get_fit(name: str):
    if name not in FITS:
        raise BadInputError(f"unknown fit {name!r}; valid choices: {', '.join(FITS)}")
    return FITS[name]


def downscale_to_max_side(img: Image.Image, max_side: int) -> Image.Image:
    """Lanczos-downscale so that the longer side is at most `max_side` (0: unchanged)."""
    w, h = img.size
    if not max_side or max(w, h) <= max_side:
        return img
    s = max_side / max(w, h)
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)


def load_eval_image(path: Path, max_side: int = 0) -> tuple[torch.Tensor, tuple[int, int]]:
    """(1, 3, H, W) in [-1, 1] after the optional downscale, and the file's own (width, height).

    An image that cannot be decoded is a BadInputError: every VAE must see the same images."""
    try:
        img = load_rgb(path, draft_size=(max_side, max_side) if max_side else None)
    except BadImage as e:
        raise BadInputError(f"{e}; every VAE is scored on the same images: remove or fix it in --data") from e
    with Image.open(path) as raw:
        size = oriented_size(raw)  # as displayed, like the pixels load_rgb returns
    return to_tensor(downscale_to_max_side(img, max_side))[None], size


# ----------------------------------------------------------------------------- one image through one VAE
@dataclass
class Reconstruction:
    x_hat: torch.Tensor  # (1, 3, H, W) in [-1, 1], same size as the reference
    mean: torch.Tensor
    logvar: Optional[torch.Tensor]
    encode_s: float
    decode_s: float


@torch.no_grad()
def reconstruct(vae, x: torch.Tensor, reference_hw: tuple[int, int], dtype=None) -> Reconstruction:
    """Encode to the posterior mean, decode, and cut the output back to the reference size."""
    device = next(vae.parameters()).device
    x = x.to(device)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        t0 = time.perf_counter()
        mean, logvar = encode_moments(vae, x)
        t1 = time.perf_counter()
        x_hat = decode(vae, mean)
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


def image_metrics(ref: np.ndarray, out: np.ndarray, out_float: np.ndarray, lpips_models: dict) -> dict[str, float]:
    """Every per-image number: PSNR, SSIM and LPIPS on the uint8 output (LPIPS sees it mapped back to
    [-1, 1]); sharpness on the unquantized output, so 8-bit rounding noise sets no floor."""
    row = {"psnr": metrics.psnr(ref, out), "ssim": metrics.ssim(ref, out),
           "hf_energy_ratio": metrics.hf_energy_ratio(ref, out_float),
           "laplacian_var_ratio": metrics.laplacian_var_ratio(ref, out_float)}
    if lpips_models:
        a = torch.from_numpy(ref).permute(2, 0, 1)[None].float() / 127.5 - 1
        b = torch.from_numpy(out).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            for net, model in lpips_models.items():
                row[f"lpips_{net}"] = float(lpips_distance(model, a, b)[0])
    return row


def warm_up(vae, factor: int, dtype=None) -> None:
    """One small forward first, so one-time kernel setup is not timed."""
    reconstruct(vae, torch.zeros(1, 3, 8 * factor, 8 * factor), (8 * factor, 8 * factor), dtype)


# ----------------------------------------------------------------------------- a whole evaluation
@dataclass(frozen=True)
class EvalSettings:
    fit: str = "crop"
    max_side: int = 0
    lpips_nets: tuple[str, ...] = LPIPS_NETS
    precision: str = "auto"
    spectrum_bins: int = 32


@dataclass
class VaeResult:
    label: str
    source: str
    rows: list[dict] = field(default_factory=list)
    spectrum_log_ratio: list[np.ndarray] = field(default_factory=list)
    squared_error: float = 0.0
    values: int = 0


def evaluate_vae(label: str, source: str, vae, images: list[Path], settings: EvalSettings,
                 lpips_models: dict, log=print) -> VaeResult:
    """Reconstruct every image with one VAE and score it; one CSV row per image."""
    factor, fit = downsample_factor(vae), get_fit(settings.fit)
    device = next(vae.parameters()).device
    dtype = PRECISIONS[resolve_mixed_precision(settings.precision, device.type)]
    warm_up(vae, factor, dtype)
    stochastic = trained_stochastic(source, vae)
    result = VaeResult(label, source)
    for path in images:
        x, (w0, h0) = load_eval_image(path, settings.max_side)
        try:
            x_in, ref = fit(x, factor)
        except BadInputError as e:
            raise BadInputError(f"{path}: {e}") from e
        rec = reconstruct(vae, x_in, ref.shape[-2:], dtype)
        ref_u8, out_u8, out_float = hwc_uint8(ref), hwc_uint8(rec.x_hat), hwc_float(rec.x_hat)
        row = {"vae": label, "image": path.name, "width": w0, "height": h0,
               "eval_width": ref.shape[-1], "eval_height": ref.shape[-2],
               "latent_shape": "x".join(map(str, rec.mean.shape[1:])),
               **image_metrics(ref_u8, out_u8, out_float, lpips_models),
               "kl_per_element": None if rec.logvar is None or not stochastic else float(kl_to_standard_normal(rec.mean, rec.logvar).mean()),
               "encode_s": rec.encode_s, "decode_s": rec.decode_s}
        result.rows.append(row)
        result.squared_error += metrics.squared_error_sum(ref_u8, out_u8)
        result.values += ref_u8.size
        _, p_ref = metrics.radial_power_spectrum(metrics.luma(ref_u8), settings.spectrum_bins)
        _, p_out = metrics.radial_power_spectrum(metrics.luma(out_float), settings.spectrum_bins)
        result.spectrum_log_ratio.append(np.log10(np.maximum(p_out, 1e-20) / np.maximum(p_ref, 1e-20)))
        log(f"  {label} {path.name} {ref.shape[-1]}x{ref.shape[-2]}: PSNR {row['psnr']:.2f} SSIM {row['ssim']:.4f} "
            f"enc {rec.encode_s:.2f}s dec {rec.decode_s:.2f}s")
    return result


def trained_stochastic(spec: str, vae) -> bool:
    """Was z sampled from the posterior in training? False for deterministic encoders
    (AutoencoderTiny) and for `model.mode=ae` runs (their logvar head was never trained, so a KL
    would be meaningless); True for other AutoencoderKLs."""
    if isinstance(vae, AutoencoderTiny):
        return False
    path = Path(spec)
    run = next((p for p in (path, *path.parents) if (p / "checkpoints").is_dir()), None) if path.is_dir() else None
    if run is not None and (run / "config.json").is_file():
        return json.loads((run / "config.json").read_text()).get("model", {}).get("mode", "vae") != "ae"
    return True


def _mean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarize(result: VaeResult, vae) -> dict:
    """summary.json's entry for one VAE: per-image means, pooled PSNR, shapes, rate, speed."""
    rows, f, c = result.rows, downsample_factor(vae), latent_channels(vae)
    megapixels = sum(r["eval_width"] * r["eval_height"] for r in rows) / 1e6
    out = {"source": result.source, "class": type(vae).__name__,
           "parameters": sum(p.numel() for p in vae.parameters()), "images": len(rows)}
    out.update({k: _mean([r.get(k) for r in rows]) for k in MEAN_COLUMNS})
    out["psnr_pooled"] = metrics.pooled_psnr(result.squared_error, result.values)
    out.update({"latent_channels": c, "downsample_factor": f, "latent_shape": f"{c} x H/{f} x W/{f}",
                "compression_ratio": 3 * f * f / c,
                "encode_s_per_megapixel": sum(r["encode_s"] for r in rows) / megapixels,
                "decode_s_per_megapixel": sum(r["decode_s"] for r in rows) / megapixels})
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
    "hf_energy_ratio": ("HF energy ratio", "{:.3f}"), "laplacian_var_ratio": ("Laplacian var ratio", "{:.3f}"),
    "kl_per_element": ("KL/elem (nats)", "{:.3g}"), "latent_shape": ("latent", "{}"),
    "compression_ratio": ("compression", "{:.0f}x"), "encode_s_per_megapixel": ("enc s/MP", "{:.2f}"),
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


def write_csv(path: Path, results: list[VaeResult]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in results:
            for row in r.rows:
                writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})


def plot_spectra(path: Path, results: list[VaeResult], bins: int) -> None:
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_report_folder(out: Path) -> None:
    """REPORT must be new, empty or an earlier report (it has summary.json): never someone's other folder."""
    if out.exists() and not out.is_dir():
        raise BadInputError(f"--out {out} exists and is not a folder; expected a new folder or an earlier report")
    if out.is_dir() and any(out.iterdir()) and not (out / "summary.json").is_file():
        raise BadInputError(f"--out {out} is a non-empty folder that is not an evaluation report (no summary.json); "
                            "choose a new or empty folder")


def publish_report(tmp: Path, out: Path) -> None:
    """Rename the finished staging folder to REPORT, replacing an earlier report only after that succeeds."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_report(out: Path, results: list[VaeResult], summary: dict, settings_record: dict) -> None:
    """The report's files, into a hidden staging folder beside `out` that then replaces it whole."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed evaluation: never published
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        _write_report_files(tmp, results, summary, settings_record)
        publish_report(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_report_files(out: Path, results: list[VaeResult], summary: dict, settings_record: dict) -> None:
    write_csv(out / "per_image.csv", results)
    (out / "summary.json").write_text(json.dumps(finite_or_none({"settings": settings_record, "vaes": summary}),
                                                 indent=2) + "\n")
    plot_spectra(out / "spectrum.png", results, settings_record["spectrum_bins"])
    fit = {"crop": "center-cropped", "pad": "reflect-padded (scored on the original pixels)"}[settings_record["fit"]]
    scale = f"downscaled to at most {settings_record['max_side']} px on the long side, " if settings_record["max_side"] else ""
    md = [f"# VAE evaluation: {settings_record['images']} images from `{settings_record['data']}`", "",
          f"Images {scale}{fit} to a multiple of each VAE's downsampling factor; z = posterior mean; "
          "metrics on uint8 outputs; PSNR and the other columns are per-image means (pooled PSNR: MSE pooled "
          "over all images). Conventions: docs/evaluation.md.", "", markdown_table(summary), "",
          "![spectrum](spectrum.png)", ""]
    (out / "report.md").write_text("\n".join(md))


def vae_label(spec: str, taken: set[str]) -> str:
    """A short unique column name: `taesd:sd` as is, a path by its folder/file name."""
    base = spec if ":" in spec and not Path(spec).exists() else (Path(spec).name or spec)
    label, i = base, 2
    while label in taken:
        label, i = f"{base}#{i}", i + 1
    taken.add(label)
    return label


def load_all(specs: list[str], device: torch.device) -> dict[str, tuple[str, torch.nn.Module]]:
    """label -> (spec, VAE), all loaded before any work so that a bad path fails at once."""
    taken: set[str] = set()
    return {vae_label(s, taken): (s, load_vae(s).to(device).eval()) for s in specs}


def load_vae(spec: str):
    """load_autoencoder, with `--vae` leading the message of a NotAnAutoencoder."""
    try:
        return load_autoencoder(spec)
    except NotAnAutoencoder as e:
        raise with_flag("--vae", spec, e) from e


def resolve_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise BadInputError(f"--device {device}: not a device ({e})") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    return dev


def run_evaluation(specs: list[str], data: str | Path, out: str | Path, settings: EvalSettings = EvalSettings(),
                   lpips_dir: Optional[str] = None, device: str = "cpu", limit: int = 0, log=print,
                   lpips_option: str = "--lpips-dir") -> dict:
    """The whole evaluation; returns summary.json's contents. Raises NotAnAutoencoder for a bad VAE path,
    other UserErrors for other bad inputs, all before any work; `out` is written only at the end."""
    for net in settings.lpips_nets:
        if net not in LPIPS_NETS:
            raise BadInputError(f"--lpips: unknown LPIPS net {net!r}; valid choices: {', '.join(LPIPS_NETS)}")
    get_fit(settings.fit)
    if limit < 0 or settings.max_side < 0:
        raise BadInputError(f"--limit and --max-side must be >= 0 (0: all images, no downscale); got "
                            f"{limit} and {settings.max_side}")
    check_report_folder(Path(out))
    dev = resolve_device(device)
    vaes = load_all(specs, dev)
    images = list_images(data)[: limit or None]
    lpips_models = {net: load_lpips(net, lpips_dir, option=lpips_option) for net in settings.lpips_nets}
    results, summary = [], {}
    for label, (spec, vae) in vaes.items():
        log(f"{label}: {type(vae).__name__}, /{downsample_factor(vae)}, {latent_channels(vae)} channels")
        result = evaluate_vae(label, spec, vae, images, settings, lpips_models, log)
        results.append(result)
        summary[label] = summarize(result, vae)
    record = {**asdict(settings), "data": str(data), "images": len(images), "device": device,
              "precision_resolved": resolve_mixed_precision(settings.precision, dev.type),
              "latent": "posterior mean (mode)", "torch": torch.__version__, "threads": torch.get_num_threads()}
    write_report(Path(out), results, summary, record)
    return finite_or_none({"settings": record, "vaes": summary})


def _parser() -> argparse.ArgumentParser:
    from .cli import make_parser

    p = make_parser("latentvae evaluate", __doc__.split("\n")[0])
    p.add_argument("--vae", action="append", required=True,
                   help="diffusers folder, training run/checkpoint, LDM .safetensors or taesd:sd|sdxl|sd3|flux; repeat")
    p.add_argument("--data", required=True, help="image folder (searched recursively)")
    p.add_argument("--out", required=True, help="report folder: new, empty, or an earlier report (replaced)")
    p.add_argument("--fit", default="crop", choices=list(FITS), help="crop or pad to the downsampling factor")
    p.add_argument("--max-side", type=int, default=0, help="downscale images whose long side exceeds this (0: never)")
    p.add_argument("--lpips", default=",".join(LPIPS_NETS), help="comma-separated LPIPS nets, or '' for none")
    p.add_argument("--lpips-dir", help="folder of LPIPS backbones (default $LATENTVAE_LPIPS_DIR)")
    p.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS], help="autocast dtype for the VAE")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--limit", type=int, default=0, help="only the first N images (0: all)")
    return p


def _evaluate_command(argv=None) -> None:
    args = _parser().parse_args(argv)
    settings = EvalSettings(fit=args.fit, max_side=args.max_side, precision=args.precision,
                            lpips_nets=tuple(n for n in args.lpips.split(",") if n))
    summary = run_evaluation(args.vae, args.data, args.out, settings, args.lpips_dir, args.device, args.limit,
                             log=lambda m: print(m, file=sys.stderr))
    print(markdown_table(summary["vaes"]))
    print(f"report: {args.out}/report.md")


def main(argv=None) -> None:
    """`latentvae evaluate` = `python eval/evaluate.py`; a mistake is one line on stderr, exit status 2."""
    from .cli import run_command

    run_command("evaluate", _evaluate_command, argv)


if __name__ == "__main__":
    main()
