"""What both benchmark scripts measure the same way: the machine's matmul peak."""
from __future__ import annotations

import time
from pathlib import Path

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_flops(dtype: torch.dtype, device: str = "cpu", n: int = 2048, seconds: float = 3.0) -> float:
    """FLOP/s of an n x n @ n x n matmul, repeated for about `seconds` after one warm-up.

    On CPUs without bf16 kernels (AVX2) a bf16 matmul takes a minute at n = 2048: there one
    n = 1024 product is timed, which is enough to see the rate is ~400x below fp32."""
    from latentvae.precision import cpu_has_fast_bf16

    if device == "cpu" and dtype == torch.bfloat16 and not cpu_has_fast_bf16():
        n = 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t0 = time.perf_counter()
    a @ b
    sync(device)
    first = time.perf_counter() - t0
    if first > seconds:  # the slow path: the warm-up itself is the measurement
        return 2 * n ** 3 / first
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def preset_vae(preset: str, device: str) -> torch.nn.Module:
    """The AutoencoderKL of a model preset, initialised with seed 0, in eval mode on `device`: what the
    benchmarks time (the speed of a network does not depend on its weights' values)."""
    from latentvae.config import load_config
    from latentvae.vae.model import build_vae

    torch.manual_seed(0)
    return build_vae(load_config(None, [f"model.preset={preset}"]).model).eval().to(device)


def report(lines: list[str], out: str | None) -> None:
    """Print a benchmark's lines, and write them to `out` too when given (its folder made)."""
    print("\n".join(lines))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- what the figures ran on
def pick_device() -> str:
    """cuda where there is one, else cpu: both scripts run unchanged on either."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def hardware(device: str) -> dict:
    """The record printed above every table: the chip, what PyTorch dispatches for on it, torch, cores."""
    import os
    import platform

    from latentvae.precision import cpu_capability, cpu_has_fast_bf16

    rec = {"device": device, "torch": torch.__version__, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
           "cpu": _cpu_model() or platform.processor(), "cpu_capability": cpu_capability(),
           "cpu_fast_bf16": cpu_has_fast_bf16()}
    if device == "cuda":
        rec.update(gpu=torch.cuda.get_device_name(), gpu_bf16=torch.cuda.is_bf16_supported(),
                   cuda=torch.version.cuda)
    return rec


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        return ""


def hardware_line(hw: dict) -> str:
    chip = f"GPU {hw['gpu']} (CUDA {hw['cuda']}, bf16 {hw['gpu_bf16']}); host " if hw["device"] == "cuda" else ""
    return (f"hardware: {chip}CPU {hw['cpu']}, capability {hw['cpu_capability']}, oneDNN bf16 kernels "
            f"{hw['cpu_fast_bf16']}, {hw['cores']} cores, {hw['threads']} torch threads; torch {hw['torch']}")


def matmul_size(device: str) -> int:
    """2048^2 on CPUs (the figures in RESULTS.md); 8192^2 on GPUs, where 2048^2 is too small to reach the peak."""
    return 8192 if device == "cuda" else 2048


# ----------------------------------------------------------------------------- the model's own convolutions
def conv_shapes(model: torch.nn.Module, *inputs: torch.Tensor) -> list[dict]:
    """Every Conv2d call of one `model(*inputs)` (under inference_mode), grouped by shape:
    [{"conv": Conv2d constructor arguments, "input": (B, C, H, W), "calls": n, "flops": of one call}]."""
    calls: dict[tuple, dict] = {}

    def record(m: torch.nn.Conv2d, args, out) -> None:
        b, c, h, w = args[0].shape
        kw = dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=m.kernel_size,
                  stride=m.stride, padding=m.padding, groups=m.groups)
        key = (tuple(kw.items()), (b, c, h, w))
        flops = 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        calls.setdefault(key, {"conv": kw, "input": (b, c, h, w), "calls": 0, "flops": flops})["calls"] += 1

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.inference_mode():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return list(calls.values())


def conv_flops(shapes: list[dict], dtype: torch.dtype, device: str = "cpu", batch: int = 0,
               seconds: float = 0.5) -> float:
    """FLOP/s of the convolutions `shapes` (conv_shapes) each timed alone, forward only, channels_last,
    weights and inputs in `dtype`, at `batch` (0: as recorded); total FLOPs over total time, each shape counted as often as the model
    calls it: the rate the model's convolutions can reach here, its applicable peak.

    Each shape: one warm-up call, then repeats for about `seconds`. On CPUs without bf16 kernels (AVX2)
    bf16 convolutions take a slow reference path (minutes for an encoder): there each shape is timed by
    one call at batch 1 and at most 16x16 pixels, enough to see its rate."""
    from latentvae.precision import cpu_has_fast_bf16

    slow = device == "cpu" and dtype == torch.bfloat16 and not cpu_has_fast_bf16()
    total_flops = total_seconds = 0.0
    for s in shapes:
        b, c, h, w = s["input"]
        b = batch or b
        if slow:
            b, h, w = 1, min(h, 16), min(w, 16)
        conv = torch.nn.Conv2d(**s["conv"]).to(device, dtype, memory_format=torch.channels_last)
        x = torch.randn(b, c, h, w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            t0 = time.perf_counter()
            y = conv(x)
            sync(device)
            first = time.perf_counter() - t0
            flops = 2 * y.numel() * (c // conv.groups) * conv.kernel_size[0] * conv.kernel_size[1]
            if slow or first > seconds:
                rate = flops / first
            else:
                reps, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds:
                    conv(x)
                    reps += 1
                sync(device)
                rate = flops * reps / (time.perf_counter() - t0)
        total_flops += s["calls"] * s["flops"]
        total_seconds += s["calls"] * s["flops"] / rate
    return total_flops / total_seconds


def peaks(shapes: list[dict], device: str, batch: int = 0) -> dict:
    """{"conv": {"fp32", "bf16"}, "matmul": {"fp32", "bf16"}} FLOP/s measured here now."""
    n = matmul_size(device)
    return {"conv": {name: conv_flops(shapes, dt, device, batch) for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))},
            "matmul": {name: matmul_flops(dt, device, n) for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))},
            "matmul_n": n}


def peaks_line(p: dict) -> str:
    c, m = p["conv"], p["matmul"]
    return (f"peaks here: the model's own convolutions (forward, channels_last) fp32 {c['fp32'] / 1e9:.1f} / bf16 "
            f"{c['bf16'] / 1e9:.2f} GFLOP/s; matmul {p['matmul_n']}^2 fp32 {m['fp32'] / 1e9:.1f} / bf16 "
            f"{m['bf16'] / 1e9:.2f} GFLOP/s")


def peak_key(precision: str) -> str:
    """The peak a row is measured against: fp32 rows the fp32 rates, bf16 and fp16 rows the bf16 rates."""
    return "fp32" if precision in ("fp32", "no") else "bf16"
