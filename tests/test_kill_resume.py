"""Killed at any moment, a run resumes to bit-identical weights.

A training run with the GAN, EMA and gradient accumulation is SIGKILLed at several moments in
turn (mid-step, right after a tensor file of a checkpoint is written, just before and just after
the rename that publishes a checkpoint, and at a random moment), resumed each time with
`--resume latest`, and its final checkpoint is compared tensor for tensor with an uninterrupted run.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import tiny_overrides
from helpers_ckpt import assert_same_checkpoint
from latentvae import runs as ckpt

WORKER = Path(__file__).with_name("kill_worker.py")
SETTINGS = {"train.steps": "8", "train.save_every": "2", "train.keep_last": "1", "train.grad_accum": "2",
            "loss.gan": "true", "loss.gan_start": "2", "train.ema_decay": "0.9", "loss.lpips_weight": "0",
            "train.cpu_threads": "1", "train.image_every": "100",
            # pinned: NHWC is `auto` on CUDA and bf16 CPUs, and the layout a restore must keep (fused AdamW)
            "train.channels_last": "true", "train.mixed_precision": "no"}
# kill point -> (complete checkpoints left, files in the staging folder of the next one, or None)
KILLS = {
    "written:model.safetensors:2": ([2], {"model.safetensors", "rng-rank0.safetensors", "rng-rank0.json"}),
    "publish:1": ([2], "complete"),  # state.json written, folder not yet renamed
    "published:1": ([2, 4], None),  # renamed, the older one not yet rotated out
    "step:2": ([2, 4], None),  # mid-update of step 5 (its second micro-step)
    "random": (None, None),
}


def _state_after_kill(run):
    done = [int(ckpt.CKPT_RE.match(p.name).group(1)) for p in ckpt.list_checkpoints(run)]
    staging = [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    files = {f.name for f in staging[0].iterdir()} if staging else None
    return done, ("complete" if files and "state.json" in files else files)


def _start(out, kill, overrides):
    env = {**os.environ, "PYTHONPATH": str(WORKER.parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(WORKER), str(out), "none" if kill == "random" else kill, *overrides]
    return subprocess.Popen(cmd, env=env, cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=120):
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout + stderr


def _kill_at_random(proc, out, rng):
    """SIGKILL a moment after the process's first new checkpoint appears (or let it finish)."""
    before = {p.name for p in ckpt.list_checkpoints(out)}
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        if {p.name for p in ckpt.list_checkpoints(out)} - before:
            time.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    return _finish(proc)


def test_sigkill_at_any_moment_then_resume_gives_bit_identical_weights(image_folder, tmp_path):
    overrides = tiny_overrides(image_folder, **SETTINGS)
    ref = tmp_path / "uninterrupted"
    code, log = _finish(_start(ref, "none", overrides))
    assert code == 0, log[-3000:]

    run, rng = tmp_path / "killed", random.Random(0)
    for kill, expected in KILLS.items():
        proc = _start(run, kill, overrides)
        code, log = _kill_at_random(proc, run, rng) if kill == "random" else _finish(proc)
        assert code in (-signal.SIGKILL, 0), (kill, log[-3000:])
        if kill != "random":
            assert code == -signal.SIGKILL, f"{kill}: the kill point was never reached\n{log[-2000:]}"
            assert _state_after_kill(run) == expected, kill  # the kill landed where it was meant to
        for p in ckpt.list_checkpoints(run):  # whatever was published is complete and verifies
            ckpt.verify(p)
    code, log = _finish(_start(run, "none", overrides))
    assert code == 0, log[-3000:]

    a, b = ckpt.final_dir(ref, 8), ckpt.final_dir(run, 8)
    assert_same_checkpoint(a, b, {"model.safetensors", "ema.safetensors", "disc.safetensors", "optim-d.safetensors"})
    sa, sb = ckpt.read_state(a), ckpt.read_state(b)
    assert sa["micro_step"] == sb["micro_step"] == 16 and sa["scheduler_g"] == sb["scheduler_g"]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["checkpoint-00000008"]  # leftovers cleaned
