"""What the jobs' options share: one name per concept across jobs, the shared help texts and checks.

One name per concept: --vae, --data / --data-kind / --split / --image-column, --out, --limit (how
many images or rows), --resolution (a square side), --mixed-precision, --device, --seed, --progress.
Each job module has `run(options)`; cli.py maps subcommands to both.
"""
from __future__ import annotations

from typing import Literal

from .fields import OptionError


Precision = Literal["auto", "no", "bf16", "fp16"]
DataKind = Literal["auto", "folder", "hf"]

VAE_HELP = ("a VAE: diffusers or pipeline folder, hub id (org/name), latentvae run or checkpoint, LDM/SD "
            ".safetensors file, or taesd:sd|sdxl|sd3|flux; options as SPEC[subfolder=vae,variant=fp16,revision=REV,"
            "weights=raw,allow_pickle=yes] (docs/export.md, Naming a VAE)")
DATA_HELP = "image folder (recursive), saved `datasets` folder, or hub dataset name"
PRECISION_HELP = "autocast dtype; auto: bf16 on CUDA and on CPUs with bf16 kernels, else fp32 (no)"


def _positive(**values: float) -> None:
    for flag, value in values.items():
        if value < 1:
            raise OptionError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")


def _check_tile_size(tiling: bool, tile_size: int) -> None:
    """--tile-size (evaluate, decode): 0 (the model's own) or > 0, and only with --tiling."""
    if tile_size < 0 or (tile_size and not tiling):
        raise OptionError(f"--tile-size {tile_size}: must be > 0 and needs --tiling (0: the model's own)")
