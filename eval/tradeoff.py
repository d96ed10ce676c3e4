"""The blur tradeoff: train (or take) a set of autoencoders, evaluate them, draw the pictures.

    # a small CPU sweep (6 runs of the `tiny` preset at 64 px; 17 minutes on 2 cores at --steps 300, measured)
    python eval/tradeoff.py --sweep --out runs/tradeoff --data ../shared/data/dev-images --max-side 256
    # only some variants, or other lengths
    python eval/tradeoff.py --sweep --variants mse,mse+lpips,ae --steps 100 --out runs/tradeoff --data IMAGES
    # runs that already exist (any VAE `latentvae evaluate` accepts)
    python eval/tradeoff.py --runs runs/a runs/b taesd:sd --out runs/tradeoff --data IMAGES

The sweep trains each variant with `accelerate launch train/train.py --config configs/quickstart.yaml
--set ...` in a subprocess (log in OUT/runs/NAME.log; a finished run is reused, an interrupted one
resumed), evaluates all of them with latentvae.evaluate (report in OUT/eval), and writes
OUT/perception_distortion.png (PSNR against LPIPS and against sharpness), OUT/rate_distortion.png
(KL per latent element against PSNR) and OUT/tradeoff.md. This script owns the sweep's variants
and the plots; the numbers come from latentvae/evaluate.py.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from latentvae.cli import make_parser, run_command
from latentvae.errors import BadInputError, UserError
from latentvae.evaluate import EvalSettings, markdown_table, run_evaluation

REPO = Path(__file__).resolve().parents[1]  # train/train.py and configs/ live here

# shared by every variant: the quickstart config shrunk to the `tiny` preset and 64 px crops
BASE = {"model.preset": "tiny", "data.resolution": 64, "data.short_side_min": 96, "data.short_side_max": 256,
        "data.val_resolution": 128, "loss.lpips_crop": 0,
        "train.log_every": 25, "train.image_every": 100000, "train.lr_warmup_steps": 20}
MSE = {"loss.recon": "mse", "loss.lpips_weight": 0}
MSE_LPIPS = {"loss.recon": "mse", "loss.lpips_weight": 1.0}
# variant name -> overrides on top of BASE; the KL weight is the LDM-normalized one (1e-6 = the SD recipe)
VARIANTS: dict[str, dict] = {
    "mse": {**MSE, "loss.kl_weight": 1e-6},
    "mse+lpips": {**MSE_LPIPS, "loss.kl_weight": 1e-6},
    "mse+lpips+gan": {**MSE_LPIPS, "loss.kl_weight": 1e-6, "loss.gan": True, "loss.disc_channels": 32},
    # the KL term is summed over the latent and divided by the pixel values (1/48 of a latent value
    # each at /8, 4 channels): it only weighs against an MSE of ~0.01-0.1 from a weight of ~0.1 up
    "mse+lpips kl=1e-2": {**MSE_LPIPS, "loss.kl_weight": 1e-2},
    "mse+lpips kl=1": {**MSE_LPIPS, "loss.kl_weight": 1.0},
    "ae mse+lpips": {**MSE_LPIPS, "model.mode": "ae"},
}


class TrainingFailed(UserError, RuntimeError):
    """A sweep run exited with an error; its log (named in the message) says why."""


def run_dir_name(variant: str) -> str:
    return variant.replace("+", "_").replace(" ", "_").replace("=", "")


def overrides(variant: str, steps: int) -> list[str]:
    """--set arguments of one variant; the GAN starts halfway through."""
    if variant not in VARIANTS:
        raise BadInputError(f"--variants: unknown variant {variant!r}; valid choices: {', '.join(VARIANTS)}")
    sets = {**BASE, **VARIANTS[variant], "train.steps": steps, "train.save_every": steps}
    if sets.get("loss.gan"):
        sets["loss.gan_start"] = steps // 2
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in sets.items()]


def finished(run: Path, steps: int) -> bool:
    return (run / "checkpoints" / f"checkpoint-{steps:08d}").is_dir()


def train_command(run: Path, variant: str, steps: int, config: str) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "train" / "train.py"),
           "--config", config, "--output-dir", str(run), "--no-progress"]
    for s in overrides(variant, steps):
        cmd += ["--set", s]
    if (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir()):
        cmd += ["--resume", "latest"]
    return cmd


def train_variant(out: Path, variant: str, steps: int, config: str) -> Path:
    """Train one variant (or reuse the finished run); returns the run folder."""
    run = out / "runs" / run_dir_name(variant)
    if finished(run, steps):
        print(f"{variant}: reusing {run}", file=sys.stderr)
        return run
    run.parent.mkdir(parents=True, exist_ok=True)
    print(f"{variant}: training {steps} steps -> {run}", file=sys.stderr)
    with open(run.parent / f"{run.name}.log", "a") as log:
        proc = subprocess.run(train_command(run, variant, steps, config), stdout=log, stderr=subprocess.STDOUT,
                              cwd=REPO)
    if proc.returncode != 0 or not finished(run, steps):
        raise TrainingFailed(f"{variant}: training failed (exit {proc.returncode}); see {run.parent / run.name}.log")
    return run


def plot_tradeoffs(summary: dict[str, dict], out: Path) -> None:
    """perception_distortion.png and rate_distortion.png from summary.json's `vaes`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def scatter(ax, xkey, ykey, xlabel, ylabel, logx=False, logy=False):
        for label, s in summary.items():
            if s.get(xkey) is None or s.get(ykey) is None:
                continue
            ax.scatter(s[xkey], s[ykey])
            ax.annotate(label, (s[xkey], s[ykey]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel=xlabel, ylabel=ylabel)
        if logx:
            ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    scatter(axes[0], "psnr", "lpips_vgg", "PSNR (dB) → less distortion", "LPIPS-VGG ↓ (perceptual distance)")
    scatter(axes[1], "psnr", "hf_energy_ratio", "PSNR (dB) → less distortion",
            "HF energy ratio, log (1 = original's)", logy=True)
    axes[1].axhline(1.0, color="gray", lw=0.8)
    # descriptive titles: what the points show depends on the runs, and short CPU runs are noisy
    fig.suptitle("Perception-distortion: PSNR against LPIPS and against sharpness")
    fig.tight_layout()
    fig.savefig(out / "perception_distortion.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    scatter(ax, "kl_per_element", "psnr", "KL per latent element (nats, log scale): the rate", "PSNR (dB)", logx=True)
    ax.set_title("Rate-distortion: KL per latent element against PSNR")
    fig.tight_layout()
    fig.savefig(out / "rate_distortion.png", dpi=120)
    plt.close(fig)


def write_table(summary: dict, settings: dict, variants: dict[str, str], out: Path, steps: int) -> None:
    lines = [f"# Blur tradeoff: {len(summary)} autoencoders on {settings['images']} images from `{settings['data']}`", ""]
    if variants:
        lines += [f"Trained {steps} steps each; overrides on top of configs/quickstart.yaml and "
                  f"`{' '.join(f'{k}={v}' for k, v in BASE.items())}`:", ""]
        lines += [f"- **{label}**: `{variants[label]}`" for label in summary if label in variants]
        lines += [""]
    lines += [markdown_table(summary), "", "![perception-distortion](perception_distortion.png)", "",
              "![rate-distortion](rate_distortion.png)", ""]
    (out / "tradeoff.md").write_text("\n".join(lines))


def _parser() -> argparse.ArgumentParser:
    p = make_parser("eval/tradeoff.py", __doc__.split("\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--sweep", action="store_true", help="train the variants first")
    what.add_argument("--runs", nargs="+", help="evaluate these VAEs (runs, folders, taesd:...) instead")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated; choices: {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=300, help="training steps per sweep run")
    p.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    p.add_argument("--out", required=True)
    p.add_argument("--data", required=True, help="evaluation images")
    p.add_argument("--max-side", type=int, default=256)
    p.add_argument("--lpips-dir")
    return p


def _tradeoff(argv=None) -> None:
    args = _parser().parse_args(argv)
    out = Path(args.out)
    labels: dict[str, str] = {}
    if args.sweep:
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
        for v in names:
            overrides(v, args.steps)  # unknown names fail before any training
        specs = []
        for v in names:
            run = train_variant(out, v, args.steps, args.config)
            specs.append(str(run))
            labels[run.name] = " ".join(f"--set {s}" for s in overrides(v, args.steps) if not s.startswith("train."))
    else:
        specs = args.runs
    report = run_evaluation(specs, args.data, out / "eval", EvalSettings(max_side=args.max_side), args.lpips_dir,
                            log=lambda m: print(m, file=sys.stderr))
    plot_tradeoffs(report["vaes"], out)
    write_table(report["vaes"], report["settings"], labels, out, args.steps)
    (out / "tradeoff.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(report["vaes"]))
    print(f"wrote {out}/tradeoff.md, perception_distortion.png, rate_distortion.png")


def main(argv=None) -> None:
    """A mistake (a bad path, an unknown variant, a failed sweep run) is one line on stderr, exit status 2."""
    run_command("eval/tradeoff.py", _tradeoff, argv)


if __name__ == "__main__":
    main()
