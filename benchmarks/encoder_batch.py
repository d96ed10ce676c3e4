"""The encoder alone at several batch sizes: which pixels-per-call budget suits this device.

    python benchmarks/encoder_batch.py                 # sd preset, 128/256/512 px, 1-32 images a call
    python benchmarks/encoder_batch.py --rounds 4 --out benchmarks/results/encoder-batch-DATE-HW.txt

What `latentvae encode --batch-size 0` should pick (latentvae/cache/encode.py AUTO_BATCH_PIXELS): the
randomly initialised `sd`-preset encoder (as `latentvae encode` runs it: InferenceEncoder, channels_last,
fp32 weights, inference mode) on random images, each configuration (resolution, images per call)
encoding the same number of pixels per round (8 x 256²), rounds in ABBA order after one warm-up call
each. Prints million pixels per second per configuration and round, and the mean.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import hardware, hardware_line, pick_device, preset_vae, report  # noqa: E402

CONFIGS = [(128, 4), (128, 8), (128, 16), (128, 32), (256, 1), (256, 2), (256, 4), (256, 8), (512, 1), (512, 2)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="sd")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", help="also write the printed table here")
    args = p.parse_args()

    from latentvae.vae.model import InferenceEncoder

    device = pick_device()
    vae = preset_vae(args.preset, device)
    vae = vae.to(memory_format=torch.channels_last)
    encoder = InferenceEncoder(vae).eval()
    pixels_per_round = 8 * 256 * 256
    rates: dict = {c: [] for c in CONFIGS}

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        inputs = {c: torch.randn(c[1], 3, c[0], c[0], device=device).contiguous(memory_format=torch.channels_last)
                  for c in CONFIGS}
        for c in CONFIGS:
            encoder(inputs[c])  # warm-up: oneDNN's kernels for this shape
        for r in range(args.rounds):
            for c in (CONFIGS if r % 2 == 0 else CONFIGS[::-1]):
                res, batch = c
                calls = max(1, pixels_per_round // (res * res * batch))
                sync()
                t = time.perf_counter()
                for _ in range(calls):
                    encoder(inputs[c])
                sync()
                rates[c].append(calls * batch * res * res / (time.perf_counter() - t) / 1e6)
                print(f"round {r}: {res}² x {batch}: {rates[c][-1]:.4f} MP/s", flush=True)
    lines = [hardware_line(hardware(device)),
             f"{args.preset} encoder (InferenceEncoder, channels_last, fp32), {pixels_per_round / 1e6:.2f} MP per "
             f"configuration and round, {args.rounds} rounds ABBA", "",
             "| resolution | images per call | MP/s (mean) | per round |", "|---:|---:|---:|---|"]
    for (res, batch), v in rates.items():
        lines.append(f"| {res}² | {batch} | {statistics.mean(v):.4f} | {' / '.join(f'{x:.4f}' for x in v)} |")
    print()
    report(lines, args.out)


if __name__ == "__main__":
    main()
