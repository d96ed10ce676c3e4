"""Run by test_interrupts.py: a `latentvae` command held at one chosen moment, so that the test's real
signal lands exactly there.

    python tests/interrupt_worker.py MODULE:FUNCTION:N READY COMMAND ARGS...

The N-th call of MODULE.FUNCTION (1-based) first creates the file READY, then sleeps up to 120 s
($INTERRUPT_HOLD_S) before it runs: the test waits for READY and sends its signal (SIGINT, SIGTERM),
which lands in that sleep (a loop that only records the signal, interrupts.StopRequest, sleeps on:
give it a short hold). The other calls run as they are. The command runs as `latentvae COMMAND ARGS` does (cli.main:
its signal handlers, its messages, its exit status).
"""
import importlib
import os
import sys
import time
from pathlib import Path

from latentvae import cli


def hold(target: str, ready: Path) -> None:
    where, name, n = target.rsplit(":", 2)
    module = importlib.import_module(where)
    real, calls = getattr(module, name), [0]

    def held(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(n):
            ready.touch()
            time.sleep(float(os.environ.get("INTERRUPT_HOLD_S", 120)))  # the test's signal ends this
        return real(*args, **kwargs)
    setattr(module, name, held)


if __name__ == "__main__":
    hold(sys.argv[1], Path(sys.argv[2]))
    cli.main(sys.argv[3:])
