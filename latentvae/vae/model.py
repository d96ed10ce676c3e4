"""The network built and run, no disk: the class ModelConfig names (families.py), and a uniform interface
over every family, so evaluation and encoding treat them alike (loading from disk is loading.py):

    vae = build_vae(cfg.model)                  # random init, any trainable family (model.family)
    mean, logvar = encode_moments(vae, x)       # x in [-1, 1], (B, 3, H, W) -> (B, C, H/f, W/f), 4-D always
    x_hat = decode(vae, mean)                   # raw (unscaled) latents -> [-1, 1]
    enc = InferenceEncoder(vae, torch.bfloat16) # encoding only: bf16 weights, fp32 moments
"""
from __future__ import annotations

import copy
from typing import Optional

import torch

from ..config import ModelConfig
from ..errors import BadInputError
from .families import family, family_of
from ..precision import autocast


def diffusers_kwargs(m: ModelConfig) -> dict:
    """ModelConfig -> the constructor arguments of model.family's class (= its saved config.json).

    kl and flux2 take the keys as they are (flux2 adds its BatchNorm of the patchified latent); qwenimage
    and wan read block_out_channels as base_dim * dim_mult, layers_per_block as num_res_blocks and
    latent_channels as z_dim, with no temporal downsampling (an image VAE) and identity statistics until
    calibration measures them."""
    n = len(m.block_out_channels)
    if m.family in ("qwenimage", "wan"):
        base = m.block_out_channels[0]
        if any(c % base for c in m.block_out_channels):
            raise BadInputError(f"model.block_out_channels={list(m.block_out_channels)}: {m.family} builds every level "
                                f"as a multiple of the first ({base})")
        return dict(base_dim=base, z_dim=m.latent_channels, dim_mult=[c // base for c in m.block_out_channels],
                    num_res_blocks=m.layers_per_block, temperal_downsample=[False] * (n - 1),
                    latents_mean=[0.0] * m.latent_channels, latents_std=[1.0] * m.latent_channels)
    return dict(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(m.block_out_channels), layers_per_block=m.layers_per_block,
        latent_channels=m.latent_channels, norm_num_groups=m.norm_num_groups,
        use_quant_conv=m.use_quant_conv, use_post_quant_conv=m.use_post_quant_conv,
        mid_block_add_attention=m.mid_block_add_attention,
    )


BUILDABLE = ("kl", "flux2", "qwenimage", "wan")  # families model.family may build from scratch


def build_vae(m: ModelConfig):
    """A randomly initialised autoencoder of `m.family`'s class and the architecture `m` describes."""
    if m.family not in BUILDABLE:
        raise BadInputError(f"model.family={m.family}: latentvae builds {', '.join(BUILDABLE)} from scratch; start "
                            f"a {m.family} from its weights with model.init_from")
    return family(m.family).cls(**diffusers_kwargs(m))


def configure_for_training(vae, m: ModelConfig, label: str = "model.init_from"):
    """Gradient checkpointing and a frozen encoder (`train_decoder_only`), as `m` asks; a family that
    cannot do what is asked says so in one line."""
    fam = family_of(vae)
    fam.require("train-decoder" if m.train_decoder_only else "train", label)
    if m.gradient_checkpointing:
        if not fam.grad_checkpointing:
            raise BadInputError(f"model.gradient_checkpointing: diffusers implements no gradient checkpointing for "
                                f"{fam.class_name}; set it false")
        vae.enable_gradient_checkpointing()
    if m.train_decoder_only:
        vae.requires_grad_(False)
        for p in fam.decoder_parameters(vae):
            p.requires_grad_(True)
    return vae


# diffusers clamps the log-variance to [-30, 20]: at -30 the posterior's std is e^-15 ~ 3e-7
DETERMINISTIC_LOGVAR = -30.0


@torch.no_grad()
def make_posterior_deterministic(vae):
    """Pin the posterior's log-variance to -30 (std ~3e-7), so `latent_dist.sample()` equals `.mode()`.

    A plain autoencoder (`model.mode: ae`) never trains the log-variance half of its moments, so
    without this, `sample()` (what img2img and diffusers' training scripts call) adds noise larger
    than the signal. The moments come from `quant_conv`, or from the encoder's last conv without it."""
    fam = family_of(vae)
    if not fam.pinnable:
        raise BadInputError(f"model.mode=ae: {fam.class_name}'s encoder adds a residual to its moments; its "
                            "log-variance cannot be pinned")
    conv = getattr(vae, "quant_conv", None)
    conv = conv if conv is not None else vae.encoder.conv_out
    c = fam.channels(vae)
    if conv.weight.shape[0] != 2 * c or conv.bias is None:
        raise BadInputError(f"model.mode=ae: {type(vae).__name__} has no 1x1 moments conv to pin the log-variance of")
    conv.weight[c:].zero_()
    conv.bias[c:].fill_(DETERMINISTIC_LOGVAR)
    return vae


def downsample_factor(vae) -> int:
    return family_of(vae).factor(vae)


def latent_channels(vae) -> int:
    return family_of(vae).channels(vae)


def encode_moments(vae, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """[-1, 1] images -> 4-D (mean, logvar) of the posterior; logvar is None for deterministic encoders."""
    return family_of(vae).moments(vae, x)


class InferenceEncoder(torch.nn.Module):
    """The encoder half of a VAE for inference: [-1, 1] fp32 images -> fp32 4-D (mean, logvar), as encode_moments.

    The encoder runs in `dtype` with its weights cast to it (a copy: `vae` itself stays as it was, so
    its weights hash and its decoder are untouched) and no autocast needed. For the classes built on
    diffusers' Encoder + 1x1 quant_conv (kl, flux2) and AutoencoderTiny, the moments are an fp32 island
    whatever the dtype: `quant_conv` (a negligible cost) and the log-variance clamp run in fp32 with
    autocast off, on purpose, since exp(logvar / 2) amplifies 16-bit rounding; this is their `_encode` +
    DiagonalGaussianDistribution's mean/logvar without tiling or slicing (never on for encoding). Every
    other family runs its own `encode` in `dtype` (families.py), its moments then cast to fp32."""

    def __init__(self, vae, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.family = family_of(vae)
        self.dtype = dtype
        self.island = self.family.name in ("kl", "flux2", "tiny")
        if self.island:  # encoder (and quant_conv) share vae's modules in fp32; a 16-bit encoder is its own copy
            self.encoder = vae.encoder if dtype == torch.float32 else copy.deepcopy(vae.encoder).to(dtype)
            self.quant_conv = None if self.family.name == "tiny" else vae.quant_conv
        else:
            # nn.Module.to, not ModelMixin.to: its warning about modules to keep in fp32 names none for these
            self.vae = vae if dtype == torch.float32 else torch.nn.Module.to(copy.deepcopy(vae), dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not self.island:
            mean, logvar = self.family.moments(self.vae, x.to(self.dtype))
            return mean.float(), None if logvar is None else logvar.float().clamp(-30.0, 20.0)
        h = self.encoder(x.to(self.dtype))  # (B, 2C, h, w) moments; AutoencoderTiny: (B, C, h, w) latents
        with autocast(x.device.type, None):
            h = h.float()
            if self.quant_conv is None and self.family.name == "tiny":
                return h, None
            if self.quant_conv is not None:
                h = self.quant_conv(h)
            mean, logvar = h.chunk(2, dim=1)
            return mean, logvar.clamp(-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp


def configure_tiling(label: str, vae, tiling: bool, tile_size: int = 0, encode: bool = True) -> Optional[dict]:
    """--tiling (evaluate, decode): diffusers' own tiled encode/decode (vae.enable_tiling()), `tile_size`
    replacing the model's minimum tile (kl, flux2, hunyuanimage, tiny: tile_sample_min_size and
    tile_latent_min_size = tile_size / factor); returns the tile settings, None without `tiling`.
    `encode=False`: only decoding will be tiled (diffusers' AutoencoderTiny tiles latents of any channel
    count when decoding, of 4 only when encoding). Qwen-Image and DC tile with their own defaults; the video
    classes with `tile_size` px tiles (or their defaults), and in time where they need it (_video_tiling)."""
    if not tiling:
        return None
    fam = family_of(vae)
    factor = fam.factor(vae)
    if encode and fam.name == "tiny" and fam.channels(vae) != 4:
        raise BadInputError(f"--tiling: {label} has {fam.channels(vae)} latent channels, but diffusers' "
                            "AutoencoderTiny tiled encode writes 4 only; evaluate it without --tiling")
    if fam.name == "tiny" and getattr(vae, "spatial_scale_factor", factor) != factor:
        raise BadInputError(f"--tiling: {label} downsamples by {factor}, but diffusers' AutoencoderTiny tiles assume "
                            f"{vae.spatial_scale_factor}; run it without --tiling")
    if tile_size and tile_size % factor:
        raise BadInputError(f"--tile-size {tile_size}: must be a multiple of {label}'s downsampling factor {factor}")
    if fam.video:
        return _video_tiling(vae, fam, tile_size)
    if tile_size and not hasattr(vae, "tile_sample_min_size"):
        raise BadInputError(f"--tile-size: {label} is a {fam.class_name}, whose tiles diffusers sizes by height and "
                            "width; use --tiling without --tile-size (its own tile sizes)")
    vae.enable_tiling()
    if tile_size:
        vae.tile_sample_min_size, vae.tile_latent_min_size = tile_size, tile_size // factor
    return {k: v for k, v in sorted(vars(vae).items()) if k.startswith("tile_")}


LTX2_TILE = 256  # px: LTX-2's tiles when --tile-size is not given (see _video_tiling)


def _video_tiling(vae, fam, tile_size: int) -> dict:
    """A video class's own spatial tiling (tiles of `tile_size` px overlapping by a quarter, else its defaults;
    LTX-2: LTX2_TILE),
    and its temporal tiling where diffusers has one: LTX-2 encodes and decodes framewise (its
    `use_framewise_encoding/decoding`, which `enable_tiling` leaves off); Wan, HunyuanVideo 1.5 and CogVideoX
    already run their causal encoders and decoders a few frames at a time, so time never needs tiling."""
    kwargs = {}
    if not tile_size and fam.name == "ltx2":
        # its default 512-px tiles fail in diffusers 0.42.1 on 480-px frames: tiled_decode steps through every
        # side by the stride once one side needs tiles, leaving a 1-latent-row tile its reflect padding refuses
        tile_size = LTX2_TILE
    if tile_size:
        kwargs = dict(tile_sample_min_height=tile_size, tile_sample_min_width=tile_size)
        if fam.name in ("wan", "ltx2"):
            stride = max(fam.factor(vae), tile_size * 3 // 4 // fam.factor(vae) * fam.factor(vae))
            kwargs.update(tile_sample_stride_height=stride, tile_sample_stride_width=stride)
        if fam.name == "hunyuanvideo15":
            kwargs.update(tile_latent_min_height=tile_size // fam.factor(vae),
                          tile_latent_min_width=tile_size // fam.factor(vae))
    vae.enable_tiling(**kwargs)
    if fam.name == "ltx2":
        vae.use_framewise_encoding = vae.use_framewise_decoding = True
    return {k: v for k, v in sorted(vars(vae).items()) if k.startswith(("tile_", "use_framewise"))}


def decode(vae, z: torch.Tensor) -> torch.Tensor:
    """raw 4-D latents -> [-1, 1] images"""
    return family_of(vae).decode(vae, z)


def last_decoder_layer(vae) -> torch.nn.Parameter:
    """The weight whose gradient norms set the adaptive GAN weight (LDM's `get_last_layer`)."""
    return family_of(vae).last_decoder_layer(vae)


def describe(vae) -> str:
    n = sum(p.numel() for p in vae.parameters())
    return (f"{type(vae).__name__}: {n / 1e6:.2f}M parameters, {latent_channels(vae)} latent channels, "
            f"/{downsample_factor(vae)}")
