"""How a latent space looks to the diffusion model that will learn it: statistics beside the probe's number.

    channel_statistics(mean, logvar)         # per channel: mean, std of posterior samples, KL to N(0, 1)
    high_frequency_share(x, cutoff=0.25)     # share of a (B, C, H, W) field's spectral power above `cutoff`
    spectrum_statistics(latents, images)     # that share for the latents and for the images, side by side
    scale_equivariance_psnr(lv, images)      # decode(downsample(z)) against downsample(image), PSNR in dB

Why these: work on the "diffusability" of autoencoders relates generation quality to how much
high-frequency energy the latents carry (a diffusion model's denoising is hardest at the high
frequencies, where natural images have little power and a latent space may have a lot) and to how
equivariant the latent space is to scaling (EQ-VAE, Kouzelis et al. 2025: decoding a downscaled
latent should give the downscaled image). Conventions, fixed here once:

- Spectra: each channel (or image luma) mean-removed and Hann-windowed (metrics.windowed_power),
  power summed over all 2-D frequencies; frequencies in cycles per sample of the grid the field
  lives on (latent grid for latents, pixel grid for images), so 0.25 is half the Nyquist rate of
  either. White noise has a share of 1 - pi * cutoff^2 above `cutoff` (0.80 at 0.25).
- Downsampling: bilinear with antialiasing (torch.nn.functional.interpolate, scale 1/2), the same
  for the latent and for the image; PSNR on uint8 images (metrics.psnr).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import metrics
from .vae.moments import batch_moments, channel_mean_std

HF_CUTOFF = metrics.HF_CUTOFF  # cycles per sample


def channel_statistics(mean: torch.Tensor, logvar: Optional[torch.Tensor]) -> dict[str, list[float]]:
    """Per channel of (B, C, h, w) posterior moments: the mean and std of posterior samples (exact, from
    moments.batch_moments) and the KL to N(0, 1) per element in nats (None for deterministic encoders)."""
    m = batch_moments(mean, logvar)
    mu, std = channel_mean_std(m)
    kl = None if m.kl_sum is None else (m.kl_sum / m.count).tolist()
    return {"mean": mu.tolist(), "std": std.tolist(), "kl": kl}


def high_frequency_share(x: torch.Tensor | np.ndarray, cutoff: float = HF_CUTOFF) -> float:
    """Share of the spectral power of a (B, C, H, W) (or (H, W)) field at radial frequencies >= `cutoff`
    cycles/sample, pooled over every channel of every item (each mean-removed and windowed)."""
    a = np.asarray(x.detach().float().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    planes = a.reshape(-1, *a.shape[-2:])
    high = total = 0.0
    for plane in planes:
        power, r = metrics.windowed_power(plane)
        high += float(power[r >= cutoff].sum())
        total += float(power.sum())
    return high / total if total > 0 else 0.0


def spectrum_statistics(latents: torch.Tensor, images: torch.Tensor, cutoff: float = HF_CUTOFF) -> dict:
    """The high-frequency share of the latents (B, C, h, w) and of the images' luma (B, 3, H, W) in
    [-1, 1], each on its own grid, and their ratio (> 1: the latents are rougher than the images)."""
    gray = 0.2126 * images[:, 0] + 0.7152 * images[:, 1] + 0.0722 * images[:, 2]  # metrics.luma's weights
    lat, img = high_frequency_share(latents, cutoff), high_frequency_share(gray, cutoff)
    return {"cutoff_cycles_per_sample": cutoff, "latent_hf_share": lat, "image_hf_share": img,
            "hf_share_ratio": lat / img if img > 0 else float("inf")}


def downsample(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Bilinear, antialiased downsampling by `factor` (the one used for latents and images alike)."""
    return F.interpolate(x, scale_factor=1 / factor, mode="bilinear", antialias=True, align_corners=False)


@torch.no_grad()
def scale_equivariance_psnr(lv, images: torch.Tensor, factor: int = 2) -> float:
    """PSNR (dB, uint8, pooled over the batch) between decode(downsample(encode(x))) and downsample(x), for
    images (B, 3, H, W) in [-1, 1] whose sides are multiples of factor x the VAE's downsampling factor; z is
    the posterior mean, in the VAE's own latent (before any pipeline patchify). `lv`: a vae.loaded.LoadedVae
    (anything with its `module`, `moments` and `decode`). An exactly scale-equivariant autoencoder scores as
    high as its plain reconstruction."""
    from .images import to_uint8

    param = next(lv.module.parameters())
    x = images.to(param.device, param.dtype)
    z, _ = lv.moments(x)
    y = lv.decode(downsample(z.float(), factor).to(param.dtype)).float().cpu()
    ref = downsample(images.float(), factor)
    a = torch.stack([to_uint8(v) for v in ref]).numpy()
    b = torch.stack([to_uint8(v) for v in y.clamp(-1, 1)]).numpy()
    return metrics.pooled_psnr(metrics.squared_error_sum(a, b), a.size)
