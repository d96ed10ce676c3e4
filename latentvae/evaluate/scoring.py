"""One VAE scored on every image: reconstruction, the per-image row, latent statistics, the VAE's summary.

    lv = load_vae("out/my-vae")                             # any family (vae/loading.py)
    rec = reconstruct(lv, x, x.shape[-2:])                  # lv.moments -> lv.decode, cut to the reference
    result = evaluate_vae("my-vae", lv, src, opts, lpips_models, multiple)
    summarize(result, lv)                                   # summary.json's entry: figures, family, layout

Everything family-specific (4-D/5-D, which moments, how to decode, whether the posterior is a
trained Gaussian) comes from the LoadedVae, so a kl, a flux2, a qwenimage and a TAESD are scored by
the same lines. The KL figure is vae/moments.kl_to_standard_normal, the one formula.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .. import fid, metrics
from ..errors import BadInputError
from ..images import to_uint8
from ..latent_stats import downsample, high_frequency_share
from ..options import EvaluateOptions
from ..precision import AUTOCAST_DTYPES, autocast, resolve_mixed_precision
from ..sources import ImageSource
from ..vae.loaded import LoadedVae, make_record
from ..vae.moments import batch_moments, channel_mean_std, kl_to_standard_normal, merge_moments
from .inputs import FITS, PROTOCOLS, image_name, load_eval_image

SPECTRUM_BINS = 32  # rings of spectrum.png, up to Nyquist
CSV_COLUMNS = ("vae", "image", "width", "height", "eval_width", "eval_height", "latent_shape", "psnr", "ssim",
               "lpips_alex", "lpips_vgg", "hf_energy_ratio", "laplacian_var_ratio", "kl_per_element",
               "encode_s", "decode_s")
# columns averaged over images into summary.json (per-image mean)
MEAN_COLUMNS = ("psnr", "ssim", "lpips_alex", "lpips_vgg", "hf_energy_ratio", "laplacian_var_ratio", "kl_per_element")


def as_loaded(vae) -> LoadedVae:
    """A LoadedVae as it is; a diffusers module made in memory gets its record (vae/loaded.make_record)."""
    return vae if isinstance(vae, LoadedVae) else make_record(vae, {"kind": "memory"})


def device_of(lv: LoadedVae) -> torch.device:
    return next(lv.module.parameters()).device


# ----------------------------------------------------------------------------- one image through one VAE
@dataclass
class Reconstruction:
    x_hat: torch.Tensor  # (1, 3, H, W) in [-1, 1], same size as the reference
    mean: torch.Tensor  # (1, C, h, w): the VAE latent, 4-D whatever the family
    logvar: Optional[torch.Tensor]  # None: no trained Gaussian posterior (LoadedVae.stochastic)
    encode_s: float
    decode_s: float


@torch.no_grad()
def reconstruct(vae, x: torch.Tensor, reference_hw: tuple[int, int], dtype=None,
                generator: Optional[torch.Generator] = None) -> Reconstruction:
    """Encode, decode the posterior mean (or, with `generator`, a draw mean + std * eps; a deterministic
    encoder has only its mean), and cut the output back to the reference size. `vae`: a LoadedVae (or a
    module, given its record)."""
    lv = as_loaded(vae)
    device = device_of(lv)
    x = x.to(device)
    with autocast(device.type, dtype):
        t0 = time.perf_counter()
        mean, logvar = lv.moments(x)
        z = mean
        if generator is not None and logvar is not None:
            eps = torch.randn(mean.shape, generator=generator).to(device, mean.dtype)  # CPU draws: any device alike
            z = mean + torch.exp(0.5 * logvar) * eps
        t1 = time.perf_counter()
        x_hat = lv.decode(z)
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


def warm_up(lv: LoadedVae, multiple: int, dtype=None) -> None:
    """One small forward first, so one-time kernel setup is not timed."""
    side = 8 * multiple
    reconstruct(lv, torch.zeros(1, 3, side, side), (side, side), dtype)


# ----------------------------------------------------------------------------- scores of one VAE
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
                lpips_models: dict) -> dict:
    """One (VAE, image) row of per_image.csv, added to `result`; KL where the posterior is a trained Gaussian."""
    ref_u8, out_u8, out_float = hwc_uint8(ref), hwc_uint8(rec.x_hat), hwc_float(rec.x_hat)
    kl = None if rec.logvar is None else float(kl_to_standard_normal(rec.mean, rec.logvar).mean())
    row = {"vae": result.label, "image": name, "width": size[0], "height": size[1],
           "eval_width": ref.shape[-1], "eval_height": ref.shape[-2],
           "latent_shape": "x".join(map(str, rec.mean.shape[1:])),
           **metrics.image_metrics(ref_u8, out_u8, out_float, lpips_models),
           "kl_per_element": kl, "encode_s": rec.encode_s, "decode_s": rec.decode_s}
    result.add(row, ref_u8, out_u8, out_float)
    return row


@torch.no_grad()
def add_latent_statistics(result: VaeResult, lv: LoadedVae, x: torch.Tensor, rec: Reconstruction,
                          dtype=None) -> None:
    """One image's share of the latent-space statistics (latent_stats.py), on the VAE latent: the posterior's
    channel moments, the high-frequency share of latent and image, and scale equivariance (decode of the
    2x-downsampled latent against the 2x-downsampled image) where the image's sides are multiples of 2 x the
    factor."""
    result.moments = merge_moments(result.moments, batch_moments(rec.mean, rec.logvar))
    result.latent_hf.append(high_frequency_share(rec.mean))
    result.image_hf.append(high_frequency_share(metrics.luma(hwc_uint8(x))))
    factor = lv.layout.factor
    if x.shape[-1] % (2 * factor) or x.shape[-2] % (2 * factor):
        return
    device = device_of(lv)
    with autocast(device.type, dtype):
        y = lv.decode(downsample(rec.mean, 2).to(device)).float().cpu()
    a, b = to_uint8(downsample(x.float(), 2)).numpy(), to_uint8(y).numpy()
    result.equivariance.append((metrics.squared_error_sum(a, b), a.size))


@dataclass
class Rfid:
    """rFID's Inception and the originals' feature statistics, computed once per kind of reference."""
    extractor: torch.nn.Module
    weights: str  # where the weights came from, for the settings
    references: dict = field(default_factory=dict)  # (fit, multiple) -> fid.FeatureStats of the reference images

    def reference_key(self, fit: str, multiple: int) -> tuple:
        return (fit, multiple if fit == "crop" else 0)  # padding scores the original pixels, whatever the factor


def evaluate_vae(label: str, source: str, lv: LoadedVae, src: ImageSource, opts: EvaluateOptions,
                 lpips_models: dict, multiple: int, log=print, rfid: Optional[Rfid] = None) -> VaeResult:
    """Reconstruct every image with one VAE and score it; one CSV row per image; rFID where `rfid` is given.
    Images are fitted to `multiple` (a multiple of this VAE's factor: every VAE of the report sees the same
    pixels)."""
    fit = FITS[opts.fit]
    dtype = AUTOCAST_DTYPES[resolve_mixed_precision(opts.mixed_precision, device_of(lv).type)]
    warm_up(lv, multiple, dtype)
    generator = torch.Generator().manual_seed(opts.seed) if opts.latent == "sample" else None
    resolution = PROTOCOLS[opts.protocol].resolution
    key = rfid.reference_key(opts.fit, multiple) if rfid else None
    ref_stats = fid.FeatureStats() if rfid and key not in rfid.references else None
    rec_stats = fid.FeatureStats() if rfid else None
    result = VaeResult(label, source)
    for i in range(len(src)):
        name = image_name(src, i, opts.data)
        x, size = load_eval_image(src, i, opts.max_side, resolution)
        try:
            x_in, ref = fit(x, multiple)
        except BadInputError as e:
            raise BadInputError(f"{name}: {e}") from e
        rec = reconstruct(lv, x_in, ref.shape[-2:], dtype, generator)
        row = score_image(result, name, size, ref, rec, lpips_models)
        add_latent_statistics(result, lv, x_in, rec, dtype)
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


# ----------------------------------------------------------------------------- summary.json's entry
def latent_summary(result: VaeResult) -> dict:
    """summary.json's latent-space statistics of one VAE (docs/probe.md explains them)."""
    if result.moments is None:
        return {}
    mean, std = channel_mean_std(result.moments)
    kl = None if result.moments.kl_sum is None else (result.moments.kl_sum / result.moments.count).tolist()
    sq, n = sum(e for e, _ in result.equivariance), sum(k for _, k in result.equivariance)
    return {"latent_channel_mean": mean.tolist(), "latent_channel_std": std.tolist(), "latent_kl_per_channel": kl,
            "latent_hf_share": float(np.mean(result.latent_hf)), "image_hf_share": float(np.mean(result.image_hf)),
            "scale_equivariance_psnr": metrics.pooled_psnr(sq, n) if n else None,
            "scale_equivariance_images": len(result.equivariance)}


def _mean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def vae_record(lv: LoadedVae) -> dict:
    """What the VAE is: family, class, posterior, latent layout (the VAE's and the diffusion model's), formula."""
    layout = lv.layout
    m = layout.multiple
    return {"family": lv.family.name, "class": lv.class_name, "stochastic": lv.stochastic,
            "latent_layout": layout.describe(), "latent_patch": layout.patch, "five_d": layout.five_d,
            "diffusion_latent_shape": f"{layout.diffusion_channels} x H/{m} x W/{m}", "convention": lv.convention,
            "factors": lv.provenance}


def summarize(result: VaeResult, lv: LoadedVae) -> dict:
    """summary.json's entry for one VAE: what it is, per-image means, pooled PSNR, rFID, shapes, rate, speed."""
    rows, f, c = result.rows, lv.layout.factor, lv.layout.channels
    megapixels = sum(r["eval_width"] * r["eval_height"] for r in rows) / 1e6
    out = {"source": result.source, **vae_record(lv),
           "parameters": sum(p.numel() for p in lv.module.parameters()), "images": len(rows)}
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
