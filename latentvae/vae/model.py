"""The network: `diffusers.AutoencoderKL` built from a ModelConfig (loading from disk is loading.py).

Also a small uniform interface over the diffusers autoencoders we use (AutoencoderKL and, for
the TAESD references, AutoencoderTiny), so evaluation and encoding treat them alike:

    vae = build_vae(cfg.model)                  # random init
    mean, logvar = encode_moments(vae, x)       # x in [-1, 1], (B, 3, H, W) -> (B, C, H/f, W/f)
    x_hat = decode(vae, mean)                   # raw (unscaled) latents -> [-1, 1]
    enc = InferenceEncoder(vae, torch.bfloat16) # encoding only: bf16 weights, fp32 moments
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from ..config import ModelConfig
from ..errors import BadInputError

AUTOENCODER_CLASSES = {"AutoencoderKL": AutoencoderKL, "AutoencoderTiny": AutoencoderTiny}


def diffusers_kwargs(m: ModelConfig) -> dict:
    """ModelConfig -> AutoencoderKL constructor arguments (= its saved config.json)."""
    n = len(m.block_out_channels)
    return dict(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(m.block_out_channels), layers_per_block=m.layers_per_block,
        latent_channels=m.latent_channels, norm_num_groups=m.norm_num_groups,
        use_quant_conv=m.use_quant_conv, use_post_quant_conv=m.use_post_quant_conv,
        mid_block_add_attention=m.mid_block_add_attention,
    )


def build_vae(m: ModelConfig) -> AutoencoderKL:
    """A randomly initialised AutoencoderKL of the architecture `m` describes."""
    return AutoencoderKL(**diffusers_kwargs(m))


def configure_for_training(vae: AutoencoderKL, m: ModelConfig) -> AutoencoderKL:
    """Gradient checkpointing and a frozen encoder (`train_decoder_only`), as `m` asks."""
    if m.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    if m.train_decoder_only:
        for module in (vae.encoder, vae.quant_conv):
            if module is not None:
                module.requires_grad_(False)
    return vae


# diffusers clamps the log-variance to [-30, 20]: at -30 the posterior's std is e^-15 ~ 3e-7
DETERMINISTIC_LOGVAR = -30.0


@torch.no_grad()
def make_posterior_deterministic(vae: AutoencoderKL) -> AutoencoderKL:
    """Pin the posterior's log-variance to -30 (std ~3e-7), so `latent_dist.sample()` equals `.mode()`.

    A plain autoencoder (`model.mode: ae`) never trains the log-variance half of its moments, so
    without this, `sample()` (what img2img and diffusers' training scripts call) adds noise larger
    than the signal. The moments come from `quant_conv`, or from the encoder's last conv without it."""
    conv = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
    c = vae.config.latent_channels
    conv.weight[c:].zero_()
    conv.bias[c:].fill_(DETERMINISTIC_LOGVAR)
    return vae


def downsample_factor(vae) -> int:
    if isinstance(vae, AutoencoderTiny):
        return 2 ** sum(1 for m in vae.encoder.layers if isinstance(m, torch.nn.Conv2d) and m.stride[0] == 2)
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_channels(vae) -> int:
    return vae.config.latent_channels


def encode_moments(vae, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """[-1, 1] images -> (mean, logvar) of the posterior; logvar is None for deterministic encoders."""
    if isinstance(vae, AutoencoderTiny):
        return vae.encode(x).latents, None
    dist = vae.encode(x).latent_dist
    return dist.mean, dist.logvar


class InferenceEncoder(torch.nn.Module):
    """The encoder half of a VAE for inference: [-1, 1] fp32 images -> fp32 (mean, logvar), as encode_moments.

    The encoder runs in `dtype` with its weights cast to it (a copy: `vae` itself stays as it was, so
    its weights hash and its decoder are untouched) and no autocast needed. The moments are an fp32
    island whatever the dtype: `quant_conv` (a 1x1 conv, a negligible cost) and the log-variance clamp
    run in fp32 with autocast off, on purpose, since exp(logvar / 2) amplifies 16-bit rounding. This is
    AutoencoderKL._encode + DiagonalGaussianDistribution's mean/logvar, and AutoencoderTiny.encode,
    without tiling or slicing (never on for encoding)."""

    def __init__(self, vae, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.vae_class = type(vae).__name__
        self.dtype = dtype
        # encoder (and quant_conv) share vae's modules in fp32; a half-precision encoder is its own copy
        self.encoder = vae.encoder if dtype == torch.float32 else copy.deepcopy(vae.encoder).to(dtype)
        self.quant_conv = None if isinstance(vae, AutoencoderTiny) else vae.quant_conv

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        h = self.encoder(x.to(self.dtype))  # (B, 2C, h, w) moments; AutoencoderTiny: (B, C, h, w) latents
        with torch.autocast(x.device.type, enabled=False):
            h = h.float()
            if self.vae_class == "AutoencoderTiny":
                return h, None
            if self.quant_conv is not None:
                h = self.quant_conv(h)
            mean, logvar = h.chunk(2, dim=1)
            return mean, logvar.clamp(-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp


def configure_tiling(label: str, vae, tiling: bool, tile_size: int = 0, encode: bool = True) -> Optional[dict]:
    """--tiling (evaluate, decode): diffusers' own tiled encode/decode (vae.enable_tiling()), `tile_size`
    replacing the model's tile_sample_min_size (and tile_latent_min_size = tile_size / factor); returns
    the tiles for the settings, None without `tiling`. `encode=False`: only decoding will be tiled (diffusers'
    AutoencoderTiny tiles latents of any channel count when decoding, of 4 only when encoding)."""
    if not tiling:
        return None
    factor = downsample_factor(vae)
    if encode and isinstance(vae, AutoencoderTiny) and latent_channels(vae) != 4:
        raise BadInputError(f"--tiling: {label} has {latent_channels(vae)} latent channels, but diffusers' "
                            "AutoencoderTiny tiled encode writes 4 only; evaluate it without --tiling")
    if isinstance(vae, AutoencoderTiny) and getattr(vae, "spatial_scale_factor", factor) != factor:
        raise BadInputError(f"--tiling: {label} downsamples by {factor}, but diffusers' AutoencoderTiny tiles assume "
                            f"{vae.spatial_scale_factor}; run it without --tiling")
    if tile_size and tile_size % factor:
        raise BadInputError(f"--tile-size {tile_size}: must be a multiple of {label}'s downsampling factor {factor}")
    vae.enable_tiling()
    if tile_size:
        vae.tile_sample_min_size, vae.tile_latent_min_size = tile_size, tile_size // factor
    return {"tile_sample_min_size": vae.tile_sample_min_size, "tile_latent_min_size": vae.tile_latent_min_size,
            "tile_overlap_factor": vae.tile_overlap_factor}


def decode(vae, z: torch.Tensor) -> torch.Tensor:
    """raw latents -> [-1, 1] images"""
    return vae.decode(z).sample


def last_decoder_layer(vae: AutoencoderKL) -> torch.nn.Parameter:
    """The weight whose gradient norms set the adaptive GAN weight (LDM's `get_last_layer`)."""
    return vae.decoder.conv_out.weight


def describe(vae) -> str:
    n = sum(p.numel() for p in vae.parameters())
    return (f"{type(vae).__name__}: {n / 1e6:.2f}M parameters, {latent_channels(vae)} latent channels, "
            f"/{downsample_factor(vae)}")

