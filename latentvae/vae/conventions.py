"""How each pipeline family turns VAE latents into diffusion latents and back: the one place for it.

Mirrors diffusers 0.42 (the lines cited are where each pipeline applies the factors):
  sd    SD 1.x/2.x: z * scaling_factor; decoded as x / scaling_factor
        (pipelines/stable_diffusion/pipeline_stable_diffusion_img2img.py `prepare_latents`;
        pipeline_stable_diffusion.py `__call__`, `self.vae.decode(latents / self.vae.config.scaling_factor)`)
  sdxl  SDXL and its derivatives: when `latents_mean` and `latents_std` are both in the config,
        (z - latents_mean) * scaling_factor / latents_std, decoded as x * latents_std / scaling_factor
        + latents_mean (pipeline_stable_diffusion_xl_img2img.py `prepare_latents`; pipeline_stable_
        diffusion_xl.py `__call__`); without them, as sd. The pipelines view the statistics as
        (1, 4, 1, 1): 4 latent channels only.
  sd3   SD3 and FLUX: (z - shift_factor) * scaling_factor, decoded as x / scaling_factor + shift_factor
        (pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py, pipelines/flux/pipeline_flux.py)

    config = diffusers_config("sdxl", channel_mean=m, channel_std=s, mean=mu, std=sigma)
    x = to_diffusion(z, config, "sdxl")          # what the diffusion model sees: ~N(0, 1) on the data
    z = from_diffusion(x, config, "sdxl")        # back to the VAE's latents

`diffusers_config` writes, for a family, the factors under which that family's own formula gives
unit-variance latents on the measured data (zero-mean too for sdxl and sd3; sd never shifts).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..errors import BadInputError

FAMILIES = {
    "sd": "SD 1.x/2.x (and SDXL pipelines given no latents_mean/std): z * scaling_factor",
    "sdxl": "SDXL-family pipelines and training scripts: (z - latents_mean) * scaling_factor / latents_std",
    "sd3": "SD3 / FLUX: (z - shift_factor) * scaling_factor",
}


def check_family(family: str, channels: Optional[int] = None) -> str:
    if family not in FAMILIES:
        raise BadInputError(f"unknown convention {family!r}; valid choices: {', '.join(FAMILIES)}")
    if family == "sdxl" and channels is not None and channels != 4:
        raise BadInputError(f"convention sdxl needs 4 latent channels (the SDXL pipelines view latents_mean/std as "
                            f"(1, 4, 1, 1)); this VAE has {channels}: use sd3 (16 channels) or sd")
    return family


def default_family(latent_channels: int) -> str:
    """16-channel latents are the SD3/FLUX family; fewer are the SD family."""
    return "sd3" if latent_channels >= 16 else "sd"


def diffusers_config(family: str, *, channel_mean: Sequence[float], channel_std: Sequence[float], mean: float,
                     std: float) -> dict:
    """The config.json entries under which `family`'s formula maps the measured latents to unit scale.

    `channel_mean/std` per latent channel, `mean/std` over all channels and positions."""
    check_family(family, len(channel_mean))
    if family == "sd":
        return {"scaling_factor": 1.0 / std, "shift_factor": None, "latents_mean": None, "latents_std": None}
    if family == "sd3":
        return {"scaling_factor": 1.0 / std, "shift_factor": mean, "latents_mean": None, "latents_std": None}
    return {"scaling_factor": 1.0, "shift_factor": None, "latents_mean": [float(v) for v in channel_mean],
            "latents_std": [float(v) for v in channel_std]}


def _channel_view(values, z: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=z.dtype, device=z.device).view(1, -1, 1, 1)


def _has_stats(config: dict) -> bool:
    return config.get("latents_mean") is not None and config.get("latents_std") is not None


def to_diffusion(z: torch.Tensor, config: dict, family: str) -> torch.Tensor:
    """VAE latents (B, C, h, w) -> what a `family` pipeline's diffusion model sees."""
    check_family(family)
    sf = config["scaling_factor"]
    if family == "sdxl" and _has_stats(config):
        return (z - _channel_view(config["latents_mean"], z)) * sf / _channel_view(config["latents_std"], z)
    if family == "sd3":
        return (z - (config.get("shift_factor") or 0.0)) * sf
    return z * sf


def from_diffusion(x: torch.Tensor, config: dict, family: str) -> torch.Tensor:
    """The inverse of `to_diffusion`: diffusion latents -> what the VAE decodes."""
    check_family(family)
    sf = config["scaling_factor"]
    if family == "sdxl" and _has_stats(config):
        return x * _channel_view(config["latents_std"], x) / sf + _channel_view(config["latents_mean"], x)
    if family == "sd3":
        return x / sf + (config.get("shift_factor") or 0.0)
    return x / sf
