"""Preemption: SIGTERM, SIGINT and SIGUSR1 stop training after the current update with a checkpoint.

A run with the GAN, EMA and gradient accumulation gets real signals at chosen moments (mid-step,
mid-checkpoint; a second signal mid-checkpoint), through `latentvae train` as a user's run would. Each
time: the exit status says which signal, one line says where it stopped and how to resume, and that
resume command, run as printed, ends at weights identical tensor for tensor to an uninterrupted run.
Two gloo ranks signalled at different moments stop at the same step.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_photo, tiny_overrides
from helpers_ckpt import assert_same_checkpoint
from latentvae import runs as ckpt

WORKER = Path(__file__).with_name("kill_worker.py")
SETTINGS = {"train.steps": "8", "train.save_every": "4", "train.keep_last": "3", "train.grad_accum": "2",
            "loss.gan": "true", "loss.gan_start": "2", "train.ema_decay": "0.9", "loss.lpips_weight": "0",
            "train.cpu_threads": "1", "train.image_every": "100", "train.channels_last": "true",
            "train.mixed_precision": "no"}
ENV = {"PYTHONPATH": str(WORKER.parents[1]), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i in range(5):
        make_photo(seed=i).save(folder / f"img{i}.png")
    return folder


def _worker(out: Path, spec: str, overrides: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(WORKER), str(out), spec, *overrides], env={**os.environ, **ENV},
                          cwd=out.parent, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> Path:
    """The last checkpoint of an uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = _worker(out, "none", tiny_overrides(images, **SETTINGS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ckpt.final_dir(out, 8)


def _same_checkpoint(a: Path, b: Path) -> None:
    assert_same_checkpoint(a, b, {"model.safetensors", "ema.safetensors", "disc.safetensors", "optim-g.safetensors"})


def _interrupted_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("latentvae train: interrupted by")]
    assert len(lines) == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


def _resume_as_printed(line: str, cwd: Path) -> subprocess.CompletedProcess:
    words = shlex.split(line.split("resume with: ", 1)[1])
    assert words[:2] == ["latentvae", "train"] and words[-2:] == ["--resume", "latest"]
    return subprocess.run([sys.executable, "-m", "latentvae", *words[1:], "--no-progress"], env={**os.environ, **ENV},
                          cwd=cwd, capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("spec,signum,stop,kept", [
    ("TERM@step:3", signal.SIGTERM, 2, [2]),  # mid-update 2 (micro-steps 3 and 4): finish it, checkpoint it
    ("INT@step:9", signal.SIGINT, 5, [4, 5]),  # Ctrl-C mid-update 5
    ("USR1@written:model.safetensors:1", signal.SIGUSR1, 4, [4]),  # during step 4's own checkpoint: no extra step
])
def test_a_signal_finishes_the_update_checkpoints_it_and_the_printed_resume_is_exact(
        images, reference, tmp_path, spec, signum, stop, kept):
    run = tmp_path / "run"
    overrides = tiny_overrides(images, **SETTINGS)
    proc = _worker(run, spec, overrides)
    assert proc.returncode == 128 + signum, proc.stderr[-3000:]
    line = _interrupted_line(proc)
    assert f"interrupted by {signal.Signals(signum).name}: stopped at step {stop} of 8; checkpoint " in line
    assert str(ckpt.final_dir(run, stop)) in line
    assert "a second signal exits at once" in proc.stdout + proc.stderr  # said when the signal arrived
    assert [int(ckpt.CKPT_RE.match(p.name).group(1)) for p in ckpt.list_checkpoints(run)] == kept
    for p in ckpt.list_checkpoints(run):
        ckpt.verify(p)
    assert ckpt.read_state(ckpt.final_dir(run, stop))["micro_step"] == 2 * stop

    again = _resume_as_printed(line, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {ckpt.final_dir(run, stop)} at step {stop}" in again.stdout
    _same_checkpoint(reference, ckpt.final_dir(run, 8))


def test_a_second_signal_exits_at_once_and_the_last_complete_checkpoint_resumes_exactly(images, reference, tmp_path):
    run = tmp_path / "run"
    overrides = tiny_overrides(images, **SETTINGS)
    # the first SIGTERM mid-update 6; the second while that stop's checkpoint is being written
    proc = _worker(run, "TERM@step:11,TERM@written:model.safetensors:2", overrides)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert "second signal (SIGTERM): exiting at once" in proc.stderr and "Traceback" not in proc.stderr
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["checkpoint-00000004"]  # step 6's never published
    assert (run / "checkpoints" / ".checkpoint-00000006.tmp").is_dir()
    again = _worker(run, "none", overrides)  # --resume latest
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and "checkpoint-00000004 at step 4" in again.stdout
    _same_checkpoint(reference, ckpt.final_dir(run, 8))


def _torchrun(out: Path, spec: str, overrides: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(out), spec, *overrides]
    return subprocess.run(cmd, env={**os.environ, **ENV, "ACCELERATE_USE_CPU": "1"}, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_two_ranks_signalled_at_different_moments_stop_at_the_same_step(images, tmp_path):
    overrides = tiny_overrides(images, **{**SETTINGS, "train.steps": "6", "train.grad_accum": "1",
                                          "train.save_every": "6", "train.keep_last": "1"})
    ref = _torchrun(tmp_path / "ref", "none", overrides, tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    # rank 1 gets SIGTERM in its 2nd update, rank 0 only in its 5th: both must stop after update 2
    proc = _torchrun(tmp_path / "run", "TERM@step:5;TERM@step:2", overrides, tmp_path)
    out = proc.stdout + proc.stderr
    # torchrun reports its workers' status 143 as its own failure (with its own traceback); ours print none
    assert proc.returncode != 0 and "exitcode  : 143" in out, out[-3000:]
    assert 'kill_worker.py", line' not in out and f'{WORKER.parents[1] / "latentvae"}' not in out, out[-3000:]
    lines = [ln for ln in out.splitlines() if "latentvae train: interrupted by SIGTERM" in ln]
    assert len(lines) == 1 and "stopped at step 2 of 6" in lines[0], out[-3000:]  # the first process speaks
    stopped = ckpt.final_dir(tmp_path / "run", 2)
    ckpt.verify(stopped)  # both ranks' RNG states are in it: both wrote the same step's checkpoint
    assert {"rng-rank0.safetensors", "rng-rank1.safetensors"} <= {p.name for p in stopped.iterdir()}
    again = _torchrun(tmp_path / "run", "none", overrides, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    _same_checkpoint(ckpt.final_dir(tmp_path / "ref", 6), ckpt.final_dir(tmp_path / "run", 6))
