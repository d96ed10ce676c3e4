"""One command line: `latentvae train|export|encode|decode|evaluate|demo|tradeoff`, generated from options.

Each subcommand is an options dataclass (options/) and a plain function that runs the job (below,
each importing its job module when called): the flags, their help and defaults come from the
dataclass, so a new option is one field.
`python -m latentvae ...`, `accelerate launch -m latentvae ...`, `train/train.py` and the eval/
scripts all come here.

A user's mistake (any `errors.UserError`: a wrong path, flag or key) is printed as one line,
`latentvae COMMAND: error: MESSAGE`, on stderr, and the command exits with status 2; anything
else is a bug and keeps its traceback. Nothing heavy is imported before a job runs, so `--help`
answers at once.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from . import options as o
from .errors import UserError

PROG = "latentvae"


@dataclass(frozen=True)
class Command:
    options: type  # the options dataclass
    run: Callable[[Any], Any]  # the job, taking the options object
    summary: str  # one line for `latentvae --help`
    epilog: Optional[Callable[[], str]] = None  # extra --help text, built on demand


# The jobs: each imports its module when it runs, so `latentvae --help` imports no torch.
def train(opts):
    from .train import run
    return run(opts)


def export(opts):
    from .export import run
    return run(opts)


def encode(opts):
    from .cache.encode import run
    return run(opts)


def decode(opts):
    from .cache.verify import run
    return run(opts)


def evaluate(opts):
    from .evaluate import run
    return run(opts)


def probe(opts):
    from .probe import run
    return run(opts)


def tradeoff(opts):
    from .tradeoff import run
    return run(opts)


def recon_grid(opts):
    from .demos import run_recon_grid
    return run_recon_grid(opts)


def prior(opts):
    from .demos import run_prior
    return run_prior(opts)


def interpolate(opts):
    from .demos import run_interpolate
    return run_interpolate(opts)


def _config_keys() -> str:
    from .config import describe_keys
    return describe_keys()


COMMANDS: dict[str, Command] = {
    "train": Command(o.TrainOptions, train, "train a VAE or autoencoder of any family, from scratch (model.preset) "
                     "or from any VAE (model.init_from) (= accelerate launch train/train.py)", _config_keys),
    "export": Command(o.ExportOptions, export, "export any VAE to a diffusers folder or one single file, with "
                      "measured latent scaling"),
    "encode": Command(o.EncodeOptions, encode, "encode images, videos or a dataset to a resumable parquet cache of "
                      "latents"),
    "decode": Command(o.DecodeOptions, decode, "decode random rows of a latent cache; PSNR against the sources"),
    "evaluate": Command(o.EvaluateOptions, evaluate, "compare autoencoders side by side: PSNR, SSIM, LPIPS, "
                        "sharpness, speed; on videos per-frame figures, temporal PSNR, FVD, strips"),
    "probe": Command(o.ProbeOptions, probe, "the second number: how easily a small diffusion model learns each "
                     "cache's latent space"),
    "tradeoff": Command(o.TradeoffOptions, tradeoff, "the blur tradeoff: train or take several autoencoders, "
                        "evaluate, plot"),
}
DEMOS: dict[str, Command] = {
    "recon-grid": Command(o.ReconGridOptions, recon_grid, "original | reconstruction | |error|, per VAE"),
    "prior": Command(o.PriorOptions, prior, "decode z ~ N(0, I); how far it is from the encoder's latents"),
    "interpolate": Command(o.InterpolateOptions, interpolate, "linear and spherical latent interpolation, PNG + GIF"),
}
SUMMARIES = {**{k: c.summary for k, c in COMMANDS.items()},
             "demo": "the lecture's pictures: " + ", ".join(DEMOS)}


def one_line(message: str) -> str:
    """A message as one line: its lines joined by spaces."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def run_command(name: str, func: Callable[[Optional[Sequence[str]]], None], argv=None) -> None:
    """Run `func(argv)`; a UserError becomes `latentvae NAME: error: MESSAGE` on stderr (one line) and
    exit status 2. SIGINT, SIGTERM and SIGUSR1 raise interrupts.Interrupted (a job may stop at a safe point
    first), which becomes `latentvae NAME: interrupted by SIGNAL: MESSAGE` (one line; none on processes
    other than the first) and exit status 128 + the signal's number. Other exceptions propagate with
    their traceback."""
    from .interrupts import Interrupted, on_signals_raise

    try:
        with on_signals_raise():
            func(argv)
    except UserError as e:
        print(f"{PROG} {name}: error: {one_line(str(e)) or type(e).__name__}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        if e.message or is_first_process():
            sys.stdout.flush()
            print(f"{PROG} {name}: interrupted by {e.name}" + (f": {one_line(e.message)}" if e.message else ""),
                  file=sys.stderr, flush=True)
        sys.exit(e.status)


def is_first_process() -> bool:
    """RANK 0, or no launcher: the process that speaks for a multi-process command."""
    import os
    return os.environ.get("RANK", "0") == "0"


def _invoke(cmd: Command, prog: str, argv: Sequence[str]) -> None:
    parser = o.build_parser(cmd.options, prog)
    if cmd.epilog is not None and ("-h" in argv or "--help" in argv):
        parser.epilog = cmd.epilog()
    cmd.run(o.make_options(cmd.options, o.values_from_namespace(cmd.options, parser.parse_args(argv))))


def _usage_error(usage: str, message: str, show_usage: bool = True) -> None:
    if show_usage:
        print(usage, file=sys.stderr)
    print(f"{usage.split()[1] if show_usage else PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _dispatch(table: dict[str, Command], argv: list[str], prog: str, summaries: dict[str, str]) -> None:
    usage = f"usage: {prog} [-h] {{{','.join(summaries)}}} ..."
    valid = ", ".join(summaries)
    if not argv:
        _usage_error(usage, f"no command given; valid commands: {valid} (`{prog} --help` describes them)")
    if argv[0] in ("-h", "--help"):
        width = max(map(len, summaries))
        print("\n".join([usage, "", "commands:", *(f"  {k:<{width}}  {v}" for k, v in summaries.items()), "",
                         f"`{prog} COMMAND --help` lists a command's options."]))
        sys.exit(0)
    name = argv[0]
    if name == "demo" and table is COMMANDS:
        _dispatch(DEMOS, argv[1:], f"{prog} demo", {k: c.summary for k, c in DEMOS.items()})
        return
    if name not in table:
        what = "option" if name.startswith("-") else "command"
        print(f"{prog}: error: unknown {what} {name!r}; valid commands: {valid}", file=sys.stderr)
        sys.exit(2)
    label = f"{prog} {name}"
    run_command(label[len(PROG) + 1:], lambda a: _invoke(table[name], label, a), argv[1:])


def main(argv: Optional[Sequence[str]] = None) -> None:
    """`latentvae COMMAND [options]`"""
    _dispatch(COMMANDS, list(sys.argv[1:] if argv is None else argv), PROG, SUMMARIES)


def train_main(argv: Optional[Sequence[str]] = None) -> None:
    """train/train.py: `accelerate launch train/train.py ...` = `latentvae train ...`"""
    main(["train", *(sys.argv[1:] if argv is None else argv)])


def script_main(command: str) -> Callable[[Optional[Sequence[str]]], None]:
    """The main() of a thin script under eval/: `latentvae COMMAND` with the script's arguments."""
    def run(argv: Optional[Sequence[str]] = None) -> None:
        main([*command.split(), *(sys.argv[1:] if argv is None else argv)])
    return run
