"""The training run: build the parts, then loop over the data stream until `train.steps`.

    accelerate launch train/train.py --config configs/quickstart.yaml --out RUN
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 train/train.py --config ... --out RUN

    trainer = Trainer(cfg, "runs/x", resume="latest"); trainer.run()

The VAE it starts from (any family, checked against the config) and the parts around it are build.py;
the step itself is step.train_step; checkpoints are checkpoint.py; logs and preview grids report.py;
validation (RUN/eval.jsonl, checkpoints/best) validation.py.
Too many consecutive non-finite updates stop the run (NonFiniteError) after a last checkpoint of
the (finite) weights.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import torch

from .. import runs
from ..config import Config, frame_size
from ..errors import UserError
from ..fsutil import atomic_write_bytes, atomic_write_json
from ..interrupts import Interrupted, StopRequest
from .validation import Validator, append_record, best_metric, best_record, better, load_val_images, prune_log
from .checkpoint import (best_from, drop_best, load_checkpoint, read_best, recover_best, resume_point, save_best,
                         save_checkpoint)
from .build import build_parts, initial_vae, starting_vae  # noqa: F401 (initial_vae: the tests' way in)
from .clips import ClipStream, clip_data, clip_sources, load_val_clips
from .data import CropStream, build_sources, make_loader, mix_seed
from .report import LogWindow, eval_copy, flat_config, save_preview, tracker_list
from .step import TrainState, train_step

SHARED_MARKER = ".latentvae-shared-check"
SHARDED = {"FSDP", "DEEPSPEED", "MEGATRON_LM"}


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with non-finite gradients."""


# ----------------------------------------------------------------------------- set-up checks
def refuse_sharded_training(distributed_type: Optional[str] = None) -> None:
    """FSDP / DeepSpeed / Megatron are refused at start: the VAE fits on one device, DDP is the way."""
    from accelerate.utils import parse_flag_from_env

    asked = [name for name, env in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"),
                                    ("Megatron-LM", "ACCELERATE_USE_MEGATRON_LM")) if parse_flag_from_env(env)]
    if distributed_type is not None and str(distributed_type).split(".")[-1] in SHARDED:
        asked.append(str(distributed_type).split(".")[-1])
    if asked:
        raise UserError(f"accelerate is set up for {asked[0]}, which latentvae does not support: the VAE fits on one "
                        "device, so train with DDP (`accelerate launch --multi_gpu ...`, or an `accelerate config` "
                        "without FSDP/DeepSpeed)")


def check_shared_output(acc, out: Path) -> None:
    """Every process must see the output folder that process 0 writes (each writes its RNG state into
    the checkpoints there): process 0 writes a random token, every process reads it back."""
    import json
    import uuid

    from accelerate.utils import broadcast_object_list

    token = [uuid.uuid4().hex if acc.is_main_process else None]
    if acc.num_processes > 1:
        broadcast_object_list(token)
    if acc.is_main_process:
        atomic_write_json(out / SHARED_MARKER, {"token": token[0]})
    acc.wait_for_everyone()
    try:
        seen = json.loads((out / SHARED_MARKER).read_text()).get("token")
    except (OSError, ValueError):
        seen = None
    ok = acc.gather(torch.tensor([int(seen == token[0])], device=acc.device))
    bad = [r for r, v in enumerate(ok.tolist()) if not v]
    if bad:
        raise UserError(f"--out {out}: process(es) {bad} do not see the folder that process 0 writes; every "
                        "process (on every node) must see the same output folder, e.g. on a shared file system")


def cpu_threads_per_process(num_processes: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", num_processes))
    return max(1, cores // max(1, local))


def env_cpu() -> bool:
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


# ----------------------------------------------------------------------------- the run
class Trainer:
    """Builds the parts (data, models, optimizers, precision) and `run()`s to `cfg.train.steps`."""

    def __init__(self, cfg: Config, out: str | Path, resume: Optional[str] = None, accelerator=None,
                 show_progress: bool = True):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg, self.out, self.show_progress = cfg, Path(out), show_progress
        t = cfg.train
        refuse_sharded_training()
        # Precision is ours, not accelerate's: we autocast and own the fp16 GradScaler, so that with the
        # GAN each optimizer is unscaled exactly once and the scaler updated once per step (accelerate's
        # wrapper updates it at every optimizer.step), and so that fp16 also works on a CPU.
        acc = accelerator or Accelerator(mixed_precision="no", gradient_accumulation_steps=t.grad_accum,
                                         log_with=tracker_list(t.report_to, self.out), project_dir=str(self.out),
                                         cpu=env_cpu())
        refuse_sharded_training(acc.distributed_type)
        if acc.device.type == "cpu":
            torch.set_num_threads(t.cpu_threads or cpu_threads_per_process(acc.num_processes))
        set_seed(t.seed)  # identical initial weights on every process
        # the VAE first: what its family cannot do is refused before any data is read
        self.start = starting_vae(cfg)
        self.state = TrainState()
        self.clips = clip_data(cfg.data)  # a video VAE's decoder on clips (train/clips.py)
        if self.clips:
            train_src, val_src = clip_sources(cfg.data)
            self.stream = ClipStream(train_src, cfg.data, t.seed)
        else:
            train_src, val_src = build_sources(cfg.data)
            self.stream = CropStream(train_src, cfg.data, t.seed)
        # validation and preview grids are the main process's: only it holds the images or clips (uint8)
        self.eval_every = t.save_every if t.eval_every is None else t.eval_every
        count = max(t.eval_count if self.eval_every else 0, t.preview_count)
        images, bad_val = torch.empty(0, 3, 0, 0, dtype=torch.uint8), []
        if acc.is_main_process:
            images, bad_val = (load_val_clips(val_src, frame_size(cfg.data), count) if self.clips else
                               load_val_images(val_src, cfg.data.val_resolution, count))
        self.val = images[:t.preview_count].float() / 127.5 - 1  # the preview grids' images
        self.state.bad_images.extend(bad_val)
        self.parts = build_parts(cfg, acc, self.start)
        self.validator = None
        if acc.is_main_process and self.eval_every and len(images):
            self.validator = Validator(cfg, images[:t.eval_count], acc.device, acc.print, self.parts.lpips_eval)
        elif acc.is_main_process and self.eval_every:
            acc.print("validation: no validation images (data.val_count=0 and no data.val_source); nothing is scored")
        self.best_value: Optional[float] = None  # train.best_metric's value in checkpoints/best
        self.best_info: Optional[dict] = None  # best.json of the next checkpoints/best
        # each process draws its own reparameterization noise
        torch.manual_seed(mix_seed(t.seed, 1_000_000 + acc.process_index))

        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            runs.clean_staging(self.out)
            atomic_write_json(self.out / "config.json", cfg.to_dict())
        acc.wait_for_everyone()
        check_shared_output(acc, self.out)
        if resume:
            path = resume_point(self.out, resume, acc.print)
            if path is not None:
                self.state = load_checkpoint(self.parts, path, acc.print)
        if acc.is_main_process:
            self.best_value = self.reconcile_validation()
        acc.wait_for_everyone()

    @property
    def acc(self):
        return self.parts.acc

    @property
    def vae(self):
        return self.parts.vae

    def run(self) -> TrainState:
        p, t, st, acc = self.parts, self.cfg.train, self.state, self.parts.acc
        if st.step >= t.steps:
            acc.print(f"{self.out}: already at step {st.step} of train.steps={t.steps}; nothing to train "
                      f"(raise train.steps to continue)")
            return st
        if acc.is_main_process:
            acc.init_trackers("tb", config=flat_config(self.cfg))
            what = "clips" if self.clips else "images"
            acc.print(self.start.describe(), f"| {len(self.stream.src)} training {what} | {acc.num_processes} "
                      f"process(es) | precision {p.precision} | output: {self.out}")
        loader = make_loader(self.stream, t.batch_size, st.micro_step, acc.process_index, acc.num_processes,
                             self.cfg.data.num_workers)
        bar = None
        if acc.is_main_process and self.show_progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=t.steps, initial=st.step, desc="train", dynamic_ncols=True)
        window = LogWindow(st.micro_step)
        say = (lambda m: bar.write(m, file=sys.stderr)) if bar is not None else acc.print
        try:
            with StopRequest(say if acc.is_main_process else (lambda m: None), "the current optimizer step") as stop:
                for batch in loader:
                    self.record_bad_images(batch["bad"])
                    logs = train_step(p, st, batch["pixels"])
                    if logs is None:
                        continue
                    if st.nonfinite_in_row:
                        self.on_nonfinite()
                        if stop.agreed(acc) and st.step < t.steps:
                            self.stop_here(stop, window, bar, saved=False)
                        continue
                    window.add(logs)
                    if bar is not None:
                        bar.update(1)
                    if st.step % t.log_every == 0 or st.step == t.steps:
                        window.flush(p, st, bar)
                    # a due preview and validation still run when stopping: the run stays the uninterrupted one
                    if st.step % t.image_every == 0 or st.step == t.steps:
                        save_preview(p, self.val, self.out, st.step)
                    evaluate = bool(self.eval_every) and (st.step % self.eval_every == 0 or st.step == t.steps)
                    improved = self.validate() if evaluate else False
                    saved = st.step % t.save_every == 0 or st.step == t.steps
                    if saved:
                        self.save()
                    if improved:
                        save_best(p, st, self.out, self.best_info, runs.final_dir(self.out, st.step) if saved else None)
                    # every process, once per update, after all of it: a signal during the step, its
                    # validation or its checkpoint stops the run here, not one update later
                    if stop.agreed(acc) and st.step < t.steps:
                        self.stop_here(stop, window, bar, saved)
                    if st.step >= t.steps:
                        break
        finally:
            if bar is not None:
                bar.close()
            acc.end_training()
        return st

    def stop_here(self, stop: StopRequest, window: LogWindow, bar, saved: bool) -> None:
        """After a signal (every process, at the same update): the logs so far, a checkpoint of this step
        unless it has one, then Interrupted (the command line adds how to resume)."""
        p, st = self.parts, self.state
        window.flush(p, st, bar)
        if not saved:
            self.save()
        raise stop.interrupted(
            f"stopped at step {st.step} of {self.cfg.train.steps}; checkpoint {runs.final_dir(self.out, st.step)}"
            if self.acc.is_main_process else "")

    def save(self) -> Optional[Path]:
        return save_checkpoint(self.parts, self.state, self.out, self.cfg.train.keep_last)

    # ------------------------------------------------------------------------- validation
    def validate(self) -> bool:
        """Score the EMA weights (main process), log and record them; True on every process when
        train.best_metric improved (then the caller saves checkpoints/best, all processes together)."""
        acc, st, metric = self.acc, self.state, best_metric(self.cfg)
        improved = [False]
        if self.validator is not None:
            record = self.validator.evaluate(eval_copy(self.parts), st.step)
            acc.log({f"val/{k}": v for k, v in record.items() if k != "step" and v is not None}, step=st.step)
            append_record(self.out, record)
            what = f"{record['images']} frame(s) of {record['clips']} clip(s)" if "clips" in record else \
                f"{record['images']} image(s)"
            acc.print(f"step {st.step}: validation on {what}: " + ", ".join(
                f"{k} {record[k]:.4g}" for k in ("psnr", "ssim", "lpips_alex", "lpips_vgg", "rfid")
                if record.get(k) is not None))
            if metric != "none" and better(metric, record.get(metric), self.best_value):
                self.best_value = record[metric]
                self.best_info = {"step": st.step, "metric": metric, "value": record[metric]}
                improved = [True]
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list
            broadcast_object_list(improved)  # every process calls it, main's value wins
        return improved[0]

    def reconcile_validation(self) -> Optional[float]:
        """At start (main process): RUN/eval.jsonl and checkpoints/best made consistent with the step the
        run starts from; returns train.best_metric's value in checkpoints/best (None: none yet)."""
        st, metric, log = self.state, best_metric(self.cfg), self.acc.print
        records = prune_log(self.out, st.step)  # lines of steps a killed run did not checkpoint
        recover_best(self.out)
        best = read_best(self.out)
        if best is not None and best["step"] > st.step:
            log(f"checkpoints/best holds step {best['step']}, after step {st.step} this run starts from: removed")
            drop_best(self.out)
            best = None
        if metric == "none":
            return None
        value = best["value"] if best is not None and best.get("metric") == metric else None
        top = best_record(records, metric)
        if top is not None and better(metric, top[metric], value):
            # a kill between the record and checkpoints/best: take that step's checkpoint if it is there
            ckpt = runs.final_dir(self.out, top["step"])
            try:
                runs.verify(ckpt)
            except runs.CheckpointError:
                return value
            best_from(self.out, ckpt, {"step": top["step"], "metric": metric, "value": top[metric]})
            log(f"checkpoints/best: step {top['step']} ({metric} {top[metric]:.4g}), from eval.jsonl")
            value = top[metric]
        return value

    def on_nonfinite(self) -> None:
        st, t = self.state, self.cfg.train
        self.acc.print(f"step {st.step}: non-finite gradients, update skipped "
                       f"({st.nonfinite_in_row} in a row, {st.nonfinite_total} in all)")
        if st.nonfinite_in_row >= t.max_nonfinite_in_row:
            self.save()
            raise NonFiniteError(
                f"{st.nonfinite_in_row} consecutive updates had non-finite gradients "
                f"(train.max_nonfinite_in_row={t.max_nonfinite_in_row}); stopped at step {st.step}. "
                f"The last checkpoint holds the last finite weights: lower train.lr, use "
                f"train.mixed_precision=bf16 instead of fp16, or check the data.")

    def record_bad_images(self, messages: list[str]) -> None:
        new = [m for m in messages if m not in self.state.bad_images]
        if not new:
            return
        self.state.bad_images.extend(new)
        for m in new:
            self.acc.print(f"skipped image: {m}")
        if self.acc.is_main_process:
            atomic_write_bytes(self.out / "skipped_images.txt", ("\n".join(self.state.bad_images) + "\n").encode())


def run(opts) -> TrainState:
    """`latentvae train` (options.TrainOptions): load the config, build the Trainer, train. Stopped by a
    signal, it says how to resume (the same command with `--resume latest`)."""
    from ..config import load_config

    cfg = load_config(opts.config, opts.set)
    try:
        return Trainer(cfg, opts.out, resume=opts.resume, show_progress=opts.progress).run()
    except Interrupted as e:
        if not e.message:
            raise
        raise Interrupted(e.signum, f"{e.message}; resume with: {resume_command(opts)}") from None


def resume_command(opts) -> str:
    """The command line that continues this run exactly (under the same launcher, with as many processes)."""
    import shlex

    words = ["latentvae", "train", "--out", opts.out]
    if opts.config:
        words += ["--config", opts.config]
    for item in opts.set:
        words += ["--set", item]
    return shlex.join([*words, "--resume", "latest"])
