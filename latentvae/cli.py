"""Command-line entry points: `latentvae train|export|encode|decode|evaluate` and train/train.py."""
from __future__ import annotations

import argparse
import sys

from .config import MODEL_PRESETS, ConfigError, load_config


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description="Train a KL-regularized VAE with Accelerate.")
    p.add_argument("--config", help="YAML file of overrides (see configs/)")
    p.add_argument("--output-dir", required=True, help="run folder: checkpoints, logs, samples")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help=f"override one key, e.g. train.lr=1e-4 or model.preset=sd "
                        f"(presets: {', '.join(MODEL_PRESETS)})")
    p.add_argument("--resume", help="'latest' (this output dir's newest checkpoint) or a checkpoint folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to TensorBoard)")
    return p


def train_main(argv=None) -> None:
    args = _train_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    from .trainer import Trainer  # heavy imports after the config is known to be good

    Trainer(cfg, args.output_dir, resume=args.resume, show_progress=not args.no_progress).run()


# subcommand -> "module:function"; each function takes argv (list of str) and owns its parser
COMMANDS = {
    "train": "latentvae.cli:train_main",
    "export": "latentvae.export:main",
    "encode": "latentvae.encode:main",
    "decode": "latentvae.encode:decode_main",
    "evaluate": "latentvae.evaluate:main",
}


def main(argv=None) -> None:
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        sys.exit(f"usage: latentvae {{{','.join(COMMANDS)}}} ...  (latentvae COMMAND --help for its options)")
    module, func = COMMANDS[argv[0]].split(":")
    getattr(importlib.import_module(module), func)(argv[1:])
