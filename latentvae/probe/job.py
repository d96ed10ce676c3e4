"""`latentvae probe`: every cache read and its VAE checked before any work, each (cache, seed) trained and
scored, the sample grids, and the report at the end (summary.json last).

    summary = run_probe(opts)            # the library call
    run(opts)                            # the command: the table on stdout; a signal's line says how far it got
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .. import runs
from ..fsutil import atomic_save_image, atomic_write_bytes, atomic_write_json, check_output_folder
from ..options import ProbeOptions, validated
from ..vae.loaded import LoadedVae
from .data import ProbeData, latent_statistics, read_cache
from .model import sample
from .report import report_markdown, shapes_warning, summarize
from .training import train_one

REPORT_FILES = ("summary.json", "report.md")  # removed when a (re)run starts, written when it ends


def cache_label(cache: str, taken: set) -> str:
    base = Path(cache).resolve().name or "cache"
    label, n = base, 2
    while label in taken:
        label, n = f"{base}-{n}", n + 1
    taken.add(label)
    return label


def check_out(out: Path) -> None:
    """--out: new, empty, or an earlier probe's folder (it has runs/), which is resumed."""
    check_output_folder(out, "--out", lambda p: (p / "runs").is_dir(),
                        "a probe report (runs/), the folder of an earlier probe to resume it")


def stopped_message(opts: ProbeOptions) -> str:
    """The interrupt's line: how far the checkpoints of OUT/runs/LABEL-seedS got."""
    taken: set = set()
    labels = [cache_label(c, taken) for c in opts.cache]
    where = {(label, opts.seed + k): runs.list_checkpoints(Path(opts.out) / "runs" / f"{label}-seed{opts.seed + k}")
             for label in labels for k in range(opts.seeds)}
    steps = {key: int(runs.CKPT_RE.match(found[-1].name).group(1)) if found else 0 for key, found in where.items()}
    done = sum(1 for n in steps.values() if n >= opts.steps)
    partial = [f"{label} seed {seed} at step {n}" for (label, seed), n in steps.items() if 0 < n < opts.steps]
    return (f"{opts.out}: {done} of {len(steps)} probe run(s) trained to step {opts.steps}"
            + (f", checkpoints of {', '.join(partial)}" if partial else "") + "; rerun the same command to resume")


def sample_grid(model, data: ProbeData, lv: LoadedVae, opts: ProbeOptions, seed: int, device, path: Path) -> None:
    """--samples latents drawn with the model, mapped back to the VAE latent and decoded by the cache's VAE."""
    from ..images import make_grid

    labels = None
    if data.train_labels is not None:
        labels = torch.arange(opts.samples) % (int(data.train_labels.max()) + 1)
    z = sample(model, opts.objective, data.shape, opts.samples, opts.sample_steps, seed, device, labels)
    with torch.no_grad():
        imgs = lv.decode(data.vae_latent(z).to(next(lv.module.parameters()).dtype)).float().clamp(-1, 1)
    cols = int(math.ceil(math.sqrt(opts.samples)))
    rows = [imgs[i:i + cols] for i in range(0, len(imgs), cols)]
    while len(rows[-1]) < cols:
        rows[-1] = torch.cat([rows[-1], torch.ones_like(imgs[:1])])
    atomic_save_image(make_grid(rows), path)


def run_probe(opts: ProbeOptions, log=print) -> dict:
    """Train and score every (cache, seed); the report on the first process. Returns the summary."""
    from accelerate import Accelerator
    from accelerate.utils import parse_flag_from_env

    from ..precision import resolve_mixed_precision

    opts = validated(opts)
    out = Path(opts.out)
    check_out(out)
    taken: set = set()
    vaes: dict[str, LoadedVae] = {}
    datas = []
    for c in opts.cache:  # every check before any work: the caches, their VAEs, what their families can do
        data, lv = read_cache(c, opts, cache_label(c, taken))
        datas.append(data)
        vaes[data.label] = lv
    warning = shapes_warning(datas)
    if warning:
        log(warning)
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU")
    device_type = "cpu" if cpu or not torch.cuda.is_available() else "cuda"
    precision = resolve_mixed_precision(opts.mixed_precision, device_type)
    acc = Accelerator(mixed_precision=precision, log_with=None if opts.report_to == "none" else opts.report_to,
                      project_dir=str(out), cpu=cpu)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for name in REPORT_FILES:  # an earlier report goes before new sample grids could sit beside it
            (out / name).unlink(missing_ok=True)
        acc.init_trackers("probe", config={k: str(v) for k, v in vars(opts).items()})
    acc.wait_for_everyone()
    seeds = [opts.seed + k for k in range(opts.seeds)]
    results: dict[str, list[dict]] = {}
    grids = {}
    for data in datas:
        results[data.label] = []
        for seed in seeds:
            r = train_one(data, opts, seed, out / "runs" / f"{data.label}-seed{seed}", acc, log if acc.is_main_process
                          else (lambda *a: None))
            model = r.pop("model")
            results[data.label].append(r)
            if acc.is_main_process:
                log(f"{data.label} seed {seed}: held-out loss {r['loss']:.4f} after {r['steps']} steps "
                    f"({r['train_seconds']:.0f} s)")
            if seed == seeds[0] and acc.is_main_process:
                lv = vaes[data.label]
                path = out / f"samples-{data.label}.png"
                sample_grid(model, data, lv, opts, seed, acc.device, path)
                grids[data.label] = path.name
                results[data.label][-1]["latent_statistics"] = latent_statistics(data, lv)
    summary = summarize(datas, results, opts, precision, acc.num_processes)
    summary["sample_grids"] = grids
    if acc.is_main_process:  # summary.json last: where it is, the report and grids beside it are this run's
        atomic_write_bytes(out / "report.md", report_markdown(summary).encode())
        atomic_write_json(out / "summary.json", summary)
    acc.wait_for_everyone()
    acc.end_training()  # last: it ends the process group that wait_for_everyone needs
    return summary


def run(opts: ProbeOptions) -> dict:
    """`latentvae probe`: the report, and its table on stdout; a signal's line says how far each run got."""
    from ..interrupts import Interrupted

    try:
        summary = run_probe(opts)
    except Interrupted as e:
        first = os.environ.get("RANK", "0") == "0"  # the process that speaks for all (no launcher: this one)
        raise Interrupted(e.signum, stopped_message(validated(opts)) if first else "") from None
    print(report_markdown(summary))
    return summary
