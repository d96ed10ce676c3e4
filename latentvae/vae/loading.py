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

The module returned is the diffusers one (AutoencoderKL or AutoencoderTiny, eval mode), with
`vae.latentvae_source`: {"spec", "kind" (hub|folder|pipeline|single-file|taesd|run), "path" (the local
folder or file read), "repo_id", "revision" (the hub commit), "subfolder", "variant", "weights" (a run's
ema|raw)}, for manifests and exports.

    vae = load_autoencoder("out/my-vae")
    vae = load_autoencoder("stabilityai/sdxl-vae[variant=fp16]")
    vae = load_autoencoder("runs/quickstart[weights=raw]")
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from diffusers import AutoencoderKL

from .. import runs
from . import convert
from ..config import config_from_dict
from ..errors import BadInputError, MissingInputError, UserError
from .model import AUTOENCODER_CLASSES, diffusers_kwargs, make_posterior_deterministic


class NotAnAutoencoder(UserError, ValueError):
    """A path that holds no autoencoder we can load; the message says what was expected."""


def with_flag(flag: str, spec, e: NotAnAutoencoder) -> NotAnAutoencoder:
    """The same error, its message led by the option that named the path (`--vae PATH ...`)."""
    text = str(e)
    return NotAnAutoencoder(f"{flag} {text}" if text.startswith(str(spec)) else f"{flag} {spec}: {text}")


# ----------------------------------------------------------------------------- the spec string
SPEC_OPTIONS = {
    "subfolder": "the VAE's folder inside a folder or repo",
    "variant": "diffusion_pytorch_model.VARIANT.safetensors",
    "revision": "hub branch, tag or commit",
    "file": "one weight file inside a folder or repo",
    "weights": "ema or raw (a latentvae run)",
    "norm_num_groups": "GroupNorm groups of an LDM file",
    "allow_pickle": "yes: read torch files with weights_only=True",
}
SOURCE_KEYS = ("spec", "kind", "path", "repo_id", "revision", "subfolder", "variant", "weights")
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
WEIGHT_FILE = re.compile(r"diffusion_pytorch_model(?P<shard>-\d+-of-\d+)?(?:\.(?P<variant>[A-Za-z0-9_-]+))?"
                         r"\.(?P<ext>safetensors|bin)")
INDEX_FILE = re.compile(r"diffusion_pytorch_model\.(?P<ext>safetensors|bin)\.index(?:\.(?P<variant>[A-Za-z0-9_-]+))?"
                        r"\.json")
_YES, _NO = ("yes", "true", "1", "on"), ("no", "false", "0", "off")
_EXPECTED = ("a diffusers or pipeline folder, a training run or checkpoint, an LDM .safetensors file, a hub id "
             f"org/name, or one of {', '.join(convert.TAESD_PREFIX + v for v in convert.TAESD_VARIANTS)}")


@dataclass(frozen=True)
class VaeSpec:
    """A parsed spec: `target` (path, hub id or taesd:NAME) and its options, as strings (validated)."""
    text: str
    target: str
    options: dict = field(default_factory=dict)

    def get(self, key: str, default=None):
        return self.options.get(key, default)

    @property
    def allow_pickle(self) -> bool:
        return self.options.get("allow_pickle", "no") in _YES


def parse_spec(spec) -> VaeSpec:
    """`TARGET[key=value,...]` -> VaeSpec; a NotAnAutoencoder naming a bad key (and the valid ones) or value."""
    text = str(spec)
    if not text.endswith("]") or "[" not in text or _exists(text):
        return VaeSpec(text, text)
    target, _, inner = text[:-1].rpartition("[")
    if not target:
        raise NotAnAutoencoder(f"{text}: nothing before the options; expected TARGET[key=value,...]")
    options: dict[str, str] = {}
    for item in (i.strip() for i in inner.split(",")):
        if not item:
            continue
        key, eq, value = (s.strip() for s in item.partition("="))
        if key not in SPEC_OPTIONS:
            raise NotAnAutoencoder(f"{text}: unknown option {key!r}; valid options: {', '.join(SPEC_OPTIONS)}")
        if not eq or not value:
            raise NotAnAutoencoder(f"{text}: option {key} needs a value ({key}=VALUE: {SPEC_OPTIONS[key]})")
        if key in options:
            raise NotAnAutoencoder(f"{text}: option {key} given twice")
        options[key] = _check_value(text, key, value)
    return VaeSpec(text, target, options)


def _exists(path: str) -> bool:
    try:
        return Path(path).exists()
    except OSError:  # a name too long for the file system, ...: not a local path
        return False


def _check_value(text: str, key: str, value: str) -> str:
    bad = None
    if key == "weights" and value not in ("ema", "raw"):
        bad = "ema or raw"
    elif key == "allow_pickle":
        if value.lower() not in _YES + _NO:
            bad = "yes or no"
        value = value.lower()
    elif key == "norm_num_groups" and not (value.isdigit() and int(value) > 0):
        bad = "a positive integer"
    elif key == "variant" and not re.fullmatch(r"[A-Za-z0-9_-]+", value):
        bad = "a name such as fp16 (letters, digits, _ and -)"
    elif key in ("subfolder", "file"):
        parts = value.replace("\\", "/").strip("/").split("/")
        if value.startswith(("/", "~")) or any(p in ("", ".", "..") for p in parts):
            bad = "a relative path inside the folder or repo, without . or .."
        value = "/".join(parts)
    if bad:
        raise NotAnAutoencoder(f"{text}: option {key}={value}: expected {bad}")
    return value


def _check_applies(spec: VaeSpec, allowed: tuple[str, ...], what: str) -> None:
    extra = [k for k in spec.options if k not in allowed]
    if extra:
        raise NotAnAutoencoder(f"{spec.text}: option {extra[0]} does not apply to {what}; options for it: "
                               f"{', '.join(allowed) if allowed else 'none'}")


def _merge(spec: VaeSpec, key: str, given, convert_value=str):
    """A keyword argument and the same spec option: either, or both when they agree."""
    if key not in spec.options:
        return given
    value = convert_value(spec.options[key])
    if given is not None and given != value:
        raise NotAnAutoencoder(f"{spec.text}: option {key}={value} contradicts {key}={given!r} given by the caller")
    return value


def is_hub_id(target: str) -> bool:
    """`org/name`: exactly one slash, hub characters, no `--` or `..` (the hub refuses those)."""
    return bool(HUB_ID.fullmatch(target)) and "--" not in target and ".." not in target


def _record(vae, spec: VaeSpec, kind: str, path=None, **fields):
    fields.update(spec=spec.text, kind=kind, path=None if path is None else os.path.abspath(path))
    vae.latentvae_source = {k: fields.get(k) for k in SOURCE_KEYS}
    return vae


# ----------------------------------------------------------------------------- training runs
def load_from_checkpoint(path: str | Path, weights: str = "ema") -> AutoencoderKL:
    """The VAE of a training checkpoint (or a run's newest), with its EMA or raw weights."""
    found = runs.find_checkpoint(path)
    state = runs.read_state(found)
    if "vae_config" in state:  # the architecture actually trained (also with model.init_from)
        vae = AutoencoderKL.from_config(state["vae_config"])
    else:
        vae = AutoencoderKL(**diffusers_kwargs(config_from_dict(state["config"]).model))
    name = {"ema": "ema.safetensors", "raw": "model.safetensors"}.get(weights)
    if name is None:
        raise BadInputError(f"unknown weights {weights!r}; valid choices: ema, raw")
    file = found / name
    if weights == "ema" and not file.is_file():
        raise MissingInputError(f"{found}: no ema.safetensors (EMA was off in this run); use the raw weights "
                                "(--weights raw, weights='raw', or the spec option [weights=raw])")
    vae.load_state_dict(runs.load_tensors(file), strict=True)
    if state.get("config", {}).get("model", {}).get("mode") == "ae":
        make_posterior_deterministic(vae)  # its log-variance never trained: sample() must equal mode()
    vae.latentvae_source = {**dict.fromkeys(SOURCE_KEYS), "spec": str(path), "kind": "run",
                            "path": os.path.abspath(found), "weights": weights}
    return vae.eval()


# ----------------------------------------------------------------------------- diffusers folders
def choose_weights(names, variant: Optional[str], allow_pickle: bool, where: str,
                   route=None) -> tuple[Optional[str], list[str]]:
    """(variant, files to read) among the file `names` of a diffusers folder: the plain safetensors file
    wins unless `variant` is asked for; without a plain one, the only variant; torch files only with
    `allow_pickle` (else refused, with `route(name)`: how to convert it). A NotAnAutoencoder says what
    is there otherwise."""
    found: dict[str, dict[Optional[str], list[str]]] = {"safetensors": {}, "bin": {}}
    index: dict[tuple[str, Optional[str]], str] = {}
    for name in sorted(names):
        if m := WEIGHT_FILE.fullmatch(name):
            found[m["ext"]].setdefault(m["variant"], []).append(name)
        elif m := INDEX_FILE.fullmatch(name):
            index[m["ext"], m["variant"]] = name

    def files(ext: str, v: Optional[str]) -> tuple[Optional[str], list[str]]:
        extra = [index[ext, v]] if (ext, v) in index else []
        return v, found[ext][v] + extra

    def listed(ext: str) -> str:
        return ", ".join("plain" if v is None else v for v in sorted(found[ext], key=lambda v: v or ""))

    def refuse(name: str):
        return NotAnAutoencoder(f"{where}: only torch weights ({name}); only safetensors are read by default. "
                                + (route or (lambda n: convert.pickle_route(Path(where) / n)))(name))

    if variant is not None:
        if variant in found["safetensors"]:
            return files("safetensors", variant)
        if variant in found["bin"]:
            if not allow_pickle:
                raise refuse(found["bin"][variant][0])
            return files("bin", variant)
        have = "; ".join(f"{ext}: {listed(ext)}" for ext in found if found[ext]) or "no diffusion_pytorch_model weights"
        raise NotAnAutoencoder(f"{where}: no variant {variant!r} (diffusion_pytorch_model.{variant}.safetensors); "
                               f"found {have}")
    for ext in ("safetensors", "bin"):
        if not found[ext]:
            continue
        if ext == "bin" and not allow_pickle:
            raise refuse(next(iter(found["bin"].values()))[0])
        if None in found[ext]:
            return files(ext, None)
        if len(found[ext]) == 1:
            return files(ext, next(iter(found[ext])))
        raise NotAnAutoencoder(f"{where}: several weight variants and no plain file ({listed(ext)}); choose one "
                               f"with the option [variant=NAME]")
    raise NotAnAutoencoder(f"{where}: no diffusion_pytorch_model[.VARIANT].safetensors weights")


def _read_class(path: Path) -> tuple[type, dict]:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise NotAnAutoencoder(f"{path}/config.json: unreadable ({e})") from e
    cls_name = config.get("_class_name") if isinstance(config, dict) else None
    if cls_name not in AUTOENCODER_CLASSES:
        raise NotAnAutoencoder(f"{path}/config.json: _class_name is {cls_name!r}; expected one of "
                               f"{', '.join(AUTOENCODER_CLASSES)}")
    return AUTOENCODER_CLASSES[cls_name], config


def load_diffusers_folder(path: str | Path, variant: Optional[str] = None, allow_pickle: bool = False,
                          names=None):
    """A diffusers autoencoder folder (config.json + weights), the weights chosen by `choose_weights`
    among `names` (default: the folder's files); the chosen variant is in `vae.latentvae_source`."""
    path = Path(path)
    cls, config = _read_class(path)
    if names is None:
        names = [p.name for p in path.iterdir() if p.is_file()]
    variant, files = choose_weights(names, variant, allow_pickle, str(path))
    try:
        if files[0].endswith(".safetensors"):
            vae = cls.from_pretrained(str(path), variant=variant, use_safetensors=True)
        else:  # allowed torch file: read by convert.read_state_dict (weights_only=True), not by diffusers
            if len(files) > 1:
                raise NotAnAutoencoder(f"{path}: sharded torch weights ({', '.join(files)}); convert them to "
                                       "safetensors (diffusers: from_pretrained, then save_pretrained)")
            vae = cls.from_config(config)
            vae.load_state_dict(convert.read_state_dict(path / files[0], allow_pickle=True), strict=True)
    except convert.ConversionError as e:
        raise NotAnAutoencoder(str(e)) from e
    except (OSError, ValueError) as e:  # unreadable/truncated weights, a config that does not fit them
        if isinstance(e, NotAnAutoencoder):
            raise
        raise NotAnAutoencoder(f"{path}: diffusers cannot load this {cls.__name__} folder ({type(e).__name__}: "
                               f"{_first_line(e)})") from e
    except RuntimeError as e:
        if "state_dict" not in str(e) and "size mismatch" not in str(e):
            raise
        raise NotAnAutoencoder(f"{path}: the weights do not fit config.json ({_first_line(e)})") from e
    vae.latentvae_source = {**dict.fromkeys(SOURCE_KEYS), "spec": str(path), "kind": "folder",
                            "path": os.path.abspath(path), "variant": variant}
    return vae.eval()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _load_single_file(spec: VaeSpec, file: Path, norm_num_groups: Optional[int]):
    """An LDM/SD weight file (a torch file refused by convert.read_state_dict without allow_pickle)."""
    try:
        return convert.load_ldm_vae(file, norm_num_groups or 32, allow_pickle=spec.allow_pickle)
    except (convert.ConversionError, FileNotFoundError) as e:
        raise NotAnAutoencoder(str(e)) from e


# ----------------------------------------------------------------------------- local paths
FOLDER_OPTIONS = ("subfolder", "variant", "file", "allow_pickle")
FILE_OPTIONS = ("norm_num_groups", "allow_pickle")


def _load_local(spec: VaeSpec, path: Path, weights: Optional[str], norm_num_groups: Optional[int]):
    if path.is_file():
        _check_applies(spec, FILE_OPTIONS, "a single weight file")
        return _record(_load_single_file(spec, path, norm_num_groups), spec, "single-file", path)
    sub, file = spec.get("subfolder"), spec.get("file")
    is_run = (path / "checkpoints").is_dir() or (path / "state.json").is_file()
    if sub is None and file is None and is_run and not ((path / "config.json").is_file()
                                                        and not (path / "checkpoints").is_dir()):
        _check_applies(spec, ("weights",), "a latentvae training run or checkpoint")
        try:
            vae = load_from_checkpoint(path, weights or "ema")
        except UserError:
            raise
        except (FileNotFoundError, ValueError) as e:  # no complete checkpoint, unreadable state.json / weights
            raise NotAnAutoencoder(str(e)) from e
        return _record(vae, spec, "run", vae.latentvae_source["path"], weights=weights or "ema")
    _check_applies(spec, FOLDER_OPTIONS + (("norm_num_groups",) if file else ()), "a folder")
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
        return _record(_load_single_file(spec, target, norm_num_groups), spec, "single-file", target, subfolder=sub)
    if not folder.is_dir():
        raise NotAnAutoencoder(f"{spec.text}: no folder {folder}")
    if not (folder / "config.json").is_file():
        raise NotAnAutoencoder(f"{folder}: not a diffusers autoencoder folder (config.json + *.safetensors), a "
                               "pipeline folder (model_index.json + vae/) nor a latentvae training run or checkpoint")
    vae = load_diffusers_folder(folder, spec.get("variant"), spec.allow_pickle)
    return _record(vae, spec, kind, folder, subfolder=sub, variant=vae.latentvae_source["variant"])


def _components(path: Path) -> list[str]:
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return sorted(k for k in index if not k.startswith("_")) if isinstance(index, dict) else []


# ----------------------------------------------------------------------------- hub ids
HUB_OPTIONS = ("subfolder", "variant", "revision", "file", "allow_pickle")


def _hub_error(spec: VaeSpec, repo_id: str, revision: Optional[str], e: Exception) -> NotAnAutoencoder:
    """One line: which was tried (no such local path, so the hub id), and why the hub gave nothing."""
    import huggingface_hub as hub
    from huggingface_hub import utils as hu

    def cls(name):
        return getattr(hu, name, None) or getattr(getattr(hub, "errors", None), name, None) or ()

    at = f" at revision {revision}" if revision else ""
    if isinstance(e, cls("GatedRepoError")):
        why = f"{repo_id} is gated: accept its terms on the hub, then log in (`hf auth login` or HF_TOKEN)"
    elif isinstance(e, cls("RevisionNotFoundError")):
        why = f"{repo_id} has no revision {revision!r}"
    elif isinstance(e, cls("RepositoryNotFoundError")):
        why = (f"the hub has no repo {repo_id} (or it is private: log in with `hf auth login` or set HF_TOKEN)")
    elif isinstance(e, cls("IncompleteSnapshotError")):
        why = f"the cached copy of {repo_id}{at} lacks files and the hub could not be reached ({_first_line(e)})"
    elif isinstance(e, cls("LocalEntryNotFoundError")) or isinstance(e, cls("OfflineModeIsEnabled")):
        cache = hub.constants.HF_HUB_CACHE
        if _offline():
            why = (f"{repo_id}{at} is not in the hub cache {cache} and HF_HUB_OFFLINE=1 forbids downloading it "
                   "(download it once online, or point HF_HOME / HF_HUB_CACHE at a cache holding it)")
        else:
            cause = e.__cause__ or e.__context__
            why = (f"{repo_id}{at} is not in the hub cache {cache} and the hub could not be reached"
                   + (f" ({type(cause).__name__}: {_first_line(cause)})" if cause is not None else ""))
    elif isinstance(e, cls("HFValidationError")):
        why = f"not a valid hub id ({_first_line(e)})"
    else:
        why = f"{type(e).__name__}: {_first_line(e)}"
    return NotAnAutoencoder(f"{spec.text}: no local file or folder {spec.target}, so it was tried as a Hugging Face "
                            f"hub id: {why}")


def _offline() -> bool:
    from huggingface_hub import constants

    is_offline = getattr(constants, "is_offline_mode", None)
    return bool(is_offline() if callable(is_offline) else constants.HF_HUB_OFFLINE)


def _snapshot(spec: VaeSpec, repo_id: str, revision: Optional[str], patterns: list[str],
              local_only: bool = False) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                      local_files_only=local_only))
    except Exception as e:  # the hub's errors (HTTP, offline, validation): one line naming the id
        raise _hub_error(spec, repo_id, revision, e) from e


def _hub_listing(repo_id: str, commit: str) -> Optional[list[str]]:
    """The repo's files at `commit` as the hub listed them, or None when the hub did not answer (offline,
    unreachable): the snapshot_download just made cached that listing if it was online."""
    import huggingface_hub as hub

    if _offline():
        return None
    try:
        if hasattr(hub, "get_cached_repo_tree"):
            return [f.path for f in hub.get_cached_repo_tree(repo_id, revision=commit)]
        return hub.list_repo_files(repo_id, revision=commit)  # an older huggingface_hub: ask the hub
    except Exception:  # not listed: the download fell back on the cache (no network, hub down)
        return None


def _names_in(snapshot: Path, prefix: str, listing: Optional[list[str]]) -> list[str]:
    """File names in the repo folder `prefix`: those cached, and those the hub listed."""
    folder = snapshot / prefix if prefix else snapshot
    names = {p.name for p in folder.iterdir() if p.is_file()} if folder.is_dir() else set()
    head = f"{prefix}/" if prefix else ""
    names |= {p[len(head):] for p in listing or () if p.startswith(head) and "/" not in p[len(head):]}
    return sorted(names)


def _in_repo(listing: Optional[list[str]]) -> str:
    return ("in the repo" if listing is not None else
            "in the hub cache (the hub did not answer: HF_HUB_OFFLINE=1, or no connection)")


def _load_hub(spec: VaeSpec, norm_num_groups: Optional[int]):
    repo_id, revision, sub, file = spec.target, spec.get("revision"), spec.get("subfolder"), spec.get("file")
    _check_applies(spec, HUB_OPTIONS + (("norm_num_groups",) if file else ()), "a hub id")
    if file is not None:
        if Path(file).suffix in convert.PICKLE_SUFFIXES and not spec.allow_pickle:  # refused before downloading
            raise NotAnAutoencoder(f"{spec.text}: {file} is a pickle-based torch file; only safetensors are read by "
                                   "default. Add the option [allow_pickle=yes] to read it with "
                                   "torch.load(weights_only=True), or convert it once to safetensors")
        rel = f"{sub}/{file}" if sub else file
        snapshot = _snapshot(spec, repo_id, revision, [rel])
        if not (snapshot / rel).is_file():
            raise NotAnAutoencoder(f"{spec.text} (hub {repo_id}, commit {snapshot.name[:12]}): no file {rel} "
                                   + _in_repo(_hub_listing(repo_id, snapshot.name)))
        return _record(_load_single_file(spec, snapshot / rel, norm_num_groups), spec, "hub", snapshot / rel,
                       repo_id=repo_id, revision=snapshot.name, subfolder=sub)
    first = [f"{sub}/config.json"] if sub else ["config.json", "model_index.json", "vae/config.json"]
    snapshot = _snapshot(spec, repo_id, revision, first)
    commit = snapshot.name
    listing = _hub_listing(repo_id, commit)
    where = f"{spec.text} (hub {repo_id}, commit {commit[:12]})"
    if sub is None and not (snapshot / "config.json").is_file():
        if not (snapshot / "model_index.json").is_file():
            raise NotAnAutoencoder(f"{where}: neither config.json (a diffusers VAE repo) nor model_index.json (a "
                                   f"pipeline repo, whose vae/ is used) {_in_repo(listing)}; for one weight file "
                                   "in it add [file=NAME], for another folder [subfolder=DIR]")
        sub = "vae"
    if not (snapshot / (f"{sub}/config.json" if sub else "config.json")).is_file():
        raise NotAnAutoencoder(f"{where}: no {sub + '/' if sub else ''}config.json {_in_repo(listing)}")
    online = listing is not None
    names = _names_in(snapshot, sub or "", listing)
    head = f"{sub}/" if sub else ""
    variant, files = choose_weights(names, spec.get("variant"), spec.allow_pickle, f"{where}{'/' + sub if sub else ''}",
                                    route=lambda name: f"Download it (hf download {repo_id} {head}{name} --local-dir "
                                                       f"DIR), then " + convert.pickle_route(f"DIR/{head}{name}"))
    snapshot = _snapshot(spec, repo_id, commit, [head + "config.json"] + [head + f for f in files],
                         local_only=not online)  # no second round of retries when the hub did not answer
    missing = [head + f for f in files if not (snapshot / head / f).is_file()]
    if missing:
        raise NotAnAutoencoder(f"{where}: no {', '.join(missing)} {_in_repo(None)}")
    folder = snapshot / sub if sub else snapshot
    vae = load_diffusers_folder(folder, variant, spec.allow_pickle, names=files)
    return _record(vae, spec, "hub", folder, repo_id=repo_id, revision=commit, subfolder=sub, variant=variant)


# ----------------------------------------------------------------------------- the one entry point
def load_autoencoder(path: str | Path, taesd_dir: str | Path | None = None, weights: Optional[str] = None,
                     norm_num_groups: Optional[int] = None):
    """Any supported form, as an eval-mode diffusers autoencoder with `vae.latentvae_source` (module doc):

    `taesd:sd|sdxl|sd3|flux` (from `taesd_dir`, $LATENTVAE_TAESD_DIR or ../shared/weights/taesd),
    an LDM/SD VAE weight file (`norm_num_groups` is not stored in it; all SD-family VAEs use 32),
    a diffusers or pipeline folder, a hub id, or a training run / checkpoint (`weights`: ema or raw),
    each optionally followed by `[key=value,...]` options (`weights` and `norm_num_groups` may be given
    either way; both ways, they must agree).
    """
    spec = parse_spec(path)
    weights = _merge(spec, "weights", weights)
    norm_num_groups = _merge(spec, "norm_num_groups", norm_num_groups, int)
    if spec.target.startswith(convert.TAESD_PREFIX):
        _check_applies(spec, (), "a TAESD reference")
        try:
            vae = convert.load_taesd(spec.target, taesd_dir)
        except (ValueError, FileNotFoundError) as e:
            raise NotAnAutoencoder(str(e)) from e
        folder = Path(taesd_dir) if taesd_dir is not None else convert.default_taesd_dir()
        return _record(vae, spec, "taesd", folder)
    if _exists(spec.target):
        return _load_local(spec, Path(spec.target), weights, norm_num_groups)
    if is_hub_id(spec.target):
        return _load_hub(spec, norm_num_groups)
    raise NotAnAutoencoder(f"{spec.target} does not exist (expected {_EXPECTED})")
