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


# ----------------------------------------------------------------------------- the command line
def flag_name(f: dataclasses.Field) -> str:
    """How the field is named on the command line: `--image-column`, or `SRC` for a positional."""
    if f.metadata.get("positional"):
        return f.metadata.get("metavar") or f.name.upper()
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown in --help (unless None/off, or the help already says); descriptions as written."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
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
    parser = make_parser(prog, description if description is not None else (cls.__doc__ or "").strip())
    add_options(parser, cls)
    return parser


def parse_options(cls: type, argv: Optional[Sequence[str]], prog: str, description: Optional[str] = None) -> Any:
    """Parse `argv` into a checked `cls` instance (argparse errors exit 2 with the usage, as argparse does)."""
    ns = build_parser(cls, prog, description).parse_args(argv)
    return make_options(cls, values_from_namespace(cls, ns))
