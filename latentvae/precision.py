"""What "auto" means for mixed precision and memory format, measured rather than assumed.

On CUDA, bf16 autocast and channels_last pay. On a CPU they pay only where oneDNN has bf16
kernels (AVX512-BF16 / AMX): without them PyTorch's CPU bf16 convolutions fall back to a slow
reference path, many times slower than fp32 (the figures: benchmarks/RESULTS.md, "Training
step", the bf16 lever row).
"""
from __future__ import annotations

from typing import Optional

import torch

# a resolved mixed-precision choice -> the autocast dtype (None: fp32, no autocast)
AUTOCAST_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_capability() -> str:
    """What PyTorch's CPU kernels were dispatched for here ('AVX2', 'AVX512', ...): name it beside every figure."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_has_fast_bf16() -> bool:
    """oneDNN has native bf16 kernels (AVX512-BF16 / AMX class CPUs); the one place `auto` asks the CPU."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_mixed_precision(choice: str, device_type: str) -> str:
    """'auto' -> 'bf16' where bf16 kernels are fast, else 'no'; other choices pass through."""
    if choice != "auto":
        return choice
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if device_type == "cpu" and cpu_has_fast_bf16() else "no"


# --weights-dtype of inference (encoding): the dtype the encoder's weights are cast to
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_weights_dtype(choice: str, precision: str, force_upcast: bool) -> str:
    """'auto' -> the half dtype `precision` (--mixed-precision, resolved) names, run without autocast; else fp32.

    diffusers' upcast rule: a VAE whose config says `force_upcast` (the SD/SDXL VAEs) overflows in fp16
    and runs in fp32 there, so 'auto' keeps its weights fp32 under fp16 autocast; bf16 has fp32's range
    and needs no upcast. An explicit choice passes through (encode refuses fp16 with force_upcast)."""
    if choice != "auto":
        return choice
    if precision == "bf16" or (precision == "fp16" and not force_upcast):
        return precision
    return "fp32"


def resolve_channels_last(choice: bool | None, device_type: str, inference: bool = False) -> bool:
    """None ('auto') -> channels_last on CUDA, or on a CPU with fast bf16 (oneDNN prefers NHWC there).

    For inference only (encoding a dataset), also on other CPUs: there the fp32 encoding loop gains
    from channels_last while the training step, backward included, does not (benchmarks/RESULTS.md)."""
    if choice is not None:
        return choice
    if inference and device_type == "cpu":
        return True
    return device_type == "cuda" or (device_type == "cpu" and cpu_has_fast_bf16())


def autocast(device_type: str, dtype: Optional[torch.dtype]):
    """The one autocast context: `dtype` (bf16 or fp16) on `device_type`, or plain fp32 when dtype is None."""
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)
