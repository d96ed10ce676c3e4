"""Saving and restoring a training run's full state, in the run folder layout of `latentvae/runs.py`.

    save_checkpoint(parts, state, run, keep_last)   # every process calls it; returns the folder
    path = resume_point(run, "latest", log)          # newest checkpoint that verifies, or None
    state = load_checkpoint(parts, path, log)         # weights, EMA, optimizers, RNG, position

    save_best(parts, state, run, record, linked)     # checkpoints/best: this step's checkpoint, apart
                                                     # from the rotation (all processes call it)

Each process writes its own RNG state; process 0 writes the rest, then `state.json` with the
checksums of every file, then renames the staging folder into place (runs.commit).

`checkpoints/best` is a complete checkpoint (it verifies, exports, loads and resumes like any other)
plus `best.json` ({"step", "metric", "value"}); `runs.list_checkpoints` does not see it, so neither
`keep_last` nor `--resume latest` touches it. It is staged in `.checkpoint-best.tmp` (hard links to
the files of this step's regular checkpoint when there is one, else written afresh), then the old
one is renamed to `.best.old` and the new one into place; a kill between those two renames leaves
the old one whole in `.best.old`, which `recover_best` puts back at the next start.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from .. import runs
from ..fsutil import fsync_dir
from ..vae.families import family_of
from .step import Parts, TrainState


def save_checkpoint(p: Parts, st: TrainState, run: Path, keep_last: int) -> Optional[Path]:
    """Write a complete checkpoint of the current step (all processes must call this)."""
    acc = p.acc
    if acc.is_main_process:
        runs.begin(run, st.step)
    write_checkpoint(p, st, runs.staging_dir(run, st.step))
    final = runs.commit(run, st.step, keep_last) if acc.is_main_process else None
    acc.wait_for_everyone()
    return final


def write_checkpoint(p: Parts, st: TrainState, tmp: Path) -> None:
    """Every file of the current step's checkpoint into the empty staging folder `tmp` (made by the main
    process), `state.json` last (all processes must call this)."""
    acc = p.acc
    acc.wait_for_everyone()
    tensors, meta = runs.rng_to_files()
    runs.save_tensors(tmp / f"rng-rank{acc.process_index}.safetensors", tensors)
    runs.write_json(tmp / f"rng-rank{acc.process_index}.json", meta)
    acc.wait_for_everyone()
    if acc.is_main_process:
        runs.save_tensors(tmp / "model.safetensors", p.vae.state_dict(),
                          metadata={"format": runs.STATE_FORMAT, "step": str(st.step)})
        if p.ema is not None:
            runs.save_tensors(tmp / "ema.safetensors", ema_state_dict(p))
        if p.disc is not None:
            runs.save_tensors(tmp / "disc.safetensors", p.disc_module().state_dict())
        for name, opt in (("g", p.opt_g), ("d", p.opt_d)):
            if opt is not None:
                tensors, ometa = runs.optimizer_to_files(opt.state_dict())
                runs.save_tensors(tmp / f"optim-{name}.safetensors", tensors)
                runs.write_json(tmp / f"optim-{name}.json", ometa)
        state = {
            "format": runs.STATE_FORMAT, "step": st.step, "micro_step": st.micro_step,
            "nonfinite_total": st.nonfinite_total, "nonfinite_in_row": st.nonfinite_in_row,
            "bad_images": st.bad_images, "num_processes": acc.num_processes, "precision": p.precision,
            "scheduler_g": {k: v for k, v in p.sched_g.state_dict().items() if k != "lr_lambdas"},
            "scaler": p.scaler.state_dict() if p.scaler.is_enabled() else None,
            "ema_optimization_step": p.ema.updates if p.ema is not None else None,
            "config": p.cfg.to_dict(),
            # the architecture actually trained, its class included (with model.init_from, the loaded VAE's)
            "vae_config": {"_class_name": family_of(p.vae).class_name,
                           **{k: v for k, v in p.vae.config.items() if not k.startswith("_")}},
            "files": runs.checksums(tmp),  # every process's files are in by now (barrier above)
        }
        runs.write_json(tmp / "state.json", state)  # last: marks the folder complete
    acc.wait_for_everyone()


def ema_state_dict(p: Parts) -> dict:
    """ema.safetensors: the EMA of the parameters, with the module's buffers as they are (FLUX.2's BatchNorm
    statistics), so that it loads as a whole state dict, as model.safetensors does."""
    return {**p.vae.state_dict(), **p.ema.state_dict()}


# ----------------------------------------------------------------------------- checkpoints/best
BEST, BEST_INFO = "best", "best.json"


def best_dir(run: Path) -> Path:
    return runs.checkpoints_root(run) / BEST


def read_best(run: Path) -> Optional[dict]:
    """best.json of checkpoints/best ({"step", "metric", "value"}), or None without a readable one."""
    try:
        info = json.loads((best_dir(run) / BEST_INFO).read_text())
        return info if isinstance(info, dict) and isinstance(info.get("step"), int) else None
    except (OSError, ValueError):
        return None


def save_best(p: Parts, st: TrainState, run: Path, record: Optional[dict], linked: Optional[Path]) -> None:
    """Publish the current step as checkpoints/best (all processes must call this). `linked`: this step's
    regular checkpoint, whose files are hard-linked (copied where links fail) instead of written again;
    `record` ({"step", "metric", "value"}, main process) goes into best.json."""
    if linked is not None:
        if p.acc.is_main_process:
            best_from(run, linked, record)
    else:
        tmp = runs.checkpoints_root(run) / f".checkpoint-{BEST}.tmp"
        if p.acc.is_main_process:
            _best_staging(run)
        write_checkpoint(p, st, tmp)
        if p.acc.is_main_process:
            runs.write_json(tmp / BEST_INFO, record)
            publish_best(run, tmp)
    p.acc.wait_for_everyone()


def _best_staging(run: Path) -> Path:
    """An empty `.checkpoint-best.tmp` (runs.clean_staging removes a leftover one at start)."""
    tmp = runs.checkpoints_root(run) / f".checkpoint-{BEST}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def best_from(run: Path, ckpt: Path, record: dict) -> Path:
    """checkpoints/best from the files of a complete checkpoint, hard-linked (copied where a file system
    has no hard links), with best.json; main process."""
    tmp = _best_staging(run)
    for f in sorted(ckpt.iterdir()):
        try:
            os.link(f, tmp / f.name)
        except OSError:
            shutil.copy2(f, tmp / f.name)
            with open(tmp / f.name, "rb+") as fh:
                os.fsync(fh.fileno())
    runs.write_json(tmp / BEST_INFO, record)
    return publish_best(run, tmp)


def publish_best(run: Path, staged: Path) -> Path:
    """Rename a complete staged folder to checkpoints/best, the old one first to `.best.old`."""
    best = best_dir(run)
    old = best.with_name(f".{BEST}.old")
    fsync_dir(staged)  # the files' entries, before the rename publishes the folder
    if best.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(best, old)
    os.replace(staged, best)
    fsync_dir(best.parent)
    shutil.rmtree(old, ignore_errors=True)
    return best


def recover_best(run: Path) -> None:
    """After a kill between publish_best's two renames, put the old best back (main process, at start)."""
    best = best_dir(run)
    old = best.with_name(f".{BEST}.old")
    shutil.rmtree(best.with_name(f".{BEST}.dropped"), ignore_errors=True)
    if old.is_dir():
        if not best.exists() and (old / "state.json").is_file():
            os.replace(old, best)
            fsync_dir(best.parent)
        else:
            shutil.rmtree(old, ignore_errors=True)


def drop_best(run: Path) -> None:
    """Remove checkpoints/best (hidden first: a kill mid-delete leaves no half folder under its name)."""
    best = best_dir(run)
    if best.exists():
        hidden = best.with_name(f".{BEST}.dropped")
        shutil.rmtree(hidden, ignore_errors=True)
        os.replace(best, hidden)
        shutil.rmtree(hidden, ignore_errors=True)


def resume_point(run: Path, where: str, log: Callable[[str], None]) -> Optional[Path]:
    """The checkpoint to resume from: for "latest", this run's newest one that verifies (falling back
    to older ones and saying so; None if the run has none yet); else the checkpoint or run `where`."""
    if where != "latest":
        path = runs.find_checkpoint(where)
        runs.verify(path)
        return path
    path = next(runs.resume_candidates(run, log=log), None)
    if path is None:
        if runs.list_checkpoints(run):
            raise runs.CheckpointError(f"{run}: every checkpoint is damaged (see above); nothing to resume from "
                                       "(remove them, or choose one with --resume PATH)")
        log(f"--resume latest: no checkpoint in {run} yet; starting from step 0")
        return None
    newest = runs.list_checkpoints(run)[-1]
    if path != newest:
        log(f"--resume latest: {newest.name} is damaged; falling back to {path.name}")
    return path


def load_checkpoint(p: Parts, path: Path, log: Callable[[str], None]) -> TrainState:
    """Restore weights, EMA, discriminator, optimizers, schedule, scaler and this process's RNG."""
    state = runs.read_state(path)
    if state.get("num_processes") != p.acc.num_processes:
        raise runs.CheckpointError(f"{path}: saved with {state.get('num_processes')} processes, resumed with "
                                   f"{p.acc.num_processes}; an exact resume needs the same number")
    p.vae.load_state_dict(runs.load_tensors(path / "model.safetensors"), strict=True)
    if p.ema is not None:
        if (path / "ema.safetensors").is_file():
            p.ema.load_state_dict(runs.load_tensors(path / "ema.safetensors"), state["ema_optimization_step"])
        else:
            p.ema.load_state_dict(dict(p.vae.named_parameters()), 0)
            log(f"{path.name} has no EMA (train.ema_decay was 0): the EMA starts from its weights")
    if p.disc is not None:
        if (path / "disc.safetensors").is_file():
            p.disc_module().load_state_dict(runs.load_tensors(path / "disc.safetensors"), strict=True)
        else:
            log(f"loss.gan is on but {path.name} has no discriminator: a fresh one starts "
                f"(at step max({state['step']}, loss.gan_start={p.cfg.loss.gan_start}))")
    elif (path / "disc.safetensors").is_file():
        log(f"loss.gan is off: the discriminator saved in {path.name} is not used")
    for name, opt in (("g", p.opt_g), ("d", p.opt_d)):
        if opt is not None and (path / f"optim-{name}.safetensors").is_file():
            meta = json.loads((path / f"optim-{name}.json").read_text())
            runs.restore_optimizer(opt, runs.load_tensors(path / f"optim-{name}.safetensors"), meta)
    p.sched_g.load_state_dict({**p.sched_g.state_dict(), **state["scheduler_g"]})
    if p.scaler.is_enabled() and state.get("scaler"):
        p.scaler.load_state_dict(state["scaler"])
    rank = p.acc.process_index
    runs.rng_from_files(runs.load_tensors(path / f"rng-rank{rank}.safetensors"),
                        json.loads((path / f"rng-rank{rank}.json").read_text()))
    log(f"resumed from {path} at step {state['step']}")
    return TrainState(step=state["step"], micro_step=state["micro_step"], nonfinite_total=state["nonfinite_total"],
                      nonfinite_in_row=state["nonfinite_in_row"], bad_images=list(state["bad_images"]))

