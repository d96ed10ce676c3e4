"""Image-quality numbers for reconstructions, with their conventions fixed in one place.

    psnr(x_u8, y_u8)                     # dB, on uint8 images (what a saved PNG holds)
    ssim(x_u8, y_u8)                     # scikit-image, Wang et al. 2004 settings
    hf_energy_ratio(x_u8, y_u8)          # radial power spectrum above half Nyquist, y over x
    laplacian_var_ratio(x_u8, y_u8)      # variance of the Laplacian, y over x
    gaussian_fit_distances(real, draws)  # how far latent draws fall from a Gaussian fit of `real`
    frame_metrics(x_thw3, y_thw3, lpips) # a clip's per-frame PSNR, SSIM, LPIPS
    temporal_psnr(x_thw3, y_thw3)        # PSNR of the frame differences: falls with flicker

Image inputs are (H, W, 3) numpy arrays, `x` the original and `y` the reconstruction: uint8 for
PSNR/SSIM; uint8 or float in [0, 1] for the sharpness ratios (evaluate/scoring.py passes the unquantized
output there: rounding to 8 bits adds white noise, ~1/12 LSB², that would floor a heavily blurred
image's high-frequency energy).
PSNR and SSIM come from scikit-image (https://scikit-image.org/docs/stable/api/skimage.metrics.html);
LPIPS lives in perceptual.py. docs/evaluation.md states every convention and why.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from skimage.color import rgb2gray
from skimage.filters import laplace, window
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

HF_CUTOFF = 0.25  # cycles/pixel: the upper half of the band below Nyquist (0.5)


def psnr(x: np.ndarray, y: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (peak 255); inf for identical images."""
    if np.array_equal(x, y):
        return float("inf")  # skimage would divide by zero with a warning
    return float(peak_signal_noise_ratio(x, y, data_range=255))


def pooled_psnr(squared_error_sum: float, count: int) -> float:
    """PSNR of the MSE pooled over all pixel values of all images (not the mean of per-image PSNRs)."""
    mse = squared_error_sum / count
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def squared_error_sum(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.square(x.astype(np.float64) - y.astype(np.float64)).sum())


def ssim(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of RGB uint8 images, channel mean; Gaussian window sigma 1.5, population covariance
    (the settings of Wang et al. 2004 and of most published VAE tables)."""
    return float(structural_similarity(x, y, data_range=255, channel_axis=-1, gaussian_weights=True,
                                       sigma=1.5, use_sample_covariance=False))


def luma(x: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8, or float in [0, 1] -> (H, W) float64 luminance in [0, 1] (ITU-R 709 weights)"""
    return rgb2gray(x)


def windowed_power(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(power spectrum, radial frequency in cycles/pixel) of a mean-removed, 2-D Hann-windowed image.

    The window keeps the image border (a jump where the FFT wraps around) from leaking energy
    into every frequency."""
    g = (gray - gray.mean()) * window("hann", gray.shape)
    power = np.abs(np.fft.fft2(g)) ** 2
    fy = np.fft.fftfreq(gray.shape[0])[:, None]
    fx = np.fft.fftfreq(gray.shape[1])[None, :]
    return power, np.sqrt(fx ** 2 + fy ** 2)


def radial_power_spectrum(gray: np.ndarray, bins: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Power averaged over rings up to Nyquist: (ring centres in cycles/pixel, mean power)."""
    power, r = windowed_power(gray)
    edges = np.linspace(0, 0.5, bins + 1)
    idx = np.digitize(r, edges) - 1
    keep = (idx >= 0) & (idx < bins)
    sums = np.bincount(idx[keep], weights=power[keep], minlength=bins)
    counts = np.bincount(idx[keep], minlength=bins)
    return (edges[:-1] + edges[1:]) / 2, sums / np.maximum(counts, 1)


def high_frequency_energy(gray: np.ndarray, cutoff: float = HF_CUTOFF) -> float:
    """Spectral energy at radial frequencies in [cutoff, 0.5] cycles/pixel."""
    power, r = windowed_power(gray)
    return float(power[(r >= cutoff) & (r <= 0.5)].sum())


def hf_energy_ratio(x: np.ndarray, y: np.ndarray, cutoff: float = HF_CUTOFF) -> float:
    """High-frequency spectral energy of y over that of x: 1 = as sharp, < 1 = blurrier, > 1 = noisier."""
    return high_frequency_energy(luma(y), cutoff) / max(high_frequency_energy(luma(x), cutoff), 1e-12)


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the 3x3 Laplacian of a [0, 1] image: the classic focus/blur measure."""
    return float(laplace(gray, ksize=3).var())


def laplacian_var_ratio(x: np.ndarray, y: np.ndarray) -> float:
    """Laplacian variance of y over that of x."""
    return laplacian_variance(luma(y)) / max(laplacian_variance(luma(x)), 1e-12)


# ----------------------------------------------------------------------------- latent-space distances
def gaussian_fit(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) samples -> (mean (C,), covariance (C, C)), ridge 1e-6 for stability."""
    mean = vectors.mean(0)
    cov = np.cov(vectors, rowvar=False).reshape(vectors.shape[1], vectors.shape[1])
    return mean, cov + 1e-6 * np.eye(len(mean))


def mean_mahalanobis_sq(vectors: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> float:
    """Mean squared Mahalanobis distance of (N, C) vectors to N(mean, cov); equals C for its own samples."""
    d = vectors - mean
    return float(np.einsum("nc,nc->n", d @ np.linalg.inv(cov), d).mean())


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Squared 2-Wasserstein (Fréchet) distance between two Gaussians, as FID computes it:
    |mu1 - mu2|² + Tr(cov1) + Tr(cov2) - 2 Tr sqrt(cov1 cov2).

    torch-fidelity (`fid_statistics_to_metric`) takes Tr sqrt(cov1 cov2) as the sum of the square roots of
    the eigenvalues of cov1 cov2; those are the eigenvalues of the symmetric cov1^½ cov2 cov1^½, computed
    here with two symmetric eigendecompositions: the same figure (tests/test_fid.py checks it against
    torch-fidelity's own to 1e-5), several times faster on a CPU than the general eigensolver at 2048-d,
    and free of scipy `sqrtm`'s trouble with the singular covariances of few samples."""
    diff = mu1 - mu2
    w, v = np.linalg.eigh(cov1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # cov1^½, symmetric
    inner = root1 @ cov2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * tr_covmean)


def gaussian_fit_distances(real: np.ndarray, draws: np.ndarray) -> dict[str, float]:
    """How far latent `draws` (N, C) fall from the region `real` latents (M, C) occupy.

    mahalanobis_ratio: mean squared Mahalanobis distance of the draws under the Gaussian fitted to
    `real`, divided by C (≈ 1 for draws from that region; >> 1 far outside it);
    frechet: Fréchet distance between the Gaussian fits of `real` and `draws` (0 = same fit)."""
    mu_r, cov_r = gaussian_fit(real)
    mu_d, cov_d = gaussian_fit(draws)
    c = real.shape[1]
    return {"mahalanobis_ratio": mean_mahalanobis_sq(draws, mu_r, cov_r) / c,
            "mahalanobis_ratio_real": mean_mahalanobis_sq(real, mu_r, cov_r) / c,
            "frechet": frechet_distance(mu_r, cov_r, mu_d, cov_d)}


def image_metrics(ref: np.ndarray, out: np.ndarray, out_float: np.ndarray, lpips_models: dict) -> dict[str, float]:
    """Every per-image number: PSNR, SSIM and LPIPS on the uint8 output (LPIPS sees it mapped back to
    [-1, 1]); sharpness on the unquantized output, so 8-bit rounding noise sets no floor."""
    row = {"psnr": psnr(ref, out), "ssim": ssim(ref, out),
           "hf_energy_ratio": hf_energy_ratio(ref, out_float),
           "laplacian_var_ratio": laplacian_var_ratio(ref, out_float)}
    if lpips_models:
        from .perceptual import lpips_distance

        a = torch.from_numpy(ref).permute(2, 0, 1)[None].float() / 127.5 - 1
        b = torch.from_numpy(out).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            for net, model in lpips_models.items():
                row[f"lpips_{net}"] = float(lpips_distance(model, a, b)[0])
    return row


# ----------------------------------------------------------------------------- clips
def temporal_psnr(x: np.ndarray, y: np.ndarray) -> Optional[float]:
    """Temporal consistency of a reconstructed clip: PSNR in dB (peak 255, as per-frame PSNR) between the frame
    differences y[t+1] - y[t] of the reconstruction and x[t+1] - x[t] of the original, over every t and pixel.
    `x`, `y`: uint8 (T, H, W, 3). An error that stays put from frame to frame cancels in the differences; flicker
    (an error that changes from frame to frame) does not, so it lowers this figure far more than per-frame PSNR.
    inf where the motion is reproduced exactly; None for a single frame."""
    if len(x) < 2:
        return None
    dx, dy = np.diff(x.astype(np.int16), axis=0), np.diff(y.astype(np.int16), axis=0)
    mse = float(np.square((dy - dx).astype(np.float64)).mean())
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def frame_metrics(x: np.ndarray, y: np.ndarray, lpips_models: dict, chunk: int = 8) -> list[dict[str, float]]:
    """Per-frame PSNR, SSIM and LPIPS of a clip: `x` the original, `y` the reconstruction, uint8 (T, H, W, 3);
    one dict per frame (LPIPS as in image_metrics, `chunk` frames per forward)."""
    rows = [{"psnr": psnr(a, b), "ssim": ssim(a, b)} for a, b in zip(x, y)]
    if lpips_models:
        from .perceptual import lpips_distance

        a = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1
        b = torch.from_numpy(y).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            for net, model in lpips_models.items():
                d = torch.cat([lpips_distance(model, a[i:i + chunk], b[i:i + chunk]) for i in range(0, len(a), chunk)])
                for row, v in zip(rows, d.tolist()):
                    row[f"lpips_{net}"] = v
    return rows
