"""Training loss curves in bf16 autocast against fp32, over several seeds: does bf16 move the curve more
than changing the seed does?

    python benchmarks/precision_curves.py                                  # tiny preset, 64x64, 3 seeds, 200 steps
    python benchmarks/precision_curves.py --preset small --resolution 128 --seeds 3 --steps 200 \
        --out benchmarks/results/precision-curves-DATE-HW.json

Each (precision, seed) is one `latentvae train` run of the quickstart recipe (configs/quickstart.yaml:
L1 + LPIPS-VGG + KL, its optimizer and schedule, the bundled training photographs) with the model
preset, resolution and step count given here, `train.mixed_precision` = `no` (fp32) or `bf16`, and
`train.seed` = seed: the same seed gives the same weights, batches and noise in both precisions, so the
bf16 - fp32 difference at a step is the precision's own effect, and the spread of the fp32 curves over
seeds is the yardstick it is compared with. The losses are the training windows' means the run logs to
TensorBoard every `--log-every` steps (train/loss, train/rec, train/lpips, train/kl_per_elem).

Printed and written (--out, with a .txt and a .png beside it): for each logged step the fp32 and bf16
means and standard deviations over seeds, the paired difference, and whether the bf16 mean lies within
the fp32 mean +- 2 std (seed spread); the share of steps inside; the wall time of each run. On a CPU
without bf16 kernels (AVX2) bf16 is emulated and several times slower than fp32: the curves are still
the curves bf16 arithmetic gives, only the times are not those of bf16 hardware.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

KEYS = ("loss", "rec", "lpips", "kl_per_elem")
PRECISIONS = {"fp32": "no", "bf16": "bf16"}


def run_one(work: Path, precision: str, seed: int, args) -> tuple[dict, float]:
    """One training run (skipped when its folder already holds the finished curve); its logged curves."""
    out = work / f"{precision}-seed{seed}"
    done = out / "curves.json"
    if done.exists():
        rec = json.loads(done.read_text())
        return rec["curves"], rec["seconds"]
    if out.exists():
        import shutil

        shutil.rmtree(out)
    sets = {"model.preset": args.preset, "data.resolution": args.resolution, "data.val_resolution": args.resolution,
            "train.steps": args.steps, "train.batch_size": args.batch, "train.seed": seed,
            "train.mixed_precision": PRECISIONS[precision], "train.log_every": args.log_every,
            "train.image_every": 10 ** 6, "train.save_every": 10 ** 6, "train.eval_every": 0,
            "train.lr_warmup_steps": min(30, args.steps // 10), "loss.lpips_crop": min(64, args.resolution)}
    cmd = [sys.executable, "-m", "latentvae", "train", "--config", str(REPO / "configs" / "quickstart.yaml"),
           "--out", str(out), "--no-progress"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}\nfailed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    curves = read_curves(out / "tb")
    done.write_text(json.dumps({"curves": curves, "seconds": seconds}))
    return curves, seconds


def read_curves(tb: Path) -> dict:
    """{key: [[step, value], ...]} of the train/KEY scalars in a run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, list] = {}
    for events in sorted(tb.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for key in KEYS:
            tag = f"train/{key}"
            if tag in acc.Tags().get("scalars", []):
                curves.setdefault(key, []).extend([e.step, e.value] for e in acc.Scalars(tag))
    if "loss" not in curves:
        raise SystemExit(f"{tb}: no train/loss scalars logged")
    return {k: sorted(v) for k, v in curves.items()}


def compare(runs: dict, key: str) -> list[dict]:
    """Per logged step: fp32 and bf16 mean and std over seeds, the paired difference, inside the band."""
    seeds = sorted(runs["fp32"])
    steps = [s for s, _ in runs["fp32"][seeds[0]][key]]
    rows = []
    for i, step in enumerate(steps):
        f = np.array([runs["fp32"][s][key][i][1] for s in seeds])
        b = np.array([runs["bf16"][s][key][i][1] for s in seeds])
        d = b - f
        rows.append({"step": step, "fp32_mean": f.mean(), "fp32_std": f.std(ddof=1), "bf16_mean": b.mean(),
                     "bf16_std": b.std(ddof=1), "diff_mean": d.mean(), "diff_std": d.std(ddof=1),
                     "inside": bool(abs(b.mean() - f.mean()) <= 2 * f.std(ddof=1))})
    return rows


def plot(runs: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(KEYS), figsize=(4.2 * len(KEYS), 3.4))
    for ax, key in zip(axes, KEYS):
        for precision, color in (("fp32", "tab:blue"), ("bf16", "tab:orange")):
            for k, (seed, curves) in enumerate(sorted(runs[precision].items())):
                if key in curves:
                    s, v = zip(*curves[key])
                    ax.plot(s, v, color=color, alpha=0.7, lw=1, label=precision if k == 0 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        if key == "kl_per_elem":
            ax.set_yscale("log")
    axes[0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    from _common import hardware

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", help="model.preset of every run")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 in each precision (at least 2)")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--work", default="/tmp/latentvae-precision-curves", help="run folders (a rerun reuses finished runs)")
    ap.add_argument("--out", help="write the results here (.json; .txt and .png beside it)")
    args = ap.parse_args(argv)
    if args.seeds < 2:
        ap.error("--seeds: at least 2 (the spread over seeds is the yardstick)")
    os.environ.setdefault("LATENTVAE_LPIPS_DIR", str(REPO.parent / "shared" / "weights" / "lpips"))
    work = Path(args.work) / f"{args.preset}-{args.resolution}-b{args.batch}-{args.steps}"
    work.mkdir(parents=True, exist_ok=True)

    hw = hardware("cpu")
    lines = [f"hardware: {json.dumps(hw)}",
             f"recipe: configs/quickstart.yaml, model.preset={args.preset}, {args.resolution}x{args.resolution}, "
             f"batch {args.batch}, {args.steps} steps, seeds 0-{args.seeds - 1}, windows of {args.log_every} steps"]
    print(*lines, sep="\n", flush=True)
    runs: dict = {"fp32": {}, "bf16": {}}
    seconds: dict = {"fp32": [], "bf16": []}
    for seed in range(args.seeds):  # interleaved: drift of the machine's speed hits both precisions alike
        for precision in ("fp32", "bf16"):
            curves, sec = run_one(work, precision, seed, args)
            runs[precision][seed] = curves
            seconds[precision].append(sec)
            print(f"  {precision} seed {seed}: {sec:.0f} s, final window loss {curves['loss'][-1][1]:.4f}", flush=True)

    result = {"hardware": hw, "args": vars(args), "seconds": seconds, "runs": runs, "compare": {}}
    for key in KEYS:
        if all(key in c for p in runs.values() for c in p.values()):
            result["compare"][key] = compare(runs, key)
    for key, rows in result["compare"].items():
        inside = sum(r["inside"] for r in rows)
        lines.append(f"\n{key}: bf16 mean within fp32 mean +- 2 std over seeds at {inside}/{len(rows)} logged steps")
        lines.append("| step | fp32 mean | fp32 std (seeds) | bf16 mean | bf16 std | bf16 - fp32 (paired) | inside |")
        lines.append("|---:|---:|---:|---:|---:|---:|:-:|")
        for r in rows:
            lines.append(f"| {r['step']} | {r['fp32_mean']:.4g} | {r['fp32_std']:.2g} | {r['bf16_mean']:.4g} | "
                         f"{r['bf16_std']:.2g} | {r['diff_mean']:+.2g} +- {r['diff_std']:.1g} | "
                         f"{'yes' if r['inside'] else 'NO'} |")
    lines.append(f"\nwall time per run: fp32 {np.mean(seconds['fp32']):.0f} s, bf16 {np.mean(seconds['bf16']):.0f} s"
                 f" (bf16 on a CPU without bf16 kernels is emulated: {hw['cpu_capability']}, fast bf16 "
                 f"{hw['cpu_fast_bf16']})")
    print(*lines[2:], sep="\n")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=float))
        out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
        plot(runs, out.with_suffix(".png"), f"{args.preset} {args.resolution}px, {args.steps} steps, "
             f"{args.seeds} seeds; fp32 blue, bf16 orange; {hw['cpu_capability']}")


if __name__ == "__main__":
    main()
