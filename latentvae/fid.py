"""FID (Heusel et al. 2017, https://arxiv.org/abs/1706.08500) exactly as torch-fidelity computes it.

    extractor = load_inception(weights, device)          # or raises InceptionUnavailable(message)
    real, fake = FeatureStats(), FeatureStats()
    real.add(extractor, images_uint8_nchw)               # any size: torch-fidelity resizes to 299 itself
    fake.add(extractor, reconstructions_uint8_nchw)
    frechet_distance(real, fake)                         # = torch_fidelity.calculate_metrics(..., fid=True)

The network is torch-fidelity's own `FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])`
(the TF inception-2015-12-05 graph, TF1 bilinear resize, (x - 128) / 128), never a copy of it. Its
weights come from, in order:
  1. `weights` (`latentvae evaluate --inception-weights PATH`) or the environment variable
     LATENTVAE_INCEPTION_WEIGHTS: a safetensors file with the extractor's state_dict keys, as
     ../shared/weights/inception/inception_fid_torch_fidelity.safetensors (read with safetensors:
     a user's file is never unpickled);
  2. torch-fidelity's own download (its torch.hub cache, or the internet).
If none works, `InceptionUnavailable` says how to provide them. Features are 2048-d pool features;
statistics accumulate in float64; the distance is metrics.frechet_distance (torch-fidelity's
eigenvalue formula). rFID = FID between originals and their reconstructions.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Optional
from unittest import mock

import numpy as np
import torch

from . import metrics
from .errors import UserError
from .precision import autocast

INCEPTION_ENV = "LATENTVAE_INCEPTION_WEIGHTS"
INCEPTION_FILE = "inception_fid_torch_fidelity.safetensors"
FEATURES = 2048


class InceptionUnavailable(UserError, RuntimeError):
    """The FID Inception weights could not be loaded; the message says how to provide them."""


def how_to(option: str = "--inception-weights") -> str:
    return (f"Provide them with {option} PATH or the environment variable {INCEPTION_ENV}=PATH, a safetensors "
            f"file of torch-fidelity's FeatureExtractorInceptionV3 state_dict (for example "
            f"../shared/weights/inception/{INCEPTION_FILE}), or go online once so that torch-fidelity can "
            "download its weights into the torch.hub cache.")


def _read_safetensors(path: Path, source: str, option: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise InceptionUnavailable(f"{source}: {path} is not a file. " + how_to(option))
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types
        raise InceptionUnavailable(f"{source}: {path} is not a readable safetensors file ({e}). "
                                   + how_to(option)) from None


def _build(tfi, state: dict, source: str, option: str) -> torch.nn.Module:
    """torch-fidelity's extractor with `state` as its weights (strict load, eval, no grad)."""
    # its only ways in are its download and torch.load of a pickle: hand it the tensors for the duration
    # of the constructor, then put the function back
    with mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: state):
        try:
            return tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
        except RuntimeError as e:  # load_state_dict(strict=True): missing/unexpected keys, wrong shapes
            first = " ".join(str(e).strip().splitlines()[:2])[:300]
            raise InceptionUnavailable(f"{source}: not torch-fidelity's Inception-v3 state_dict ({first}). "
                                       + how_to(option)) from None


def load_inception(weights: Optional[str], device="cpu", option: str = "--inception-weights") -> torch.nn.Module:
    """torch-fidelity's FID Inception-v3, eval mode, on `device`; returns (N, 2048) features per uint8 batch.

    `weights`: a safetensors file (else $LATENTVAE_INCEPTION_WEIGHTS, else torch-fidelity's download).
    Raises InceptionUnavailable naming the file, or saying how to provide one."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    path = weights or os.environ.get(INCEPTION_ENV) or None
    if path is None:
        source = "torch-fidelity's Inception weights"
        try:  # what its constructor would call: the torch.hub cache, else the download
            with contextlib.redirect_stdout(sys.stderr):
                state = tfi.load_state_dict_from_url(tfi.URL_INCEPTION_V3, progress=False)
        except Exception as e:  # offline: URLError / OSError; a broken cache file: RuntimeError
            cause = " ".join(str(e).split()) or type(e).__name__
            raise InceptionUnavailable(f"FID Inception weights: torch-fidelity could not load them "
                                       f"({type(e).__name__}: {cause}). " + how_to(option)) from None
    else:
        source = f"{option} {path}" if weights else f"{INCEPTION_ENV}={path}"
        state = _read_safetensors(Path(path), source, option)
    return _build(tfi, state, source, option).to(device)


@torch.no_grad()
def inception_features(extractor: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, 2048) float64 pool features, in fp32 whatever autocast is active."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected a uint8 (N, 3, H, W) batch, got {images.dtype} {tuple(images.shape)}")
    device = next(extractor.parameters()).device
    with autocast(device.type, None):
        return extractor(images.to(device))[0].double().cpu()


class FeatureStats:
    """Running mean and covariance of 2048-d Inception features, in float64: n, sum, sum of outer products."""

    def __init__(self, dim: int = FEATURES):
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def add_features(self, features: torch.Tensor) -> None:
        f = features.double().cpu()  # (N, dim)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def add(self, extractor: torch.nn.Module, images: torch.Tensor) -> None:
        """Add a uint8 (N, 3, H, W) batch (one image: N = 1; any H, W)."""
        self.add_features(inception_features(extractor, images))

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean (2048,), unbiased covariance (2048, 2048)), as np.cov(features, rowvar=False)."""
        if self.n < 2:
            raise ValueError(f"FID needs at least 2 images per side, got {self.n}")
        mean = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mean, mean)) / (self.n - 1)
        return mean.numpy(), cov.numpy()


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """FID between two feature sets (metrics.frechet_distance of their Gaussian fits)."""
    return metrics.frechet_distance(*a.mean_cov(), *b.mean_cov())
