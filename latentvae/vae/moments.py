"""Exact per-channel moments of posterior samples, and the factors they give each pipeline family.

    m = batch_moments(mean, logvar)          # (B, C, h, w) -> sums over samples z ~ N(mean, exp(logvar))
    m = merge_moments(m, batch_moments(...))  # batch by batch
    f = factors(m, "sd3")                    # conventions.diffusers_config entries + channel_mean/std

E[z] = mu and E[z^2] = mu^2 + sigma^2 are accumulated in float64 without drawing noise. Calibration
(export --calibrate) and the latent cache's manifest both measure through these.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .conventions import diffusers_config


@dataclass(frozen=True)
class LatentMoments:
    """Per-channel sums over posterior samples: count (elements per channel), sum z, sum z^2, sum KL."""
    count: int
    sum: torch.Tensor  # (C,) float64
    sumsq: torch.Tensor  # (C,)
    kl_sum: Optional[torch.Tensor]  # (C,), None for deterministic encoders (mode "ae", TAESD)

    @property
    def channels(self) -> int:
        return self.sum.numel()


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per element, LDM's DiagonalGaussianDistribution.kl: the one formula
    (training's loss, evaluate's figure, these moments and the probe all use it)."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)


def batch_moments(mean: torch.Tensor, logvar: Optional[torch.Tensor]) -> LatentMoments:
    """(B, C, h, w) or (B, C, T, h, w) posterior mean/logvar -> the per-channel moments of samples z ~ N(mean,
    exp(logvar)) over every other axis.

    In float64 on purpose: sums of ~1e6 squares lose digits in fp32.
    """
    mu = mean.detach().double()
    var = torch.zeros_like(mu) if logvar is None else logvar.detach().double().exp()
    dims = (0, *range(2, mu.dim()))
    kl = None
    if logvar is not None:
        kl = kl_to_standard_normal(mu, logvar.detach().double()).sum(dims)
    count = mu.numel() // mu.shape[1]
    return LatentMoments(count, mu.sum(dims), (mu.pow(2) + var).sum(dims), kl)


def merge_moments(a: Optional[LatentMoments], b: LatentMoments) -> LatentMoments:
    if a is None:
        return b
    kl = None if a.kl_sum is None or b.kl_sum is None else a.kl_sum + b.kl_sum
    return LatentMoments(a.count + b.count, a.sum + b.sum, a.sumsq + b.sumsq, kl)


def channel_mean_std(m: LatentMoments) -> tuple[torch.Tensor, torch.Tensor]:
    mean = m.sum / m.count
    return mean, (m.sumsq / m.count - mean.pow(2)).clamp_min(0).sqrt()


def global_mean_std(m: LatentMoments) -> tuple[float, float]:
    """Over all channels and positions, as LDM's `1 / z.flatten().std()`."""
    n = m.count * m.channels
    mean = m.sum.sum() / n
    return float(mean), float((m.sumsq.sum() / n - mean.pow(2)).clamp_min(0).sqrt())


def factors(m: LatentMoments, convention: str) -> dict:
    """Moments -> the convention's diffusers config entries (conventions.diffusers_config), plus the
    measured per-channel statistics as `channel_mean` / `channel_std`."""
    channel_mean, channel_std = channel_mean_std(m)
    mean, std = global_mean_std(m)
    out = diffusers_config(convention, channel_mean=channel_mean.tolist(), channel_std=channel_std.tolist(),
                           mean=mean, std=std)
    return {**out, "channel_mean": [float(v) for v in channel_mean], "channel_std": [float(v) for v in channel_std]}
