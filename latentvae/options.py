"""Options for every job: frozen dataclasses, one coercion and validation path, a generated CLI.

A job's settings are one frozen dataclass; each field says its default and its help text with
`opt`, and an optional `check()` method holds the cross-field rules:

    @dataclass(frozen=True)
    class DecodeOptions:
        cache: str = opt(REQUIRED, "folder written by `latentvae encode`", positional=True)
        limit: int = opt(8, "decode this many random rows")

    opts = parse_options(DecodeOptions, argv, prog="latentvae decode")  # flags generated from the fields
    opts = make_options(DecodeOptions, {"cache": "latents/", "limit": 4})  # the same path from a dict

Types decide the flags: `Literal[...]` -> choices; `bool` -> `--flag/--no-flag`; `Optional[bool]` ->
`auto|yes|no`; `tuple[str, ...]` -> a repeatable flag; `int`/`float`/`str` -> a value. Every value
goes through `coerce` (the same as training's `--set`), and `check()` runs once, after all values
are in. A wrong value raises `OptionError` naming the flag and what was expected.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Literal, Optional, Sequence

import yaml

from .errors import UserError


class OptionError(UserError, ValueError):
    """An option or configuration value that cannot be used; the message names it."""


REQUIRED: Any = MISSING  # `opt(REQUIRED, ...)`: no default, the user must give it


def opt(default: Any = REQUIRED, help: str = "", *, positional: bool = False, metavar: Optional[str] = None,
        flag: Optional[str] = None) -> Any:
    """A dataclass field with its help text (shown by --help) and how its flag looks."""
    meta = {"help": help, "positional": positional, "metavar": metavar, "flag": flag}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for a sequence default")
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- coercion
def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`, converting only what is lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads a bare `no` as false
            value = "no"
        if value not in args:
            raise OptionError(f"{key}: unknown choice {value!r}; valid choices: {', '.join(map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(key, value, inner[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise OptionError(f"{key}: expected a list, got {value!r}")
        return tuple(coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise OptionError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise OptionError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OptionError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise OptionError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise OptionError(f"{key}: expected a string, got {value!r}")
        return value
    raise OptionError(f"{key}: unsupported type {tp}")  # pragma: no cover - a bug in a dataclass


def apply(obj: Any, updates: dict[str, Any], name: Optional[str] = None, key_of=None) -> Any:
    """`obj` (a dataclass instance) with `updates` coerced to its field types; unknown keys name the
    valid ones. `name` prefixes keys in messages (`train.lr`); `key_of(field)` names them otherwise."""
    hints = typing.get_type_hints(type(obj))
    valid = [f.name for f in fields(obj)]
    label = key_of or (lambda k: f"{name}.{k}" if name else k)
    clean = {}
    for key, value in updates.items():
        if key not in hints:
            where = f" in '{name}'" if name else ""
            raise OptionError(f"unknown key {label(key)}; valid keys{where}: {', '.join(valid)}")
        clean[key] = coerce(label(key), value, hints[key])
    return replace(obj, **clean)


def check(obj: Any) -> Any:
    """Run the dataclass's cross-field `check()` if it has one; returns `obj`."""
    if hasattr(obj, "check"):
        obj.check()
    return obj


def make_options(cls: type, values: dict[str, Any]) -> Any:
    """A checked options object from field values (the command line's path, without argparse).
    Messages name each option as its flag (`--image-column`)."""
    hints, by_name = typing.get_type_hints(cls), {f.name: f for f in fields(cls)}
    unknown = [k for k in values if k not in by_name]
    if unknown:
        raise OptionError(f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(by_name)}")
    missing = [flag_name(f) for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
               and f.name not in values]
    if missing:
        raise OptionError(f"missing required option(s): {', '.join(missing)}")
    return check(cls(**{k: coerce(flag_name(by_name[k]), v, hints[k]) for k, v in values.items()}))


def validated(obj: Any) -> Any:
    """An options object built in code (`EncodeOptions(vae=..., ...)`) put through the command line's
    coercion and checks, so library callers get the same errors as users."""
    return make_options(type(obj), {f.name: getattr(obj, f.name) for f in fields(obj)})


# ----------------------------------------------------------------------------- the command line
def flag_name(f: dataclasses.Field) -> str:
    """How the field is named on the command line: `--image-column`, or `SRC` for a positional."""
    if f.metadata.get("positional"):
        return f.metadata.get("metavar") or f.name.upper()
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown in --help (unless None/off, or the help already says); descriptions as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def make_parser(prog: str, description: Optional[str] = None, **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser as every latentvae command has it: no abbreviated flags, defaults in --help."""
    kwargs.setdefault("formatter_class", HelpFormatter)
    return argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False, **kwargs)


def _is_optional_bool(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and set(typing.get_args(tp)) == {bool, type(None)}


def _shown_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return " ".join(map(str, value)) if value else None
    return value


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argparse argument per field of `cls`; values stay strings until `parse_options` coerces them."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        tp, name, help_text = hints[f.name], flag_name(f), f.metadata.get("help", "")
        required = f.default is MISSING
        kw: dict[str, Any] = {"dest": f.name, "help": help_text}
        if typing.get_origin(tp) is Literal:
            kw["choices"] = [str(c) for c in typing.get_args(tp)]
        if f.metadata.get("positional"):
            kw.pop("dest")
            parser.add_argument(f.name, metavar=name, help=help_text,
                                **({"nargs": "+"} if typing.get_origin(tp) is tuple else {}))
            continue
        if tp is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, **kw)
            continue
        if _is_optional_bool(tp):
            kw["choices"] = ["auto", "yes", "no"]
            parser.add_argument(name, default={None: "auto", True: "yes", False: "no"}[f.default], **kw)
            continue
        if typing.get_origin(tp) is tuple:
            kw["action"] = "append"
            kw["help"] = help_text + " (repeat the flag for several)"
        if f.metadata.get("metavar"):
            kw["metavar"] = f.metadata["metavar"]
        parser.add_argument(name, required=required, default=argparse.SUPPRESS if required else
                            _shown_default(f.default), **kw)


def _from_text(raw: Any, tp: Any) -> Any:
    """A command-line string as the value the field's type wants (read as YAML unless a string)."""
    if raw is None or not isinstance(raw, str):
        return raw
    inner = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) in (typing.Union, types.UnionType) else [tp]
    if inner and inner[0] is str or typing.get_origin(inner[0]) is Literal:
        return raw
    if _is_optional_bool(tp):
        return {"auto": None, "yes": True, "no": False}[raw]
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def values_from_namespace(cls: type, ns: argparse.Namespace) -> dict[str, Any]:
    """The parsed flags as field values (typed), for every flag argparse filled in."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        if not hasattr(ns, f.name):
            continue
        raw, tp = getattr(ns, f.name), hints[f.name]
        if typing.get_origin(tp) is tuple:
            if raw is None or isinstance(raw, str):
                continue  # not given: the dataclass default
            out[f.name] = [_from_text(r, typing.get_args(tp)[0]) for r in raw]
        else:
            out[f.name] = _from_text(raw, tp)
    return out


def build_parser(cls: type, prog: str, description: Optional[str] = None) -> argparse.ArgumentParser:
    parser = make_parser(prog, description if description is not None else inspect.cleandoc(cls.__doc__ or ""))
    add_options(parser, cls)
    return parser


def parse_options(cls: type, argv: Optional[Sequence[str]], prog: str, description: Optional[str] = None) -> Any:
    """Parse `argv` into a checked `cls` instance (argparse errors exit 2 with the usage, as argparse does)."""
    ns = build_parser(cls, prog, description).parse_args(argv)
    return make_options(cls, values_from_namespace(cls, ns))


# ============================================================================= the jobs' options
# One name per concept across jobs: --vae, --data / --data-kind / --split / --image-column, --out,
# --limit (how many images or rows), --resolution (a square side), --mixed-precision, --device,
# --seed, --progress. Each job module has `run(options)`; cli.py maps subcommands to both.
Precision = Literal["auto", "no", "bf16", "fp16"]
DataKind = Literal["auto", "folder", "hf"]

VAE_HELP = ("a VAE: diffusers or pipeline folder, hub id (org/name), latentvae run or checkpoint, LDM/SD "
            ".safetensors file, or taesd:sd|sdxl|sd3|flux; options as SPEC[subfolder=vae,variant=fp16,revision=REV,"
            "weights=raw,allow_pickle=yes] (docs/export.md, Naming a VAE)")
DATA_HELP = "image folder (recursive), saved `datasets` folder, or hub dataset name"
PRECISION_HELP = "autocast dtype; auto: bf16 on CUDA and on CPUs with bf16 kernels, else fp32 (no)"


def _positive(**values: float) -> None:
    for flag, value in values.items():
        if value < 1:
            raise OptionError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")


def _check_tile_size(tiling: bool, tile_size: int) -> None:
    """--tile-size (evaluate, decode): 0 (the model's own) or > 0, and only with --tiling."""
    if tile_size < 0 or (tile_size and not tiling):
        raise OptionError(f"--tile-size {tile_size}: must be > 0 and needs --tiling (0: the model's own)")


@dataclass(frozen=True)
class TrainOptions:
    """Train a KL-regularized VAE (or a plain autoencoder) with Accelerate. Every config key is listed
    below; `--set section.key=value` overrides one (see README, Configuration)."""
    out: str = opt(REQUIRED, "run folder: checkpoints, logs, preview grids")
    config: Optional[str] = opt(None, "YAML file of overrides (see configs/)")
    set: tuple[str, ...] = opt((), "override one config key, e.g. train.lr=1e-4 or model.preset=sd",
                               metavar="SECTION.KEY=VALUE")
    resume: Optional[str] = opt(None, "'latest': this run's newest checkpoint that verifies (the previous one if "
                                      "it is damaged; none yet: start from step 0), or a checkpoint folder")
    progress: bool = opt(True, "progress bar (logs go to TensorBoard either way)")


@dataclass(frozen=True)
class ExportOptions:
    """Export any VAE to a diffusers folder, or to one .safetensors file in the original LDM layout
    (ComfyUI / A1111 / kohya), with latent statistics measured on your images."""
    src: str = opt(REQUIRED, VAE_HELP + " (a training run: its newest checkpoint)", positional=True, metavar="SRC")
    out: str = opt(REQUIRED, "diffusers folder (--format diffusers) or .safetensors file (--format single-file) to "
                             "write, outside SRC")
    format: Literal["diffusers", "single-file"] = opt(
        "diffusers", "diffusers: a folder for AutoencoderKL.from_pretrained; single-file: one .safetensors in the "
                     "original LDM key layout (encoder.down.0.block.0...), latent statistics in its metadata")
    weights: Literal["ema", "raw"] = opt("ema", "a training run's EMA or raw weights (other VAEs: the weights they "
                                                "hold; raw is refused)")
    dtype: Literal["fp32", "fp16", "bf16"] = opt("fp32", "stored dtype of the weights")
    calibrate: Optional[str] = opt(None, "images to measure the latent statistics on (" + DATA_HELP + ")",
                                   metavar="DATA")
    convention: Optional[Literal["sd", "sdxl", "sd3"]] = opt(
        None, "the pipeline family whose own formula must give unit latents: sd (SD 1.x/2.x: z * scaling_factor), "
              "sdxl (SDXL family: (z - latents_mean) * scaling_factor / latents_std, 4 channels), sd3 (SD3/FLUX: "
              "(z - shift_factor) * scaling_factor); default: sd3 for 16 channels, else sd")
    limit: int = opt(64, "calibration images")
    resolution: int = opt(256, "calibration crop size")
    fp16_images: int = opt(2, "calibration images decoded in fp16 to check for overflow (0: skip the check, "
                              "keep force_upcast)")
    eval_summary: Optional[str] = opt(None, "summary.json of `latentvae evaluate`: its entry for SRC (these weights) "
                                            "goes into the model card; none matching is an error (default: "
                                            "RUN/eval/summary.json of a training run, skipped if none matches)")
    overwrite: bool = opt(False, "replace an existing --out")

    def check(self) -> None:
        _positive(limit=self.limit, resolution=self.resolution)
        if self.fp16_images < 0:
            raise OptionError(f"--fp16-images must be >= 0, got {self.fp16_images}")
        if self.convention is not None and self.calibrate is None:
            raise OptionError("--convention chooses how measured factors are written; it needs --calibrate DATA")
        if self.format == "single-file" and not self.out.endswith(".safetensors"):
            raise OptionError(f"--out {self.out}: --format single-file writes one file; name it *.safetensors")
        if self.format == "diffusers" and self.out.endswith(".safetensors"):
            raise OptionError(f"--out {self.out} names a .safetensors file, but --format diffusers writes a folder; "
                              "add --format single-file for one LDM-layout file")


@dataclass(frozen=True)
class EncodeOptions:
    """Encode an image folder or a `datasets` dataset to a resumable parquet cache of latents
    (`accelerate launch -m latentvae encode ...` for several processes)."""
    vae: str = opt(REQUIRED, VAE_HELP)
    data: str = opt(REQUIRED, DATA_HELP)
    out: str = opt(REQUIRED, "cache folder: new, empty, or an earlier cache of the same settings (resumed)")
    data_kind: DataKind = opt("auto", "what --data is (auto: from the path)")
    split: str = opt("train", "split of a `datasets` input")
    image_column: str = opt("image", "image column of a `datasets` input")
    limit: int = opt(0, "only the first N inputs (0: all); rerun with a larger N to encode the next ones")
    preprocess: Literal["center-crop", "buckets", "crops"] = opt(
        "center-crop", "resize and crop mode: center-crop, buckets (aspect-ratio buckets), crops (--crops random "
                       "squares per image)")
    resolution: int = opt(256, "square side, a multiple of the VAE's downsampling factor; aspect buckets hold "
                               "about its square")
    max_aspect: float = opt(2.0, "widest bucket aspect ratio")
    crops: int = opt(16, "--preprocess crops: random resolution x resolution crops per image (seeded by --seed)")
    crop_scale: int = opt(0, "--preprocess crops: resize each image's short side to this first (0: native size)")
    flip: bool = opt(False, "also store a horizontally flipped copy of every image")
    store: Literal["mean", "moments", "sample"] = opt("mean", "latent columns of each row")
    dtype: Literal["fp16", "bf16", "fp32"] = opt("fp16", "stored dtype of the latents")
    shard_size: int = opt(1000, "rows per parquet shard")
    batch_size: int = opt(0, "images per encoder call; 0: suited to the device (CPU: 1 of 256x256, as many pixels at "
                             "other sizes; GPU: 64 of 256x256 to start, halved on an out-of-memory error)")
    num_workers: int = opt(-1, "DataLoader workers decoding images; -1: none when encoding on the CPU (decoding is "
                                   "a small part of the time there), else one fewer than the CPU cores, at most 4")
    mixed_precision: Precision = opt("auto", PRECISION_HELP)
    channels_last: Optional[bool] = opt(None, "channels-last memory format of the encoder (auto: yes)")
    weights_dtype: Literal["auto", "fp32", "bf16", "fp16"] = opt(
        "auto", "dtype of the encoder's weights; bf16/fp16 run it in pure half precision without autocast (the "
                "moments stay fp32); auto: the half dtype --mixed-precision resolves to (fp16 only for VAEs without "
                "force_upcast), else fp32")
    compile: bool = opt(False, "torch.compile the encoder (pays off only on large datasets: docs/encode.md, Speed)")
    jpeg_draft: bool = opt(True, "decode JPEGs at a reduced DCT scale that still covers the target")
    max_image_pixels: int = opt(100_000_000, "larger images are recorded as failures")
    seed: int = opt(0, "noise of --store sample, rows checked by --verify")
    verify: bool = opt(False, "then decode 8 random rows and report their PSNR (= latentvae decode OUT)")
    progress: bool = opt(True, "progress bar")

    def check(self) -> None:
        _positive(shard_size=self.shard_size, resolution=self.resolution)
        if self.batch_size < 0:
            raise OptionError(f"--batch-size must be >= 0 (0: suited to the device), got {self.batch_size}")
        if self.limit < 0:
            raise OptionError(f"--limit must be >= 0, got {self.limit}")
        if self.max_aspect < 1:
            raise OptionError(f"--max-aspect must be >= 1, got {self.max_aspect}")
        if self.preprocess == "crops" and self.crops < 1:
            raise OptionError(f"--crops must be >= 1 with --preprocess crops, got {self.crops}")
        if self.crop_scale < 0:
            raise OptionError(f"--crop-scale must be >= 0 (0: native size), got {self.crop_scale}")


@dataclass(frozen=True)
class DecodeOptions:
    """Decode random rows of a latent cache; PSNR against the source images preprocessed the same way."""
    cache: str = opt(REQUIRED, "folder written by `latentvae encode` (with manifest.json)", positional=True,
                     metavar="CACHE")
    vae: Optional[str] = opt(None, "the VAE (default: the one in the manifest; its weights must match)")
    data: Optional[str] = opt(None, "the images the cache was encoded from, where they are now (default: where the "
                                    "manifest says, or beside the cache as they were)")
    limit: int = opt(8, "rows to decode")
    seed: int = opt(0, "which rows")
    out: Optional[str] = opt(None, "write source | decoded PNG pairs into this folder")
    min_psnr: Optional[float] = opt(None, "exit 1 if the mean PSNR is below this")
    tiling: bool = opt(False, "diffusers' tiled decode (vae.enable_tiling()): memory bounded by the tile, for "
                              "latents of large images")
    tile_size: int = opt(0, "with --tiling: tile side in pixels (0: the model's own)")

    def check(self) -> None:
        _positive(limit=self.limit)
        _check_tile_size(self.tiling, self.tile_size)


@dataclass(frozen=True)
class EvaluateOptions:
    """Evaluate autoencoders side by side: PSNR, SSIM, LPIPS, rFID, sharpness, rate, speed."""
    vae: tuple[str, ...] = opt(REQUIRED, VAE_HELP)
    data: str = opt(REQUIRED, DATA_HELP)
    out: str = opt(REQUIRED, "report folder: new, empty, or an earlier report (replaced whole)")
    data_kind: DataKind = opt("auto", "what --data is (auto: from the path)")
    split: str = opt("train", "split of a `datasets` input")
    image_column: str = opt("image", "image column of a `datasets` input")
    limit: int = opt(0, "only the first N images (0: all)")
    fit: Literal["crop", "pad"] = opt("crop", "center-crop or reflect-pad each image to the downsampling factor")
    max_side: int = opt(0, "downscale images whose long side exceeds this first (0: never)")
    lpips: Literal["alex,vgg", "alex", "vgg", "none"] = opt("alex,vgg", "LPIPS networks: alex,vgg (both), alex, vgg "
                                                                    "or none", metavar="NETS")
    lpips_dir: Optional[str] = opt(None, "folder of the LPIPS backbones (default: $LATENTVAE_LPIPS_DIR)")
    protocol: Literal["full", "imagenet256", "coco256"] = opt(
        "full", "full: each image whole (--max-side, --fit); imagenet256, coco256: short side resized to 256 "
                "(bicubic, antialiased) and the central 256x256 crop, the published tables' protocol "
                "(docs/evaluation.md)")
    latent: Literal["mean", "sample"] = opt("mean", "decode the posterior mean, or a sample of it (seeded by --seed)")
    seed: int = opt(0, "seed of --latent sample's draws")
    tiling: bool = opt(False, "diffusers' tiled encode/decode (vae.enable_tiling()): memory bounded by the tile")
    tile_size: int = opt(0, "with --tiling: tile side in pixels (diffusers' tile_sample_min_size; the latent tile is "
                            "it over the downsampling factor); 0: the model's own")
    inception_weights: Optional[str] = opt(None, "rFID's Inception-v3: a safetensors file of torch-fidelity's "
                                                 "weights (default: $LATENTVAE_INCEPTION_WEIGHTS, else "
                                                 "torch-fidelity's download; none found: no rFID)", metavar="PATH")
    mixed_precision: Precision = opt("no", PRECISION_HELP + "; evaluation's default: no (fp32) on every device")
    device: str = opt("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")

    def check(self) -> None:
        if self.limit < 0 or self.max_side < 0:
            raise OptionError("--limit and --max-side must be >= 0")
        if self.max_side and self.protocol != "full":
            raise OptionError(f"--max-side applies to --protocol full only; --protocol {self.protocol} resizes "
                              "every image to 256 itself")
        _check_tile_size(self.tiling, self.tile_size)


@dataclass(frozen=True)
class ReconGridOptions:
    """One row per image: original | reconstruction | |error| x gain, for each VAE."""
    vae: tuple[str, ...] = opt(REQUIRED, VAE_HELP)
    data: str = opt(REQUIRED, "image folder")
    out: str = opt(REQUIRED, "PNG file to write")
    limit: int = opt(4, "the first N images")
    resolution: int = opt(256, "central square, resized to this (a multiple of each VAE's downsampling factor)")
    gain: float = opt(4.0, "error map amplification")

    def check(self) -> None:
        _positive(limit=self.limit, resolution=self.resolution)


@dataclass(frozen=True)
class PriorOptions:
    """Decode z ~ N(0, I) in one forward pass per VAE; how far such draws fall from the encoder's latents."""
    vae: tuple[str, ...] = opt(REQUIRED, VAE_HELP + "; e.g. an ae-mode run, then a vae run")
    data: str = opt(REQUIRED, "real images: the aggregate posterior")
    out: str = opt(REQUIRED, "folder to write prior.png and prior.json into")
    limit: int = opt(8, "prior samples (and reconstructions) per VAE")
    resolution: int = opt(128, "image side (a multiple of each VAE's downsampling factor)")
    seed: int = opt(0, "seed of the draws")

    def check(self) -> None:
        _positive(limit=self.limit, resolution=self.resolution)


@dataclass(frozen=True)
class InterpolateOptions:
    """Decoded latent interpolation between two images, linear and spherical, as PNG strips and GIFs."""
    vae: str = opt(REQUIRED, VAE_HELP)
    a: str = opt(REQUIRED, "first image file")
    b: str = opt(REQUIRED, "last image file")
    out: str = opt(REQUIRED, "folder to write into")
    steps: int = opt(8, "frames, both ends included")
    resolution: int = opt(256, "image side (a multiple of the VAE's downsampling factor)")

    def check(self) -> None:
        _positive(resolution=self.resolution)
        if self.steps < 2:
            raise OptionError(f"--steps must be >= 2 (both ends), got {self.steps}")


@dataclass(frozen=True)
class ProbeOptions:
    """The second number: train a small diffusion model on each latent cache for the same budget and compare
    their held-out denoising losses (docs/probe.md)."""
    cache: tuple[str, ...] = opt(REQUIRED, "a latent cache from `latentvae encode`; repeat for each VAE to compare",
                                 metavar="CACHE")
    out: str = opt(REQUIRED, "report folder: new, empty, or an earlier probe's (resumed)")
    preset: Literal["tiny", "small", "test"] = opt("tiny", "UNet2DModel size: tiny (~2.8M parameters), small "
                                                           "(~20M), test (a few thousand, for tests)")
    objective: Literal["flow", "v"] = opt("flow", "flow matching (logit-normal t) or v-prediction (cosine schedule)")
    steps: int = opt(1200, "optimizer steps per cache and seed (the budget; tiny: ~0.46 s per step of 32 on 2 AVX2 cores)")
    batch_size: int = opt(32, "latents per process and step")
    lr: float = opt(5e-4, "AdamW learning rate, constant after the warm-up")
    warmup_steps: int = opt(100, "linear learning-rate warm-up")
    ema_decay: float = opt(0.999, "EMA of the weights that are scored and sampled")
    holdout: float = opt(0.15, "share of the source images whose rows are held out (at least one image)")
    noise_levels: int = opt(8, "noise levels t = (k + 0.5) / K of the held-out loss")
    seeds: int = opt(1, "train each cache with this many seeds (seed, seed + 1, ...) for the spread")
    seed: int = opt(0, "first training seed")
    class_column: Optional[str] = opt(None, "condition on this integer column of the caches (class labels)")
    samples: int = opt(16, "latents sampled and decoded per cache, as one grid")
    sample_steps: int = opt(32, "Euler (flow) or DDIM (v) steps of the sampler")
    log_every: int = opt(50, "log the training loss every N steps")
    save_every: int = opt(500, "checkpoint every N steps (a rerun resumes); 0: only at the end")
    mixed_precision: Precision = opt("no", "precision of training (scoring is fp32): no (fp32, the same figures on "
                                           "every machine), bf16, fp16, auto")
    report_to: Literal["tensorboard", "none"] = opt("tensorboard", "tracker of the training curves")

    def check(self) -> None:
        _positive(steps=self.steps, batch_size=self.batch_size, seeds=self.seeds, noise_levels=self.noise_levels,
                  samples=self.samples, sample_steps=self.sample_steps, log_every=self.log_every)
        if not 0 < self.holdout < 1:
            raise OptionError(f"--holdout must be a share in (0, 1), got {self.holdout}")
        if self.lr <= 0 or not 0 <= self.ema_decay < 1:
            raise OptionError(f"--lr must be > 0 and --ema-decay in [0, 1), got {self.lr} and {self.ema_decay}")
        if self.save_every < 0 or self.warmup_steps < 0:
            raise OptionError("--save-every and --warmup-steps must be >= 0")


@dataclass(frozen=True)
class TradeoffOptions:
    """The blur tradeoff: train (or take) a set of autoencoders, evaluate them, draw the pictures."""
    data: str = opt(REQUIRED, "evaluation images: " + DATA_HELP)
    out: str = opt(REQUIRED, "folder: runs/, eval/, the plots and tradeoff.md")
    runs: tuple[str, ...] = opt((), "evaluate these VAEs instead of training the sweep (" + VAE_HELP + ")",
                                metavar="VAE")
    variants: tuple[str, ...] = opt((), "sweep variant to train (default: all of them; the names are listed in "
                                        "latentvae/tradeoff.py and docs/evaluation.md)", metavar="NAME")
    steps: int = opt(300, "training steps per sweep run")
    config: Optional[str] = opt(None, "training config the sweep starts from (default: configs/quickstart.yaml)")
    max_side: int = opt(256, "evaluation: downscale images whose long side exceeds this")
    lpips_dir: Optional[str] = opt(None, "folder of the LPIPS backbones (default: $LATENTVAE_LPIPS_DIR)")

    def check(self) -> None:
        _positive(steps=self.steps)
        if self.max_side < 0:
            raise OptionError(f"--max-side must be >= 0, got {self.max_side}")
        if self.runs and self.variants:
            raise OptionError("--variants chooses the sweep runs to train; with --runs nothing is trained")
