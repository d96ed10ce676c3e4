"""The command line generated from an options dataclass: one argparse argument per field.

    parser = build_parser(DecodeOptions, "latentvae decode")
    opts = parse_options(DecodeOptions, argv, prog="latentvae decode")   # flags -> a checked object

Types decide the flags: `Literal[...]` -> choices; `bool` -> `--flag/--no-flag`; `Optional[bool]` ->
`auto|yes|no`; `tuple[str, ...]` -> a repeatable flag; `int`/`float`/`str` -> a value. Values stay
strings until fields.make_options coerces them (read as YAML unless the field is a string).
"""
from __future__ import annotations

import argparse
import inspect
import types
import typing
from dataclasses import MISSING, fields
from typing import Any, Literal, Optional, Sequence

import yaml

from .fields import flag_name, make_options


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
