"""The blur tradeoff: train (or take) a set of autoencoders, evaluate them, draw the pictures.

    # the CPU sweep: 6 runs of the `tiny` preset at 64 px (its time: benchmarks/RESULTS.md, "Evaluation")
    latentvae tradeoff --out runs/tradeoff --data ../shared/data/dev-images --max-side 256
    # only some variants, or other lengths
    latentvae tradeoff --variants mse --variants mse+lpips --variants "ae mse+lpips" --steps 100 \
        --out runs/tradeoff --data IMAGES
    # runs that already exist (any VAE `latentvae evaluate` accepts): nothing is trained
    latentvae tradeoff --runs runs/a --runs runs/b --runs taesd:sd --out runs/tradeoff --data IMAGES
    python eval/tradeoff.py ...        # the same command

Without --runs, each variant is trained with `accelerate launch train/train.py --config
configs/quickstart.yaml --out OUT/runs/NAME --set ...` (= `latentvae train ...`) in a subprocess
(log in OUT/runs/NAME.log; a finished run is reused, an interrupted one resumed). All of them are
evaluated with latentvae.evaluate (report in OUT/eval), then OUT gets perception_distortion.png
(PSNR against LPIPS and against sharpness), rate_distortion.png (KL per latent element against
PSNR), tradeoff.json and, last, tradeoff.md; the earlier ones are removed as soon as the new evaluation
is in place, so what is there is of one sweep. A signal while a variant trains is passed on to its training, which
stops after its current step with a checkpoint (the rerun resumes it) before the sweep stops. This
module owns the sweep's variants and the plots; the numbers come from latentvae/evaluate/.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .errors import BadInputError, UserError
from .evaluate import markdown_table, run_evaluation
from .fsutil import atomic_write, atomic_write_bytes
from .interrupts import Interrupted
from .options import EvaluateOptions, TradeoffOptions, make_options
from .runs import list_checkpoints

REPO = Path(__file__).resolve().parents[1]  # train/train.py and configs/ live here
OUTPUTS = ("tradeoff.md", "tradeoff.json", "perception_distortion.png", "rate_distortion.png")  # md written last

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


# ----------------------------------------------------------------------------- the sweep
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
    """`accelerate launch train/train.py --config CONFIG --out RUN --set ...`, one CPU process, resumed if begun."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "train" / "train.py"),
           "--config", config, "--out", str(run), "--no-progress"]
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
    found = list_checkpoints(run)
    print(f"{variant}: resuming {run} from {found[-1].name} to step {steps}" if found else
          f"{variant}: training {steps} steps -> {run}", file=sys.stderr)
    log_path = run.parent / f"{run.name}.log"
    with open(log_path, "a") as log:
        # its own process group: a signal is passed on to the launcher and the training alike (stop_training)
        proc = subprocess.Popen(train_command(run, variant, steps, config), stdout=log, stderr=subprocess.STDOUT,
                                cwd=REPO, start_new_session=True)
        try:
            code = proc.wait()
        except Interrupted as e:
            stop_training(proc, e.signum)
            found = list_checkpoints(run)
            kept = f"its {found[-1].name} is kept" if found else "before its first checkpoint"
            raise Interrupted(e.signum, f"{run}: {variant} stopped, {kept} (log: {log_path}); rerun the same "
                                        "command to resume") from None
    if code != 0 or not finished(run, steps):
        raise TrainingFailed(f"{variant}: training failed (exit {code}); see {log_path}")
    return run


def stop_training(proc: subprocess.Popen, signum: int) -> None:
    """Pass the signal on to the training's process group and wait until every process of it is gone: the
    training finishes its step and writes a checkpoint (`accelerate launch` passes no signal on, and may
    exit before the training it started). A second signal here is passed on too: the training then exits
    at once (interrupts.StopRequest)."""
    try:
        os.killpg(proc.pid, signum)
        wait_for_group(proc)
    except Interrupted as again:
        os.killpg(proc.pid, again.signum)
        wait_for_group(proc)
        raise


def wait_for_group(proc: subprocess.Popen) -> None:
    """Until the process and all it started in its process group have exited."""
    proc.wait()
    while True:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def train_sweep(opts: TradeoffOptions) -> tuple[list[str], dict[str, str]]:
    """Train every chosen variant (all unknown names refused first): (run folders, run name -> its --set flags)."""
    names = list(opts.variants or VARIANTS)
    for v in names:
        overrides(v, opts.steps)  # unknown names fail before any training
    config = opts.config or str(REPO / "configs" / "quickstart.yaml")
    specs, labels = [], {}
    for v in names:
        run = train_variant(Path(opts.out), v, opts.steps, config)
        specs.append(str(run))
        labels[run.name] = " ".join(f"--set {s}" for s in overrides(v, opts.steps) if not s.startswith("train."))
    return specs, labels


# ----------------------------------------------------------------------------- the pictures
def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def scatter(ax, summary: dict[str, dict], xkey: str, ykey: str, xlabel: str, ylabel: str, logx: bool = False,
            logy: bool = False) -> None:
    """One labelled point per VAE that has both numbers."""
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


def plot_tradeoffs(summary: dict[str, dict], out: Path) -> None:
    """perception_distortion.png and rate_distortion.png from summary.json's `vaes`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    scatter(axes[0], summary, "psnr", "lpips_vgg", "PSNR (dB) → less distortion",
            "LPIPS-VGG ↓ (perceptual distance)")
    scatter(axes[1], summary, "psnr", "hf_energy_ratio", "PSNR (dB) → less distortion",
            "HF energy ratio, log (1 = original's)", logy=True)
    axes[1].axhline(1.0, color="gray", lw=0.8)
    # descriptive titles: what the points show depends on the runs, and short CPU runs are noisy
    fig.suptitle("Perception-distortion: PSNR against LPIPS and against sharpness")
    save_figure(fig, out / "perception_distortion.png")

    fig, ax = plt.subplots(figsize=(6, 4.5))
    scatter(ax, summary, "kl_per_element", "psnr", "KL per latent element (nats, log scale): the rate", "PSNR (dB)",
            logx=True)
    ax.set_title("Rate-distortion: KL per latent element against PSNR")
    save_figure(fig, out / "rate_distortion.png")


def write_table(summary: dict, settings: dict, variants: dict[str, str], out: Path, steps: int) -> None:
    """tradeoff.md: what was trained (for a sweep), the table, the two plots."""
    lines = [f"# Blur tradeoff: {len(summary)} autoencoders on {settings['images']} images from "
             f"`{settings['data']}`", ""]
    if variants:
        lines += [f"Trained {steps} steps each; overrides on top of configs/quickstart.yaml and "
                  f"`{' '.join(f'{k}={v}' for k, v in BASE.items())}`:", ""]
        lines += [f"- **{label}**: `{variants[label]}`" for label in summary if label in variants]
        lines += [""]
    lines += [markdown_table(summary), "", "![perception-distortion](perception_distortion.png)", "",
              "![rate-distortion](rate_distortion.png)", ""]
    atomic_write_bytes(out / "tradeoff.md", "\n".join(lines).encode())


# ----------------------------------------------------------------------------- the command
def run(opts: TradeoffOptions) -> dict:
    """`latentvae tradeoff`: the sweep (unless --runs), the evaluation, the plots and the table."""
    out = Path(opts.out)
    if opts.runs:
        specs, labels = list(opts.runs), {}
    else:
        specs, labels = train_sweep(opts)
    evaluation = make_options(EvaluateOptions, {"vae": specs, "data": opts.data, "out": str(out / "eval"),
                                                "max_side": opts.max_side, "lpips_dir": opts.lpips_dir})
    report = run_evaluation(evaluation, log=lambda m: print(m, file=sys.stderr),
                            vae_flag="--runs" if opts.runs else "--vae")
    for name in OUTPUTS:  # the earlier sweep's, beside the evaluation that just replaced theirs
        (out / name).unlink(missing_ok=True)
    plot_tradeoffs(report["vaes"], out)
    atomic_write_bytes(out / "tradeoff.json", (json.dumps(report, indent=2) + "\n").encode())
    write_table(report["vaes"], report["settings"], labels, out, opts.steps)  # last: the sweep is whole
    print(markdown_table(report["vaes"]))
    print(f"wrote {out}/tradeoff.md, perception_distortion.png, rate_distortion.png")
    return report
