"""Typed configuration: one frozen dataclass per concern, YAML holds overrides only.

Order of application: dataclass defaults -> model preset (``model.preset``) -> YAML file ->
``--set section.key=value`` overrides. Every key, type and choice is checked at once; a wrong
one raises ``ConfigError`` naming the key and the valid keys or choices.

    cfg = load_config("configs/quickstart.yaml", ["train.lr=1e-4", "model.preset=small"])

`model.family` is the class a preset builds from scratch (kl, flux2, qwenimage, wan); with
`model.init_from` the architecture is the loaded VAE's, of any family, and its checks (the
downsampling factor, what the family can train) are train/build.py's once it is loaded; a video
VAE's clip options (data.frames, data.frame_size, data.latent_tile) are checked against it by
train/clips.py.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .options import OptionError, apply, opt
from .options.fields import parse_size

ConfigError = OptionError  # a configuration key, type or value that cannot be used


@dataclass(frozen=True)
class ModelConfig:
    preset: str = opt("small", "named architecture applied before every other model key (MODEL_PRESETS)")
    family: Literal["kl", "flux2", "qwenimage", "wan"] = opt(
        "kl", "the diffusers class built from scratch: kl (AutoencoderKL), flux2 (AutoencoderKLFlux2), qwenimage "
        "(AutoencoderKLQwenImage), wan (AutoencoderKLWan); with init_from, the loaded VAE's class")
    block_out_channels: tuple[int, ...] = opt((32, 64, 128, 128), "channels per resolution level; /2^(n-1)")
    layers_per_block: int = opt(1, "ResNet blocks per level")
    latent_channels: int = opt(4, "channels of z (SD/SDXL 4, SD3/FLUX 16)")
    norm_num_groups: int = opt(8, "GroupNorm groups; keep several channels per group (SD: 128 / 32 = 4)")
    use_quant_conv: bool = opt(True, "1x1 conv after the encoder (SD has it, FLUX not)")
    use_post_quant_conv: bool = opt(True, "1x1 conv before the decoder")
    mid_block_add_attention: bool = opt(True, "self-attention in the middle blocks")
    mode: Literal["vae", "ae"] = opt("vae", "vae: z sampled from the posterior, KL term; ae: z = mean, no KL (the "
                                            "only mode of a VAE without a posterior: AutoencoderDC, AutoencoderTiny)")
    init_from: Optional[str] = opt(None, "start from this VAE, of any family: diffusers or pipeline folder, hub id, "
                                         "LDM .safetensors, latentvae run or checkpoint, taesd:*")
    train_decoder_only: bool = opt(False, "freeze the encoder and train the decoder (the sd-vae-ft-mse recipe); "
                                          "every family can")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward: less memory, slower (AutoencoderKL, "
                                              "Flux2, LTX-2, HunyuanVideo 1.5, CogVideoX; not Wan, Qwen-Image)")
    tiling: bool = opt(False, "encode and decode clips in the class's spatial+temporal tiles (vae/model.py "
                              "configure_tiling): memory set by the tile, not the clip (training and validation)")
    tile_size: int = opt(0, "model.tiling's tile side in pixels (a multiple of the spatial factor); 0: the class's own")


# Named architectures. `sd`/`flux` are the real trunks; the others are sized for a CPU.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "sd": dict(family="kl", block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
               norm_num_groups=32, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True),
    "flux": dict(family="kl", block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                 norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True),
    # CPU presets keep SD's 4 channels per GroupNorm group (see validate)
    "small": dict(family="kl", block_out_channels=(32, 64, 128, 128), layers_per_block=1, latent_channels=4,
                  norm_num_groups=8, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True),
    "small-f16": dict(family="kl", block_out_channels=(32, 64, 128, 128), layers_per_block=1, latent_channels=16,
                      norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True),
    "tiny": dict(family="kl", block_out_channels=(16, 32, 64, 64), layers_per_block=1, latent_channels=4,
                 norm_num_groups=4, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True),
    # two blocks, /2: for unit tests only
    "test": dict(family="kl", block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                 norm_num_groups=4, use_quant_conv=True, use_post_quant_conv=True,
                 mid_block_add_attention=False),
    # the architectures of FLUX.2 (AutoencoderKLFlux2: 32 channels, BatchNorm statistics of the 2x2-patchified
    # latent) and Qwen-Image / Wan (AutoencoderKLQwenImage / AutoencoderKLWan: causal 3-D convolutions, 16
    # channels, base_dim * dim_mult = block_out_channels), sized for a CPU like `small`
    "flux2-small": dict(family="flux2", block_out_channels=(32, 64, 128, 128), layers_per_block=1, latent_channels=32,
                        norm_num_groups=8, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True),
    "qwenimage-small": dict(family="qwenimage", block_out_channels=(32, 64, 128, 128), layers_per_block=1,
                            latent_channels=16, norm_num_groups=8),
    "wan-small": dict(family="wan", block_out_channels=(32, 64, 128, 128), layers_per_block=1, latent_channels=16,
                      norm_num_groups=8),
    "flux2-test": dict(family="flux2", block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                       norm_num_groups=4, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=False),
    "qwenimage-test": dict(family="qwenimage", block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                           norm_num_groups=4),
}


# loss.equivariance_transforms: name -> (kind, amount): quarter turns, or a downscale factor (train/equivariance.py)
EQUIVARIANCE_TRANSFORMS = {"rot90": ("rot", 1), "rot180": ("rot", 2), "rot270": ("rot", 3),
                           "scale0.5": ("scale", 0.5), "scale0.75": ("scale", 0.75)}


@dataclass(frozen=True)
class LossConfig:
    recon: Literal["l1", "mse"] = opt("l1", "pixel reconstruction loss, mean over pixels of images in [-1, 1]")
    recon_weight: float = opt(1.0, "weight of the reconstruction term")
    lpips_weight: float = opt(1.0, "weight of LPIPS; 0 disables it")
    lpips_net: Literal["vgg", "alex"] = opt("vgg", "LPIPS backbone")
    lpips_dir: Optional[str] = opt(None, "folder with {alexnet,vgg16}_features.safetensors "
                                         "(default: $LATENTVAE_LPIPS_DIR, else torchvision's weights)")
    lpips_crop: int = opt(0, "LPIPS on one random crop of this size (faster); 0: the whole image")
    kl_weight: float = opt(1e-6, "KL weight; the KL is summed over latent elements and divided by the pixel "
                                 "values per image, so 1e-6 means what it means in latent diffusion")
    kl_warmup_steps: int = opt(0, "ramp the KL weight linearly from 0 over this many steps")
    gan: bool = opt(False, "add a PatchGAN discriminator (adversarial term with the adaptive weight)")
    gan_loss: Literal["hinge", "vanilla"] = opt("hinge", "discriminator/generator loss pair")
    gan_weight: float = opt(0.5, "multiplies the adaptive GAN weight")
    gan_start: int = opt(0, "step at which the discriminator starts")
    adaptive_weight: bool = opt(True, "GAN weight = ||grad rec|| / ||grad g|| at the decoder's last layer")
    disc_layers: int = opt(3, "stride-2 layers of the discriminator")
    disc_channels: int = opt(64, "channels of the discriminator's first layer")
    disc_lr: Optional[float] = opt(None, "discriminator learning rate (default: train.lr)")
    equivariance_weight: float = opt(0.0, "EQ-VAE's term: decode a rotated or downscaled latent and match it to "
                                          "the same transform of the image (reconstruction + LPIPS, as the main "
                                          "term); 0 disables it")
    lpips_frames: int = opt(0, "clips: LPIPS and the GAN term see this many random frames of each clip per step "
                               "(bounds their memory); 0: every frame")
    equivariance_transforms: tuple[str, ...] = opt(("rot90", "rot180", "rot270", "scale0.5", "scale0.75"),
                                                   "the transforms drawn from, one per micro-batch, seeded")


@dataclass(frozen=True)
class DataConfig:
    source: str = opt("data/samples", "image folder (recursive), saved `datasets` folder, or hub dataset name")
    kind: Literal["auto", "folder", "hf"] = opt("auto", "how to read data.source")
    image_column: str = opt("image", "image column of a `datasets` source")
    split: str = opt("train", "split of a `datasets` source")
    resolution: int = opt(128, "training crop size (a multiple of the downsampling factor)")
    short_side_min: int = opt(0, "resize the short side to a random size in [min, max] before cropping; 0: native")
    short_side_max: int = opt(0, "upper end of that range (0: = min)")
    flip: bool = opt(True, "random horizontal flips")
    val_source: Optional[str] = opt(None, "validation images, scored and shown in the preview grids "
                                          "(default: hold aside val_count of source)")
    val_count: int = opt(1, "images of data.source held aside for validation and the preview grids")
    val_resolution: int = opt(256, "center crop scored by validation and shown in the preview grids")
    num_workers: int = opt(2, "DataLoader workers decoding images")
    max_image_pixels: int = opt(100_000_000, "larger images are skipped (decompression bombs)")
    # clips (data.source a folder of videos, or a `datasets` video column): train/clips.py
    video_column: str = opt("video", "video column of a `datasets` source")
    frames: int = opt(0, "frames per clip from video data: the VAE's 1 + step*k (Wan 81, LTX-2 121, CogVideoX 49)")
    fps: float = opt(0.0, "clips resampled to this frame rate; 0: each video's own")
    clip_stride: int = opt(0, "frames (at data.fps) between the starts of a video's clips; 0: = data.frames")
    frame_size: Optional[str] = opt(None, "clip frames HEIGHTxWIDTH (e.g. 480x832), resized to cover and center "
                                          "cropped; null: data.resolution square")
    latent_tile: int = opt(0, "clips: decode a random latent_tile x latent_tile window of each clip's latent "
                              "(all its frames) against the matching pixels; 0: the whole latent")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = opt(0, "seed of the weights, the data stream and the noise")
    steps: int = opt(1000, "optimizer updates to train for")
    batch_size: int = opt(8, "images per process and micro-step")
    grad_accum: int = opt(1, "micro-steps per update")
    lr: float = opt(1e-4, "learning rate of the autoencoder")
    betas: tuple[float, ...] = opt((0.5, 0.9), "AdamW betas")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    lr_warmup_steps: int = opt(0, "linear learning-rate warm-up")
    lr_schedule: Literal["constant", "cosine", "linear"] = opt("constant", "learning-rate schedule after warm-up")
    grad_clip: float = opt(1.0, "clip the gradient norm to this; 0 disables")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = opt(
        "auto", "auto: bf16 on CUDA and on CPUs with bf16 kernels (AVX512-BF16/AMX), else fp32 (no)")
    fp16_init_scale: float = opt(65536.0, "fp16 only: the GradScaler's initial loss scale; it halves on every "
                                          "overflowing step and doubles after 2000 clean ones")
    channels_last: Optional[bool] = opt(None, "NHWC memory format; null: auto (with bf16 kernels or CUDA)")
    ema_decay: float = opt(0.999, "EMA of the weights, 0 disables; the decay at update n is "
                                  "min(ema_decay, (1 + n) / (10 + n)), so 0.999 is reached after ~1000 updates")
    log_every: int = opt(10, "log the window's mean losses every N updates")
    image_every: int = opt(200, "write a preview grid every N updates")
    save_every: int = opt(500, "write a checkpoint every N updates")
    keep_last: int = opt(3, "checkpoints kept (checkpoints/best is kept apart from them)")
    eval_every: Optional[int] = opt(0, "score the EMA weights on the validation images every N updates "
                                       "(RUN/eval.jsonl, the trackers, checkpoints/best); null: = train.save_every; "
                                       "0: never")
    eval_count: int = opt(500, "validation images scored: the first N of data.val_source or of the held-aside ones")
    eval_fid_min: int = opt(50, "rFID only with at least this many validation images (and Inception weights)")
    inception_weights: Optional[str] = opt(None, "Inception weights for rFID (default: $LATENTVAE_INCEPTION_WEIGHTS, "
                                                 "else the library's download)")
    best_metric: Literal["lpips", "lpips_vgg", "lpips_alex", "psnr", "ssim", "rfid", "none"] = opt(
        "lpips", "validation metric whose best value keeps its checkpoint as checkpoints/best (lower is better "
                 "for lpips/rfid, higher for psnr/ssim); lpips: with loss.lpips_net; none: no best checkpoint")
    report_to: Optional[str] = opt("tensorboard", "accelerate trackers, comma-separated (tensorboard, wandb, "
                                                  "mlflow, aim, comet_ml, clearml, dvclive, swanlab, trackio), or "
                                                  "none; wandb logs offline without an API key")
    preview_count: int = opt(8, "validation images shown in the preview grids (the first N)")
    max_nonfinite_in_row: int = opt(20, "stop after this many consecutive non-finite updates")
    compile: bool = opt(False, "torch.compile the autoencoder")
    compile_lpips: bool = opt(False, "torch.compile the LPIPS network of the loss (forward and the backward to the "
                                     "reconstruction; validation keeps the plain one)")
    cpu_threads: int = opt(0, "CPU threads per process; 0: this machine's cores / processes on it "
                              "(`accelerate launch` alone sets OMP_NUM_THREADS=1)")


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


# accelerate's trackers (accelerate.tracking.LOGGER_TYPE_TO_CLASS, 1.15); a name not here is looked up there
TRACKERS = ("tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "swanlab", "trackio")


def tracker_names(report_to: Optional[str]) -> list[str]:
    """`train.report_to` -> accelerate tracker names ([] for none / null); an unknown one raises ConfigError."""
    if report_to is None:
        return []
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS  # slow import: only for names not listed above
        unknown = [n for n in unknown if n not in LOGGER_TYPE_TO_CLASS]
    if not names or unknown:
        raise ConfigError(f"train.report_to: unknown tracker {(unknown or [report_to])[0]!r}; valid choices: none, "
                          f"or one or more (comma-separated) of {', '.join(TRACKERS)}")
    return names


SECTIONS = {f.name: f.type for f in fields(Config)}
SECTIONS_CLS = {"model": ModelConfig, "loss": LossConfig, "data": DataConfig, "train": TrainConfig}


def _apply(section: Any, name: str, updates: dict[str, Any]) -> Any:
    return apply(section, updates, name=name)


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
RETIRED_KEYS = {("loss", "logvar_clamp"), ("loss", "lpips_random_backbone")}


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
    if lo.equivariance_weight < 0:
        raise ConfigError(f"loss.equivariance_weight must be >= 0, got {lo.equivariance_weight}")
    unknown = [t for t in lo.equivariance_transforms if t not in EQUIVARIANCE_TRANSFORMS]
    if unknown or not lo.equivariance_transforms:
        raise ConfigError(f"loss.equivariance_transforms: unknown {unknown or 'empty list'}; valid: {', '.join(EQUIVARIANCE_TRANSFORMS)}")
    if not m.init_from:  # with init_from the architecture is the loaded VAE's: train/build.py checks it
        validate_architecture(m, d)
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
    for key, value in {"train.eval_every": t.eval_every, "train.preview_count": t.preview_count}.items():
        if value is not None and value < 0:
            raise ConfigError(f"{key} must be >= 0 (0: never), got {value}")
    if t.eval_count <= 0:
        raise ConfigError(f"train.eval_count must be positive, got {t.eval_count}")
    if t.eval_fid_min < 2:
        raise ConfigError(f"train.eval_fid_min must be >= 2 (a covariance needs two images), got {t.eval_fid_min}")
    tracker_names(t.report_to)
    if t.lr <= 0:
        raise ConfigError(f"train.lr must be positive, got {t.lr}")
    if t.fp16_init_scale <= 0:
        raise ConfigError(f"train.fp16_init_scale must be positive, got {t.fp16_init_scale}")
    if d.short_side_max and d.short_side_max < d.short_side_min:
        raise ConfigError("data.short_side_max must be >= data.short_side_min (or 0 for native size)")
    for key, value in {"data.frames": d.frames, "data.fps": d.fps, "data.clip_stride": d.clip_stride,
                       "data.latent_tile": d.latent_tile, "loss.lpips_frames": lo.lpips_frames,
                       "model.tile_size": m.tile_size}.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    frame_size(d)
    if lo.lpips_crop and lo.lpips_crop < 32:
        raise ConfigError(f"loss.lpips_crop must be 0 (whole image) or >= 32 (AlexNet and VGG need it), got {lo.lpips_crop}")


def frame_size(d: DataConfig) -> tuple[int, int]:
    """data.frame_size as (H, W); data.resolution square without it."""
    if d.frame_size is None:
        return d.resolution, d.resolution
    return parse_size(d.frame_size, "data.frame_size")


# families whose blocks normalize with GroupNorm(model.norm_num_groups); Qwen-Image and Wan use RMS norms
GROUP_NORM_FAMILIES = ("kl", "flux2")


def validate_architecture(m: ModelConfig, d: DataConfig) -> None:
    """The model keys of a VAE built from scratch, as its family (model.family) reads them."""
    if m.family in GROUP_NORM_FAMILIES:
        for c in m.block_out_channels:
            if c % m.norm_num_groups:
                raise ConfigError(f"model.block_out_channels: {c} is not divisible by model.norm_num_groups={m.norm_num_groups}")
            if c == m.norm_num_groups:
                # one channel per group is instance norm: the decoder's last GroupNorm (over the first
                # block's channels) then fixes every image's mean colour to a learned constant
                raise ConfigError(f"model.norm_num_groups={m.norm_num_groups} puts one channel per group in a "
                                  f"{c}-channel block, which erases each image's mean colour; use at most {c // 2} "
                                  f"(the SD VAE has 4 channels per group: 128 / 32)")
    else:  # base_dim * dim_mult (vae/model.py diffusers_kwargs)
        base = m.block_out_channels[0]
        if any(c % base for c in m.block_out_channels):
            raise ConfigError(f"model.block_out_channels={list(m.block_out_channels)}: model.family={m.family} builds "
                              f"every level as a multiple of the first ({base})")
    from .vae.families import family  # the table (imports torch: not at --help time)

    if m.gradient_checkpointing and not family(m.family).grad_checkpointing:
        raise ConfigError(f"model.gradient_checkpointing: diffusers implements no gradient checkpointing for "
                          f"{family(m.family).class_name} (model.family={m.family}); set it false")
    factor = 2 ** (len(m.block_out_channels) - 1)  # every family here halves the image once per level after the first
    for key, value in (("data.resolution", d.resolution), ("data.val_resolution", d.val_resolution)):
        if value % factor:
            raise ConfigError(f"{key}={value} must be a multiple of the downsampling factor {factor} "
                              f"(model.block_out_channels has {len(m.block_out_channels)} levels)")


def describe_keys() -> str:
    """Every config key with its default and documentation (for `latentvae train --help`)."""
    lines = ["config keys (--set section.key=value; a YAML file holds the same sections):"]
    for name, cls in SECTIONS_CLS.items():
        for f in fields(cls):
            default = list(f.default) if isinstance(f.default, tuple) else f.default
            lines.append(f"  {name}.{f.name} = {default}: {f.metadata.get('help', '')}")
    lines.append("model presets (model.preset=NAME: family, block_out_channels, latent channels):")
    lines += [f"  {k}: {v['family']} {list(v['block_out_channels'])} z={v['latent_channels']}"
              for k, v in MODEL_PRESETS.items()]
    lines.append("fine-tuning any VAE: model.init_from=VAE (any family: AutoencoderKL, AutoencoderKLFlux2, "
                 "AutoencoderKLQwenImage, AutoencoderKLWan, AutoencoderKLHunyuanImage in full or decoder-only; "
                 "AutoencoderDC and AutoencoderTiny decoder-only, with model.mode=ae); docs/training.md")
    lines.append("a video VAE's decoder on clips: model.init_from=VIDEO_VAE (Wan, LTX-2, HunyuanVideo 1.5, CogVideoX), "
                 "model.train_decoder_only=true, data.source=VIDEO_FOLDER, data.frames=N; "
                 "configs/video-decoder-finetune.yaml")
    return "\n".join(lines)
