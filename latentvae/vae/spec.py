"""The spec string that names a VAE for every job: `TARGET` or `TARGET[key=value,key=value]` (loading.py's doc).

    spec = parse_spec("org/pipe[variant=fp16,revision=v1]")   # VaeSpec(target="org/pipe", options={...})

Parsing only: unknown keys, bad values and options that do not apply are one-line NotAnAutoencoder
errors naming the spec and the valid choices.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from . import convert


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
    if not text.endswith("]") or "[" not in text or exists(text):
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


def exists(path: str) -> bool:
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


def check_applies(spec: VaeSpec, allowed: tuple[str, ...], what: str) -> None:
    extra = [k for k in spec.options if k not in allowed]
    if extra:
        raise NotAnAutoencoder(f"{spec.text}: option {extra[0]} does not apply to {what}; options for it: "
                               f"{', '.join(allowed) if allowed else 'none'}")


def merge(spec: VaeSpec, key: str, given, convert_value=str):
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


FOLDER_OPTIONS = ("subfolder", "variant", "file", "allow_pickle")
FILE_OPTIONS = ("norm_num_groups", "allow_pickle")
HUB_OPTIONS = ("subfolder", "variant", "revision", "file", "allow_pickle")
