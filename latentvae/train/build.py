"""What a run is built from: the VAE it starts from (any family), checked against the config, and the
prepared parts around it (optimizers, schedule, scaler, discriminator, EMA).

    lv = starting_vae(cfg)          # model.init_from (any VAE load_vae reads), else a new model.family
    parts = build_parts(cfg, acc, lv)

A VAE of any family in the table (vae/families.py) trains: in full where its class has a posterior
(kl, flux2, qwenimage, wan, hunyuanimage), its decoder only (`model.train_decoder_only`) for every
family. What a family cannot do is refused here, in one line, before any data is read or any step
runs: a full fine-tune of a class without a posterior (DC, TAESD), `model.mode=vae` (posterior
samples and a KL term) for one, gradient checkpointing where diffusers has none for the class, and
a `data.resolution` that is not a multiple of the loaded VAE's downsampling factor; for clips (a video
VAE's decoder on video data, train/clips.py) a frame count off the VAE's clip rule, a frame size off its
spatial factor, a full fine-tune (the family table's NO_VIDEO_FULL).
"""
from __future__ import annotations

import math
from itertools import chain

import torch

from ..config import Config, ConfigError
from ..perceptual import load_lpips
from ..precision import resolve_channels_last, resolve_mixed_precision
from ..vae.families import FamilyCannot
from ..vae.loaded import LoadedVae, make_record
from ..vae.loading import load_vae
from ..vae.model import build_vae, configure_for_training, configure_tiling
from .clips import check_clips, clip_data
from .discriminator import PatchDiscriminator
from .ema import EMA
from .step import Autoencoder, Parts


# ----------------------------------------------------------------------------- the VAE
def starting_vae(cfg: Config) -> LoadedVae:
    """The record of the VAE training starts from (fp32, train mode, configured as cfg.model asks), after
    every check of what its family can do (FamilyCannot / ConfigError: one line, exit status 2)."""
    m = cfg.model
    if m.init_from:
        lv = load_vae(m.init_from)
        label = f"model.init_from={m.init_from}"
    else:
        lv = make_record(build_vae(m), {"spec": f"model.family={m.family}", "kind": "new"})
        label = f"model.family={m.family}"
    fam = lv.family
    if m.mode == "vae" and not fam.stochastic:
        raise FamilyCannot(f"{label}: {fam.class_name} ({fam.name} family) cannot be trained with model.mode=vae: it "
                           "has no posterior to sample from or to hold a KL term; set model.mode=ae (z = its latent) "
                           "and model.train_decoder_only=true")
    if m.mode == "ae" and fam.stochastic and not fam.pinnable:
        raise FamilyCannot(f"{label}: {fam.class_name} ({fam.name} family) cannot be trained with model.mode=ae: its "
                           "encoder adds a residual to the posterior's moments, so the never-trained log-variance "
                           "cannot be pinned and sample() would not equal mode(); use model.mode=vae")
    if cfg.train.mixed_precision == "fp16" and not fam.fp16_training:
        raise FamilyCannot(f"train.mixed_precision=fp16: {fam.class_name} ({fam.name} family) {fam.fp16}; set "
                           "train.mixed_precision to bf16, no or auto")
    video = clip_data(cfg.data)
    check_clips(cfg, lv, label, video)  # clips: the VAE's clip rule, frame size, decoder only (train/clips.py)
    factor = lv.layout.factor
    for key, value in (("data.resolution", cfg.data.resolution), ("data.val_resolution", cfg.data.val_resolution)):
        if value % factor and not video:
            raise ConfigError(f"{key}={value} must be a multiple of the downsampling factor {factor} of {label} "
                              f"({fam.class_name})")
    configure_for_training(lv.module, m, label)  # the family's refusals: full fine-tune, gradient checkpointing
    if m.tiling:
        if not video:
            raise ConfigError("model.tiling: tiles the encoding of clips (video data); images train untiled")
        configure_tiling(label, lv.module, True, m.tile_size)
    lv.module.float().train()
    return lv


def initial_vae(m):
    """The module training starts from, fp32 in train mode: `model.init_from`, else a random `model.family`."""
    return (load_vae(m.init_from).module if m.init_from else build_vae(m)).float().train()


# NHWC: channels_last for 4-D weights, channels_last_3d for the 5-D convolutions of Qwen-Image and Wan
MEMORY_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


@torch.no_grad()
def to_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """Every 4-D and 5-D weight of `module` in its NHWC layout (Module.to(memory_format=...) takes one rank)."""
    for t in chain(module.parameters(), module.buffers()):
        if t.dim() in MEMORY_FORMATS:
            t.data = t.data.contiguous(memory_format=MEMORY_FORMATS[t.dim()])
    return module


# ----------------------------------------------------------------------------- optimizers
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
    """AdamW with torch's fused kernel, on CUDA and CPUs alike: one kernel over all parameters instead of
    a chain of foreach ops (the `sd` preset's 84M parameters: 58 against 175 ms an update on the 2-core
    AVX2 CPU, benchmarks/optimizer_step.py); the same update within float rounding. Frozen parameters
    (a decoder-only fine-tune's encoder) are left out."""
    params = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay,
                             fused=True)


def build_parts(cfg: Config, acc, lv: LoadedVae) -> Parts:
    """The networks, optimizers, schedule, scaler and EMA of a run around `lv` (starting_vae), prepared by
    accelerate."""
    t = cfg.train
    precision = resolve_mixed_precision(t.mixed_precision, acc.device.type)
    channels_last = resolve_channels_last(t.channels_last, acc.device.type)
    ae = Autoencoder(lv.module, stochastic=cfg.model.mode == "vae", frozen_encoder=cfg.model.train_decoder_only)
    lpips = load_lpips(cfg.loss.lpips_net, cfg.loss.lpips_dir).to(acc.device) if cfg.loss.lpips_weight > 0 else None
    opt_g = make_optimizer(ae.parameters(), t.lr, cfg)
    disc = opt_d = None
    if cfg.loss.gan:
        disc = PatchDiscriminator(cfg.loss.disc_layers, cfg.loss.disc_channels)
        opt_d = make_optimizer(disc.parameters(), cfg.loss.disc_lr or t.lr, cfg)
    if channels_last:
        for m in (ae, disc):
            if m is not None:
                to_channels_last(m)
    # the schedule is stepped by us once per update (accelerate's wrapper steps it per process)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lr_lambda(cfg))
    if disc is not None:
        ae, disc, opt_g, opt_d = acc.prepare(ae, disc, opt_g, opt_d)
    else:
        ae, opt_g = acc.prepare(ae, opt_g)
    if t.compile:
        ae = torch.compile(ae)
    if lpips is not None and t.compile_lpips:
        lpips = torch.compile(lpips)  # Parts.lpips_eval is the plain network
    scaler = torch.amp.GradScaler(acc.device.type, init_scale=t.fp16_init_scale, enabled=precision == "fp16")
    ema = EMA(acc.unwrap_model(ae).vae, t.ema_decay) if t.ema_decay > 0 else None
    return Parts(cfg=cfg, acc=acc, ae=ae, opt_g=opt_g, sched_g=sched_g, scaler=scaler, precision=precision,
                 channels_last=channels_last, lpips=lpips, disc=disc, opt_d=opt_d, ema=ema)
