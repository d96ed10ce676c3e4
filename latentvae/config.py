"""Typed configuration: one frozen dataclass per concern, YAML holds overrides only.

Order of application: dataclass defaults -> model preset (``model.preset``) -> YAML file ->
``--set section.key=value`` overrides. Every key, type and choice is checked at once; a wrong
one raises ``ConfigError`` naming the key and the valid keys or choices.

    cfg = load_config("configs/quickstart.yaml", ["train.lr=1e-4", "model.preset=small"])
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration key, type or value that cannot be used."""


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "small"
    block_out_channels: tuple[int, ...] = (32, 64, 128, 128)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 8  # 4 channels per group in the 32-channel block, as SD (128 / 32)
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    mode: Literal["vae", "ae"] = "vae"  # "ae": plain autoencoder, z = mu, no KL term
    init_from: Optional[str] = None  # diffusers folder, LDM .safetensors, or training run
    train_decoder_only: bool = False  # the sd-vae-ft-mse recipe: encoder frozen
    gradient_checkpointing: bool = False


# Named architectures. `sd`/`flux` are the real trunks; the others are sized for a CPU.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "sd": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
               norm_num_groups=32, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True),
    "flux": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                 norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True),
    # CPU presets keep SD's 4 channels per GroupNorm group (see validate)
    "small": dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1, latent_channels=4,
                  norm_num_groups=8, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True),
    "small-f16": dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1, latent_channels=16,
                      norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True),
    "tiny": dict(block_out_channels=(16, 32, 64, 64), layers_per_block=1, latent_channels=4,
                 norm_num_groups=4, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True),
    # two blocks, /2: for unit tests only
    "test": dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                 norm_num_groups=4, use_quant_conv=True, use_post_quant_conv=True,
                 mid_block_add_attention=False),
}


@dataclass(frozen=True)
class LossConfig:
    recon: Literal["l1", "mse"] = "l1"
    recon_weight: float = 1.0
    lpips_weight: float = 1.0  # 0 disables LPIPS
    lpips_net: Literal["vgg", "alex"] = "vgg"
    lpips_dir: Optional[str] = None  # folder with {alexnet,vgg16}_features.safetensors
    lpips_crop: int = 0  # >0: LPIPS on one random crop of this size (speed); 0: whole image
    lpips_random_backbone: bool = False  # TEST ONLY: random LPIPS backbone, never for real runs
    # KL summed over latent elements, divided by the number of pixel values per image, so that
    # kl_weight means what it means in latent diffusion's first-stage recipe (1e-6).
    kl_weight: float = 1e-6
    kl_warmup_steps: int = 0
    gan: bool = False
    gan_loss: Literal["hinge", "vanilla"] = "hinge"
    gan_weight: float = 0.5  # multiplies the adaptive weight
    gan_start: int = 0  # step at which the discriminator starts
    adaptive_weight: bool = True
    disc_layers: int = 3
    disc_channels: int = 64
    disc_lr: Optional[float] = None  # None: train.lr


@dataclass(frozen=True)
class DataConfig:
    source: str = "data/samples"  # image folder, `datasets` folder, or hub name
    kind: Literal["auto", "folder", "hf"] = "auto"
    image_column: str = "image"
    split: str = "train"
    resolution: int = 128  # training crop size
    # before cropping, the short side is resized to a random size in [min, max]; 0 = native
    short_side_min: int = 0
    short_side_max: int = 0
    flip: bool = True
    val_source: Optional[str] = None  # None: hold aside `val_count` images of `source`
    val_count: int = 1
    val_resolution: int = 256  # center crop shown in the reconstruction grids
    num_workers: int = 2
    max_image_pixels: int = 100_000_000  # larger images are skipped (decompression bombs)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    steps: int = 1000
    batch_size: int = 8  # per process, per micro-step
    grad_accum: int = 1
    lr: float = 1e-4
    betas: tuple[float, ...] = (0.5, 0.9)
    weight_decay: float = 0.0
    lr_warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    grad_clip: float = 1.0  # 0 disables
    # "auto": bf16 on CUDA and on CPUs with bf16 kernels, else fp32 (see precision.py)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # fp16 only: the GradScaler's initial loss scale (torch's default 2^16); it halves on every
    # overflowing step and doubles after 2000 clean ones
    fp16_init_scale: float = 65536.0
    channels_last: Optional[bool] = None  # None: auto, as mixed_precision
    ema_decay: float = 0.999  # 0 disables EMA
    log_every: int = 10
    image_every: int = 200
    save_every: int = 500
    keep_last: int = 3
    max_nonfinite_in_row: int = 20
    compile: bool = False
    # CPU threads per process; 0: this machine's cores / processes on it. (`accelerate launch`
    # without a config sets OMP_NUM_THREADS=1, which halves a 2-core CPU's speed.)
    cpu_threads: int = 0


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


SECTIONS = {f.name: f.type for f in fields(Config)}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`, converting only what is lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads a bare `no` as false
            value = "no"
        if value not in args:
            raise ConfigError(f"{key}: unknown choice {value!r}; valid choices: {', '.join(map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - a bug in this file


def _apply(section: Any, name: str, updates: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(type(section))
    valid = [f.name for f in fields(section)]
    clean = {}
    for key, value in updates.items():
        if key not in hints:
            raise ConfigError(f"unknown key {name}.{key}; valid keys in '{name}': {', '.join(valid)}")
        clean[key] = _coerce(f"{name}.{key}", value, hints[key])
    return replace(section, **clean)


def _check_layer(data: Any, source: str) -> dict[str, dict[str, Any]]:
    """One layer of overrides ({section: {key: value}}) with its structure checked."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections ({', '.join(SECTIONS)}), "
                          f"got {type(data).__name__}")
    for name, values in data.items():
        if name not in SECTIONS:
            raise ConfigError(f"{source}: unknown section {name!r}; valid sections: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping of keys, got {values!r}")
    return data


def build_config(layers: list[tuple[str, Any]], base: Optional[Config] = None) -> Config:
    """Config from layers of overrides [(source, {section: {key: value}}), ...], in the documented order.

    The model preset comes first, whichever layer names it (the last one named wins), then every
    other key, layer by layer; the cross-field checks run once, on the result. So
    `--set model.block_out_channels=[8,16] --set model.norm_num_groups=4` works in either order,
    and `--set model.preset=tiny` keeps the model keys a YAML file set. `base` (default: the
    dataclass defaults) is what the layers apply to.
    """
    layers = [(source, _check_layer(data, source)) for source, data in layers]
    cfg = Config() if base is None else base
    preset = None
    for source, data in layers:
        if "preset" in data.get("model", {}):
            preset = data["model"]["preset"]
            if preset not in MODEL_PRESETS:
                raise ConfigError(f"{source}: model.preset: unknown choice {preset!r}; "
                                  f"valid choices: {', '.join(MODEL_PRESETS)}")
    if preset is not None:
        cfg = replace(cfg, model=replace(cfg.model, preset=preset, **MODEL_PRESETS[preset]))
    for source, data in layers:
        for name, values in data.items():
            values = {k: v for k, v in values.items() if not (name == "model" and k == "preset")}
            try:
                cfg = replace(cfg, **{name: _apply(getattr(cfg, name), name, values)})
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
    validate(cfg)
    return cfg


def merge(cfg: Config, updates: dict[str, Any], source: str = "config") -> Config:
    """`cfg` with the nested `updates` ({section: {key: value}}) applied (preset first) and checked."""
    return build_config([(source, updates)], base=cfg)


def parse_override(text: str) -> dict[str, Any]:
    """'train.lr=1e-4' -> {'train': {'lr': 0.0001}} (the value is read as YAML)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r}: expected section.key=value, for example train.lr=1e-4")
    key, raw = text.split("=", 1)
    section, name = key.strip().split(".", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
    if isinstance(value, str) and raw.strip().lower() in ("none", "null", "~"):
        value = None
    return {section: {name: value}}


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file of overrides: a mapping of sections (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    return _check_layer({} if data is None else data, str(path))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults -> model preset -> YAML file -> `--set` overrides, validated once at the end."""
    layers: list[tuple[str, Any]] = []
    if path is not None:
        layers.append((str(path), read_yaml(path)))
    layers += [(f"--set {text}", parse_override(text)) for text in overrides]
    return build_config(layers)


# keys that older versions wrote into saved configs and that no longer exist (they did nothing)
RETIRED_KEYS = {("loss", "logvar_clamp")}


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config saved with `Config.to_dict` (presets already expanded)."""
    cfg = Config()
    for name, values in data.items():
        if name not in SECTIONS:
            raise ConfigError(f"saved config: unknown section {name!r}")
        values = {k: v for k, v in values.items() if (name, k) not in RETIRED_KEYS}
        cfg = replace(cfg, **{name: _apply(getattr(cfg, name), name, values)})
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that a single type annotation cannot express."""
    m, d, t, lo = cfg.model, cfg.data, cfg.train, cfg.loss
    for c in m.block_out_channels:
        if c % m.norm_num_groups:
            raise ConfigError(f"model.block_out_channels: {c} is not divisible by model.norm_num_groups={m.norm_num_groups}")
        if c == m.norm_num_groups:
            # one channel per group is instance norm: the decoder's last GroupNorm (over the first
            # block's channels) then fixes every image's mean colour to a learned constant
            raise ConfigError(f"model.norm_num_groups={m.norm_num_groups} puts one channel per group in a "
                              f"{c}-channel block, which erases each image's mean colour; use at most {c // 2} "
                              f"(the SD VAE has 4 channels per group: 128 / 32)")
    factor = 2 ** (len(m.block_out_channels) - 1)
    if d.resolution % factor:
        raise ConfigError(f"data.resolution={d.resolution} must be a multiple of the downsampling factor {factor}")
    if d.val_resolution % factor:
        raise ConfigError(f"data.val_resolution={d.val_resolution} must be a multiple of the downsampling factor {factor}")
    positive = {"train.steps": t.steps, "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum,
                "train.log_every": t.log_every, "train.image_every": t.image_every,
                "train.save_every": t.save_every, "train.keep_last": t.keep_last,
                "train.max_nonfinite_in_row": t.max_nonfinite_in_row, "data.resolution": d.resolution,
                "model.latent_channels": m.latent_channels}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if not 0 <= t.ema_decay < 1:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    if t.lr <= 0:
        raise ConfigError(f"train.lr must be positive, got {t.lr}")
    if t.fp16_init_scale <= 0:
        raise ConfigError(f"train.fp16_init_scale must be positive, got {t.fp16_init_scale}")
    if d.short_side_max and d.short_side_max < d.short_side_min:
        raise ConfigError("data.short_side_max must be >= data.short_side_min (or 0 for native size)")
    if lo.lpips_crop and lo.lpips_crop < 32:
        raise ConfigError(f"loss.lpips_crop must be 0 (whole image) or >= 32 (AlexNet and VGG need it), got {lo.lpips_crop}")
