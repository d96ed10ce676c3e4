"""Run by test_cache_update.py: `latentvae encode ARGS`, SIGKILLed at a chosen moment of an update.

    python tests/encode_kill_worker.py KILL encode-args...

KILL is one of
    shard:RANK:N     right after the N-th shard of process rank RANK is renamed into place
                     (RANK 999: the shards that carry rows of superseded shards over)
    committed        right after the new manifest generation is written, before the superseded
                     shards are deleted
The kill is a real SIGKILL: no exception handler, `finally` or atexit runs.
"""
import os
import signal
import sys

from latentvae import cli
from latentvae.cache import update, writer


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(kill: str) -> None:
    kind, *args = kill.split(":")
    if kind == "shard":
        rank, n = int(args[0]), int(args[1])
        real = writer.ShardWriter.write

        def write(self, count):
            real(self, count)
            if self.rank == rank and len(self.written) == n:
                die()
        writer.ShardWriter.write = write
    elif kind == "committed":  # encode imports `finish` from update when it runs
        update.finish = lambda *a, **k: die()
    else:
        raise SystemExit(f"unknown kill point {kill}")


if __name__ == "__main__":
    arm(sys.argv[1])
    cli.main(["encode", *sys.argv[2:]])
