"""Importing pretrained autoencoders that are not diffusers folders: LDM checkpoints and TAESD.

    vae = load_ldm_vae("sd-vae.safetensors")     # original latent-diffusion / SD key names -> AutoencoderKL
    vae = load_taesd("taesd:flux")                # ../shared/weights/taesd/taef1_*.safetensors -> AutoencoderTiny

LDM keys (`encoder.down.0.block.0.norm1.weight`, optionally under `first_stage_model.` or
`vae.`) are renamed by diffusers' own `convert_ldm_vae_checkpoint`; this file only infers the
architecture from the tensor shapes and checks that every tensor was used. TAESD weights are in
the layout of the reference `taesd.py`; the remap to `diffusers.AutoencoderTiny` is the one in
../shared/README.md. Only safetensors (or `torch.load(weights_only=True)`) is read.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from diffusers import AutoencoderKL, AutoencoderTiny


@dataclass(frozen=True)
class TaesdVariant:
    stem: str  # file stem in the TAESD folder
    channels: int
    space: str  # the VAE whose latent space it shares
    # that VAE's published config factors: TAESD latents are that VAE's *normalized* latents,
    # (z_raw - shift_factor) * scaling_factor (measured std ~1 on ../shared/data/dev-images; docs/export.md)
    scaling_factor: float
    shift_factor: float


TAESD_VARIANTS: dict[str, TaesdVariant] = {
    "sd": TaesdVariant("taesd", 4, "SD 1.x/2.x VAE", 0.18215, 0.0),
    "sdxl": TaesdVariant("taesdxl", 4, "SDXL VAE", 0.13025, 0.0),
    "sd3": TaesdVariant("taesd3", 16, "SD3 VAE", 1.5305, 0.0609),
    "flux": TaesdVariant("taef1", 16, "FLUX.1 VAE", 0.3611, 0.1159),
}
TAESD_PREFIX = "taesd:"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class ConversionError(ValueError):
    """Weights that do not form the expected autoencoder; the message names the file and the problem."""


# ----------------------------------------------------------------------------- reading tensors
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or a torch file read with weights_only=True (never a full unpickle)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise ConversionError(f"{path}: not a readable safetensors file ({e})") from e
    if path.suffix in PICKLE_SUFFIXES:
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConversionError(f"{path}: torch.load(weights_only=True) refused it ({type(e).__name__}); "
                                  "convert it to .safetensors with a tool you trust") from e
        data = data.get("state_dict", data) if isinstance(data, dict) else data
        if not isinstance(data, dict) or not all(torch.is_tensor(v) for v in data.values()):
            raise ConversionError(f"{path}: expected a dict of tensors (or {{'state_dict': ...}})")
        return data
    raise ConversionError(f"{path}: unknown weight file type {path.suffix!r}; expected .safetensors "
                          f"(or {', '.join(PICKLE_SUFFIXES)} read with weights_only=True)")


# ----------------------------------------------------------------------------- LDM / Stable Diffusion
def strip_vae_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the VAE tensors of a full SD checkpoint (`first_stage_model.` / `vae.`), prefix removed."""
    for prefix in ("first_stage_model.", "vae."):
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def is_ldm_vae(state: dict[str, torch.Tensor]) -> bool:
    keys = strip_vae_prefix(state)
    return "encoder.conv_in.weight" in keys and any(k.startswith("encoder.down.0.block.0.") for k in keys)


def ldm_vae_config(state: dict[str, torch.Tensor], norm_num_groups: int = 32) -> dict:
    """AutoencoderKL constructor arguments read off the shapes of an LDM VAE state dict.

    The group count of the GroupNorms is not in the weights; every LDM/SD/SDXL/SD3/FLUX VAE uses 32.
    """
    s = strip_vae_prefix(state)
    levels = sorted({int(m.group(1)) for k in s if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    if not levels:
        raise ConversionError("no encoder.down.N.* tensors: not an LDM VAE state dict")
    channels = tuple(s[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in levels)
    layers = len({m.group(1) for k in s if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    z2 = s["encoder.conv_out.weight"].shape[0]  # 2 * latent channels (mean and logvar)
    n = len(channels)
    return dict(
        in_channels=s["encoder.conv_in.weight"].shape[1], out_channels=s["decoder.conv_out.weight"].shape[0],
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=channels, layers_per_block=layers, latent_channels=z2 // 2,
        norm_num_groups=norm_num_groups,
        use_quant_conv="quant_conv.weight" in s, use_post_quant_conv="post_quant_conv.weight" in s,
        mid_block_add_attention=any(k.startswith("encoder.mid.attn_1.") for k in s),
    )


def convert_ldm_vae(state: dict[str, torch.Tensor], norm_num_groups: int = 32, source: str = "state dict") -> AutoencoderKL:
    """LDM-keyed VAE tensors -> AutoencoderKL, renamed by diffusers, loaded with strict=True."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae_state = strip_vae_prefix(state)
    config = ldm_vae_config(vae_state, norm_num_groups)
    converted = convert_ldm_vae_checkpoint(vae_state, config)
    vae = AutoencoderKL(**config)
    n_src = sum(1 for k in vae_state if not k.startswith("loss."))  # LDM ships the LPIPS/disc of its loss
    if len(converted) != n_src:
        raise ConversionError(f"{source}: {n_src - len(converted)} of {n_src} LDM VAE tensors were not converted "
                              "(an architecture diffusers' converter does not know)")
    try:
        vae.load_state_dict(converted, strict=True)
    except RuntimeError as e:
        raise ConversionError(f"{source}: converted LDM weights do not fit AutoencoderKL({config}): {e}") from e
    return vae.eval()


def load_ldm_vae(path: str | Path, norm_num_groups: int = 32) -> AutoencoderKL:
    state = read_state_dict(path)
    if not is_ldm_vae(state):
        sample = ", ".join(list(state)[:3])
        raise ConversionError(f"{path}: not an LDM VAE checkpoint (expected keys such as "
                              f"encoder.down.0.block.0.norm1.weight, optionally under first_stage_model.; "
                              f"found {sample} ...)")
    return convert_ldm_vae(state, norm_num_groups, source=str(path))


# ----------------------------------------------------------------------------- TAESD
def default_taesd_dir() -> Optional[Path]:
    """$LATENTVAE_TAESD_DIR, else ../shared/weights/taesd beside the repository, if it exists."""
    env = os.environ.get("LATENTVAE_TAESD_DIR")
    if env:
        return Path(env)
    shared = Path(__file__).resolve().parents[2] / "shared" / "weights" / "taesd"
    return shared if shared.is_dir() else None


def taesd_state_dict(encoder: dict[str, torch.Tensor], decoder: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference taesd.py keys -> AutoencoderTiny keys (the reference decoder's layer 0 is a clamp)."""
    out = {f"encoder.layers.{k}": v for k, v in encoder.items()}
    for k, v in decoder.items():
        index, rest = k.split(".", 1)
        out[f"decoder.layers.{int(index) - 1}.{rest}"] = v
    return out


def parse_taesd_name(name: str) -> str:
    variant = name[len(TAESD_PREFIX):] if name.startswith(TAESD_PREFIX) else name
    if variant not in TAESD_VARIANTS:
        raise ValueError(f"unknown TAESD variant {name!r}; valid choices: "
                         f"{', '.join(TAESD_PREFIX + v for v in TAESD_VARIANTS)}")
    return variant


def load_taesd(name: str, taesd_dir: str | Path | None = None) -> AutoencoderTiny:
    """`taesd:sd|sdxl|sd3|flux` -> AutoencoderTiny in fp32: [-1, 1] images <-> unscaled latents."""
    variant = parse_taesd_name(name)
    stem, channels = TAESD_VARIANTS[variant].stem, TAESD_VARIANTS[variant].channels
    folder = Path(taesd_dir) if taesd_dir is not None else default_taesd_dir()
    if folder is None:
        raise FileNotFoundError(f"{name}: no TAESD folder; set LATENTVAE_TAESD_DIR or pass taesd_dir "
                                f"(a folder with {stem}_encoder.safetensors and {stem}_decoder.safetensors)")
    enc, dec = (read_state_dict(folder / f"{stem}_{part}.safetensors") for part in ("encoder", "decoder"))
    vae = AutoencoderTiny(latent_channels=channels)
    try:
        vae.load_state_dict(taesd_state_dict(enc, dec), strict=True)
    except RuntimeError as e:
        raise ConversionError(f"{folder}/{stem}_*.safetensors: not TAESD weights for "
                              f"{channels} latent channels: {e}") from e
    vae.taesd_variant = variant  # plain attribute: which latent space, for taesd_to_raw / raw_to_taesd
    return vae.float().eval()


def taesd_factors(vae) -> tuple[float, float]:
    """(scaling_factor, shift_factor) mapping raw latents of the target VAE to this TAESD's latents;
    (1, 0) for an AutoencoderTiny not loaded by `load_taesd` (its space is unknown here)."""
    variant = getattr(vae, "taesd_variant", None)
    if variant is None:
        return 1.0, 0.0
    v = TAESD_VARIANTS[variant]
    return v.scaling_factor, v.shift_factor


def taesd_to_raw(vae, z: torch.Tensor) -> torch.Tensor:
    """TAESD latents (normalized) -> raw latents of the VAE it mimics: z / scaling_factor + shift_factor"""
    scale, shift = taesd_factors(vae)
    return z / scale + shift


def raw_to_taesd(vae, z: torch.Tensor) -> torch.Tensor:
    """raw latents of the VAE it mimics -> TAESD latents: (z - shift_factor) * scaling_factor"""
    scale, shift = taesd_factors(vae)
    return (z - shift) * scale
