"""Export any VAE to a diffusers folder or to one LDM-layout .safetensors file, with measured latent
statistics and a model card.

    latentvae export runs/quickstart --out out/my-vae --calibrate data/samples/train
    latentvae export runs/quickstart/checkpoints/checkpoint-00000300 --out out/my-vae --weights raw --dtype fp16
    latentvae export path/to/diffusers-vae --out out/vae --calibrate IMAGES        # anything load_autoencoder reads
    latentvae export sd-vae-ft-mse.safetensors --out out/sd-vae --calibrate IMAGES
    latentvae export runs/quickstart --out out/my-vae.safetensors --format single-file --calibrate IMAGES

SRC is a training run or checkpoint, or any VAE `loading.load_autoencoder` reads (a diffusers or
pipeline folder, an LDM/SD file, a hub id, `taesd:*`, with its `[key=value]` options). `--format
diffusers` (default) writes OUT with `config.json` + `diffusion_pytorch_model.safetensors`
(`AutoencoderKL.from_pretrained(OUT)`), `README.md` (model card: where the weights come from,
latent statistics, for a run its training config and data, and the evaluation figures of these
very weights) and `latentvae_export.json` (the same facts, machine-readable, including whether the
scaling factors were measured). The folder is written beside OUT under a hidden temporary name,
reloaded and compared with the source model, and only then renamed into place. `--format
single-file` writes OUT as one .safetensors file in the original LDM key layout (what ComfyUI,
A1111 and kohya load as a VAE), the record and the diffusers config in its metadata; it is checked
with diffusers' own converter and `AutoencoderKL.from_single_file` before it is written
atomically. Every argument is checked before that (OUT is neither inside SRC nor SRC inside OUT;
an existing OUT needs --overwrite), and a failed or interrupted export leaves nothing behind (but the
parent folders of OUT it created); a signal's line says whether OUT was written. See docs/export.md.
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from . import runs
from .vae import convert
from .calibrate import (CalibrationConfig, Fp16Report, LatentStats, calibrate, fp16_check,
                        format_fp16, format_stats)
from .config import config_from_dict
from .vae.conventions import CONVENTIONS
from .errors import BadInputError, MissingInputError, UserError
from .fsutil import atomic_write_bytes, atomic_write_json, flatten, publish_folder
from .vae.loading import load_autoencoder, load_from_checkpoint
from .vae.model import DETERMINISTIC_LOGVAR, decode, downsample_factor, encode_moments
from .options import ExportOptions, validated

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FP32_TOLERANCE = 1e-5
UNMEASURED_SCALING = 1.0  # identity: diffusers needs some value; 1.0 is not passed off as measured
METADATA_FILE = "latentvae_export.json"
TILE_SAMPLE_SIZE = 512  # the exported config's sample_size at least (the SD VAE's)
LATENT_KEYS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")
SOURCE_KINDS = {  # loading.py's `latentvae_source["kind"]` -> words for the model card
    "run": "latentvae training run", "folder": "diffusers folder", "pipeline": "the VAE of a diffusers pipeline",
    "hub": "Hugging Face hub repo", "single-file": "single weight file, LDM/SD layout",
    "taesd": "TAESD reference, AutoencoderTiny"}


class ExportError(RuntimeError):
    """The export could not be completed or did not verify; OUT was left untouched."""


class ExportTargetExists(UserError, FileExistsError):
    """OUT exists and holds something that --overwrite was not given to replace."""


@dataclass(frozen=True)
class Source:
    """What is exported: the VAE (fp32, eval mode) and where it came from."""
    spec: str  # SRC as given
    vae: Any
    kind: str  # a key of SOURCE_KINDS
    origin: dict = field(default_factory=dict)  # loading's `latentvae_source` (path read, hub id, revision, ...)
    checkpoint: Optional[Path] = None  # a run's checkpoint, its state.json and training config
    state: Optional[dict] = None
    cfg: Any = None
    weights: Optional[str] = None  # a run's ema|raw; any other VAE: the weights it holds
    factors_from: Optional[str] = None  # not a run: where its config's latent factors come from (None: unknown)

    @property
    def is_run(self) -> bool:
        return self.checkpoint is not None


@dataclass(frozen=True)
class Evaluation:
    """The figures of the exported weights in an evaluation summary, or why there are none."""
    file: Optional[Path] = None
    figures: Optional[dict] = None  # the exported VAE's own entry
    label: Optional[str] = None  # its name in summary.json's "vaes"
    settings: Optional[dict] = None  # summary.json's "settings": images, data, fit, ...
    note: str = ""


@dataclass(frozen=True)
class ExportResult:
    out: Path
    checkpoint: Optional[Path]  # None unless SRC was a training run or checkpoint
    step: Optional[int]
    stats: Optional[LatentStats]
    fp16: Optional[Fp16Report]
    max_diff: dict[str, float] = field(default_factory=dict)  # encode/decode vs the source model
    source: str = ""
    format: str = "diffusers"
    evaluation: Optional[str] = None  # the summary.json entry whose figures went into the model card


# ----------------------------------------------------------------------------- SRC and OUT
def run_folder(found_checkpoint: Path) -> Path:
    """RUN of RUN/checkpoints/checkpoint-XXXXXXXX."""
    return found_checkpoint.parent.parent


def split_spec(spec: str) -> tuple[str, dict[str, str]]:
    """`TARGET[key=value,...]` (loading.py's VAE names) -> (TARGET, options); a path that exists is whole."""
    if not spec.endswith("]") or "[" not in spec or Path(spec).exists():
        return spec, {}
    target, _, inner = spec[:-1].rpartition("[")
    pairs = (item.partition("=") for item in inner.split(","))
    return target, {k.strip(): v.strip() for k, _, v in pairs if k.strip()}


def is_run_path(target: str) -> bool:
    """A training run or checkpoint folder, as `load_autoencoder` tells it from a diffusers folder."""
    p = Path(target)
    return p.is_dir() and ((p / "checkpoints").is_dir()
                           or ((p / "state.json").is_file() and not (p / "config.json").is_file()))


def check_out(out: Path, overwrite: bool, single_file: bool = False) -> None:
    if single_file:
        if out.is_dir():
            raise ExportTargetExists(f"{out} is a folder; --format single-file writes one .safetensors file")
        if out.exists() and not overwrite:
            raise ExportTargetExists(f"{out} exists; pass --overwrite to replace it")
        return
    if out.exists() and not out.is_dir():
        raise ExportTargetExists(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportTargetExists(f"{out} exists and is not empty; pass --overwrite to replace it")


def check_apart(paths: list, out: Path, hint: str = "choose a folder outside the training run") -> None:
    """OUT must not be a source path, lie inside one, or hold one: writing (or --overwrite replacing)
    OUT would change or delete what is being exported. `paths` as the user wrote them, first wins."""
    sources: dict[Path, str] = {}
    for p in paths:
        sources.setdefault(Path(p).resolve(), str(p))  # resolved -> as the user wrote it
    target = out.resolve()
    for src, shown in sorted(sources.items(), key=lambda kv: len(kv[0].parts)):
        if target == src:
            raise BadInputError(f"export target {out} is its source {shown}; {hint}")
        if src in target.parents:
            raise BadInputError(f"export target {out} is inside its source {shown}; {hint}")
        if target in src.parents:
            raise BadInputError(f"export target {out} contains its source {shown}; {hint}")


def find_source(run: str | Path) -> Path:
    """The checkpoint to export, or a MissingInputError/BadInputError naming RUN."""
    try:
        return runs.find_checkpoint(run)
    except FileNotFoundError as e:
        raise MissingInputError(str(e)) from e


def guess_kind(target: str) -> str:
    """The kind of a non-run SRC, for a loader that does not record it."""
    p = Path(target)
    if target.startswith(convert.TAESD_PREFIX):
        return "taesd"
    if p.is_file():
        return "single-file"
    if p.is_dir():
        return "pipeline" if (p / "model_index.json").is_file() and not (p / "config.json").is_file() else "folder"
    return "hub"


def open_run(options: ExportOptions, target: str, spec_options: dict, out: Path) -> Source:
    found = find_source(target)
    single = options.format == "single-file"
    check_apart([target, found, *([run_folder(found)] if found.parent.name == "checkpoints" else [])], out,
                f"choose a {'path' if single else 'folder'} outside the training run")
    check_out(out, options.overwrite, single)
    try:
        state = runs.read_state(found)
    except ValueError as e:
        raise BadInputError(str(e)) from e
    named = spec_options.get("weights")
    if named is not None and options.weights == "raw" and named != "raw":
        raise BadInputError(f"--weights raw contradicts {options.src} (weights={named}); give the weights once")
    if spec_options:  # RUN[weights=raw]: the loader checks the options
        vae = load_autoencoder(options.src)
        weights = (getattr(vae, "latentvae_source", None) or {}).get("weights") or named or "ema"
    else:
        vae = load_from_checkpoint(found, options.weights)
        weights = options.weights
    return Source(options.src, vae.float().eval(), "run", dict(getattr(vae, "latentvae_source", None) or {}), found,
                  state, config_from_dict(state["config"]), weights)


def open_other(options: ExportOptions, target: str, out: Path) -> Source:
    """Any VAE `load_autoencoder` reads that is not a training run: its weights as they are."""
    if options.weights == "raw":
        raise BadInputError(f"--weights raw: {options.src} is not a latentvae training run or checkpoint; --weights "
                            "chooses between a run's EMA and raw weights, any other VAE is exported with the "
                            "weights it holds (leave --weights out)")
    hint = "choose a path outside it"
    single = options.format == "single-file"
    local = [target] if Path(target).exists() else []
    taesd = convert.TAESD_VARIANTS.get(target.removeprefix(convert.TAESD_PREFIX))
    if target.startswith(convert.TAESD_PREFIX) and taesd and convert.default_taesd_dir():  # its two weight files
        local = [convert.default_taesd_dir() / f"{taesd.stem}_{part}.safetensors" for part in ("encoder", "decoder")]
    check_apart(local, out, hint)
    check_out(out, options.overwrite, single)
    vae = load_autoencoder(options.src).float().eval()
    origin = dict(getattr(vae, "latentvae_source", None) or {})
    read = origin.get("path")
    if read and origin.get("kind") != "taesd":
        check_apart([read], out, hint)  # what was read: a pipeline's vae/, a hub snapshot
    kind = origin.get("kind") or guess_kind(target)
    read_path = Path(read or target)
    if read_path.is_file():  # a single weight file: only a latentvae export records its latent factors
        factors_from = "the file's metadata" if convert.recorded_config(read_path) is not None else None
    elif kind == "taesd":
        factors_from = "the TAESD reference config (its latents are already normalized)"
    else:
        factors_from = "the source's config.json"
    return Source(options.src, vae, kind, origin, factors_from=factors_from)


def open_source(options: ExportOptions, out: Path) -> Source:
    """SRC, loaded, after OUT was checked against it (nothing is written before)."""
    target, spec_options = split_spec(options.src)
    if is_run_path(target):
        return open_run(options, target, spec_options, out)
    return open_other(options, target, out)


def describe(src: Source) -> str:
    if src.is_run:
        return f"{src.checkpoint} (step {src.state['step']}, {src.weights} weights)"
    o = src.origin
    extra = [f"{k} {o[k][:12] if k == 'revision' else o[k]}" for k in ("repo_id", "revision", "subfolder", "variant")
             if o.get(k)]
    return f"{src.spec} ({SOURCE_KINDS.get(src.kind, src.kind)}{'; ' + ', '.join(extra) if extra else ''})"


def staging_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp-{os.getpid()}"


def clean_stale(out: Path) -> None:
    """Remove hidden leftovers of earlier interrupted exports to OUT (staging folders, atomic_write temporaries)."""
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in out.parent.glob(f".{out.name}.*.tmp"):
        if p.is_file():
            p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- latent config
def source_entries(src: Source) -> Optional[dict]:
    """A non-run source's own latent factors and force_upcast, where they are known."""
    if src.is_run or src.factors_from is None:
        return None
    c = src.vae.config
    return {**{k: c.get(k) for k in LATENT_KEYS}, "force_upcast": c.get("force_upcast", True)}


def latent_config(stats: Optional[LatentStats], fp16: Optional[Fp16Report],
                  kept: Optional[dict] = None) -> dict[str, Any]:
    """The diffusers config entries this export sets: measured, else the source's own (`kept`), else the
    unmeasured placeholder."""
    if stats:
        entries = stats.config_entries()
    elif kept is not None:
        entries = {k: kept.get(k) for k in LATENT_KEYS}
    else:
        entries = {"scaling_factor": UNMEASURED_SCALING, "shift_factor": None, "latents_mean": None,
                   "latents_std": None}
    upcast = fp16.force_upcast if fp16 is not None else bool(kept.get("force_upcast", True)) if kept else True
    return {**entries, "force_upcast": upcast}


def config_params(vae) -> set[str]:
    """The config entries the VAE's class takes (its constructor's arguments)."""
    return set(inspect.signature(type(vae).__init__).parameters) - {"self"}


def check_writable(src: Source, options: ExportOptions) -> None:
    """What the chosen format cannot hold, refused before any work."""
    cls = type(src.vae).__name__
    if options.format == "single-file" and not isinstance(src.vae, AutoencoderKL):
        raise BadInputError(f"--format single-file: {src.spec} is an {cls}; the LDM single-file layout holds an "
                            "AutoencoderKL only (ComfyUI and A1111 load TAESD from its own taesd_encoder/"
                            "taesd_decoder files); export it with --format diffusers")
    if options.convention == "sdxl" and "latents_mean" not in config_params(src.vae):
        raise BadInputError(f"--convention sdxl writes latents_mean/latents_std, which {cls} has no config entries "
                            "for; use sd or sd3")


# ----------------------------------------------------------------------------- verification
def probe_images(vae, n: int = 2) -> torch.Tensor:
    """Fixed images to compare the export with the source model: seeded, smooth, in [-1, 1]."""
    f = downsample_factor(vae)
    g = torch.Generator().manual_seed(0)
    low = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(8 * f, 8 * f), mode="bilinear", align_corners=False)


@torch.no_grad()
def compare(a, b, x: torch.Tensor) -> dict[str, float]:
    """max |difference| of the encoder means, and of the decodes of a's mean, between two fp32 VAEs."""
    mean_a, _ = encode_moments(a, x)
    mean_b, _ = encode_moments(b, x)
    return {"encode": float((mean_a - mean_b).abs().max()), "decode": float((decode(a, mean_a) - decode(b, mean_a)).abs().max())}


def check_outputs(loaded, vae, dtype: str, what: str) -> dict[str, float]:
    """Outputs of the reloaded model vs the source: in fp32 they must agree; in fp16/bf16 the difference
    is the weight rounding alone (compared in fp32 arithmetic), reported, not bounded."""
    diff = compare(vae, loaded.float().eval(), probe_images(vae))
    if dtype == "fp32" and max(diff.values()) >= FP32_TOLERANCE:
        raise ExportError(f"{what}: reloaded fp32 model differs from the source model by {diff} "
                          f"(tolerance {FP32_TOLERANCE})")
    return diff


def verify(folder: Path, vae, dtype: str) -> dict[str, float]:
    """Reload `folder` with diffusers; no missing/unexpected keys, weights equal, outputs close."""
    loaded, info = type(vae).from_pretrained(str(folder), torch_dtype=DTYPES[dtype], use_safetensors=True,
                                             output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise ExportError(f"{folder}: diffusers reloads it with {problems}")
    want = {k: v.to(DTYPES[dtype]) for k, v in vae.state_dict().items()}
    got = loaded.state_dict()
    if want.keys() != got.keys() or not all(torch.equal(want[k], got[k]) for k in want):
        raise ExportError(f"{folder}: reloaded weights differ from the source weights cast to {dtype}")
    return check_outputs(loaded, vae, dtype, str(folder))


def verify_ldm(ldm: dict[str, torch.Tensor], vae: AutoencoderKL, dtype: str, out: Path) -> dict[str, float]:
    """The LDM-layout tensors, read back by diffusers: its converter must use every tensor and give the
    source weights exactly; `AutoencoderKL.from_single_file` (with the VAE's config, offline) must
    hold them and reproduce the source's outputs."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    want = {k: v.to(DTYPES[dtype]) for k, v in vae.state_dict().items()}
    converted = convert_ldm_vae_checkpoint(dict(ldm), json.loads(vae.to_json_string()))
    if converted.keys() != want.keys() or len(converted) != len(ldm):
        raise ExportError(f"{out}: diffusers' convert_ldm_vae_checkpoint maps the {len(ldm)} LDM tensors to "
                          f"{len(converted)}; missing {sorted(want.keys() - converted.keys())[:3]}, unexpected "
                          f"{sorted(converted.keys() - want.keys())[:3]}")
    if not all(torch.equal(converted[k], want[k]) for k in want):
        raise ExportError(f"{out}: diffusers' convert_ldm_vae_checkpoint gives weights other than the source's")
    with tempfile.TemporaryDirectory() as config_dir:
        vae.save_config(config_dir)
        loaded = AutoencoderKL.from_single_file(dict(ldm), config=config_dir,
                                                torch_dtype=None if dtype == "fp32" else DTYPES[dtype])
    got = loaded.state_dict()
    if got.keys() != want.keys() or any(t.is_meta for t in got.values()) \
            or not all(torch.equal(want[k], got[k]) for k in want):
        raise ExportError(f"{out}: AutoencoderKL.from_single_file does not load the source weights from it")
    return check_outputs(loaded, vae, dtype, str(out))


def umask_modes(folder: Path) -> None:
    """Give every file in `folder` the mode a plain `open()` would (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


# ----------------------------------------------------------------------------- evaluation figures
def find_eval_summary(src: Source, explicit: Optional[str]) -> Optional[Path]:
    if explicit is not None:
        if not Path(explicit).is_file():
            raise MissingInputError(f"--eval-summary {explicit} does not exist" if not Path(explicit).exists()
                                    else f"--eval-summary {explicit} is not a file")
        return Path(explicit)
    if not src.is_run:
        return None
    default = run_folder(src.checkpoint) / "eval" / "summary.json"
    return default if default.is_file() else None


def mismatch(entry: Any, src: Source, summary_file: Path) -> Optional[str]:
    """Why an evaluation entry did not measure the weights being exported; None if it did.

    An entry records the VAE name given to `latentvae evaluate` (relative paths are read from here).
    A run named by its folder was evaluated at its newest checkpoint of the time: that is the exported
    checkpoint only if it is still the newest and was written before the summary. `evaluate` reads a
    run's EMA weights unless the name says [weights=raw]."""
    spec = entry.get("source") if isinstance(entry, dict) else None
    if not isinstance(spec, str):
        return "records no source"
    target, opts = split_spec(spec)
    if src.is_run:
        if not is_run_path(target):
            return f"{spec} is not this run"
        try:
            evaluated = runs.find_checkpoint(target)
        except (FileNotFoundError, ValueError):
            return f"{spec} has no complete checkpoint now"
        if evaluated.resolve() != src.checkpoint.resolve():
            return f"{spec} is {evaluated.name}, not the exported {src.checkpoint.name}"
        if Path(target).resolve() != evaluated.resolve() \
                and (src.checkpoint / "state.json").stat().st_mtime_ns > summary_file.stat().st_mtime_ns:
            return f"{spec} was evaluated before {src.checkpoint.name} was written"
        weights = opts.get("weights", entry.get("weights", "ema"))
        return None if weights == src.weights else f"{weights} weights evaluated, {src.weights} exported"
    own_target, own_opts = split_spec(src.spec)
    if opts != own_opts:
        return f"{spec} is not {src.spec}"
    if target == own_target:
        return None
    a, b = Path(target), Path(own_target)
    return None if a.exists() and b.exists() and a.resolve() == b.resolve() else f"{spec} is not {src.spec}"


def pick_evaluation(src: Source, explicit: Optional[str]) -> Evaluation:
    """The exported weights' own entry of the evaluation summary. None matching: an error for an explicit
    --eval-summary, a line in the model card for a run's default RUN/eval/summary.json."""
    file = find_eval_summary(src, explicit)
    if file is None:
        where = "RUN/eval/summary.json or --eval-summary" if src.is_run else "no --eval-summary given"
        return Evaluation(note=f"No evaluation summary was found ({where}).")
    flag = "--eval-summary " if explicit is not None else ""
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputError(f"{flag}{file}: not a readable JSON file ({e})") from e
    vaes = data.get("vaes") if isinstance(data, dict) else None
    if not isinstance(vaes, dict):  # one record naming no VAE (not written by `latentvae evaluate`)
        return Evaluation(file, data if isinstance(data, dict) else {"value": data}, None, None,
                          "a record naming no VAE (not a `latentvae evaluate` summary.json): these figures could not "
                          "be checked against the exported weights")
    reasons = {}
    for label, entry in vaes.items():
        why = mismatch(entry, src, file)
        if why is None:
            return Evaluation(file, entry, label, data.get("settings"), f"entry `{label}` (source `{entry['source']}`)")
        reasons[label] = why
    text = (f"{file} holds no evaluation of the exported weights ({describe(src)}): "
            + ("; ".join(f"{label}: {why}" for label, why in reasons.items()) or "it has no entries"))
    if explicit is not None:
        raise BadInputError(f"--eval-summary {text}")
    return Evaluation(file, None, None, data.get("settings"), text + ". Its figures are left out.")


# ----------------------------------------------------------------------------- the model card
def data_seen(cfg, state: dict) -> dict[str, Any]:
    d, t = cfg.data, cfg.train
    procs = int(state.get("num_processes", 1))
    seen = {"source": d.source, "kind": d.kind, "split": d.split, "val_source": d.val_source,
            "resolution": d.resolution, "short_side": [d.short_side_min, d.short_side_max], "flip": d.flip,
            "steps": int(state["step"]), "processes": procs,
            "crops_seen": int(state["step"]) * t.batch_size * t.grad_accum * procs,
            "bad_images": len(state.get("bad_images", []))}
    if Path(d.source).is_dir():
        from .images import list_images
        try:
            seen["source_files"] = len(list_images(d.source))
        except FileNotFoundError:
            pass
    return seen


def _fmt(v) -> str:
    return "not set" if v is None else ", ".join(f"{x:.4g}" for x in v) if isinstance(v, list) else f"{v:.6g}"


def scaling_section(meta: dict[str, Any]) -> list[str]:
    lc, stats = meta["latent_config"], meta["latent_statistics"]
    if stats is None and meta["scaling_origin"] != "placeholder":
        return [f"**Not measured by this export**: the factors are those of {meta['scaling_origin']}, kept as "
                "they were: " + ", ".join(f"`{k}: {_fmt(lc.get(k))}`" for k in LATENT_KEYS if k in lc) + ". "
                "`latentvae export SRC --out OUT --calibrate IMAGES` measures them on your images."]
    if stats is None:
        return ["**The latent scaling factors were NOT measured** (exported without `--calibrate`).",
                f"`config.json` holds `scaling_factor: {UNMEASURED_SCALING}`, an unmeasured placeholder (identity), "
                "with no shift_factor / latents_mean / latents_std. Measure them before training a diffusion "
                "model: `latentvae export SRC --out OUT --calibrate IMAGES`."]
    kl = stats["health"]["kl_per_element"]
    return [f"Measured on {stats['images']} images ({stats['resolution']}px, `{stats['source']}`), written for "
            f"the `{stats['convention']}` convention: {CONVENTIONS[stats['convention']]}, which gives "
            "unit-variance latents on those images.", "", "| config entry | value |", "|---|---|",
            *[f"| {k} | {_fmt(lc.get(k))} |" for k in LATENT_KEYS if k in lc], "",
            "Measured per channel: mean " + _fmt(stats["channel_mean"]) + "; std " + _fmt(stats["channel_std"]) + ".",
            "", "Latent health: KL per element " + ("n/a" if kl is None else f"{kl:.4g} nats")
            + "; channels carrying no information: " + (", ".join(map(str, stats["health"]["dead_channels"])) or "none")
            + "."]


def evaluation_section(meta: dict[str, Any]) -> list[str]:
    if meta["evaluation"] is None:
        return [meta["evaluation_note"]]
    settings = meta["evaluation_settings"] or {}
    on = ", ".join(f"{k} {settings[k]}" for k in ("images", "data", "fit", "max_side") if settings.get(k) is not None)
    lines = [f"From `{meta['evaluation_file']}`, {meta['evaluation_note']}" + (f" ({on})" if on else "") + ":", "",
             "| metric | value |", "|---|---|"]
    return lines + [f"| {k} | {v} |" for k, v in flatten(meta["evaluation"]).items()]


def model_card(meta: dict[str, Any]) -> str:
    lc, fp16, cls = meta["latent_config"], meta["fp16"], meta["class"]
    run = meta["checkpoint"] is not None
    origin = (f"From `{meta['checkpoint']}` (step {meta['step']}), {meta['weights']} weights" if run else
              f"Exported from `{meta['source']}` ({SOURCE_KINDS.get(meta['source_kind'], meta['source_kind'])}), "
              "with the weights it holds")
    lines = ["---", "library_name: diffusers", "tags: [autoencoder, vae, latentvae]", "---", "",
             f"# {cls} exported by latentvae", "", f"{origin}, stored as {meta['dtype']}.",
             "", "```python", f"from diffusers import {cls}",
             f"vae = {cls}.from_pretrained(\"path/to/this/folder\")", "```", "", "## Latent scaling", ""]
    lines += scaling_section(meta)
    lines += ["", "## Posterior", "", f"{meta['posterior']}."]
    kept = "force_upcast kept True." if run else "force_upcast kept as in the source."
    lines += ["", "## fp16", "", f"`force_upcast: {lc['force_upcast']}`. "
              + (fp16["note"] if fp16 else f"Not checked (no calibration images): {kept}")]
    if run:
        lines += ["", "## Data seen in training", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in meta["data"].items()]
    else:
        lines += ["", "## Source", "", "Not trained by latentvae: no training config or training data is known to "
                  "this export.", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in (meta["source_origin"] or {"spec": meta["source"]}).items()
                  if v is not None]
    lines += ["", "## Evaluation", "", *evaluation_section(meta)]
    if run:
        lines += ["", "## Training config", "", "```json", json.dumps(meta["training_config"], indent=2,
                                                                      sort_keys=True), "```"]
    lines += ["", "## Export check", "",
              f"Reloaded with `{cls}.from_pretrained`: no missing or unexpected keys; weights identical to "
              f"the {'training' if run else 'source'} weights cast to {meta['dtype']}; max abs difference vs the "
              "source model: " + ", ".join(f"{k} {v:.3g}" for k, v in meta["max_abs_diff"].items()) + ".", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the export
def pinned_logvar(vae) -> bool:
    """An AutoencoderKL whose posterior log-variance is pinned (model.make_posterior_deterministic)."""
    if not isinstance(vae, AutoencoderKL):
        return False
    conv = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
    c = vae.config.latent_channels
    return bool((conv.weight[c:] == 0).all() and (conv.bias[c:] == DETERMINISTIC_LOGVAR).all())


def posterior(src: Source) -> tuple[bool, str]:
    """(latents are the posterior mean, the model card's words for it)"""
    if src.is_run and src.cfg.model.mode == "ae":
        return True, ("deterministic: model.mode ae never trained the log-variance, so it is pinned to "
                      f"{DETERMINISTIC_LOGVAR} (std ~3e-7) and latent_dist.sample() equals mode()")
    if isinstance(src.vae, AutoencoderTiny):
        return True, "none: AutoencoderTiny.encode returns the latents themselves (deterministic)"
    if pinned_logvar(src.vae):
        return True, (f"deterministic: the log-variance is pinned to {DETERMINISTIC_LOGVAR} (std ~3e-7, as latentvae "
                      "exports a plain autoencoder), so latent_dist.sample() equals mode()")
    return False, "Gaussian: latent_dist.sample() = mean + std * noise"


def measure(vae, options: ExportOptions, use_mean: bool = False, log=print,
            kept: Optional[dict] = None) -> tuple[Optional[LatentStats], Optional[Fp16Report]]:
    if options.calibrate is None:
        if kept is None:
            log(f"latent statistics: NOT measured (no --calibrate); the config gets the unmeasured placeholder "
                f"scaling_factor={UNMEASURED_SCALING} and force_upcast=True")
        else:
            log("latent statistics: not measured (no --calibrate); the config keeps the source's "
                + ", ".join(f"{k}={kept.get(k)}" for k in (*LATENT_KEYS, "force_upcast") if kept.get(k) is not None))
        return None, None
    stats = calibrate(vae, CalibrationConfig(options.calibrate, options.limit, options.resolution, options.convention,
                                             keep_latents=options.fp16_images, use_mean=use_mean))
    log(format_stats(stats))
    fp16 = fp16_check(vae, stats.sample_latents) if options.fp16_images > 0 else None
    log(format_fp16(fp16) if fp16 else "fp16 check: skipped (--fp16-images 0); force_upcast kept as it was")
    return stats, fp16


def export_record(options: ExportOptions, src: Source, lc: dict, stats: Optional[LatentStats],
                  fp16: Optional[Fp16Report], evaluation: Evaluation, diff: dict) -> dict[str, Any]:
    """latentvae_export.json: every fact of the export, machine-readable (the model card is made from it)."""
    run = src.is_run
    return {"format": "latentvae-export-1", "output_format": options.format, "source": src.spec,
            "source_kind": src.kind, "source_origin": src.origin or None, "class": type(src.vae).__name__,
            "checkpoint": str(src.checkpoint) if run else None, "step": int(src.state["step"]) if run else None,
            "weights": src.weights, "dtype": options.dtype, "latent_config": lc,
            "scaling_measured": stats is not None,
            "scaling_origin": "measured" if stats else (src.factors_from or "placeholder"),
            "latent_statistics": stats.to_dict() if stats else None, "fp16": fp16.to_dict() if fp16 else None,
            "data": data_seen(src.cfg, src.state) if run else None,
            "training_config": src.cfg.to_dict() if run else None,
            "evaluation_file": str(evaluation.file) if evaluation.file else None,
            "evaluation_entry": evaluation.label, "evaluation": evaluation.figures,
            "evaluation_settings": evaluation.settings, "evaluation_note": evaluation.note,
            "max_abs_diff": diff, "posterior": posterior(src)[1]}


def write_folder(src: Source, options: ExportOptions, out: Path, record) -> dict[str, float]:
    """The diffusers folder, staged beside OUT, reloaded and compared, then renamed to OUT."""
    vae = src.vae
    tmp = staging_dir(out)
    try:
        tmp.mkdir()
        stored = copy.deepcopy(vae) if options.dtype == "fp32" else copy.deepcopy(vae).to(DTYPES[options.dtype])
        stored.save_pretrained(str(tmp), safe_serialization=True)
        umask_modes(tmp)  # safetensors writes its file 0600; the export is meant to be shared
        diff = verify(tmp, vae, options.dtype)
        meta = record(diff)
        atomic_write_json(tmp / METADATA_FILE, meta)
        atomic_write_bytes(tmp / "README.md", model_card(meta).encode())
        publish_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return diff


def single_file_metadata(meta: dict[str, Any], vae: AutoencoderKL) -> dict[str, str]:
    """safetensors metadata (string values): the latent config entries as in config.json, the measured
    statistics and provenance, the whole record and the VAE's diffusers config (loading.py reads it)."""
    lc, stats = meta["latent_config"], meta["latent_statistics"]
    out = {"format": "pt", convert.EXPORT_RECORD_KEY: json.dumps(meta, sort_keys=True),
           convert.CONFIG_KEY: vae.to_json_string(), "exported_by": "latentvae export",
           "source": meta["source"], "source_kind": meta["source_kind"], "dtype": meta["dtype"],
           "scaling_measured": json.dumps(meta["scaling_measured"]), "scaling_origin": meta["scaling_origin"],
           **{k: json.dumps(lc.get(k)) for k in (*LATENT_KEYS, "force_upcast")}}
    if stats:
        out.update(latent_convention=stats["convention"], latent_channel_mean=json.dumps(stats["channel_mean"]),
                   latent_channel_std=json.dumps(stats["channel_std"]), calibration_images=str(stats["images"]),
                   calibration_source=stats["source"])
    if meta["checkpoint"] is not None:
        out.update(checkpoint=meta["checkpoint"], step=str(meta["step"]), weights=meta["weights"])
    return out


def serialized_back(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of safetensors bytes, as a reader sees them."""
    from safetensors.torch import load
    n = int.from_bytes(data[:8], "little")
    return load(data), json.loads(data[8:8 + n]).get("__metadata__", {})


def write_single_file(src: Source, options: ExportOptions, out: Path, record, log) -> dict[str, float]:
    """One .safetensors in the LDM layout: converted, checked with diffusers, serialized, read back, then
    written atomically to OUT."""
    from safetensors.torch import save

    vae = src.vae
    ldm = {k: v.contiguous() for k, v in convert.diffusers_to_ldm_vae(
        {k: v.detach().to(DTYPES[options.dtype]) for k, v in vae.state_dict().items()}).items()}
    diff = verify_ldm(ldm, vae, options.dtype, out)
    meta = record(diff)
    metadata = single_file_metadata(meta, vae)
    data = save(ldm, metadata=metadata)
    tensors, got = serialized_back(data)
    if tensors.keys() != ldm.keys() or not all(torch.equal(tensors[k], ldm[k]) for k in ldm) or got != metadata:
        raise ExportError(f"{out}: the serialized file does not read back as written")
    if vae.config.norm_num_groups != 32:
        log(f"note: norm_num_groups={vae.config.norm_num_groups} is not stored in LDM weights; latentvae and diffusers "
            "(with a config) read it from the file's metadata, ComfyUI/A1111/kohya assume 32")
    atomic_write_bytes(out, data)
    return diff


def export(options: ExportOptions, log=print) -> ExportResult:
    """`options.src` (a training run or checkpoint, or any VAE load_autoencoder reads) -> a verified
    diffusers folder or LDM single file `options.out`."""
    options = validated(options)  # the command line's checks for library callers too
    out, single = Path(options.out), options.format == "single-file"
    src = open_source(options, out)
    vae = src.vae
    check_writable(src, options)
    if options.calibrate is not None and options.resolution % downsample_factor(vae):
        raise BadInputError(f"--resolution {options.resolution} is not a multiple of the VAE's downsampling factor "
                            f"{downsample_factor(vae)}")
    evaluation = pick_evaluation(src, options.eval_summary)
    log(f"exporting {describe(src)} -> {out} as {options.dtype}{' (LDM single file)' if single else ''}")
    if evaluation.file is not None and evaluation.figures is None:
        log(f"evaluation figures left out: {evaluation.note}")

    kept = source_entries(src)
    use_mean, _ = posterior(src)
    stats, fp16 = measure(vae, options, use_mean=use_mean, log=log, kept=kept)
    params = config_params(vae)
    lc = {k: v for k, v in latent_config(stats, fp16, kept).items() if k in params}
    updates = dict(lc)
    if src.is_run:
        # diffusers' tiling decodes in tiles of sample_size pixels (and normalizes per tile): 512, as the
        # SD VAE, or the training/calibration size if larger; diffusers' default (32) made 32-px tiles
        updates["sample_size"] = max(TILE_SAMPLE_SIZE, src.cfg.data.resolution, options.resolution)
    vae.register_to_config(**updates)

    def record(diff: dict) -> dict:
        return export_record(options, src, lc, stats, fp16, evaluation, diff)

    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    if single:
        diff = write_single_file(src, options, out, record, log)
        check = ("LDM layout: diffusers' convert_ldm_vae_checkpoint maps every tensor back onto the source weights; "
                 "reloaded with AutoencoderKL.from_single_file")
    else:
        diff = write_folder(src, options, out, record)
        check = f"reloaded with {type(vae).__name__}.from_pretrained: no missing/unexpected keys"
    bound = f"fp32 tolerance {FP32_TOLERANCE}" if options.dtype == "fp32" else f"weights rounded to {options.dtype}"
    log(f"{check}; max abs difference vs the source model: "
        + ", ".join(f"{k} {v:.3g}" for k, v in diff.items()) + f" ({bound})")
    log(f"wrote {out}")
    return ExportResult(out, src.checkpoint, int(src.state["step"]) if src.is_run else None, stats, fp16, diff,
                        src.spec, options.format, evaluation.label)


def run(options: ExportOptions) -> ExportResult:
    """`latentvae export SRC --out OUT` (a failed verification, ExportError, is not a user's mistake
    and keeps its traceback). A signal: one line saying whether OUT was written (interrupts.says_if_published)."""
    from .interrupts import says_if_published

    with says_if_published(options.out, "export"):
        return export(options)
