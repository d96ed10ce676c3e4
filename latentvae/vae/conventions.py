"""How each pipeline turns VAE latents into diffusion latents and back: the one place for it.

A convention is a pipeline's formula; the family table (families.py) says which conventions each
VAE class's pipelines apply. Mirrors diffusers 0.42.1, the lines cited being where each pipeline
applies its factors (pipelines/...):

  sd        z * scaling_factor; decoded as x / scaling_factor.
            SD 1.x/2.x: stable_diffusion/pipeline_stable_diffusion_img2img.py:771 (`prepare_latents`),
            pipeline_stable_diffusion.py:1085. SANA (AutoencoderDC): sana/pipeline_sana.py:961.
            HunyuanImage 2.1: hunyuan_image/pipeline_hunyuanimage.py:858.
  sdxl      with `latents_mean` and `latents_std` both in the config, (z - latents_mean) * scaling_factor /
            latents_std, decoded as x * latents_std / scaling_factor + latents_mean
            (stable_diffusion_xl/pipeline_stable_diffusion_xl_img2img.py:696-751, pipeline_stable_diffusion_xl.py:
            1276-1287); without them, as sd. The pipelines view the statistics as (1, 4, 1, 1): 4 channels only.
  sd3       (z - shift_factor) * scaling_factor, decoded as x / scaling_factor + shift_factor
            (stable_diffusion_3/pipeline_stable_diffusion_3_img2img.py:702, pipeline_stable_diffusion_3.py:1141;
            FLUX.1: flux/pipeline_flux_img2img.py:474, pipeline_flux.py:962).
  flux2     2x2-patchify (B, C, h, w) to (B, 4C, h/2, w/2), then (z - bn.running_mean) / sqrt(bn.running_var +
            batch_norm_eps); decoded by the inverse, then unpatchified (flux2/pipeline_flux2.py:457-470
            `_patchify_latents`/`_unpatchify_latents`, 610-617 `_encode_vae_image`, 1019-1024 `__call__`).
            The statistics are the VAE's BatchNorm buffers, which its own encode/decode never apply.
  qwenimage (z - latents_mean) / latents_std per channel (the pipelines keep 1 / latents_std), decoded as
            x * latents_std + latents_mean (qwenimage/pipeline_qwenimage_img2img.py:242-251,
            pipeline_qwenimage.py:705-714; Wan: wan/pipeline_wan_i2v.py:443-462, 824-832,
            pipeline_wan_video2video.py:428-435, 723-731).
  ltx2      (z - latents_mean) * scaling_factor / latents_std per channel, decoded as x * latents_std /
            scaling_factor + latents_mean; the statistics are the VAE's `latents_mean`/`latents_std` buffers (in its
            weights file), scaling_factor its config's (ltx2/pipeline_ltx2.py:687-705 `_normalize_latents`/
            `_denormalize_latents`, 781-783, 1629-1631, 1654-1656; pipeline_ltx2_image2video.py:846 normalizes
            its conditioning latents with scaling_factor 1.0, which is what the published VAE holds).
  HunyuanVideo 1.5 and CogVideoX are `sd`: z * scaling_factor (hunyuan_video1_5/pipeline_hunyuan_video1_5_
            image2video.py:387, pipeline_hunyuan_video1_5.py:825; cogvideo/pipeline_cogvideox_video2video.py:388,
            pipeline_cogvideox.py:353).

Every formula works on images (B, C, h, w) and clips (B, C, T, h, w) alike: the statistics are per channel.

    entries = diffusers_config("sdxl", channel_mean=m, channel_std=s, mean=mu, std=sigma)
    x = to_diffusion(z, entries, "sdxl")          # what the diffusion model sees: ~N(0, 1) on the data
    z = from_diffusion(x, entries, "sdxl")        # back to the VAE's latents
    scale, bias = affine(entries, "sdxl", 4)      # the same as a per-channel z * scale + bias (after patchify)

`diffusers_config` writes, for a convention, the entries under which its formula gives unit-variance
latents on the measured data (zero-mean too, except sd, which never shifts). For flux2 the
statistics are those of the patchified latent (`patchify` first, then measure).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..errors import BadInputError

CONVENTIONS = {
    "sd": "SD 1.x/2.x, SANA, HunyuanImage (and SDXL pipelines given no latents_mean/std): z * scaling_factor",
    "sdxl": "SDXL-family pipelines and training scripts: (z - latents_mean) * scaling_factor / latents_std",
    "sd3": "SD3 / FLUX.1: (z - shift_factor) * scaling_factor",
    "flux2": "FLUX.2: 2x2 patchify, then (z - bn.running_mean) / sqrt(bn.running_var + eps)",
    "qwenimage": "Qwen-Image and Wan: (z - latents_mean) / latents_std",
    "ltx2": "LTX-2: (z - latents_mean) * scaling_factor / latents_std (the VAE's buffers)",
}
PATCH = {"flux2": 2}  # conventions that patchify before their formula
CITES = {  # where diffusers 0.42.1 applies each formula (pipelines/..., as in the module doc): for export's records
    "sd": "stable_diffusion/pipeline_stable_diffusion_img2img.py:771, pipeline_stable_diffusion.py:1085; "
          "sana/pipeline_sana.py:961; hunyuan_image/pipeline_hunyuanimage.py:858; hunyuan_video1_5/pipeline_hunyuan_"
          "video1_5_image2video.py:387, pipeline_hunyuan_video1_5.py:825; cogvideo/pipeline_cogvideox_video2video.py:"
          "388, pipeline_cogvideox.py:353",
    "sdxl": "stable_diffusion_xl/pipeline_stable_diffusion_xl_img2img.py:696-751, pipeline_stable_diffusion_xl.py:1276-1287",
    "sd3": "stable_diffusion_3/pipeline_stable_diffusion_3_img2img.py:702, pipeline_stable_diffusion_3.py:1141; "
           "flux/pipeline_flux_img2img.py:474, pipeline_flux.py:962",
    "flux2": "flux2/pipeline_flux2.py:457-470 (_patchify_latents), 610-617 (_encode_vae_image), 1019-1024 (__call__)",
    "qwenimage": "qwenimage/pipeline_qwenimage_img2img.py:242-251, pipeline_qwenimage.py:705-714; "
                 "wan/pipeline_wan_i2v.py:443-462, 824-832, pipeline_wan_video2video.py:428-435, 723-731",
    "ltx2": "ltx2/pipeline_ltx2.py:687-705 (_normalize_latents/_denormalize_latents), 781-783, 1629-1631, 1654-1656",
}


def check_convention(convention: str, channels: Optional[int] = None) -> str:
    if convention not in CONVENTIONS:
        raise BadInputError(f"unknown convention {convention!r}; valid choices: {', '.join(CONVENTIONS)}")
    if convention == "sdxl" and channels is not None and channels != 4:
        raise BadInputError(f"convention sdxl needs 4 latent channels (the SDXL pipelines view latents_mean/std as "
                            f"(1, 4, 1, 1)); this VAE has {channels}: use sd3 (16 channels) or sd")
    return convention


def default_convention(latent_channels: int) -> str:
    """For AutoencoderKL: 16-channel latents are the SD3/FLUX.1 convention; fewer are SD's."""
    return "sd3" if latent_channels >= 16 else "sd"


# ----------------------------------------------------------------------------- flux2's patchify
def patchify(z: torch.Tensor, p: int = 2) -> torch.Tensor:
    """(B, C, h, w) -> (B, C*p*p, h/p, w/p), as pipeline_flux2.py `_patchify_latents`."""
    b, c, h, w = z.shape
    if h % p or w % p:
        raise ValueError(f"a {p}x{p} patchify needs an even latent size; got {h}x{w}")
    return z.view(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4).reshape(b, c * p * p, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int = 2) -> torch.Tensor:
    """The inverse of `patchify`, as pipeline_flux2.py `_unpatchify_latents`."""
    b, c, h, w = x.shape
    return x.reshape(b, c // (p * p), p, p, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // (p * p), h * p, w * p)


# ----------------------------------------------------------------------------- entries from measurements
def diffusers_config(convention: str, *, channel_mean: Sequence[float], channel_std: Sequence[float], mean: float,
                     std: float, batch_norm_eps: float = 1e-4) -> dict:
    """The entries under which `convention`'s formula maps the measured latents to unit scale.

    `channel_mean/std` per latent channel (flux2: of the patchified latent), `mean/std` over all channels
    and positions."""
    check_convention(convention, len(channel_mean))
    cm, cs = [float(v) for v in channel_mean], [float(v) for v in channel_std]
    if convention == "sd":
        return {"scaling_factor": 1.0 / std, "shift_factor": None, "latents_mean": None, "latents_std": None}
    if convention == "sd3":
        return {"scaling_factor": 1.0 / std, "shift_factor": mean, "latents_mean": None, "latents_std": None}
    if convention == "sdxl":
        return {"scaling_factor": 1.0, "shift_factor": None, "latents_mean": cm, "latents_std": cs}
    if convention == "qwenimage":
        return {"latents_mean": cm, "latents_std": cs}
    if convention == "ltx2":
        return {"latents_mean": cm, "latents_std": cs, "scaling_factor": 1.0}
    # flux2: sqrt(running_var + eps) must be the measured std
    return {"bn_running_mean": cm, "bn_running_var": [max(s * s - batch_norm_eps, 0.0) for s in cs],
            "batch_norm_eps": batch_norm_eps}


def _view(values, z: torch.Tensor) -> torch.Tensor:
    """Per-channel values shaped to broadcast over (B, C, h, w) or (B, C, T, h, w)."""
    return torch.tensor(values, dtype=z.dtype, device=z.device).view(1, -1, *([1] * (z.dim() - 2)))


def _has_stats(entries: dict) -> bool:
    return entries.get("latents_mean") is not None and entries.get("latents_std") is not None


# ----------------------------------------------------------------------------- the formulas
def to_diffusion(z: torch.Tensor, entries: dict, convention: str) -> torch.Tensor:
    """VAE latents (B, C, h, w) -> what a `convention` pipeline's diffusion model sees (flux2: (B, 4C, h/2, w/2))."""
    check_convention(convention)
    if convention == "flux2":
        z = patchify(z)
        std = torch.sqrt(_view(entries["bn_running_var"], z) + entries["batch_norm_eps"])
        return (z - _view(entries["bn_running_mean"], z)) / std
    if convention == "qwenimage":
        return (z - _view(entries["latents_mean"], z)) * (1.0 / _view(entries["latents_std"], z))
    sf = entries["scaling_factor"]
    if convention == "ltx2" or (convention == "sdxl" and _has_stats(entries)):
        return (z - _view(entries["latents_mean"], z)) * sf / _view(entries["latents_std"], z)
    if convention == "sd3":
        return (z - (entries.get("shift_factor") or 0.0)) * sf
    return z * sf


def from_diffusion(x: torch.Tensor, entries: dict, convention: str) -> torch.Tensor:
    """The inverse of `to_diffusion`: diffusion latents -> what the VAE decodes."""
    check_convention(convention)
    if convention == "flux2":
        std = torch.sqrt(_view(entries["bn_running_var"], x) + entries["batch_norm_eps"])
        return unpatchify(x * std + _view(entries["bn_running_mean"], x))
    if convention == "qwenimage":
        return x / (1.0 / _view(entries["latents_std"], x)) + _view(entries["latents_mean"], x)
    sf = entries["scaling_factor"]
    if convention == "ltx2" or (convention == "sdxl" and _has_stats(entries)):
        return x * _view(entries["latents_std"], x) / sf + _view(entries["latents_mean"], x)
    if convention == "sd3":
        return x / sf + (entries.get("shift_factor") or 0.0)
    return x / sf


def affine(entries: dict, convention: str, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, bias), float64 per channel of the (patchified) latent: to_diffusion(z) = patchify(z) * scale + bias.

    For readers that normalize many latents in place; `channels` are those after patchify."""
    check_convention(convention)
    one = torch.ones(channels, dtype=torch.float64)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    if convention == "flux2":
        scale = 1.0 / torch.sqrt(t(entries["bn_running_var"]) + entries["batch_norm_eps"])
        return scale, -t(entries["bn_running_mean"]) * scale
    if convention == "qwenimage":
        scale = 1.0 / t(entries["latents_std"])
        return scale, -t(entries["latents_mean"]) * scale
    sf = float(entries["scaling_factor"])
    if convention == "ltx2" or (convention == "sdxl" and _has_stats(entries)):
        scale = sf / t(entries["latents_std"])
        return scale, -t(entries["latents_mean"]) * scale
    if convention == "sd3":
        return one * sf, one * (-(entries.get("shift_factor") or 0.0) * sf)
    return one * sf, one * 0.0
