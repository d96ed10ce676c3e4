"""Importing pretrained autoencoders that are not diffusers folders: LDM checkpoints and TAESD.

    vae = load_ldm_vae("sd-vae.safetensors")     # original latent-diffusion / SD key names -> AutoencoderKL
    ldm = diffusers_to_ldm_vae(vae.state_dict())  # and back (what `latentvae export --format single-file` writes)
    vae = load_taesd("taesd:flux")                # ../shared/weights/taesd/taef1_*.safetensors -> AutoencoderTiny

LDM keys (`encoder.down.0.block.0.norm1.weight`, optionally under `first_stage_model.` or
`vae.`) are renamed by diffusers' own `convert_ldm_vae_checkpoint`; this file only infers the
architecture from the tensor shapes and checks that every tensor was used. TAESD weights are in
the layout of the reference `taesd.py`; the remap to `diffusers.AutoencoderTiny` is the one in
../shared/README.md. Only safetensors is read by default; torch files (.bin/.ckpt/.pt/.pth) are
refused with the conversion route (`pickle_route`) unless `allow_pickle=True`, and then read with
`torch.load(weights_only=True)` only: never a full unpickle.
"""
from __future__ import annotations

import json
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


class PickleRefused(ConversionError):
    """A torch (pickle-based) weight file, not read without `allow_pickle`; the message gives the way out."""


def pickle_route(path: str | Path) -> str:
    """How to turn a torch weight file into safetensors once (a one-liner), or read it anyway."""
    path = Path(path)
    out = path.with_suffix(".safetensors")
    return (f"Convert it once to safetensors: python -c \"import torch, safetensors.torch as st; "
            f"d = torch.load('{path}', map_location='cpu', weights_only=True); d = d.get('state_dict', d); "
            f"st.save_file({{k: v.clone().contiguous() for k, v in d.items()}}, '{out}')\" "
            "(then use the .safetensors file), or add the option [allow_pickle=yes] to the VAE's name to read it "
            "with torch.load(weights_only=True)")


# ----------------------------------------------------------------------------- reading tensors
def read_state_dict(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A safetensors file; a torch file only with `allow_pickle`, and then with weights_only=True
    (never a full unpickle)."""
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
        if not allow_pickle:
            raise PickleRefused(f"{path}: a pickle-based torch file; only safetensors are read by default. "
                                + pickle_route(path))
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
                          f"(or {', '.join(PICKLE_SUFFIXES)} with allow_pickle, read with weights_only=True)")


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


# keys by which diffusers' single-file loaders recognise the other classes it converts
# (loaders/single_file_utils.py CHECKPOINT_KEY_NAMES "wan_vae", "autoencoder-dc", "autoencoder-dc-sana")
OTHER_SINGLE_FILES = {"decoder.middle.0.residual.0.gamma": "AutoencoderKLWan",
                      "decoder.stages.1.op_list.0.main.conv.conv.bias": "AutoencoderDC",
                      "encoder.project_in.conv.bias": "AutoencoderDC"}


def load_ldm_vae(path: str | Path, norm_num_groups: int = 32, allow_pickle: bool = False) -> AutoencoderKL:
    state = read_state_dict(path, allow_pickle)
    if not is_ldm_vae(state):
        for key, cls in OTHER_SINGLE_FILES.items():
            if key in state or f"vae.{key}" in state:
                raise ConversionError(
                    f"{path}: an original-layout {cls} file (it holds {key}); latentvae reads that class as a diffusers "
                    f"folder: convert it once with diffusers, `{cls}.from_single_file(FILE).save_pretrained(DIR)` "
                    "(it fetches the matching config from the hub, or pass config=A_DIFFUSERS_FOLDER)")
        sample = ", ".join(list(state)[:3])
        raise ConversionError(f"{path}: not an LDM VAE checkpoint (expected keys such as "
                              f"encoder.down.0.block.0.norm1.weight, optionally under first_stage_model.; "
                              f"found {sample} ...)")
    recorded = recorded_config(path)  # a file written by `latentvae export --format single-file`
    if recorded is None:
        return convert_ldm_vae(state, norm_num_groups, source=str(path))
    vae = convert_ldm_vae(state, int(recorded.get("norm_num_groups", norm_num_groups)), source=str(path))
    return apply_recorded_config(vae, recorded, str(path))


# ----------------------------------------------------------------------------- TAESD
def default_taesd_dir() -> Optional[Path]:
    """$LATENTVAE_TAESD_DIR, else ../shared/weights/taesd beside the repository, if it exists."""
    env = os.environ.get("LATENTVAE_TAESD_DIR")
    if env:
        return Path(env)
    shared = Path(__file__).resolve().parents[3] / "shared" / "weights" / "taesd"
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


# ----------------------------------------------------------------------------- diffusers -> LDM (single file)
# `latentvae export --format single-file` writes the weights in the LDM layout below, with two
# safetensors metadata entries (string values): `latentvae_export` (the export's record) and
# `diffusers_config` (the VAE's config.json: the GroupNorm group count and the latent factors are
# not in the weights). `load_ldm_vae` reads such a file with its recorded config.
EXPORT_RECORD_KEY = "latentvae_export"
CONFIG_KEY = "diffusers_config"
RECORDED_ENTRIES = ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast", "sample_size")
ARCHITECTURE_KEYS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
                     "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")

# diffusers AutoencoderKL key -> LDM key for the tensors inside the blocks: diffusers'
# `convert_ldm_vae_checkpoint` (with `update_vae_resnet_ldm_to_diffusers` and
# `update_vae_attentions_ldm_to_diffusers`) read backwards. The keys it renames whole (conv_in/out,
# norm_out, the quant convs) come from diffusers' own table, DIFFUSERS_TO_LDM_MAPPING["vae"]. In the
# templates {rev} is the LDM level of diffusers' decoder `up_blocks.{i}`: LDM numbers the decoder's
# levels by resolution like the encoder's, so the i-th block to run is `up.{levels - 1 - i}`; {j1} = j + 1.
_P = r"(?P<p>weight|bias)"
_RESNET = rf"(?P<layer>norm1|conv1|norm2|conv2|conv_shortcut)\.{_P}"
LDM_VAE_KEYS = [(re.compile(pattern), template) for pattern, template in [
    (rf"encoder\.down_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)\.{_RESNET}", "encoder.down.{i}.block.{j}.{layer}.{p}"),
    (rf"encoder\.down_blocks\.(?P<i>\d+)\.downsamplers\.0\.conv\.{_P}", "encoder.down.{i}.downsample.conv.{p}"),
    (rf"decoder\.up_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)\.{_RESNET}", "decoder.up.{rev}.block.{j}.{layer}.{p}"),
    (rf"decoder\.up_blocks\.(?P<i>\d+)\.upsamplers\.0\.conv\.{_P}", "decoder.up.{rev}.upsample.conv.{p}"),
    (rf"(?P<part>encoder|decoder)\.mid_block\.resnets\.(?P<j>\d+)\.{_RESNET}", "{part}.mid.block_{j1}.{layer}.{p}"),
    (rf"(?P<part>encoder|decoder)\.mid_block\.attentions\.0\.(?P<layer>group_norm|to_q|to_k|to_v|to_out\.0)\.{_P}",
     "{part}.mid.attn_1.{layer}.{p}"),
]]
LDM_LAYER_NAMES = {"conv_shortcut": "nin_shortcut", "group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                   "to_out.0": "proj_out"}
LDM_ATTENTION_CONV = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight")


def _ldm_key(key: str, levels: int) -> Optional[str]:
    for pattern, template in LDM_VAE_KEYS:
        if m := pattern.fullmatch(key):
            g = dict(m.groupdict())
            g["layer"] = LDM_LAYER_NAMES.get(g.get("layer"), g.get("layer"))
            if g.get("i") is not None:
                g["rev"] = levels - 1 - int(g["i"])
            if g.get("j") is not None:
                g["j1"] = int(g["j"]) + 1
            return template.format(**g)
    return None


def diffusers_to_ldm_vae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """AutoencoderKL weights -> the original LDM/CompVis layout (`encoder.down.0.block.0.norm1.weight`, no
    `first_stage_model.` prefix, attention q/k/v/proj_out as 1x1 convs (C, C, 1, 1)): the standalone VAE
    file ComfyUI, A1111 and kohya load. The inverse of diffusers' `convert_ldm_vae_checkpoint`."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    whole = DIFFUSERS_TO_LDM_MAPPING["vae"]
    levels = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))),
                     default=-1)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = whole.get(key) or _ldm_key(key, levels)
        if name is None:
            raise ConversionError(f"{key}: no LDM name for this tensor (the LDM layout holds the SD/LDM "
                                  "AutoencoderKL: DownEncoderBlock2D/UpDecoderBlock2D levels, ResNet blocks, "
                                  "one mid-block attention)")
        if name in out:
            raise ConversionError(f"{key}: its LDM name {name} is given to two tensors")
        if LDM_ATTENTION_CONV.fullmatch(name) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # (C, C) -> (C, C, 1, 1): LDM's AttnBlock uses Conv2d(C, C, 1)
        out[name] = tensor
    return out


def recorded_config(path: str | Path) -> Optional[dict]:
    """The diffusers config a `latentvae export --format single-file` file records in its metadata, else None."""
    if Path(path).suffix != ".safetensors":
        return None
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types
        raise ConversionError(f"{path}: not a readable safetensors file ({e})") from e
    if EXPORT_RECORD_KEY not in meta or CONFIG_KEY not in meta:
        return None
    try:
        config = json.loads(meta[CONFIG_KEY])
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: its metadata {CONFIG_KEY} is not JSON ({e})") from e
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: its metadata {CONFIG_KEY} is not a JSON object")
    return config


def apply_recorded_config(vae: AutoencoderKL, recorded: dict, source: str) -> AutoencoderKL:
    """Check the recorded architecture against the one read off the weights; set the recorded latent entries."""
    def plain(v):
        return list(v) if isinstance(v, (list, tuple)) else v
    differ = [k for k in ARCHITECTURE_KEYS if k in recorded and plain(recorded[k]) != plain(vae.config[k])]
    if differ:
        raise ConversionError(f"{source}: the config in its metadata does not describe its weights ("
                              + ", ".join(f"{k}: {recorded[k]} vs {vae.config[k]}" for k in differ) + ")")
    vae.register_to_config(**{k: recorded[k] for k in RECORDED_ENTRIES if k in recorded})
    return vae


def export_metadata(path: str | Path) -> Optional[dict]:
    """The record a `latentvae export --format single-file` file carries in its metadata (scaling_origin, ...),
    None for any other file (or one that cannot be read: loading it says why)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta[EXPORT_RECORD_KEY]) if EXPORT_RECORD_KEY in meta else None
    except Exception:  # unreadable or not JSON: not a record
        return None
