"""The reload check: the exported folder, read back by the class's own `from_pretrained` (no latentvae),
must hold the source weights and reproduce the source model's outputs.

    diff = verify(folder, src.lv, "fp32")    # {"encode": max |diff|, "decode": max |diff|}, or ExportError

The outputs are compared through the family table (families.py: 5-D classes get T=1 added and
dropped), on fixed smooth images: in fp32 they must agree to FP32_TOLERANCE; in fp16/bf16 the
difference is the weight rounding alone, reported, not bounded.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..vae.loaded import LoadedVae
from .source import ExportError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FP32_TOLERANCE = 1e-5


def cast(module, dtype: str):
    """The module in `dtype` ("fp32" | "fp16" | "bf16"), by nn.Module's own casts: diffusers' `.to(dtype)` warns
    about fp32-kept modules on every call, for classes that have none."""
    return {"fp32": module.float, "fp16": module.half, "bf16": module.bfloat16}[dtype]()


def probe_images(lv: LoadedVae, n: int = 2) -> torch.Tensor:
    """Fixed images to compare the export with the source model: seeded, smooth, in [-1, 1]."""
    side = 8 * lv.layout.multiple
    g = torch.Generator().manual_seed(0)
    low = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)


@torch.no_grad()
def compare(lv: LoadedVae, other, x: torch.Tensor) -> dict[str, float]:
    """max |difference| of the encoder means, and of the decodes of the source's mean, between the source
    and another module of its class (fp32)."""
    fam = lv.family
    mean_a, _ = fam.moments(lv.module, x)
    mean_b, _ = fam.moments(other, x)
    return {"encode": float((mean_a - mean_b).abs().max()),
            "decode": float((fam.decode(lv.module, mean_a) - fam.decode(other, mean_a)).abs().max())}


def check_outputs(loaded, lv: LoadedVae, dtype: str, what: str) -> dict[str, float]:
    """Outputs of the reloaded model vs the source: in fp32 they must agree; in fp16/bf16 the difference
    is the weight rounding alone (compared in fp32 arithmetic), reported, not bounded."""
    diff = compare(lv, loaded.float().eval(), probe_images(lv))
    if dtype == "fp32" and max(diff.values()) >= FP32_TOLERANCE:
        raise ExportError(f"{what}: reloaded fp32 model differs from the source model by {diff} "
                          f"(tolerance {FP32_TOLERANCE})")
    return diff


def stored_weights(vae, dtype: str) -> dict[str, torch.Tensor]:
    """The source's state dict as the export stores it: floating tensors cast to `dtype`, counters as they are."""
    return {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in vae.state_dict().items()}


def same_weights(want: dict, got: dict) -> bool:
    return want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def verify(folder: Path, lv: LoadedVae, dtype: str) -> dict[str, float]:
    """Reload `folder` with `type(module).from_pretrained`; no missing/unexpected keys, weights equal, outputs close."""
    loaded, info = type(lv.module).from_pretrained(str(folder), torch_dtype=DTYPES[dtype], use_safetensors=True,
                                                   output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise ExportError(f"{folder}: diffusers reloads it with {problems}")
    if not same_weights(stored_weights(lv.module, dtype), loaded.state_dict()):
        raise ExportError(f"{folder}: reloaded weights differ from the source weights cast to {dtype}")
    return check_outputs(loaded, lv, dtype, str(folder))
