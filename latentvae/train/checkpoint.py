"""Saving and restoring a training run's full state, in the run folder layout of `latentvae/runs.py`.

    save_checkpoint(parts, state, run, keep_last)   # every process calls it; returns the folder
    path = resume_point(run, "latest", log)          # newest checkpoint that verifies, or None
    state = load_checkpoint(parts, path, log)         # weights, EMA, optimizers, RNG, position

Each process writes its own RNG state; process 0 writes the rest, then `state.json` with the
checksums of every file, then renames the staging folder into place (runs.commit).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from .. import runs
from .step import Parts, TrainState


def save_checkpoint(p: Parts, st: TrainState, run: Path, keep_last: int) -> Optional[Path]:
    """Write a complete checkpoint of the current step (all processes must call this)."""
    acc = p.acc
    tmp = runs.staging_dir(run, st.step)
    if acc.is_main_process:
        runs.begin(run, st.step)
    acc.wait_for_everyone()
    tensors, meta = runs.rng_to_files()
    runs.save_tensors(tmp / f"rng-rank{acc.process_index}.safetensors", tensors)
    runs.write_json(tmp / f"rng-rank{acc.process_index}.json", meta)
    acc.wait_for_everyone()
    final = None
    if acc.is_main_process:
        runs.save_tensors(tmp / "model.safetensors", p.vae.state_dict(),
                          metadata={"format": runs.STATE_FORMAT, "step": str(st.step)})
        if p.ema is not None:
            runs.save_tensors(tmp / "ema.safetensors", p.ema.state_dict())
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
            # the architecture actually trained (with model.init_from it comes from that folder)
            "vae_config": {k: v for k, v in p.vae.config.items() if not k.startswith("_")},
            "files": runs.checksums(tmp),  # every process's files are in by now (barrier above)
        }
        runs.write_json(tmp / "state.json", state)  # last: marks the folder complete
        final = runs.commit(run, st.step, keep_last)
    acc.wait_for_everyone()
    return final


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
            opt.load_state_dict(runs.optimizer_from_files(runs.load_tensors(path / f"optim-{name}.safetensors"), meta))
    p.sched_g.load_state_dict({**p.sched_g.state_dict(), **state["scheduler_g"]})
    if p.scaler.is_enabled() and state.get("scaler"):
        p.scaler.load_state_dict(state["scaler"])
    rank = p.acc.process_index
    runs.rng_from_files(runs.load_tensors(path / f"rng-rank{rank}.safetensors"),
                        json.loads((path / f"rng-rank{rank}.json").read_text()))
    log(f"resumed from {path} at step {state['step']}")
    return TrainState(step=state["step"], micro_step=state["micro_step"], nonfinite_total=state["nonfinite_total"],
                      nonfinite_in_row=state["nonfinite_in_row"], bad_images=list(state["bad_images"]))
