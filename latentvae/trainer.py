"""The training loop: Accelerate as documented, one function per concern.

    accelerate launch train/train.py --config configs/quickstart.yaml --output-dir RUN
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 train/train.py --config ... --output-dir RUN

fp32 master weights, bf16/fp16 autocast for the networks, KL and LPIPS in fp32; gradient
accumulation through `accelerator.accumulate`; clipping only when gradients are synced; EMA of
the weights; checkpoints of everything needed to continue bit-for-bit (see checkpoint.py).
A step whose gradients are not finite is skipped and counted; too many in a row stop the run
after writing a last checkpoint of the (finite) weights.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from . import checkpoint as ckpt
from .config import Config, ConfigError
from .errors import UserError
from .fsutil import atomic_write_bytes, atomic_write_json
from .data import CropStream, build_sources, load_val_batch, make_loader, _mix
from .discriminator import PatchDiscriminator
from .images import atomic_save_image, make_grid
from .losses import discriminator_loss, generator_loss
from .model import build_vae, describe, last_decoder_layer
from .perceptual import load_lpips
from .precision import AUTOCAST_DTYPES, resolve_channels_last, resolve_mixed_precision


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with non-finite gradients."""


SHARED_MARKER = ".latentvae-shared-check"
SHARDED = {"FSDP", "DEEPSPEED", "MEGATRON_LM"}


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
        raise UserError(f"--output-dir {out}: process(es) {bad} do not see the folder that process 0 writes; every "
                        "process (on every node) must see the same output folder, e.g. on a shared file system")


class Autoencoder(nn.Module):
    """Wraps AutoencoderKL so one DDP-visible forward returns (x_hat, mean, logvar).

    "vae" mode samples z = mean + std * eps (in fp32); "ae" mode uses z = mean.
    """

    def __init__(self, vae, stochastic: bool, frozen_encoder: bool = False):
        super().__init__()
        self.vae, self.stochastic, self.frozen_encoder = vae, stochastic, frozen_encoder

    def forward(self, x: torch.Tensor):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_encoder):
            dist = self.vae.encode(x).latent_dist  # logvar already clamped to [-30, 20] by diffusers
        mean, logvar = dist.mean.float(), dist.logvar.float()
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if self.stochastic else mean
        x_hat = self.vae.decode(z.to(dist.mean.dtype)).sample
        return x_hat, mean, logvar


@dataclass
class TrainState:
    step: int = 0  # optimizer updates done
    micro_step: int = 0  # micro-batches consumed (the data position)
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0
    bad_images: list[str] = field(default_factory=list)


def lr_lambda(cfg: Config):
    t = cfg.train

    def f(step: int) -> float:
        if t.lr_warmup_steps and step < t.lr_warmup_steps:
            return (step + 1) / t.lr_warmup_steps
        if t.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.lr_warmup_steps) / max(1, t.steps - t.lr_warmup_steps))
        if t.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0 - progress

    return f


def make_optimizer(params, lr: float, cfg: Config) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    fused = torch.cuda.is_available()
    return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay,
                             fused=fused, foreach=None if fused else True)


class Trainer:
    """Holds the prepared models and optimizers; `run()` trains to `cfg.train.steps`."""

    def __init__(self, cfg: Config, output_dir: str | Path, resume: Optional[str] = None, accelerator=None,
                 show_progress: bool = True):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg, self.out = cfg, Path(output_dir)
        t = cfg.train
        refuse_sharded_training()
        # Precision is ours, not accelerate's: we autocast and own the fp16 GradScaler, so that with the
        # GAN each optimizer is unscaled exactly once and the scaler updated once per step (accelerate's
        # wrapper updates it at every optimizer.step), and so that fp16 also works on a CPU.
        self.acc = accelerator or Accelerator(
            mixed_precision="no", gradient_accumulation_steps=t.grad_accum, log_with="tensorboard",
            project_dir=str(self.out), cpu=_env_cpu())
        refuse_sharded_training(self.acc.distributed_type)
        self.precision = resolve_mixed_precision(t.mixed_precision, self.acc.device.type)
        self.scaler = torch.amp.GradScaler(self.acc.device.type, init_scale=t.fp16_init_scale,
                                           enabled=self.precision == "fp16")
        self.channels_last = resolve_channels_last(t.channels_last, self.acc.device.type)
        if self.acc.device.type == "cpu":
            torch.set_num_threads(t.cpu_threads or cpu_threads_per_process(self.acc.num_processes))
        self.show_progress = show_progress
        set_seed(t.seed)  # identical initial weights on every process
        self.state = TrainState()
        train_src, val_src = build_sources(cfg.data)
        self.stream = CropStream(train_src, cfg.data, t.seed)
        self.val, bad_val = load_val_batch(val_src, cfg.data.val_resolution)
        self.state.bad_images.extend(bad_val)

        vae = build_vae(cfg.model)
        self.ae = Autoencoder(vae, stochastic=cfg.model.mode == "vae", frozen_encoder=cfg.model.train_decoder_only)
        if self.channels_last:
            self.ae.to(memory_format=torch.channels_last)
        self.lpips = None
        if cfg.loss.lpips_weight > 0:
            self.lpips = load_lpips(cfg.loss.lpips_net, cfg.loss.lpips_dir)
            self.lpips.to(self.acc.device)
        self.opt_g = make_optimizer(self.ae.parameters(), t.lr, cfg)
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, lr_lambda(cfg))
        self.disc = self.opt_d = None
        if cfg.loss.gan:
            self.disc = PatchDiscriminator(cfg.loss.disc_layers, cfg.loss.disc_channels)
            if self.channels_last:
                self.disc.to(memory_format=torch.channels_last)
            self.opt_d = make_optimizer(self.disc.parameters(), cfg.loss.disc_lr or t.lr, cfg)
        # schedulers are stepped by us once per update (accelerate's wrapper steps per process)
        if self.disc is not None:
            self.ae, self.disc, self.opt_g, self.opt_d = self.acc.prepare(self.ae, self.disc, self.opt_g, self.opt_d)
        else:
            self.ae, self.opt_g = self.acc.prepare(self.ae, self.opt_g)
        if t.compile:
            self.ae = torch.compile(self.ae)
        self.ema = None
        if t.ema_decay > 0:
            from diffusers.training_utils import EMAModel
            self.ema = EMAModel(self.vae.parameters(), decay=t.ema_decay, foreach=True)
        # each process draws its own reparameterization noise
        torch.manual_seed(_mix(t.seed, 1_000_000 + self.acc.process_index))

        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.clean_staging(self.out)
            atomic_write_json(self.out / "config.json", cfg.to_dict())
        self.acc.wait_for_everyone()
        check_shared_output(self.acc, self.out)
        if resume:
            self.resume(resume)

    # ------------------------------------------------------------------ accessors
    @property
    def vae(self):
        return self.acc.unwrap_model(self.ae).vae

    def disc_module(self):
        return self.acc.unwrap_model(self.disc)

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        names = [n for n, _ in self.vae.named_parameters()]
        return {n: p.detach().float() for n, p in zip(names, self.ema.shadow_params)}

    def eval_vae(self):
        """A copy of the VAE holding the EMA weights (or the raw ones without EMA), in eval mode."""
        vae = copy.deepcopy(self.vae).eval()
        if self.ema is not None:
            vae.load_state_dict(self.ema_state_dict(), strict=False)
        return vae

    def autocast(self):
        """The networks' forward in the run's precision (fp32 master weights stay as they are)."""
        dtype = AUTOCAST_DTYPES[self.precision]
        return torch.autocast(self.acc.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    # ------------------------------------------------------------------ the steps
    def gan_active(self) -> bool:
        return self.disc is not None and self.state.step >= self.cfg.loss.gan_start

    def generator_step(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Forward, loss, backward for the autoencoder; returns the detached reconstruction."""
        disc = None
        if self.gan_active():
            disc = self.disc_module()
            disc.requires_grad_(False)  # the generator loss must not write the discriminator's grads
        with self.autocast():
            x_hat, mean, logvar = self.ae(x)
            loss, logs = generator_loss(self.cfg.loss, x, x_hat, mean, logvar, self.state.step, lpips=self.lpips,
                                        disc=disc, last_layer=last_decoder_layer(self.vae) if disc else None,
                                        train_kl=self.cfg.model.mode == "vae")
        self.acc.backward(self.scaler.scale(loss))
        if disc is not None:
            disc.requires_grad_(True)
        return x_hat.detach(), logs

    def discriminator_step(self, x: torch.Tensor, x_hat: torch.Tensor) -> dict:
        with self.autocast():
            loss, logs = discriminator_loss(self.cfg.loss, self.disc, x, x_hat)
        self.acc.backward(self.scaler.scale(loss))
        return logs

    def apply_updates(self) -> dict[str, torch.Tensor]:
        """Unscale each optimizer exactly once, clip, step, then update the fp16 scaler once.

        Returns the gradient norms ({"grad_norm", "d_grad_norm"}), measured after unscaling and
        before clipping. A non-finite norm skips that optimizer's step (with fp16 the scaler skips
        it and lowers its scale); the LR schedule advances only with a generator step."""
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        updates = [("grad_norm", self.opt_g, self.ae)]
        if self.gan_active():
            updates.append(("d_grad_norm", self.opt_d, self.disc))
        norms = {}
        for name, opt, model in updates:
            self.scaler.unscale_(opt)  # once per optimizer and step; a no-op without fp16
            norms[name] = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for name, opt, _ in updates:
            if self.scaler.is_enabled() or bool(torch.isfinite(norms[name])):  # one host sync per update
                self.scaler.step(opt)
            opt.zero_grad(set_to_none=True)
        if self.opt_d is not None and not self.gan_active():
            self.opt_d.zero_grad(set_to_none=True)
        self.scaler.update()
        if bool(torch.isfinite(norms["grad_norm"])):
            self.sched_g.step()
        return norms

    def train_micro_step(self, batch: dict) -> Optional[dict]:
        """One micro-batch; on the last one of an accumulation window, the updates.

        Returns the logs (0-d tensors) when an update happened, else None.
        """
        x = batch["pixels"].to(self.acc.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        models = (self.ae, self.disc) if self.disc is not None else (self.ae,)
        with self.acc.accumulate(*models):
            x_hat, logs = self.generator_step(x)
            if self.gan_active():
                logs.update(self.discriminator_step(x, x_hat))
            self.state.micro_step += 1
            if not self.acc.sync_gradients:
                return None
            logs.update({k: v.detach() for k, v in self.apply_updates().items()})
            if self.scaler.is_enabled():
                logs["grad_scale"] = torch.tensor(self.scaler.get_scale())
            if not torch.isfinite(logs["grad_norm"]):
                self.state.nonfinite_total += 1
                self.state.nonfinite_in_row += 1
                return logs
            self.state.nonfinite_in_row = 0
            self.state.step += 1
            if self.ema is not None:
                self.ema.step(self.vae.parameters())
            return logs

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainState:
        cfg, t, st = self.cfg, self.cfg.train, self.state
        acc = self.acc
        if st.step >= t.steps:
            acc.print(f"{self.out}: already at step {st.step} of train.steps={t.steps}; nothing to train "
                      f"(raise train.steps to continue)")
            return st
        if acc.is_main_process:
            acc.init_trackers("tb", config=_flat_config(cfg))
            acc.print(describe(self.vae), f"| {len(self.stream.src)} training images | {acc.num_processes} process(es)"
                      f" | precision {self.precision} | output: {self.out}")
        loader = make_loader(self.stream, t.batch_size, st.micro_step, acc.process_index, acc.num_processes,
                             cfg.data.num_workers)
        bar = None
        if acc.is_main_process and self.show_progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=t.steps, initial=st.step, desc="train", dynamic_ncols=True)
        sums: dict[str, torch.Tensor] = {}
        n_logged, t0, images_at_t0 = 0, time.perf_counter(), st.micro_step
        try:
            for batch in loader:
                self._record_bad(batch["bad"])
                logs = self.train_micro_step(batch)
                if logs is None:
                    continue
                if st.nonfinite_in_row:
                    acc.print(f"step {st.step}: non-finite gradients, update skipped "
                              f"({st.nonfinite_in_row} in a row, {st.nonfinite_total} in all)")
                    if st.nonfinite_in_row >= t.max_nonfinite_in_row:
                        self.save()
                        raise NonFiniteError(
                            f"{st.nonfinite_in_row} consecutive updates had non-finite gradients "
                            f"(train.max_nonfinite_in_row={t.max_nonfinite_in_row}); stopped at step {st.step}. "
                            f"The last checkpoint holds the last finite weights: lower train.lr, use "
                            f"train.mixed_precision=bf16 instead of fp16, or check the data.")
                    continue
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0) + v.float()
                n_logged += 1
                if bar is not None:
                    bar.update(1)
                if st.step % t.log_every == 0 or st.step == t.steps:
                    dt = time.perf_counter() - t0
                    ips = (st.micro_step - images_at_t0) * t.batch_size * acc.num_processes / max(dt, 1e-9)
                    self._log(sums, n_logged, ips, bar)
                    sums, n_logged, t0, images_at_t0 = {}, 0, time.perf_counter(), st.micro_step
                if st.step % t.image_every == 0 or st.step == t.steps:
                    self.save_images()
                if st.step % t.save_every == 0 or st.step == t.steps:
                    self.save()
                if st.step >= t.steps:
                    break
        finally:
            if bar is not None:
                bar.close()
            acc.end_training()
        return st

    def _record_bad(self, messages: list[str]) -> None:
        new = [m for m in messages if m not in self.state.bad_images]
        if not new:
            return
        self.state.bad_images.extend(new)
        for m in new:
            self.acc.print(f"skipped image: {m}")
        if self.acc.is_main_process:
            atomic_write_bytes(self.out / "skipped_images.txt", ("\n".join(self.state.bad_images) + "\n").encode())

    def _log(self, sums: dict, n: int, ips: float, bar) -> None:
        if not sums:
            return
        keys = sorted(sums)
        stacked = torch.stack([sums[k] / n for k in keys]).to(self.acc.device)
        values = self.acc.reduce(stacked, reduction="mean").tolist()  # the one read of the window
        logs = dict(zip(keys, values))
        logs.update(lr=self.sched_g.get_last_lr()[0], images_per_s=ips, nonfinite_total=self.state.nonfinite_total,
                    skipped_images=len(self.state.bad_images))
        self.acc.log({f"train/{k}": v for k, v in logs.items()}, step=self.state.step)
        if bar is not None:
            show = {k: f"{logs[k]:.4g}" for k in ("loss", "rec", "lpips", "kl_per_elem", "g_loss", "d_loss") if k in logs}
            show["img/s"] = f"{ips:.1f}"
            bar.set_postfix(show, refresh=False)

    @torch.no_grad()
    def save_images(self) -> None:
        """Reconstruction grid (original | reconstruction | |error|) of the held-aside images."""
        if not self.acc.is_main_process or len(self.val) == 0:
            return
        vae = self.eval_vae()
        x = self.val.to(self.acc.device)
        with self.autocast():
            mean = vae.encode(x).latent_dist.mean
            x_hat = vae.decode(mean).sample.float().clamp(-1, 1)
        err = ((x_hat - x).abs().mean(1, keepdim=True).expand_as(x) * 2).clamp(0, 1) * 2 - 1  # |error| x2, gray
        grid = make_grid([x, x_hat, err])
        path = self.out / "samples" / f"recon-{self.state.step:08d}.png"
        atomic_save_image(grid, path)
        tracker = self.acc.get_tracker("tensorboard", unwrap=True)
        if hasattr(tracker, "add_image"):
            import numpy as np
            tracker.add_image("val/reconstruction", np.asarray(grid), self.state.step, dataformats="HWC")

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Optional[Path]:
        """Write a complete checkpoint of the current step (all processes must call this)."""
        acc, st = self.acc, self.state
        tmp = ckpt.staging_dir(self.out, st.step)
        if acc.is_main_process:
            ckpt.begin(self.out, st.step)
        acc.wait_for_everyone()
        tensors, meta = ckpt.rng_to_files()
        ckpt.save_tensors(tmp / f"rng-rank{acc.process_index}.safetensors", tensors)
        ckpt.write_json(tmp / f"rng-rank{acc.process_index}.json", meta)
        acc.wait_for_everyone()
        final = None
        if acc.is_main_process:
            ckpt.save_tensors(tmp / "model.safetensors", self.vae.state_dict(),
                              metadata={"format": ckpt.STATE_FORMAT, "step": str(st.step)})
            if self.ema is not None:
                ckpt.save_tensors(tmp / "ema.safetensors", self.ema_state_dict())
            if self.disc is not None:
                ckpt.save_tensors(tmp / "disc.safetensors", self.disc_module().state_dict())
            for name, opt in (("g", self.opt_g), ("d", self.opt_d)):
                if opt is not None:
                    tensors, ometa = ckpt.optimizer_to_files(opt.state_dict())
                    ckpt.save_tensors(tmp / f"optim-{name}.safetensors", tensors)
                    ckpt.write_json(tmp / f"optim-{name}.json", ometa)
            state = {
                "format": ckpt.STATE_FORMAT, "step": st.step, "micro_step": st.micro_step,
                "nonfinite_total": st.nonfinite_total, "nonfinite_in_row": st.nonfinite_in_row,
                "bad_images": st.bad_images, "num_processes": acc.num_processes, "precision": self.precision,
                "scheduler_g": {k: v for k, v in self.sched_g.state_dict().items() if k != "lr_lambdas"},
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "ema_optimization_step": self.ema.optimization_step if self.ema is not None else None,
                "config": self.cfg.to_dict(),
                # the architecture actually trained (with model.init_from it comes from that folder)
                "vae_config": {k: v for k, v in self.vae.config.items() if not k.startswith("_")},
                "files": ckpt.checksums(tmp),  # every process's files are in by now (barrier above)
            }
            ckpt.write_json(tmp / "state.json", state)  # last: marks the folder complete
            final = ckpt.commit(self.out, st.step, self.cfg.train.keep_last)
        acc.wait_for_everyone()
        return final

    def resume(self, where: str) -> None:
        """Continue from `where`: "latest" (this run's newest checkpoint that verifies, falling back to
        older ones and saying so; none at all starts the run from step 0) or a checkpoint/run folder."""
        if where == "latest":
            path = next(ckpt.resume_candidates(self.out, log=self.acc.print), None)
            if path is None:
                if ckpt.list_checkpoints(self.out):
                    raise ckpt.CheckpointError(f"{self.out}: every checkpoint is damaged (see above); nothing to "
                                               "resume from (remove them, or choose one with --resume PATH)")
                self.acc.print(f"--resume latest: no checkpoint in {self.out} yet; starting from step 0")
                return
            newest = ckpt.list_checkpoints(self.out)[-1]
            if path != newest:
                self.acc.print(f"--resume latest: {newest.name} is damaged; falling back to {path.name}")
        else:
            path = ckpt.find_checkpoint(where)
            ckpt.verify(path)
        self.load(path)

    def load(self, path: Path) -> None:
        """Restore everything from the checkpoint folder `path` (already verified)."""
        state = ckpt.read_state(path)
        if state.get("num_processes") != self.acc.num_processes:
            raise ckpt.CheckpointError(
                f"{path}: saved with {state.get('num_processes')} processes, resumed with {self.acc.num_processes}; "
                "an exact resume needs the same number")
        self.vae.load_state_dict(ckpt.load_tensors(path / "model.safetensors"), strict=True)
        if self.ema is not None:
            if (path / "ema.safetensors").is_file():
                ema = ckpt.load_tensors(path / "ema.safetensors")
                names = [n for n, _ in self.vae.named_parameters()]
                self.ema.shadow_params = [ema[n].to(self.acc.device) for n in names]
                self.ema.optimization_step = state["ema_optimization_step"]
            else:
                self.ema.shadow_params = [p.detach().clone() for p in self.vae.parameters()]
                self.acc.print(f"{path.name} has no EMA (train.ema_decay was 0): the EMA starts from its weights")
        if self.disc is not None:
            if (path / "disc.safetensors").is_file():
                self.disc_module().load_state_dict(ckpt.load_tensors(path / "disc.safetensors"), strict=True)
            else:
                self.acc.print(f"loss.gan is on but {path.name} has no discriminator: a fresh one starts "
                               f"(at step max({state['step']}, loss.gan_start={self.cfg.loss.gan_start}))")
        elif (path / "disc.safetensors").is_file():
            self.acc.print(f"loss.gan is off: the discriminator saved in {path.name} is not used")
        for name, opt in (("g", self.opt_g), ("d", self.opt_d)):
            if opt is not None and (path / f"optim-{name}.safetensors").is_file():
                meta = json.loads((path / f"optim-{name}.json").read_text())
                opt.load_state_dict(ckpt.optimizer_from_files(ckpt.load_tensors(path / f"optim-{name}.safetensors"), meta))
        self.sched_g.load_state_dict({**self.sched_g.state_dict(), **state["scheduler_g"]})
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        rank = self.acc.process_index
        ckpt.rng_from_files(ckpt.load_tensors(path / f"rng-rank{rank}.safetensors"),
                            json.loads((path / f"rng-rank{rank}.json").read_text()))
        self.state = TrainState(step=state["step"], micro_step=state["micro_step"],
                                nonfinite_total=state["nonfinite_total"], nonfinite_in_row=state["nonfinite_in_row"],
                                bad_images=list(state["bad_images"]))
        self.acc.print(f"resumed from {path} at step {self.state.step}")


def cpu_threads_per_process(num_processes: int) -> int:
    import os
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", num_processes))
    return max(1, cores // max(1, local))


def _env_cpu() -> bool:
    import os
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def _flat_config(cfg: Config) -> dict[str, Any]:
    out = {}
    for section, values in cfg.to_dict().items():
        for k, v in values.items():
            out[f"{section}.{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
