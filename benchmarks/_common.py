"""What both benchmark scripts measure the same way: the machine's matmul peak."""
from __future__ import annotations

import time

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
