"""Loss terms as small pure functions, and the one place that combines them.

The recipe is latent diffusion's first stage (Rombach et al. 2022, https://arxiv.org/abs/2112.10752,
`taming/modules/losses/vqperceptual.py` and `ldm/modules/losses/contperceptual.py`):
reconstruction (L1 or MSE) + LPIPS + KL to N(0, I), optionally a PatchGAN (Isola et al. 2017)
whose weight is set adaptively from the gradient norms at the decoder's last layer.

`generator_loss` and `discriminator_loss` are separate; the discriminator only ever sees
detached reconstructions. Both return `(loss, logs)` with `logs` a flat dict of 0-d tensors
(read them only every N steps: reading forces a host sync).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..vae.moments import kl_to_standard_normal
from ..config import LossConfig
from ..perceptual import lpips_distance


def l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x - y).abs().mean()


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x - y).square().mean()


RECON_LOSSES: dict[str, Callable] = {"l1": l1, "mse": mse}


def kl_per_element(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per latent element, (B, C, H, W), in fp32 on purpose."""
    return kl_to_standard_normal(mean.float(), logvar.float())


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def vanilla_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-logits_fake).mean()


D_LOSSES: dict[str, Callable] = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
G_LOSSES: dict[str, Callable] = {"hinge": hinge_g_loss, "vanilla": vanilla_g_loss}


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """||d rec / d W_last|| / (||d g / d W_last|| + 1e-4), clamped to [0, 1e4] and detached."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return w.clamp(0.0, max_weight).detach()


def kl_weight_at(cfg: LossConfig, step: int) -> float:
    """KL weight with an optional linear warm-up from 0 over `kl_warmup_steps`."""
    if cfg.kl_warmup_steps <= 0:
        return cfg.kl_weight
    return cfg.kl_weight * min(1.0, step / cfg.kl_warmup_steps)


def _lpips_inputs(x: torch.Tensor, y: torch.Tensor, crop: int):
    """The LPIPS inputs: the whole images, or one random `crop` x `crop` window (the same in both)."""
    h, w = x.shape[-2:]
    if not crop or crop >= min(h, w):
        return x, y
    top = int(torch.randint(0, h - crop + 1, (1,)))
    left = int(torch.randint(0, w - crop + 1, (1,)))
    return x[..., top:top + crop, left:left + crop], y[..., top:top + crop, left:left + crop]


def generator_loss(cfg: LossConfig, x: torch.Tensor, x_hat: torch.Tensor, mean: torch.Tensor,
                   logvar: Optional[torch.Tensor], step: int, *, lpips=None, disc=None, last_layer=None,
                   train_kl: bool = True, frames: Optional[torch.Tensor] = None):
    """The autoencoder's loss. x, x_hat in [-1, 1]; (mean, logvar) the posterior's moments, 4-D (logvar
    None for a family without a posterior: no KL term).

    KL is summed over latent elements and divided by the pixel values per image (see LossConfig),
    so `kl_weight` keeps latent diffusion's meaning. `train_kl=False` (autoencoder mode) reports
    the KL but does not add it. `disc` (the discriminator, or None before `gan_start`) adds the
    adversarial term with the adaptive weight computed at `last_layer`. `frames` (clips folded into the
    batch: train/clips.py) picks the images LPIPS and the GAN term see; None: all of them.
    """
    logs: dict[str, torch.Tensor] = {}
    x32, x_hat32 = x.float(), x_hat.float()
    rec = RECON_LOSSES[cfg.recon](x_hat32, x32)
    nll = cfg.recon_weight * rec
    logs["rec"] = rec.detach()
    if cfg.lpips_weight > 0:
        if lpips is None:
            raise ValueError("loss.lpips_weight > 0 but no LPIPS module was given")
        a, b = _lpips_inputs(*((x_hat32, x32) if frames is None else (x_hat32[frames], x32[frames])), cfg.lpips_crop)
        p = lpips_distance(lpips, a, b).mean()
        nll = nll + cfg.lpips_weight * p
        logs["lpips"] = p.detach()
    loss = nll
    if logvar is not None:  # None: a family without a posterior (DC, TAESD), so no KL to report or train
        kl_elem = kl_per_element(mean, logvar)
        kl = kl_elem.flatten(1).sum(1).mean() / x[0].numel()  # per image, over its pixel values
        logs["kl_per_elem"] = kl_elem.mean().detach()
        if train_kl:
            loss = loss + kl_weight_at(cfg, step) * kl
    if disc is not None:
        g = G_LOSSES[cfg.gan_loss](disc((x_hat if frames is None else x_hat[frames]).float()))
        if cfg.adaptive_weight:
            if last_layer is None:
                raise ValueError("the adaptive GAN weight needs the decoder's last layer")
            w = adaptive_weight(nll, g, last_layer) * cfg.gan_weight
        else:
            w = torch.tensor(cfg.gan_weight, device=x.device)
        loss = loss + w * g
        logs["g_loss"] = g.detach()
        logs["d_weight"] = w.detach()
    logs["loss"] = loss.detach()
    return loss, logs


def equivariance_loss(cfg: LossConfig, x_t: torch.Tensor, x_t_hat: torch.Tensor, lpips=None) -> torch.Tensor:
    """EQ-VAE's term for one transform: the reconstruction objective (loss.recon_weight x recon +
    loss.lpips_weight x LPIPS, as in generator_loss) between the transformed image and the decoded
    transformed latent. Multiplied by loss.equivariance_weight in the step."""
    x32, y32 = x_t.float(), x_t_hat.float()
    term = cfg.recon_weight * RECON_LOSSES[cfg.recon](y32, x32)
    if cfg.lpips_weight > 0 and lpips is not None and min(x32.shape[-2:]) >= 32:  # AlexNet/VGG need 32 pixels
        a, b = _lpips_inputs(y32, x32, cfg.lpips_crop)
        term = term + cfg.lpips_weight * lpips_distance(lpips, a, b).mean()
    return term


def discriminator_loss(cfg: LossConfig, disc, x: torch.Tensor, x_hat: torch.Tensor):
    """The discriminator's loss on real `x` and detached reconstructions `x_hat`."""
    logits_real = disc(x.detach().float())
    logits_fake = disc(x_hat.detach().float())
    d = D_LOSSES[cfg.gan_loss](logits_real, logits_fake)
    logs = {"d_loss": d.detach(), "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean()}
    return d, logs
