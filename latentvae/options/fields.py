"""The options machinery, without argparse: `opt` fields, one coercion path, checked construction.

    @dataclass(frozen=True)
    class DecodeOptions:
        cache: str = opt(REQUIRED, "folder written by `latentvae encode`", positional=True)
        limit: int = opt(8, "decode this many random rows")

    opts = make_options(DecodeOptions, {"cache": "latents/", "limit": 4})   # coerced, then check()
    cfg_section = apply(section, {"lr": 1e-4}, name="train")               # training's --set path

Every value goes through `coerce` (the same for flags, `--set` and library callers), and a wrong one
raises `OptionError` naming the key or flag and what was expected. parser.py turns the same fields
into flags.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import MISSING, field, fields, replace
from typing import Any, Literal, Optional

from ..errors import UserError


def parse_size(value, label: str) -> tuple[int, int]:
    """A frame size as (H, W): N (or "N") is N x N, "HxW" or "H,W" is H x W, sides >= 1; OptionError naming
    `label` (the flag or key) otherwise. The one parser of --resolution HxW and data.frame_size."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX,]\s*(\d+)\s*)?", str(value)) if isinstance(value, str) else None
    if not m or int(m[1]) < 1 or (m[2] is not None and int(m[2]) < 1):
        raise OptionError(f"{label} {value!r}: expected a side N or HEIGHTxWIDTH in pixels (e.g. 480x832)")
    return int(m[1]), int(m[2] or m[1])


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
        for arm in inner[:-1]:  # each arm in order (Union[int, str]: 256, then "480x832"); the last one's error
            try:
                return coerce(key, value, arm)
            except OptionError:
                pass
        return coerce(key, value, inner[-1])
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


def flag_name(f: dataclasses.Field) -> str:
    """How the field is named on the command line: `--image-column`, or `SRC` for a positional."""
    if f.metadata.get("positional"):
        return f.metadata.get("metavar") or f.name.upper()
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")
