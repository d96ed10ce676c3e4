"""AdamW's step on a VAE's parameters: the for-loop, foreach and fused implementations, same run.

    python benchmarks/optimizer_step.py                      # sd preset (84M parameters), 10 rounds
    python benchmarks/optimizer_step.py --preset small --out benchmarks/results/optimizer-DATE-HW.txt

What `train` uses (latentvae/train/loop.py make_optimizer: fused, on CUDA and CPU alike) against the
alternatives: the same parameters and gradients, one optimizer of each kind, their steps interleaved
(rotating order) after one warm-up step each; prints the median and fastest milliseconds per step,
each against fused, and the largest difference of the weights from the for-loop reference after the
rounds (the three compute the same update; rounding may differ). Runs on CUDA where there is one.
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

KINDS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="sd")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--out", help="also write the printed lines here")
    args = p.parse_args()

    device = pick_device()
    vae = preset_vae(args.preset, device)
    base = [p.detach() for p in vae.parameters()]
    grads = [torch.randn_like(p) for p in base]
    params, opts = {}, {}
    for kind, flags in KINDS.items():
        params[kind] = [torch.nn.Parameter(p.clone()) for p in base]
        for q, g in zip(params[kind], grads):
            q.grad = g.clone()
        # TrainConfig's defaults (latentvae/config.py)
        opts[kind] = torch.optim.AdamW(params[kind], lr=1e-4, betas=(0.5, 0.9), weight_decay=0.0, **flags)
        opts[kind].step()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    names = list(KINDS)
    for r in range(args.rounds):
        for kind in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            opts[kind].step()
            sync(device)
            times[kind].append(time.perf_counter() - t0)

    lines = [hardware_line(hardware(device)),
             f"AdamW step over the {args.preset} preset's {sum(p.numel() for p in base) / 1e6:.1f}M fp32 parameters "
             f"({len(base)} tensors), {args.rounds} interleaved rounds after one warm-up step each:"]
    fused = statistics.median(times["fused"])
    with torch.no_grad():
        for kind in names:
            med, best = statistics.median(times[kind]), min(times[kind])
            diff = max(float((a - b).abs().max()) for a, b in zip(params[kind], params["for-loop"]))
            lines.append(f"  {kind:9s} median {med * 1e3:8.1f} ms  fastest {best * 1e3:8.1f} ms  "
                         f"{med / fused:5.2f}x fused's time  max |w - w_for-loop| {diff:.1e}")
    report(lines, args.out)


if __name__ == "__main__":
    main()
