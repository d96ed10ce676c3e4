"""Options for every job: frozen dataclasses, one coercion and validation path, a generated CLI.

A job's settings are one frozen dataclass; each field says its default and its help text with
`opt`, and an optional `check()` method holds the cross-field rules:

    @dataclass(frozen=True)
    class DecodeOptions:
        cache: str = opt(REQUIRED, "folder written by `latentvae encode`", positional=True)
        limit: int = opt(8, "decode this many random rows")

    opts = parse_options(DecodeOptions, argv, prog="latentvae decode")  # flags generated from the fields
    opts = make_options(DecodeOptions, {"cache": "latents/", "limit": 4})  # the same path from a dict

The package, by concept: fields.py (opt, coerce, make_options: the machinery without argparse),
parser.py (the flags generated from the fields), common.py (names and checks the jobs share), and one
module per job family: train.py (train, tradeoff), export.py, cache.py (encode, decode), evaluate.py
(evaluate, probe, the demos). Everything is importable from here: `from latentvae.options import
EncodeOptions, make_options`.
"""
from .cache import DecodeOptions, EncodeOptions
from .common import DATA_HELP, PRECISION_HELP, VAE_HELP, DataKind, Precision
from .evaluate import EvaluateOptions, InterpolateOptions, PriorOptions, ProbeOptions, ReconGridOptions
from .export import ExportOptions
from .fields import REQUIRED, OptionError, apply, check, coerce, flag_name, make_options, opt, validated
from .parser import (HelpFormatter, add_options, build_parser, make_parser, parse_options,
                     values_from_namespace)
from .train import TradeoffOptions, TrainOptions

__all__ = ["DATA_HELP", "PRECISION_HELP", "REQUIRED", "VAE_HELP", "DataKind", "DecodeOptions", "EncodeOptions",
           "EvaluateOptions", "ExportOptions", "HelpFormatter", "InterpolateOptions", "OptionError", "Precision",
           "PriorOptions", "ProbeOptions", "ReconGridOptions", "TradeoffOptions", "TrainOptions", "add_options",
           "apply", "build_parser", "check", "coerce", "flag_name", "make_options", "make_parser", "opt",
           "parse_options", "validated", "values_from_namespace"]
