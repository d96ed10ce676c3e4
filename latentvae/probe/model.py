"""The probe's diffusion model and objective: a small diffusers UNet2DModel, flow matching or v-prediction.

    model = build_unet("tiny", (C, h, w))             # the preset's UNet for latents of that shape
    x_t, target = noisy("flow", x0, eps, t)           # t in [0, 1]
    x0, eps, t, labels = batch_for(data, "flow", seed, step, batch, rank, world)   # a pure function of (seed, step)
    held_out_loss(model, data, "flow", levels, device)  # the score: MSE at fixed noise levels, fixed noise
    z = sample(model, "flow", shape, n, steps, seed, device)   # normalized latents from N(0, I)
"""
from __future__ import annotations

import hashlib
import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BadInputError
from .data import ProbeData

PRESETS = {
    # ~2.8M parameters: 16x16x4 latents, a few hundred ms per batch of 32 on 2 CPU cores
    "tiny": dict(block_out_channels=(64, 128), layers_per_block=1, norm_num_groups=16, attention_head_dim=32,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")),
    # ~20M parameters
    "small": dict(block_out_channels=(96, 192, 384), layers_per_block=2, norm_num_groups=32, attention_head_dim=32,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    # for tests: a few thousand parameters
    "test": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D")),
}
EVAL_NOISE_SEED = 20_250_101  # the held-out noise: the same for every cache and every training seed


def build_unet(preset: str, shape: tuple[int, int, int], num_classes: int = 0):
    from diffusers import UNet2DModel

    c, h, w = shape
    if h != w:
        raise BadInputError(f"the probe's UNet takes square latents, got {h}x{w}")
    cfg = PRESETS[preset]
    factor = 2 ** (len(cfg["block_out_channels"]) - 1)
    if h % factor:
        raise BadInputError(f"--preset {preset} halves the latent {len(cfg['block_out_channels']) - 1} time(s): "
                            f"the side must be a multiple of {factor}, got {h}")
    return UNet2DModel(sample_size=h, in_channels=c, out_channels=c, num_class_embeds=num_classes or None, **cfg)


def noisy(objective: str, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, the regression target) at times t (B,) in [0, 1]."""
    tt = t.view(-1, 1, 1, 1)
    if objective == "flow":
        return (1 - tt) * x0 + tt * eps, eps - x0
    a, s = torch.cos(0.5 * math.pi * tt), torch.sin(0.5 * math.pi * tt)
    return a * x0 + s * eps, a * eps - s * x0


def draw_times(objective: str, n: int, g: torch.Generator) -> torch.Tensor:
    if objective == "flow":  # logit-normal(0, 1), SD3's choice
        return torch.sigmoid(torch.randn(n, generator=g))
    return torch.rand(n, generator=g)


def predict(model, x_t: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
    return model(x_t, t * 1000, class_labels=labels).sample


def batch_for(data: ProbeData, objective: str, seed: int, step: int, batch: int, rank: int, world: int):
    """The training batch of step `step` on process `rank`: a pure function of (seed, step, rank)."""
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(f"{seed}|{step}".encode(), digest_size=7).digest(),
                                                     "little"))
    n = len(data.train_mean)
    idx = torch.randint(0, n, (batch * world,), generator=g)[rank * batch:(rank + 1) * batch]
    x0 = data.train_mean[idx]
    post = torch.randn(x0.shape, generator=g)  # drawn always, so the stream does not depend on --store
    eps = torch.randn((batch * world, *x0.shape[1:]), generator=g)[rank * batch:(rank + 1) * batch]
    t = draw_times(objective, batch * world, g)[rank * batch:(rank + 1) * batch]
    if data.train_std is not None:
        x0 = x0 + data.train_std[idx] * post
    labels = None if data.train_labels is None else data.train_labels[idx]
    return x0, eps, t, labels


@torch.no_grad()
def held_out_loss(model, data: ProbeData, objective: str, levels: int, device, batch: int = 256) -> dict:
    """The held-out MSE at each of `levels` fixed noise levels, and their mean."""
    g = torch.Generator().manual_seed(EVAL_NOISE_SEED)
    eps_all = torch.randn((levels, *data.val.shape), generator=g)
    per_level = []
    for k in range(levels):
        t_k = (k + 0.5) / levels
        total = 0.0
        for i in range(0, len(data.val), batch):
            x0, eps = data.val[i:i + batch].to(device), eps_all[k, i:i + batch].to(device)
            t = torch.full((len(x0),), t_k, device=device)
            x_t, target = noisy(objective, x0, eps, t)
            labels = None if data.val_labels is None else data.val_labels[i:i + batch].to(device)
            total += float(F.mse_loss(predict(model, x_t, t, labels).float(), target, reduction="sum"))
        per_level.append(total / data.val.numel())
    return {"loss": float(np.mean(per_level)), "per_level": per_level,
            "levels": [(k + 0.5) / levels for k in range(levels)]}


@torch.no_grad()
def sample(model, objective: str, shape, n: int, steps: int, seed: int, device,
           labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """n latents (normalized units) from N(0, I): Euler on the flow ODE, or DDIM with v-prediction."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g).to(device)
    ts = torch.linspace(1.0, 0.0, steps + 1)
    for k in range(steps):
        t, t_next = float(ts[k]), float(ts[k + 1])
        tt = torch.full((n,), t, device=device)
        out = predict(model, x, tt, labels).float()
        if objective == "flow":
            x = x + (t_next - t) * out
        else:
            a, s = math.cos(0.5 * math.pi * t), math.sin(0.5 * math.pi * t)
            x0, eps = a * x - s * out, s * x + a * out
            a2, s2 = math.cos(0.5 * math.pi * t_next), math.sin(0.5 * math.pi * t_next)
            x = a2 * x0 + s2 * eps
    return x.cpu()
