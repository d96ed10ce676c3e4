"""Signals that stop a command: SIGINT (Ctrl-C), SIGTERM (what SLURM, Kubernetes and spot instances send
before they kill) and SIGUSR1 (SLURM's `--signal`).

    with on_signals_raise():            # the command line, around every command
        ...                             # a signal raises Interrupted here, wherever the main thread is

    with StopRequest(log) as stop:      # training: stop at the next safe point instead
        for batch in loader:
            ...
            if stop.agreed(acc):        # once per optimizer update, the same answer on every process
                ...write a checkpoint, then raise stop.interrupted(...)

Two ways to stop, one exit status (128 + the signal's number: 130 for SIGINT, 143 for SIGTERM, 138 for
SIGUSR1, as a shell reports a process a signal ended):
- at once (every command): the signal raises `Interrupted` in the main thread; `finally` blocks run and
  the atomic writes (fsutil, the cache's shards, the export's staging folder) leave nothing half-written
  that looks complete. The command line prints one line, `latentvae COMMAND: interrupted by SIGTERM: ...`.
- at a safe point (training): the first signal only records itself; the loop finishes the optimizer
  update it is in, writes a checkpoint and raises `Interrupted` with the resume command. A second signal
  more than GRACE_S after the first exits at once (`os._exit`): the last complete checkpoint still
  resumes exactly, since a checkpoint is published by one rename after it is whole (runs.py). Signals
  within GRACE_S of the first count as the same request: Ctrl-C under `torchrun`/`accelerate launch`
  reaches each process from the terminal and again, as SIGTERM, from the launcher.

`Interrupted` derives from BaseException, as KeyboardInterrupt does, so no `except Exception` swallows it.
A command whose output is published by one rename at its end (export, evaluate) says with
`says_if_published` whether the signal came before or after it. DataLoader worker processes ignore these signals
(`ignore_in_worker`): their parent stops them, and a worker killed by the SIGTERM that SLURM sends
every process would otherwise fail the parent's step.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

GRACE_S = 2.0  # a second signal within this many seconds of the first is the same request
SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_status(signum: int) -> int:
    """128 + the signal's number: what a shell reports for a process that signal ended."""
    return 128 + int(signum)


class Interrupted(BaseException):
    """A command stopped by a signal. `message`: one line for the user (empty on processes other than
    the first, which stay quiet); `status`: the exit status the command line uses."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message)
        self.signum, self.message = int(signum), message

    @property
    def status(self) -> int:
        return exit_status(self.signum)

    @property
    def name(self) -> str:
        return signal_name(self.signum)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def installed(handler: Callable) -> Iterator[None]:
    """`handler` for every signal of SIGNALS while inside; the previous handlers are put back after.
    Outside the main thread (where Python cannot set handlers) nothing is installed."""
    if not _main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _raise(signum, frame) -> None:
    raise Interrupted(signum)


@contextmanager
def on_signals_raise() -> Iterator[None]:
    """Every signal of SIGNALS raises Interrupted in the main thread (SIGINT too, instead of the
    KeyboardInterrupt whose traceback is the default)."""
    with installed(_raise):
        yield


class StopRequest:
    """The first signal asks to stop at the loop's next safe point; a second one, later than GRACE_S
    after it, exits at once. `log` prints the one line said when the request arrives."""

    def __init__(self, log: Callable[[str], None] = print, what: str = "the current step"):
        self.log, self.what = log, what
        self.signum: Optional[int] = None
        self.at = 0.0
        self._cm = None

    def __enter__(self) -> "StopRequest":
        self._cm = installed(self._handle)
        self._cm.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._cm.__exit__(*exc)

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self.at = signum, now
            self.log(f"{signal_name(signum)}: finishing {self.what} and writing a checkpoint "
                     f"(a second signal exits at once)")
            return
        if now - self.at < GRACE_S:
            return  # the same request, delivered twice (terminal and launcher)
        sys.stdout.flush()
        print(f"second signal ({signal_name(signum)}): exiting at once; the last complete checkpoint "
              "resumes exactly", file=sys.stderr, flush=True)
        os._exit(exit_status(signum))

    @property
    def requested(self) -> bool:
        """A signal reached this process (only this one: use `agreed` to decide when to stop)."""
        return self.signum is not None

    def agreed(self, acc) -> bool:
        """True on every process once any process got a signal: one all-reduce (max) over processes,
        so all stop after the same update. With one process, no collective."""
        if acc.num_processes == 1:
            return self.requested
        import torch
        import torch.distributed as dist

        flag = torch.tensor([self.signum or 0], dtype=torch.int64, device=acc.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        got = int(flag.item())
        if got and self.signum is None:
            self.signum = got  # another process's signal: stop with its name and status
        return bool(got)

    def interrupted(self, message: str) -> Interrupted:
        return Interrupted(self.signum or signal.SIGTERM, message)


@contextmanager
def says_if_published(path, what: str) -> Iterator[None]:
    """Around a command whose output (`what` at `path`: an export, a report) is renamed into place whole at
    its very end (fsutil): an Interrupted from inside gets the line saying whether it got there before
    the signal (the rename changes the (device, inode) of `path`)."""
    from .fsutil import entry_id

    before = entry_id(path)
    try:
        yield
    except Interrupted as e:
        if entry_id(path) != before:
            raise Interrupted(e.signum, f"{path}: the {what} was whole and in place when the signal came") from None
        kept = "; the earlier one is unchanged" if before else ""
        raise Interrupted(e.signum, f"{path}: {what} not written (it is renamed into place only once whole){kept}; "
                                    "rerun the same command") from None


def ignore_in_worker(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: the worker ignores SIGNALS (its parent process stops it)."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
