"""Loading autoencoders, whatever form they come in: one string names a VAE for every job.

Every `--vae` (encode, decode, evaluate, demo), `model.init_from` and `load_autoencoder(spec)` take
the same string, `TARGET` or `TARGET[key=value,key=value]`:

    runs/quickstart                    a latentvae run (newest complete checkpoint, EMA weights) or one checkpoint
    out/my-vae                         a diffusers folder: config.json + diffusion_pytorch_model.safetensors
    models/sd15                        a pipeline folder (model_index.json): its vae/ is used
    sd-vae-ft-mse.safetensors          an original LDM / SD weight file, or a whole SD checkpoint (convert.py)
    taesd:sd|sdxl|sd3|flux             the TAESD references, AutoencoderTiny (convert.py)
    stabilityai/sd-vae-ft-mse          a Hugging Face hub id: a VAE repo, or a pipeline repo (its vae/)
    org/pipe[variant=fp16,revision=v1] options, in brackets at the end

Options (comma-separated `key=value` inside one trailing `[...]`; spaces around them are ignored):

    subfolder=DIR      the VAE's folder inside a folder or repo (default: `vae` for a pipeline, else the top)
    variant=NAME       diffusion_pytorch_model.NAME.safetensors (default: the plain file; the only variant if
                       there is no plain one; several variants and no plain file: name one)
    revision=REV       hub branch, tag or commit (hub ids only; default: main)
    file=NAME          one weight file inside a folder or repo (e.g. an LDM file in a hub repo), read as a
                       single file
    weights=ema|raw    a latentvae run's weights (default: ema)
    norm_num_groups=N  GroupNorm groups of an LDM single file (not stored in it; default 32, as every SD VAE)
    allow_pickle=yes   read .bin/.ckpt/.pt/.pth weights, with torch.load(weights_only=True) (default: refused,
                       with the one-line conversion to safetensors)

An option that does not apply to what the target turned out to be is an error, as is an unknown key.

Resolution, in order: `taesd:*`; a local path that exists (the whole string is tried first, so a path
with brackets in its name stays a path; `./org/name` is always local); else `org/name` (exactly one
slash, hub characters) is a hub id. A hub id is fetched with huggingface_hub's `snapshot_download`,
only the config and the chosen weights (or the one `file=`), never the rest of a pipeline; so the hub
cache, HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE=1, HF_TOKEN or `hf auth login`, and revisions work as
for any hub library (a token is never part of the string, which manifests record). Variants are
chosen among the files the hub lists (online) or the cache holds (offline, or the hub unreachable).
Half-precision variants load as fp32 modules (diffusers' default).

Only safetensors and JSON are read by default; torch files only with `allow_pickle=yes`, and then
with `torch.load(weights_only=True)`: nothing is unpickled.

`load_vae` returns one record (loaded.LoadedVae) for every door: the diffusers module in eval mode
(any class of the family table, families.py), its family, whether its posterior is stochastic, its
latent layout, its factors and where they come from, and its origin: {"spec", "kind" (hub|folder|
pipeline|single-file|taesd|run), "path" (the local folder or file read), "repo_id", "revision" (the hub
commit), "subfolder", "variant", "weights" (a run's ema|raw)}, for manifests and exports.

    lv = load_vae("out/my-vae")
    lv = load_vae("stabilityai/sdxl-vae[variant=fp16]")
    lv = load_vae("runs/quickstart[weights=raw]")
    vae = load_autoencoder("out/my-vae")       # the module alone

The spec string is spec.py, diffusers folders and single files folder.py, hub ids hub.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from .. import runs
from ..errors import BadInputError, MissingInputError, UserError
from . import convert
from .families import family_for_class, family_of
from .folder import load_diffusers_folder, load_single_file
from .hub import load_hub
from .loaded import LoadedVae, make_record
from .model import make_posterior_deterministic
from .spec import (_EXPECTED, FILE_OPTIONS, FOLDER_OPTIONS, NotAnAutoencoder, VaeSpec, check_applies, exists,
                   is_hub_id, merge, parse_spec, with_flag)

__all__ = ["load_vae", "load_autoencoder", "load_from_checkpoint", "NotAnAutoencoder", "parse_spec", "with_flag"]


# ----------------------------------------------------------------------------- training runs
def _read_checkpoint(path: str | Path, weights: str = "ema"):
    """(module, checkpoint folder, state) of a training checkpoint (or a run's newest), EMA or raw weights."""
    from .model import build_vae
    from ..config import config_from_dict

    found = runs.find_checkpoint(path)
    state = runs.read_state(found)
    if "vae_config" in state:  # the architecture actually trained (also with model.init_from)
        cls = family_for_class(state["vae_config"].get("_class_name", "AutoencoderKL"), f"{found}/state.json").cls
        vae = cls.from_config(state["vae_config"])
    else:
        vae = build_vae(config_from_dict(state["config"]).model)
    name = {"ema": "ema.safetensors", "raw": "model.safetensors"}.get(weights)
    if name is None:
        raise BadInputError(f"unknown weights {weights!r}; valid choices: ema, raw")
    file = found / name
    if weights == "ema" and not file.is_file():
        raise MissingInputError(f"{found}: no ema.safetensors (EMA was off in this run); use the raw weights "
                                "(--weights raw, weights='raw', or the spec option [weights=raw])")
    vae.load_state_dict(runs.load_tensors(file), strict=True)
    if _run_mode(state) == "ae" and family_of(vae).stochastic:  # DC, TAESD: no posterior to pin
        make_posterior_deterministic(vae)  # its log-variance never trained: sample() must equal mode()
    return vae.eval(), found, state


def _run_mode(state: dict) -> str:
    return state.get("config", {}).get("model", {}).get("mode", "vae")


def load_from_checkpoint(path: str | Path, weights: str = "ema") -> LoadedVae:
    """The VAE of a training checkpoint (or a run's newest), with its EMA or raw weights."""
    vae, found, state = _read_checkpoint(path, weights)
    return _finish(vae, dict(spec=str(path), kind="run", path=found, weights=weights, state=state))


# ----------------------------------------------------------------------------- local paths
def _load_local(spec: VaeSpec, path: Path, weights: Optional[str], norm_num_groups: Optional[int]):
    """A local path -> (module, origin fields)."""
    if path.is_file():
        check_applies(spec, FILE_OPTIONS, "a single weight file")
        return load_single_file(spec, path, norm_num_groups), dict(kind="single-file", path=path)
    sub, file = spec.get("subfolder"), spec.get("file")
    is_run = (path / "checkpoints").is_dir() or (path / "state.json").is_file()
    if sub is None and file is None and is_run and not ((path / "config.json").is_file()
                                                        and not (path / "checkpoints").is_dir()):
        check_applies(spec, ("weights",), "a latentvae training run or checkpoint")
        try:
            vae, found, state = _read_checkpoint(path, weights or "ema")
        except UserError:
            raise
        except (FileNotFoundError, ValueError) as e:  # no complete checkpoint, unreadable state.json / weights
            raise NotAnAutoencoder(str(e)) from e
        return vae, dict(kind="run", path=found, weights=weights or "ema", state=state)
    check_applies(spec, FOLDER_OPTIONS + (("norm_num_groups",) if file else ()), "a folder")
    kind = "folder"
    if (sub is None and file is None and not (path / "config.json").is_file()
            and (path / "model_index.json").is_file()):
        sub, kind = "vae", "pipeline"
        if not (path / sub / "config.json").is_file():
            raise NotAnAutoencoder(f"{path}: a pipeline folder (model_index.json) without vae/config.json; its "
                                   f"components: {', '.join(_components(path)) or 'none'}")
    elif sub is not None and (path / "model_index.json").is_file():
        kind = "pipeline"
    folder = path / sub if sub else path
    if file is not None:
        target = folder / file
        if not target.is_file():
            raise NotAnAutoencoder(f"{spec.text}: no file {target}")
        return load_single_file(spec, target, norm_num_groups), dict(kind="single-file", path=target, subfolder=sub)
    if not folder.is_dir():
        raise NotAnAutoencoder(f"{spec.text}: no folder {folder}")
    if not (folder / "config.json").is_file():
        raise NotAnAutoencoder(f"{folder}: not a diffusers autoencoder folder (config.json + *.safetensors), a "
                               "pipeline folder (model_index.json + vae/) nor a latentvae training run or checkpoint")
    vae, variant = load_diffusers_folder(folder, spec.get("variant"), spec.allow_pickle)
    return vae, dict(kind=kind, path=folder, subfolder=sub, variant=variant)


def _components(path: Path) -> list[str]:
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return sorted(k for k in index if not k.startswith("_")) if isinstance(index, dict) else []


# ----------------------------------------------------------------------------- the record
def _factors_origin(kind: str, path: Optional[Path]) -> str:
    """Where the factors come from: a latentvae export's record says measured or placeholder; a run holds
    diffusers' defaults; anything else is as published."""
    if kind == "run":
        return "run"
    if kind == "taesd":
        return "taesd"
    meta = None
    if path is not None and path.is_dir() and (path / "latentvae_export.json").is_file():
        try:
            meta = json.loads((path / "latentvae_export.json").read_text())
        except (OSError, json.JSONDecodeError):
            meta = None
    elif path is not None and path.is_file() and path.suffix == ".safetensors":
        meta = convert.export_metadata(path)
    if not isinstance(meta, dict):
        return "none" if kind == "single-file" else "published"  # LDM weights hold no factors
    origin = meta.get("scaling_origin", "measured" if meta.get("scaling_measured") in (True, "true") else "placeholder")
    return origin if origin in ("measured", "placeholder") else f"as published: kept by `latentvae export` from {origin}"


def _finish(vae, fields: dict) -> LoadedVae:
    path = fields.get("path")
    fields["path"] = None if path is None else os.path.abspath(path)
    state = fields.pop("state", None)
    stochastic = None if state is None else _run_mode(state) != "ae"
    origin = _factors_origin(fields["kind"], None if path is None else Path(path))
    model = (state or {}).get("config", {}).get("model", {})
    if origin == "run" and model.get("init_from") and model.get("train_decoder_only"):
        # the encoder never trained: the latents, and so the factors of the VAE it started from, are unchanged
        origin = (f"as published: kept from model.init_from={model['init_from']} (a decoder-only fine-tune: the "
                  "encoder and its latents are unchanged)")
    return make_record(vae, fields, stochastic=stochastic, factors_origin=origin)


# ----------------------------------------------------------------------------- the one entry point
def load_vae(path: str | Path, taesd_dir: str | Path | None = None, weights: Optional[str] = None,
             norm_num_groups: Optional[int] = None) -> LoadedVae:
    """Any supported form, as one LoadedVae (module doc):

    `taesd:sd|sdxl|sd3|flux` (from `taesd_dir`, $LATENTVAE_TAESD_DIR or ../shared/weights/taesd),
    an LDM/SD VAE weight file (`norm_num_groups` is not stored in it; all SD-family VAEs use 32),
    a diffusers or pipeline folder of any family, a hub id, or a training run / checkpoint (`weights`:
    ema or raw), each optionally followed by `[key=value,...]` options (`weights` and `norm_num_groups`
    may be given either way; both ways, they must agree).
    """
    spec = parse_spec(path)
    weights = merge(spec, "weights", weights)
    norm_num_groups = merge(spec, "norm_num_groups", norm_num_groups, int)
    if spec.target.startswith(convert.TAESD_PREFIX):
        check_applies(spec, (), "a TAESD reference")
        try:
            vae = convert.load_taesd(spec.target, taesd_dir)
        except (ValueError, FileNotFoundError) as e:
            raise NotAnAutoencoder(str(e)) from e
        folder = Path(taesd_dir) if taesd_dir is not None else convert.default_taesd_dir()
        vae, fields = vae, dict(kind="taesd", path=folder)
    elif exists(spec.target):
        vae, fields = _load_local(spec, Path(spec.target), weights, norm_num_groups)
    elif is_hub_id(spec.target):
        vae, fields = load_hub(spec, norm_num_groups)
    else:
        raise NotAnAutoencoder(f"{spec.target} does not exist (expected {_EXPECTED})")
    return _finish(vae, {**fields, "spec": spec.text})


def load_autoencoder(path: str | Path, **kwargs):
    """`load_vae(path, ...).module`: the diffusers module alone, for code that needs nothing else."""
    return load_vae(path, **kwargs).module
