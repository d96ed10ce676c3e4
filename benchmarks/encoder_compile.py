"""torch.compile of the encoder, alone and interleaved with eager calls in one process: does it pay here?

    python benchmarks/encoder_compile.py                          # sd preset, 256x256, batch 1, 16 rounds
    python benchmarks/encoder_compile.py --resolution 512 --rounds 6 --out benchmarks/results/encoder-compile-DATE-HW.txt

What `latentvae encode --compile` runs (model.InferenceEncoder, channels_last, inference mode, the
weights in --dtype) three ways on the same random image: eager; `torch.compile` (inductor's defaults,
what --compile does); and `torch.compile` with inductor's `freezing` (weights folded in as constants,
for inference only: on a CPU it lets oneDNN pre-pack the convolution weights). Prints the compile time
of each (the first call; a warm inductor cache in $TORCHINDUCTOR_CACHE_DIR makes it shorter), the
largest difference from the eager latents, then the three called in rotating order for --rounds rounds:
median and fastest seconds per image, each as a speed ratio against eager, and the number of images
after which the compile time is paid back (compile seconds / seconds saved per image). An interleaved
A/B because this machine's speed drifts between runs by more than the effect being measured.
`--profile` (with `--rounds 0`: alone) first prints where the eager encoder's time goes (torch.profiler, self CPU/CUDA time by op,
two calls): what compilation could fuse (norms, activations, elementwise) against the convolutions.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import hardware, hardware_line, pick_device, preset_vae, report, sync  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def profile_lines(fn, x: torch.Tensor, device: str, top: int = 8) -> list[str]:
    """The ops taking the most self time over two calls, as shares of the total."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            fn(x)
        sync(device)
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events)
    return [f"  eager, self {'GPU' if device == 'cuda' else 'CPU'} time by op (two calls, {total / 2e6:.3f} s a call):"] + [
        f"    {e.key:45s} {100 * getattr(e, attr) / total:5.1f}%  ({e.count // 2} calls a call)" for e in events[:top]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="sd")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="the encoder's weights (--weights-dtype)")
    p.add_argument("--rounds", type=int, default=16, help="0: no compilation, only --profile")
    p.add_argument("--profile", action="store_true", help="first print the eager encoder's time by op")
    p.add_argument("--out", help="also write the printed lines here")
    args = p.parse_args()

    from latentvae.vae.model import InferenceEncoder

    device = pick_device()
    vae = preset_vae(args.preset, device)
    vae = vae.to(memory_format=torch.channels_last)
    dtype = DTYPES[args.dtype]
    x = torch.rand(args.batch, 3, args.resolution, args.resolution, device=device) * 2 - 1
    x = x.contiguous(memory_format=torch.channels_last)
    lines = [hardware_line(hardware(device)),
             f"{args.preset} encoder, {args.dtype} weights, {args.batch} x {args.resolution}x{args.resolution} "
             f"a call, channels_last, inference mode; {args.rounds} rounds in rotating order:"]
    fns, compile_s = {"eager": InferenceEncoder(vae, dtype).eval()}, {}
    with torch.inference_mode():
        ref = fns["eager"](x)[0]
        if args.profile:
            lines += profile_lines(fns["eager"], x, device)
        if not args.rounds:  # --profile --rounds 0: the profile alone
            return report(lines, args.out)
        for name, freezing in (("compile", False), ("compile+freezing", True)):
            # options= makes each its own backend: dynamo does not reuse the other's graph (the fp32
            # encoders share vae's modules, and a patched global config would not tell them apart)
            fn = torch.compile(InferenceEncoder(vae, dtype).eval(), options={"freezing": freezing})
            t0 = time.perf_counter()
            out = fn(x)[0]
            sync(device)
            compile_s[name] = time.perf_counter() - t0
            fns[name] = fn
            lines.append(f"  {name}: first call (compiling) {compile_s[name]:.1f} s, max |latent - eager| "
                         f"{float((out - ref).abs().max()):.1e} (eager's max |latent| {float(ref.abs().max()):.2f})")
        for fn in fns.values():
            fn(x)
        names, times = list(fns), {k: [] for k in fns}
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                sync(device)
                t0 = time.perf_counter()
                fns[name](x)
                sync(device)
                times[name].append((time.perf_counter() - t0) / args.batch)
    eager = statistics.median(times["eager"])
    for name in names:
        med, best = statistics.median(times[name]), min(times[name])
        line = f"  {name:17s} median {med:.4f} s/img  fastest {best:.4f}  {eager / med:.3f}x eager's speed"
        if name in compile_s:
            saved = eager - med
            line += (f"; pays back its compile after {compile_s[name] / saved:,.0f} images" if saved > 0
                     else "; never pays back")
        lines.append(line)
    report(lines, args.out)


if __name__ == "__main__":
    main()
