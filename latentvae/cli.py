"""Command-line entry points: `latentvae train|export|encode|decode|evaluate|demo` and train/train.py.

A user's mistake (any `errors.UserError`: a wrong path, flag or key) is printed as one line,
`latentvae COMMAND: error: MESSAGE`, on stderr, and the command exits with status 2; anything
else is a bug and keeps its traceback. `run_command` does that for every entry point, whether it
is reached through `latentvae COMMAND`, `python -m latentvae.encode` or `python eval/evaluate.py`.
This module imports nothing heavy, so `latentvae --help` answers at once.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from .errors import UserError

PROG = "latentvae"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Option defaults shown in --help (unless None/off, or the help text already states its default);
    descriptions printed as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def make_parser(prog: str, description: Optional[str] = None, **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser as every latentvae command has it: no abbreviated flags (`--n` is not
    `--num`), defaults shown in --help."""
    kwargs.setdefault("formatter_class", HelpFormatter)
    return argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False, **kwargs)


def one_line(message: str) -> str:
    """A message as one line: its lines joined by spaces."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def run_command(name: str, func: Callable[[Optional[Sequence[str]]], None], argv=None) -> None:
    """Run `func(argv)`; a UserError becomes `latentvae NAME: error: MESSAGE` on stderr (one line) and
    exit status 2. Other exceptions propagate with their traceback. A script (NAME ending in .py)
    is named as is."""
    try:
        func(argv)
    except UserError as e:
        prog = name if name.endswith(".py") else f"{PROG} {name}"
        print(f"{prog}: error: {one_line(str(e)) or type(e).__name__}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------- train
def _train_parser() -> argparse.ArgumentParser:
    from .config import MODEL_PRESETS

    p = make_parser("train.py", "Train a KL-regularized VAE with Accelerate.")
    p.add_argument("--config", help="YAML file of overrides (see configs/)")
    p.add_argument("--output-dir", required=True, help="run folder: checkpoints, logs, samples")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help=f"override one key, e.g. train.lr=1e-4 or model.preset=sd "
                        f"(presets: {', '.join(MODEL_PRESETS)})")
    p.add_argument("--resume", help="'latest': this run's newest checkpoint that verifies (falling back to the previous "
                   "one if damaged; with none yet, start from step 0), or a checkpoint folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to TensorBoard)")
    return p


def _train(argv=None) -> None:
    from .config import load_config

    args = _train_parser().parse_args(argv)
    cfg = load_config(args.config, args.set)  # ConfigError: one line, before anything heavy is imported
    from .trainer import Trainer

    Trainer(cfg, args.output_dir, resume=args.resume, show_progress=not args.no_progress).run()


def train_main(argv=None) -> None:
    """`latentvae train ...` = `accelerate launch train/train.py ...`"""
    run_command("train", _train, argv)


# ----------------------------------------------------------------------------- latentvae COMMAND
# subcommand -> ("module:function", one-line description); each function takes argv (list of str),
# owns its parser and is itself wrapped in run_command (so `python -m latentvae.encode` behaves alike)
COMMANDS = {
    "train": ("latentvae.cli:train_main", "train a VAE or autoencoder (= accelerate launch train/train.py)"),
    "export": ("latentvae.export:main", "export a training run to a diffusers folder, with measured latent scaling"),
    "encode": ("latentvae.encode:main", "encode images or a dataset to a resumable parquet cache of latents"),
    "decode": ("latentvae.encode:decode_main", "decode random rows of a latent cache; PSNR against the sources"),
    "evaluate": ("latentvae.evaluate:main", "compare autoencoders side by side: PSNR, SSIM, LPIPS, sharpness, speed"),
    "demo": ("latentvae.demos:main", "the lecture's pictures: recon-grid, prior, interpolate (= eval/demos.py)"),
}
USAGE = f"usage: {PROG} [-h] {{{','.join(COMMANDS)}}} ..."


def help_text() -> str:
    from . import __version__

    width = max(map(len, COMMANDS))
    lines = [USAGE, "", f"latentvae {__version__}: train, export, encode with and evaluate the VAEs that latent "
             "diffusion models run in.", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", f"`{PROG} COMMAND --help` lists a command's options."]
    return "\n".join(lines)


def _usage_error(message: str, usage: bool = True) -> None:
    if usage:
        print(USAGE, file=sys.stderr)
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None) -> None:
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    valid = ", ".join(COMMANDS)
    if not argv:
        _usage_error(f"no command given; valid commands: {valid} (`{PROG} --help` describes them)")
    if argv[0] in ("-h", "--help"):
        print(help_text())
        sys.exit(0)
    if argv[0] not in COMMANDS:
        what = "option" if argv[0].startswith("-") else "command"
        _usage_error(f"unknown {what} {argv[0]!r}; valid commands: {valid}", usage=False)
    module, func = COMMANDS[argv[0]][0].split(":")
    run_command(argv[0], getattr(importlib.import_module(module), func), argv[1:])
