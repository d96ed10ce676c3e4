"""One training step, top to bottom: forward, losses, backward, and when gradients sync the updates.

    logs = train_step(parts, state, batch["pixels"])   # None until an accumulation window completes

fp32 master weights, the networks under autocast (bf16 or fp16), KL and LPIPS in fp32 (losses.py).
With fp16 the loss is scaled by our GradScaler, and at the update each optimizer's gradients are
unscaled exactly once before clipping, both optimizers stepped through the scaler, and the scale
updated once. A step whose generator gradients are not finite changes no weight, EMA or schedule
and is counted; the loop decides when too many in a row stop the run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..config import Config
from ..vae.families import family_of
from ..precision import AUTOCAST_DTYPES, autocast
from .equivariance import draw as draw_transform
from .clips import Cut, draw_cut, fold
from .ema import EMA
from .losses import discriminator_loss, equivariance_loss, generator_loss


class Autoencoder(nn.Module):
    """Wraps a VAE of any family so one DDP-visible forward returns (x_hat, mean, logvar, x_t_hat), all 4-D.

    The family (vae/families.py) runs the module: the 5-D classes (Qwen-Image, Wan) get T=1 added and
    dropped there, so the losses only ever see (B, C, H, W). `stochastic` ("vae" mode, a family with a
    posterior) samples z = mean + std * eps in fp32; otherwise z = mean, and a family without a posterior
    (DC, TAESD) returns logvar None (no KL term). With `frozen_encoder` the encoder runs without autograd.
    With `transform` (train/equivariance.py) the same forward also decodes the transformed latent
    (x_t_hat; else None), so DDP sees every use of the decoder in one forward. A video VAE's clips stay
    5-D; with `cut` (train/clips.Cut) only its window of the latent is decoded.
    """

    def __init__(self, vae, stochastic: bool, frozen_encoder: bool = False):
        super().__init__()
        self.vae, self.frozen_encoder = vae, frozen_encoder
        self.family = family_of(vae)
        self.stochastic = stochastic and self.family.stochastic

    def forward(self, x: torch.Tensor, transform=None, cut=None):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_encoder):
            mean, logvar = self.family.moments(self.vae, x)  # logvar clamped to [-30, 20] by diffusers
        if cut is not None:  # clips (train/clips.py): decode a window of the latent only
            mean, logvar = cut.latent(mean), None if logvar is None else cut.latent(logvar)
        dtype = mean.dtype
        mean = mean.float()
        logvar = None if logvar is None else logvar.float()
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if self.stochastic else mean
        x_hat = self.family.decode(self.vae, z.to(dtype))
        x_t_hat = None if transform is None else self.family.decode(self.vae, transform.latent(z).to(dtype))
        return x_hat, mean, logvar, x_t_hat


@dataclass
class TrainState:
    step: int = 0  # optimizer updates done
    micro_step: int = 0  # micro-batches consumed (the data position)
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0
    bad_images: list[str] = field(default_factory=list)


@dataclass
class Parts:
    """Everything a step touches, built and prepared by loop.Trainer."""
    cfg: Config
    acc: Any  # accelerate.Accelerator
    ae: nn.Module  # Autoencoder, prepared (DDP-wrapped with several processes)
    opt_g: torch.optim.Optimizer
    sched_g: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    precision: str  # resolved: "no", "bf16" or "fp16"
    channels_last: bool
    lpips: Optional[nn.Module] = None  # the loss's LPIPS (compiled with train.compile_lpips)
    disc: Optional[nn.Module] = None  # prepared PatchDiscriminator, when loss.gan
    opt_d: Optional[torch.optim.Optimizer] = None
    ema: Optional[EMA] = None

    @property
    def vae(self):
        return self.acc.unwrap_model(self.ae).vae

    @property
    def lpips_eval(self) -> Optional[nn.Module]:
        """The loss's LPIPS network uncompiled, for validation's many image sizes (each would compile again)."""
        return getattr(self.lpips, "_orig_mod", self.lpips)

    def disc_module(self):
        return self.acc.unwrap_model(self.disc)

    def gan_active(self, step: int) -> bool:
        return self.disc is not None and step >= self.cfg.loss.gan_start

    def autocast(self):
        """The networks' forward in the run's precision."""
        dtype = AUTOCAST_DTYPES[self.precision]
        return autocast(self.acc.device.type, dtype)


def generator_step(p: Parts, x: torch.Tensor, step: int, gan: bool, micro_step: int = 0,
                   cut: Optional[Cut] = None) -> tuple[torch.Tensor, dict]:
    """The autoencoder's forward, loss and backward; returns the detached reconstruction and logs.

    With the GAN on, the discriminator judges the reconstruction without learning from it. With
    loss.equivariance_weight, micro-batch `micro_step` also decodes a transformed latent (its
    transform drawn from (train.seed, micro_step)) against the transformed image. Clips (5-D, with
    their `cut`): the losses per frame (frames folded into the batch), no KL term (the encoder is
    frozen); the reconstruction returned is the folded frames the discriminator sees."""
    disc = p.disc_module() if gan else None
    if disc is not None:
        disc.requires_grad_(False)
    if cut is not None:
        return clip_generator_step(p, x, step, disc, cut)
    lo, transform = p.cfg.loss, None
    if lo.equivariance_weight > 0:
        f = family_of(p.vae).factor(p.vae)
        hw = (x.shape[-2] // f, x.shape[-1] // f)
        transform = draw_transform(lo.equivariance_transforms, p.cfg.train.seed, micro_step, hw)
    with p.autocast():
        x_hat, mean, logvar, x_t_hat = p.ae(x, transform)
        loss, logs = generator_loss(lo, x, x_hat, mean, logvar, step, lpips=p.lpips, disc=disc,
                                    last_layer=family_of(p.vae).last_decoder_layer(p.vae) if disc else None,
                                    train_kl=p.cfg.model.mode == "vae")
        if transform is not None:
            eq = equivariance_loss(lo, transform.image(x, hw, f), x_t_hat, p.lpips)
            loss = loss + lo.equivariance_weight * eq
            logs["eq"], logs["loss"] = eq.detach(), loss.detach()
    p.acc.backward(p.scaler.scale(loss))
    if disc is not None:
        disc.requires_grad_(True)
    return x_hat.detach(), logs


def clip_generator_step(p: Parts, x: torch.Tensor, step: int, disc, cut: Cut) -> tuple[torch.Tensor, dict]:
    """generator_step for a micro-batch of clips (B, 3, T, H, W) and its cut (train/clips.py)."""
    target = fold(cut.pixels(x))  # (B*T, 3, h, w): the pixels of the latent window
    with p.autocast():
        x_hat, mean, _, _ = p.ae(x, None, cut)
        x_hat = fold(x_hat)
        loss, logs = generator_loss(p.cfg.loss, target, x_hat, mean, None, step, lpips=p.lpips, disc=disc,
                                    last_layer=family_of(p.vae).last_decoder_layer(p.vae) if disc else None,
                                    train_kl=False, frames=cut.frames)
    p.acc.backward(p.scaler.scale(loss))
    if disc is not None:
        disc.requires_grad_(True)
    return cut.perceptual(x_hat.detach()), logs


def discriminator_step(p: Parts, x: torch.Tensor, x_hat: torch.Tensor) -> dict:
    """The discriminator's forward, loss and backward on real images and detached reconstructions."""
    with p.autocast():
        loss, logs = discriminator_loss(p.cfg.loss, p.disc, x, x_hat)
    p.acc.backward(p.scaler.scale(loss))
    return logs


def train_step(p: Parts, st: TrainState, x: torch.Tensor) -> Optional[dict[str, torch.Tensor]]:
    """One micro-batch; on the last one of an accumulation window, the updates. Returns the logs
    (0-d tensors, read them rarely: reading syncs with the device) after an update, else None."""
    x = x.to(p.acc.device, non_blocking=True)
    if p.channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    gan = p.gan_active(st.step)
    cut = draw_cut(p.cfg, family_of(p.vae).factor(p.vae), x) if x.dim() == 5 else None  # clips
    with p.acc.accumulate(*([p.ae, p.disc] if p.disc is not None else [p.ae])):
        # forward, losses, backward: the autoencoder, then the discriminator
        x_hat, logs = generator_step(p, x, st.step, gan, st.micro_step, cut)
        if gan:
            logs.update(discriminator_step(p, x if cut is None else cut.perceptual(fold(cut.pixels(x))), x_hat))
        st.micro_step += 1
        if not p.acc.sync_gradients:
            return None

        # the updates: unscale each optimizer once, clip, step through the scaler, update it once
        clip = p.cfg.train.grad_clip if p.cfg.train.grad_clip > 0 else float("inf")
        updates = [("grad_norm", p.opt_g, p.ae)] + ([("d_grad_norm", p.opt_d, p.disc)] if gan else [])
        for name, opt, model in updates:
            p.scaler.unscale_(opt)  # a no-op without fp16
            logs[name] = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).detach()
        finite = bool(torch.isfinite(logs["grad_norm"]))  # the update's host sync (one more for the GAN's)
        for name, opt, _ in updates:
            # the scaler skips a step whose gradients hold inf/nan; without it, we do
            if p.scaler.is_enabled() or (finite if name == "grad_norm" else bool(torch.isfinite(logs[name]))):
                p.scaler.step(opt)
            opt.zero_grad(set_to_none=True)
        if p.opt_d is not None and not gan:
            p.opt_d.zero_grad(set_to_none=True)
        p.scaler.update()
        if p.scaler.is_enabled():
            logs["grad_scale"] = torch.tensor(p.scaler.get_scale())
        if not finite:
            st.nonfinite_total += 1
            st.nonfinite_in_row += 1
            return logs

        # a real update: schedule, EMA, counters
        p.sched_g.step()
        if p.ema is not None:
            p.ema.update(p.vae)
        st.nonfinite_in_row = 0
        st.step += 1
        return logs
