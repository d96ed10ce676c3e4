"""Run by test_kill_resume.py: train with `--resume latest`, and SIGKILL this process at a chosen moment.

    python tests/kill_worker.py OUT KILL --set section.key=value ...

KILL is one of
    none                  train to the end
    step:N                in the middle of this process's N-th micro-step (after the autoencoder's
                          backward, before the discriminator and the update)
    written:NAME:N        right after the N-th file called NAME is written into a staging folder
    publish:N             in the N-th checkpoint commit, just before the rename that publishes it
    published:N           in the N-th checkpoint commit, just after that rename (before old ones rotate out)
The kill is a real SIGKILL: no exception handler, `finally` or atexit runs.

SIGNALS@KILL instead sends real signals to this process at that moment and trains through the command
line (`latentvae train`), as a user's run would: SIGNALS is one name or several joined by "+" (TERM, INT,
USR1), and several SIGNALS@KILL joined by "," arm several moments. interrupts.GRACE_S is made 0, so a
second signal counts however soon it follows the first. Under torchrun, "SPEC0;SPEC1" gives rank r its
own spec ("" = none).
"""
import os
import signal
import sys
import time
from pathlib import Path

from latentvae import cli, interrupts
from latentvae import runs as ckpt
from latentvae.config import load_config
from latentvae.train import Trainer, step


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def signaller(names: str):
    """send(): the named signals to this process, one after another."""
    def send() -> None:
        for i, name in enumerate(names.split("+")):
            if i:
                time.sleep(0.05)
            os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
    return send


def arm(kill: str, act=die) -> None:
    kind, *args = kill.split(":")
    count = {"n": 0}

    def hit(n: int) -> None:
        count["n"] += 1
        if count["n"] == n:
            act()

    if kind == "step":
        real = step.generator_step
        step.generator_step = lambda *a, **k: (real(*a, **k), hit(int(args[0])))[0]
    elif kind == "written":
        name, n = args[0], int(args[1])
        for fn in ("save_tensors", "write_json"):
            real_fn = getattr(ckpt, fn)

            def patched(path, *a, _real=real_fn, **k):
                _real(path, *a, **k)
                if Path(path).name == name:
                    hit(n)
            setattr(ckpt, fn, patched)
    elif kind in ("publish", "published"):
        real_publish = ckpt.publish_folder
        calls = {"n": 0}

        def publish_folder(staging, target):  # commit: fsync_dir(staging); publish_folder (the rename)
            calls["n"] += 1
            if kind == "publish" and calls["n"] == int(args[0]):
                act()
            real_publish(staging, target)
            if kind == "published" and calls["n"] == int(args[0]):
                act()
        ckpt.publish_folder = publish_folder
    elif kind != "none":
        raise SystemExit(f"unknown kill point {kill!r}")


if __name__ == "__main__":
    out, kill = Path(sys.argv[1]), sys.argv[2]
    if ";" in kill:
        kill = kill.split(";")[int(os.environ.get("RANK", "0"))] or "none"
    overrides = [a for a in sys.argv[3:] if a != "--set"]
    if "@" in kill:
        interrupts.GRACE_S = 0.0
        for part in kill.split(","):
            names, point = part.split("@", 1)
            arm(point, signaller(names))
        sets = [w for item in overrides for w in ("--set", item)]
        cli.main(["train", "--out", str(out), "--resume", "latest", "--no-progress", *sets])
    else:
        arm(kill)
        trainer = Trainer(load_config(None, overrides), out, resume="latest", show_progress=False)
        trainer.run()
