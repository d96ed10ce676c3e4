"""Shared fixtures: tiny images, tiny configs, and where the offline LPIPS weights are."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentvae.config import load_config

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
_SHARED_LPIPS = SHARED / "weights" / "lpips"
LPIPS_DIR = os.environ.get("LATENTVAE_LPIPS_DIR") or (str(_SHARED_LPIPS) if _SHARED_LPIPS.is_dir() else None)
if LPIPS_DIR is not None and not os.path.isdir(LPIPS_DIR):
    LPIPS_DIR = None  # named but absent (a machine without ../shared): the LPIPS tests skip, saying why
    os.environ.pop("LATENTVAE_LPIPS_DIR", None)
if LPIPS_DIR is not None and os.environ.get("LATENTVAE_LPIPS_DIR"):
    # the README runs the tests with a relative path (../shared/weights/lpips); subprocesses started in a
    # temporary folder would resolve it there, so pin it to where pytest was started
    LPIPS_DIR = os.environ["LATENTVAE_LPIPS_DIR"] = os.path.abspath(LPIPS_DIR)


def make_photo(size=(48, 40), seed=0) -> Image.Image:
    """A smooth random RGB image with some structure (gradients + blobs), deterministic."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    chans = []
    for c in range(3):
        f = rng.uniform(1, 6, size=2)
        chans.append(0.5 + 0.5 * np.sin(2 * np.pi * (f[0] * xx + f[1] * yy) + rng.uniform(0, 6)))
    a = np.stack(chans, -1) * 255
    a += rng.normal(0, 8, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


@pytest.fixture
def image_folder(tmp_path) -> Path:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(5):
        make_photo(seed=i).save(folder / ("sub" if i % 2 else "") / f"img{i}.png")
    return folder


def save_tiny_vae(path: Path, seed: int = 0) -> Path:
    """A seeded two-level AutoencoderKL (8, 16 channels, /2, 4 latent channels) saved with save_pretrained."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4,
                  layers_per_block=1).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    """A tiny diffusers VAE folder, shared by a test module's tests."""
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny")


@pytest.fixture
def lpips_dir() -> str:
    if LPIPS_DIR is None:
        pytest.skip("no offline LPIPS weights: set LATENTVAE_LPIPS_DIR or place ../shared/weights/lpips")
    return LPIPS_DIR


def tiny_overrides(source: Path, **extra: str) -> list[str]:
    """--set overrides for a seconds-long CPU run of the `test` preset."""
    base = {
        "model.preset": "test", "data.source": str(source), "data.val_count": "1", "data.resolution": "32",
        "data.val_resolution": "32", "data.num_workers": "0", "data.short_side_min": "0",
        "train.batch_size": "2", "train.steps": "6", "train.lr": "1e-3", "train.log_every": "2",
        "train.image_every": "3", "train.save_every": "3", "train.mixed_precision": "no",
        "loss.lpips_net": "alex", "loss.kl_weight": "1e-3",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def tiny_config(image_folder, lpips_dir):
    def make(**extra):
        return load_config(None, tiny_overrides(image_folder, **{"loss.lpips_dir": lpips_dir, **extra}))
    return make


def fresh_trainer(cfg, out, **kwargs):
    """A Trainer in this process, with accelerate's process-wide singletons reset first."""
    from accelerate.state import AcceleratorState, GradientState

    from latentvae.train import Trainer

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return Trainer(cfg, out, show_progress=False, **kwargs)
