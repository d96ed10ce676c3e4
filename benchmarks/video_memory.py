"""Peak memory of encoding and decoding one video clip against its length, tiled and untiled, per video family.

    python benchmarks/video_memory.py                      # every family, 49 and 121 frames, 480x832, both modes
    python benchmarks/video_memory.py --families wan --frames 49 121 --size 480x832

The widths are diffusers' test sizes (8-64 channels), the factors the published ones, so a 121-frame 480x832
clip runs on two CPU cores in minutes. Each measurement runs in its own process (so its peak resident memory, `ru_maxrss`, is its own) under an
address-space limit (--limit-gb, default 16), so a clip that does not fit fails there instead of swapping the
machine: the line says "does not fit". The VAEs are the classes diffusers ships, with the published spatial and
temporal factors and latent channels but narrow layers and random weights ("small" configs below): memory is
dominated by activations at the frame size, which scale with the widths, so the published models need several
times these figures; the curve against the clip length is what this measures. The clip is fp32 in [-1, 1]
(480x832x121 frames: 0.58 GB itself), run in fp32 (--dtype bf16 for bf16 weights and activations).
Prints one line per (family, frames, mode, stage) and the CPU it ran on.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SMALL = {  # published factors and latent channels, narrow widths (the published widths in comments)
    "wan": dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,  # base_dim 96, 2 res blocks
                temperal_downsample=[False, True, True]),
    "ltx2": dict(latent_channels=128, block_out_channels=(8, 16, 32, 64),  # (256, 512, 1024, 2048)
                 decoder_block_out_channels=(8, 16, 32), layers_per_block=(1, 1, 1, 1, 1),
                 decoder_layers_per_block=(1, 1, 1, 1), patch_size=4, patch_size_t=1,
                 spatial_compression_ratio=32, temporal_compression_ratio=8),
    "hunyuanvideo15": dict(latent_channels=32, block_out_channels=(8, 16, 32, 64, 64),  # (128, 256, 512, 1024, 1024)
                           layers_per_block=1, spatial_compression_ratio=16, temporal_compression_ratio=4),
    "cogvideox": dict(latent_channels=16, block_out_channels=(8, 16, 16, 32), layers_per_block=1,  # (128, 256, 256, 512)
                      norm_num_groups=4, temporal_compression_ratio=4),
}


def build(name: str):
    import diffusers
    import torch

    from latentvae.vae.families import family

    torch.manual_seed(0)
    return getattr(diffusers, family(name).class_name)(**SMALL[name]).eval().requires_grad_(False)


def one(name: str, frames: int, size: tuple[int, int], tiled: bool, stage: str, dtype: str) -> dict:
    """In this process: the clip (or its latent) made, then encoded or decoded once; peak RSS after."""
    import torch

    from latentvae.vae.families import family
    from latentvae.vae.model import configure_tiling

    torch.set_num_threads(2)
    vae = build(name)
    fam = family(name)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    vae.to(dt)
    if tiled:
        configure_tiling(name, vae, True)
    h, w = size
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    with torch.inference_mode():
        if stage == "encode":
            x = torch.rand(1, 3, frames, h, w, dtype=dt) * 2 - 1
            out = fam.moments(vae, x)[0]
        else:
            lat = (1 + (frames - 1) // fam.temporal(vae), h // fam.factor(vae), w // fam.factor(vae))
            z = torch.randn(1, fam.channels(vae), *lat, dtype=dt)
            out = fam.decode(vae, z)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"shape": list(out.shape), "seconds": seconds, "peak_gb": peak / 2 ** 20, "start_gb": before / 2 ** 20}


def measure(name, frames, size, tiled, stage, dtype, limit_gb, timeout) -> dict:
    code = (f"import sys, json; sys.path.insert(0, {sys.path[0]!r}); import resource; "
            f"resource.setrlimit(resource.RLIMIT_AS, ({int(limit_gb * 2 ** 30)}, {int(limit_gb * 2 ** 30)})); "
            f"from video_memory import one; print('RESULT', json.dumps(one({name!r}, {frames}, {tuple(size)}, {tiled}, "
            f"{stage!r}, {dtype!r})))")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"took over {timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = " ".join(proc.stderr.strip().splitlines()[-1:])[:200]
    if any(w in proc.stderr for w in ("MemoryError", "OutOfMemoryError", "can't allocate memory", "std::bad_alloc")):
        return {"error": f"does not fit in {limit_gb:g} GB ({tail})"}
    return {"error": tail or f"exit {proc.returncode}"}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=list(SMALL))
    ap.add_argument("--frames", nargs="+", type=int, default=[49, 121])
    ap.add_argument("--size", default="480x832")
    ap.add_argument("--modes", nargs="+", default=["untiled", "tiled"])
    ap.add_argument("--stages", nargs="+", default=["encode", "decode"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--limit-gb", type=float, default=16.0)
    ap.add_argument("--timeout", type=int, default=900)
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.lower().split("x"))
    print(f"cpu: {torch.backends.cpu.get_cpu_capability()}, oneDNN bf16: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}, "
          f"torch {torch.__version__}, threads 2, dtype {args.dtype}, frames {size[0]}x{size[1]}, limit {args.limit_gb:g} GB",
          flush=True)
    print("family          frames  mode     stage    peak GB  seconds  output", flush=True)
    for frames in args.frames:  # the shorter clip of every family first: the longer ones take longest
        for mode in args.modes:
            for name in args.families:
                for stage in args.stages:
                    r = measure(name, frames, size, mode == "tiled", stage, args.dtype, args.limit_gb, args.timeout)
                    if "error" in r:
                        print(f"{name:15s} {frames:6d}  {mode:8s} {stage:7s}  {r['error']}", flush=True)
                    else:
                        print(f"{name:15s} {frames:6d}  {mode:8s} {stage:7s}  {r['peak_gb']:7.2f}  {r['seconds']:7.1f}  "
                              f"{tuple(r['shape'])}", flush=True)


if __name__ == "__main__":
    main()
