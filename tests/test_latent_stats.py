"""latent_stats: per-channel statistics, the high-frequency share of latents and images, scale equivariance,
each on a constructed case with a known answer.

    python -m pytest tests/test_latent_stats.py -q
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import make_photo
from latentvae import latent_stats
from latentvae.images import to_tensor


def test_channel_statistics_are_those_of_posterior_samples():
    torch.manual_seed(0)
    mean = torch.randn(8, 3, 16, 16) * torch.tensor([0.5, 1.0, 2.0])[None, :, None, None] + torch.tensor([1.0, 0.0, -1.0])[None, :, None, None]
    logvar = torch.full_like(mean, math.log(0.25))
    s = latent_stats.channel_statistics(mean, logvar)
    # samples: mean + 0.5 * eps -> std^2 = var(mean) + 0.25 per channel
    for c in range(3):
        mu = mean[:, c]
        assert s["mean"][c] == pytest.approx(float(mu.mean()), abs=1e-6)
        assert s["std"][c] == pytest.approx(math.sqrt(float(mu.var(unbiased=False)) + 0.25), rel=1e-5)
        kl = 0.5 * (mu.pow(2) + 0.25 - 1 - math.log(0.25)).mean()
        assert s["kl"][c] == pytest.approx(float(kl), rel=1e-5)
    assert latent_stats.channel_statistics(mean, None)["kl"] is None  # a deterministic encoder


def test_white_noise_has_the_share_of_the_frequency_area_and_a_smooth_field_almost_none():
    g = torch.Generator().manual_seed(0)
    white = torch.randn(4, 4, 64, 64, generator=g)
    share = latent_stats.high_frequency_share(white, 0.25)
    assert share == pytest.approx(1 - math.pi * 0.25 ** 2, abs=0.02)  # 0.804: the area outside the disc
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    smooth = torch.stack([torch.sin(2 * math.pi * (k + 1) * xx / 64) * torch.cos(2 * math.pi * yy / 64)
                          for k in range(4)])[None]
    assert latent_stats.high_frequency_share(smooth, 0.25) < 0.01
    # latents and images on their own grids: rough latents of a smooth image have a ratio > 1
    img = to_tensor(make_photo(size=(64, 64), seed=1))[None]
    s = latent_stats.spectrum_statistics(white[:1], img)
    assert s["latent_hf_share"] == pytest.approx(share, abs=0.05) and s["hf_share_ratio"] > 1


class PointwiseAE(torch.nn.Module):
    """A toy autoencoder on the pixel grid (factor 1): z = f(W x), x = W^-1 f^-1(z). With f the identity it
    commutes exactly with any per-channel linear resampling: scale-equivariant by construction. It stands in
    for a LoadedVae (`module`, `moments`, `decode`)."""

    def __init__(self, nonlinear: bool):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.2, 0.0, 1.0]]))
        self.nonlinear = nonlinear

    @property
    def module(self):
        return self

    def moments(self, x):
        z = torch.einsum("ij,bjhw->bihw", self.w, x)
        return (z.pow(3) if self.nonlinear else z), None

    def decode(self, z):
        z = z.sign() * z.abs().pow(1 / 3) if self.nonlinear else z
        return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(self.w), z)


def test_scale_equivariance_is_high_for_an_equivariant_autoencoder_and_lower_otherwise():
    images = torch.stack([to_tensor(make_photo(size=(64, 64), seed=s)) for s in range(3)])
    exact = latent_stats.scale_equivariance_psnr(PointwiseAE(nonlinear=False), images)
    bent = latent_stats.scale_equivariance_psnr(PointwiseAE(nonlinear=True), images)
    assert exact > 55  # uint8 rounding apart, identical
    assert bent < exact - 10
    # both reconstruct the full-size images perfectly: the measure is about scaling, not reconstruction
    for nonlinear in (False, True):
        ae = PointwiseAE(nonlinear)
        out = ae.decode(ae.moments(images)[0])
        np.testing.assert_allclose(out.detach().numpy(), images.numpy(), atol=1e-4)
