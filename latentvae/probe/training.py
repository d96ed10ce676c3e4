"""One (cache, seed) probe run: trained or resumed from its checkpoint, then scored.

    r = train_one(data, opts, seed, OUT / "runs" / f"{label}-seed{seed}", accelerator)
    r["loss"], r["per_level"], r["model"]      # the EMA model's held-out scores, and that model

It reuses the training machinery: accelerate for processes and precision, runs.py's checksummed
checkpoints (staging folder, one rename) and resume, train/ema.py's EMA. A signal during training
finishes the step it is in and writes a checkpoint first (interrupts.StopRequest).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import runs
from ..errors import BadInputError
from ..options import ProbeOptions
from ..train.ema import EMA
from .data import ProbeData
from .model import batch_for, build_unet, held_out_loss, noisy, predict


def save_probe_checkpoint(run: Path, step: int, model, ema: EMA, opt, acc, extra: dict) -> None:
    """A complete checkpoint in runs.py's layout (staging folder, checksums, one rename); main process."""
    tmp = runs.begin(run, step)
    runs.save_tensors(tmp / "model.safetensors", acc.unwrap_model(model).state_dict())
    runs.save_tensors(tmp / "ema.safetensors", ema.state_dict())
    tensors, meta = runs.optimizer_to_files(opt.state_dict())
    runs.save_tensors(tmp / "optim-g.safetensors", tensors)
    runs.write_json(tmp / "optim-g.json", meta)
    runs.write_json(tmp / "state.json", {"format": runs.STATE_FORMAT, "kind": "probe", "step": step,
                                         "ema_updates": ema.updates, **extra, "files": runs.checksums(tmp)})
    runs.commit(run, step, keep_last=1)


def resume_from(run: Path, recipe: dict, model, ema: EMA, opt, steps: int, what: str, log=print) -> tuple[int, float]:
    """Load the run's newest checkpoint that verifies into model, EMA and optimizer, saying so with the
    steps done and to do; (its step, its training seconds), or (0, 0.0) for a new run."""
    runs.clean_staging(run)  # the hidden staging folder of a checkpoint a signal or kill cut short
    for ckpt in runs.resume_candidates(run, log):
        state = runs.read_state(ckpt)
        if state.get("recipe") != recipe:
            raise BadInputError(f"{run}: holds a probe run with another recipe or cache ({ckpt.name}); use a new --out")
        model.load_state_dict(runs.load_tensors(ckpt / "model.safetensors"))
        ema.load_state_dict(runs.load_tensors(ckpt / "ema.safetensors"), state["ema_updates"])
        runs.restore_optimizer(opt, runs.load_tensors(ckpt / "optim-g.safetensors"),
                               json.loads((ckpt / "optim-g.json").read_text()))
        start = state["step"]
        log(f"{what}: trained to step {start} already, reusing {ckpt}" if start >= steps else
            f"{what}: resuming from step {start} of {steps}, {steps - start} to do ({ckpt})")
        return start, state.get("train_seconds", 0.0)
    return 0, 0.0


def train_one(data: ProbeData, opts: ProbeOptions, seed: int, run: Path, acc, log=print) -> dict:
    """Train (or resume) the probe model on one cache with one seed; the held-out scores of its EMA.
    A signal during training stops it after the current step, with a checkpoint (interrupts.StopRequest)."""
    from accelerate.utils import set_seed

    set_seed(seed)
    num_classes = 0 if data.train_labels is None else int(max(data.train_labels.max(), data.val_labels.max()
                                                               if len(data.val_labels) else 0)) + 1
    model = build_unet(opts.preset, data.shape, num_classes)
    ema = EMA(model, opts.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=0.0)
    recipe = {"preset": opts.preset, "objective": opts.objective, "lr": opts.lr, "batch_size": opts.batch_size,
              "processes": acc.num_processes, "ema_decay": opts.ema_decay, "seed": seed,
              "cache": str(data.cache), "weights_sha256": data.manifest["vae"]["weights_sha256"]}
    start, seconds = resume_from(run, recipe, model, ema, opt, opts.steps, f"{data.label} seed {seed}", log)
    model, opt = acc.prepare(model, opt)
    ema.shadow = [s.to(acc.device) for s in ema.shadow]
    t0 = time.perf_counter()

    def save(step: int) -> None:
        if acc.is_main_process:
            save_probe_checkpoint(run, step, model, ema, opt, acc,
                                  {"recipe": recipe, "train_seconds": seconds + time.perf_counter() - t0})
        acc.wait_for_everyone()

    curve = train_steps(model, ema, opt, data, opts, seed, start, acc, save, log)
    seconds += time.perf_counter() - t0
    scorer = build_unet(opts.preset, data.shape, num_classes).to(acc.device).eval()
    scorer.load_state_dict({**scorer.state_dict(), **{k: v.to(acc.device) for k, v in ema.state_dict().items()}})
    scores = held_out_loss(scorer, data, opts.objective, opts.noise_levels, acc.device)
    acc.log({f"probe/{data.label}/seed{seed}/heldout_loss": scores["loss"]}, step=opts.steps)
    return {**scores, "seed": seed, "train_seconds": seconds, "steps": opts.steps,
            "images_seen": opts.steps * opts.batch_size * acc.num_processes, "train_curve": curve, "model": scorer}


def train_steps(model, ema: EMA, opt, data: ProbeData, opts: ProbeOptions, seed: int, start: int, acc, save,
                log=print) -> list:
    """Steps `start` to --steps; `save(step)` checkpoints (every --save-every, at the end, and when a signal
    asks to stop: then after the step it is in, and Interrupted). The logged training curve."""
    from ..interrupts import StopRequest

    warmup = max(1, min(opts.warmup_steps, opts.steps))
    curve = []
    model.train()
    with StopRequest(log, "the current step") as stop:
        for step in range(start, opts.steps):
            for group in opt.param_groups:
                group["lr"] = opts.lr * min(1.0, (step + 1) / warmup)
            x0, eps, t, labels = batch_for(data, opts.objective, seed, step, opts.batch_size, acc.process_index,
                                           acc.num_processes)
            x0, eps, t = x0.to(acc.device), eps.to(acc.device), t.to(acc.device)
            labels = None if labels is None else labels.to(acc.device)
            x_t, target = noisy(opts.objective, x0, eps, t)
            with acc.autocast():
                loss = F.mse_loss(predict(model, x_t, t, labels).float(), target)
            acc.backward(loss)
            acc.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(acc.unwrap_model(model))
            if (step + 1) % opts.log_every == 0:
                value = float(loss.detach())
                curve.append([step + 1, value])
                acc.log({f"probe/{data.label}/seed{seed}/train_loss": value}, step=step + 1)
            if stop.agreed(acc):
                save(step + 1)
                raise stop.interrupted("")  # run() says which runs are where
            if (opts.save_every and (step + 1) % opts.save_every == 0) or step + 1 == opts.steps:
                save(step + 1)
    return curve
