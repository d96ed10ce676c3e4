"""A signal (Ctrl-C's SIGINT, SLURM's and Kubernetes' SIGTERM) in encode, export, evaluate and probe: one
line, exit status 128 + the signal, nothing half-written that looks complete, and a rerun that says it
resumed (counts done and to do), distinct from an update after the sources changed.

    python -m pytest -q tests/test_interrupts.py

The signals are real. Most come from the test to a `python -m latentvae`-like subprocess held at a
chosen moment (tests/interrupt_worker.py: it creates a file there and waits, so the signal lands
exactly at that moment); a few are sent by the process to itself at a moment a patch picks (in-process,
through cli.main, whose handlers are the command line's).
"""
from __future__ import annotations

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import make_photo
from latentvae import cli
from latentvae.cache import LatentDataset, encode, from_storage
from latentvae.options import EncodeOptions

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 90  # for a subprocess to reach its held moment (interpreter and torch start included)


# ----------------------------------------------------------------------------- helpers
def photos(folder: Path, n: int, start: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        make_photo(size=(48, 40), seed=i).save(folder / f"p{i:02d}.png")
    return folder


def encode_args(vae_dir, data, out) -> list[str]:
    return ["encode", "--vae", str(vae_dir), "--data", str(data), "--out", str(out), "--resolution", "32",
            "--batch-size", "2", "--shard-size", "2", "--num-workers", "0", "--mixed-precision", "no",
            "--no-progress"]


def options(vae_dir, data, out) -> EncodeOptions:
    """The same settings as encode_args, for the uninterrupted reference made in-process."""
    return EncodeOptions(vae=str(vae_dir), data=str(data), out=str(out), resolution=32, batch_size=2, shard_size=2,
                         num_workers=0, progress=False, mixed_precision="no")


def interrupted(args: list[str], hold: str, sig: int, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    """Run `latentvae ARGS` held at `hold` (interrupt_worker.py), send `sig` once it is there; the finished
    process (stdout, stderr, returncode) and the seconds from the signal to its exit."""
    ready = cwd / f"ready-{time.monotonic_ns()}"
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "interrupt_worker.py"), hold, str(ready), *args],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + WAIT_S
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ready.exists(), f"never reached {hold}: exit {proc.poll()}"
        sent = time.monotonic()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def one_line(err: str, command: str, signame: str, progress: bool = False) -> str:
    """stderr is exactly one line, `latentvae COMMAND: interrupted by SIGNAME: ...`, and no traceback (with
    `progress`: after the command's own progress lines, as evaluate writes them to stderr)."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err and (progress or len(lines) == 1), err
    assert lines[-1].startswith(f"latentvae {command}: interrupted by {signame}: "), lines[-1]
    assert sum(line.startswith("latentvae ") for line in lines) == 1, err
    return lines[-1]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """cli.main in this process: (exit status, stdout, stderr), of this call only."""
    capsys.readouterr()
    try:
        cli.main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    got = capsys.readouterr()
    return code, got.out, got.err


def cache_rows(out: Path) -> dict[tuple[str, bool], dict]:
    """(source_key, flipped) -> row of the shards the manifest lists, each there once; data/ holds exactly those."""
    manifest = json.loads((out / "manifest.json").read_text())
    listed = sorted(Path(s["file"]).name for s in manifest["shards"])
    assert sorted(p.name for p in (out / "data").glob("*.parquet")) == listed
    assert not list((out / "data").glob(".*"))
    rows = [r for name in listed for r in pq.read_table(out / "data" / name).to_pylist()]
    count = Counter((r["source_key"], r["flipped"]) for r in rows)
    assert max(count.values()) == 1, count
    return {(r["source_key"], r["flipped"]): r for r in rows}


def assert_same_cache(out: Path, reference: Path) -> None:
    """The same rows, from the same bytes, with the same latents (up to fp16 rounding: the runs differ in
    thread count) as a cache made in one uninterrupted run."""
    got, want = cache_rows(out), cache_rows(reference)
    assert set(got) == set(want)
    for key in want:
        assert got[key]["source_sha256"] == want[key]["source_sha256"]
        np.testing.assert_allclose(from_storage(got[key]["latent_mean"], "fp16").numpy(),
                                   from_storage(want[key]["latent_mean"], "fp16").numpy(), rtol=2e-3, atol=1e-4)


def whole_shards(out: Path, shard_size: int) -> list[str]:
    """The shards in data/: each readable and full (an interrupted run writes no short last shard), no
    hidden temporaries beside them."""
    data = out / "data"
    assert not list(data.glob(".*")), list(data.glob(".*"))
    names = sorted(p.name for p in data.glob("*.parquet"))
    for name in names:
        assert pq.read_table(data / name).num_rows == shard_size
    return names


# ----------------------------------------------------------------------------- encode
def test_sigint_mid_shard_keeps_whole_shards_and_a_rerun_says_it_resumes(vae_dir, tmp_path, capsys):
    data, out = photos(tmp_path / "imgs", 10), tmp_path / "cache"
    # held while the third shard is being written: its hidden temporary is open
    proc, took = interrupted(encode_args(vae_dir, data, out), "pyarrow.parquet:write_table:3", signal.SIGINT, tmp_path)
    assert proc.returncode == 130 and took < 30
    line = one_line(proc.stderr, "encode", "SIGINT")
    assert line.endswith(f"{out}: 4 of 10 inputs are encoded in 2 shard(s), kept; rerun the same command to resume")
    assert not (out / "manifest.json").exists()
    assert len(whole_shards(out, 2)) == 2  # the shard being written is gone, temporary and all

    code, printed, err = run_cli(encode_args(vae_dir, data, out), capsys)
    assert code == 0 and err == ""
    lines = printed.strip().splitlines()
    assert lines[0] == f"{out}: resuming an interrupted run: 4 of 10 inputs already encoded, 6 to do"
    assert "updated to generation" not in printed
    assert re.search(r"10 rows of 10/10 inputs in 5 shards, 0 failures; this run 6 rows", printed), printed
    encode(options(vae_dir, data, tmp_path / "straight"))
    assert_same_cache(out, tmp_path / "straight")


def test_sigterm_in_an_update_keeps_the_old_generation_and_the_rerun_says_both(vae_dir, tmp_path, capsys):
    data, out = photos(tmp_path / "imgs", 6), tmp_path / "cache"
    encode(options(vae_dir, data, out))
    photos(data, 4, start=6)  # 4 new
    make_photo(size=(48, 40), seed=101).save(data / "p01.png")  # 1 edited: its shard is superseded
    # held at the second batch: the first (p01 and p06) is in a new shard, the carried rows in theirs
    proc, _ = interrupted(encode_args(vae_dir, data, out), "latentvae.cache.encode:encode_rows:2", signal.SIGTERM,
                          tmp_path)
    assert proc.returncode == 143
    line = one_line(proc.stderr, "encode", "SIGTERM")
    assert f"{out}: 7 of 10 inputs are encoded in" in line
    assert line.endswith("readers still see generation 1, whole; rerun the same command to resume")
    m = json.loads((out / "manifest.json").read_text())
    assert m["generation"] == 1 and (out / "update.json").is_file()
    ds = LatentDataset(out, convention=None)  # generation 1 as it was: its 6 rows, every listed shard there
    assert len(ds) == 6 and sorted(ds.data["source_key"]) == [f"p{i:02d}.png" for i in range(6)]

    code, printed, err = run_cli(encode_args(vae_dir, data, out), capsys)
    assert code == 0 and err == ""
    lines = printed.strip().splitlines()
    assert lines[0].startswith(f"{out}: undid an interrupted update")
    assert lines[1] == f"{out}: resuming an interrupted run: 7 of 10 inputs already encoded, 3 to do"
    assert lines[-1] == (f"{out}: updated to generation 2: 4 new, 1 changed, 0 removed input(s), 0 with new "
                         "metadata; 1 row(s) dropped, 1 carried over without re-encoding")
    assert json.loads((out / "manifest.json").read_text())["last_update"]["added"] == 4  # since generation 1
    encode(options(vae_dir, data, tmp_path / "straight"))
    assert_same_cache(out, tmp_path / "straight")


def signal_self_at(monkeypatch, target, name: str, sig: int, call: int = 1) -> None:
    """The `call`-th call of target.name sends `sig` to this process before it runs."""
    real, calls = getattr(target, name), [0]

    def patched(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)
    monkeypatch.setattr(target, name, patched)


def test_sigint_before_the_first_shard_removes_the_new_folder(vae_dir, tmp_path, capsys, monkeypatch):
    data, out = photos(tmp_path / "imgs", 3), tmp_path / "new" / "cache"
    signal_self_at(monkeypatch, pq, "write_table", signal.SIGINT)
    code, printed, err = run_cli(encode_args(vae_dir, data, out), capsys)
    assert code == 130 and "Traceback" not in err
    assert err.strip() == (f"latentvae encode: interrupted by SIGINT: {out}: stopped before its first shard; "
                           "the new folder is removed; rerun the same command")
    assert not (tmp_path / "new").exists()


def test_an_update_stopped_before_its_manifest_is_committed_by_the_rerun(vae_dir, tmp_path, capsys, monkeypatch):
    """Every new shard written, the signal before the commit: the rerun has nothing left to encode, and still
    commits the shards (a resume always writes its manifest) and says both what it resumed and what changed."""
    encode_module = importlib.import_module("latentvae.cache.encode")  # the package's `encode` is the function
    data, out = photos(tmp_path / "imgs", 4), tmp_path / "cache"
    encode(options(vae_dir, data, out))
    photos(data, 2, start=4)
    signal_self_at(monkeypatch, encode_module, "build_manifest", signal.SIGINT)
    code, _, err = run_cli(encode_args(vae_dir, data, out), capsys)
    assert code == 130
    assert err.strip().endswith(f"{out}: 6 of 6 inputs are encoded in 3 shard(s), kept; readers still see generation "
                                "1, whole; rerun the same command to resume")
    monkeypatch.undo()
    code, printed, _ = run_cli(encode_args(vae_dir, data, out), capsys)
    assert code == 0
    assert f"{out}: resuming an interrupted run: 6 of 6 inputs already encoded, 0 to do" in printed
    assert f"{out}: updated to generation 2: 2 new, 0 changed" in printed
    assert len(cache_rows(out)) == 6 and json.loads((out / "manifest.json").read_text())["generation"] == 2


def test_a_real_update_says_updated_and_a_rerun_with_nothing_changed_says_nothing_more(vae_dir, tmp_path, capsys):
    data, out = photos(tmp_path / "imgs", 4), tmp_path / "cache"
    code, printed, _ = run_cli(encode_args(vae_dir, data, out), capsys)
    assert code == 0 and len(printed.strip().splitlines()) == 1  # a first run: its summary only
    (data / "p03.png").unlink()
    photos(data, 1, start=4)
    code, printed, _ = run_cli(encode_args(vae_dir, data, out), capsys)
    assert code == 0 and "resuming" not in printed
    assert printed.strip().splitlines()[-1] == (f"{out}: updated to generation 2: 1 new, 0 changed, 1 removed "
                                                "input(s), 0 with new metadata; 1 row(s) dropped, 1 carried over "
                                                "without re-encoding")
    code, printed, _ = run_cli(encode_args(vae_dir, data, out), capsys)
    assert code == 0 and len(printed.strip().splitlines()) == 1 and "this run 0 rows" in printed


# ----------------------------------------------------------------------------- export, evaluate
def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_sigterm_in_an_export_leaves_the_earlier_export_as_it_was(vae_dir, tmp_path, capsys):
    from diffusers import AutoencoderKL

    parent = tmp_path / "exports"
    out = parent / "vae"
    assert run_cli(["export", str(vae_dir), "--out", str(out)], capsys)[0] == 0
    before = snapshot(parent)
    # held before the staged copy is reloaded and compared: weights and config are there, not yet checked
    proc, _ = interrupted(["export", str(vae_dir), "--out", str(out), "--overwrite"], "latentvae.export.job:verify:1",
                          signal.SIGTERM, tmp_path)
    assert proc.returncode == 143
    line = one_line(proc.stderr, "export", "SIGTERM")
    assert line.endswith(f"{out}: export not written (it is renamed into place only once whole); the earlier one is "
                         "unchanged; rerun the same command")
    assert snapshot(parent) == before  # no staging folder, no temporary, the old export untouched
    AutoencoderKL.from_pretrained(out)


def test_sigterm_while_a_report_is_written_leaves_no_report(vae_dir, tmp_path):
    data, out = photos(tmp_path / "imgs", 2), tmp_path / "reports" / "report"
    # held inside the staging folder, per_image.csv and summary.json written, the plot and report.md not
    proc, _ = interrupted(["evaluate", "--vae", str(vae_dir), "--data", str(data), "--out", str(out), "--lpips", "none",
                           "--device", "cpu", "--mixed-precision", "no"], "latentvae.evaluate.report:plot_spectra:1",
                          signal.SIGTERM, tmp_path)
    assert proc.returncode == 143
    line = one_line(proc.stderr, "evaluate", "SIGTERM", progress=True)
    assert line.endswith(f"{out}: report not written (it is renamed into place only once whole); rerun the same "
                         "command")
    assert list((tmp_path / "reports").iterdir()) == []  # not the report, not its hidden staging folder


def test_a_signal_just_after_the_report_is_published_says_it_is_whole(vae_dir, tmp_path, capsys, monkeypatch):
    import latentvae.fsutil as ev  # staged_folder publishes through it

    data, out = photos(tmp_path / "imgs", 1), tmp_path / "report"
    real = ev.publish_folder

    def publish_then_signal(staging, target):
        real(staging, target)
        os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(ev, "publish_folder", publish_then_signal)
    code, _, err = run_cli(["evaluate", "--vae", str(vae_dir), "--data", str(data), "--out", str(out), "--lpips",
                            "none", "--device", "cpu", "--mixed-precision", "no"], capsys)
    assert code == 143
    assert err.strip().splitlines()[-1] == (f"latentvae evaluate: interrupted by SIGTERM: {out}: the report was whole "
                                            "and in place when the signal came")
    assert json.loads((out / "summary.json").read_text())["settings"]["images"] == 1


# ----------------------------------------------------------------------------- probe
def probe_args(cache: Path, out: Path, steps: int) -> list[str]:
    return ["probe", "--cache", str(cache), "--out", str(out), "--preset", "test", "--steps", str(steps),
            "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "5", "--log-every", "5", "--save-every", "0",
            "--samples", "4", "--sample-steps", "2", "--report-to", "none", "--ema-decay", "0.9"]


def test_sigint_in_a_probe_checkpoints_the_step_and_the_rerun_says_where_it_resumes(vae_dir, tmp_path, capsys,
                                                                                   monkeypatch):
    import latentvae.probe.training as pr  # where train_steps draws its batches

    cache, out = tmp_path / "cache", tmp_path / "probe"
    encode(EncodeOptions(vae=str(vae_dir), data=str(photos(tmp_path / "imgs", 3)), out=str(cache), resolution=16,
                         preprocess="crops", crops=4, num_workers=0, progress=False, mixed_precision="no"))
    assert run_cli(probe_args(cache, out, 10), capsys)[0] == 0  # an earlier, finished probe: its report goes
    signal_self_at(monkeypatch, pr, "batch_for", signal.SIGINT, call=5)  # in step 14 of 20 (10 were done)
    code, printed, err = run_cli(probe_args(cache, out, 20), capsys)
    assert code == 130 and "Traceback" not in err
    assert f"{cache.name} seed 0: resuming from step 10 of 20, 10 to do" in printed
    assert "SIGINT: finishing the current step and writing a checkpoint" in printed
    assert err.strip() == (f"latentvae probe: interrupted by SIGINT: {out}: 0 of 1 probe run(s) trained to step 20, "
                           f"checkpoints of {cache.name} seed 0 at step 15; rerun the same command to resume")
    assert not (out / "summary.json").exists() and not (out / "report.md").exists()
    monkeypatch.undo()
    code, printed, _ = run_cli(probe_args(cache, out, 20), capsys)
    assert code == 0 and f"{cache.name} seed 0: resuming from step 15 of 20, 5 to do" in printed
    resumed = json.loads((out / "summary.json").read_text())["caches"][cache.name]
    assert run_cli(probe_args(cache, tmp_path / "straight", 20), capsys)[0] == 0
    straight = json.loads((tmp_path / "straight" / "summary.json").read_text())["caches"][cache.name]
    assert resumed["heldout_loss_mean"] == pytest.approx(straight["heldout_loss_mean"], rel=1e-6)


# ----------------------------------------------------------------------------- tradeoff
FAKE_TRAINING = """
import signal, sys, time
from pathlib import Path
run = Path(sys.argv[1])
def stop(signum, frame):  # as the trainer does: finish the step (a while), write a checkpoint, exit 128 + signum
    time.sleep(0.5)
    ckpt = run / "checkpoints" / "checkpoint-00000003"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text("{}")
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
(run.parent / "training-ready").touch()
time.sleep(60)
"""
# as `accelerate launch` is: it starts the training and waits, passing no signal on (SIGTERM ends it at once)
FAKE_LAUNCHER = "import subprocess, sys; subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]]).wait()"


def test_sigterm_in_a_sweep_lets_the_training_write_its_checkpoint(tmp_path, capsys, monkeypatch):
    """The signal is passed on to the training under its launcher, and the sweep waits until it has written its
    checkpoint (subprocess.run killed the launcher at once, and the training was never told)."""
    import threading

    import latentvae.tradeoff as tr

    out = tmp_path / "sweep"
    monkeypatch.setattr(tr, "train_command", lambda run, *a: [sys.executable, "-c", FAKE_LAUNCHER, FAKE_TRAINING,
                                                                   str(run)])

    def signal_when_training():
        deadline = time.monotonic() + 30
        while not (out / "runs" / "training-ready").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=signal_when_training, daemon=True).start()
    code, _, err = run_cli(["tradeoff", "--data", str(tmp_path), "--out", str(out), "--variants", "mse",
                            "--steps", "5"], capsys)
    assert code == 143
    run = out / "runs" / "mse"
    assert err.strip().splitlines()[-1] == (f"latentvae tradeoff: interrupted by SIGTERM: {run}: mse stopped, its "
                                            f"checkpoint-00000003 is kept (log: {out / 'runs' / 'mse.log'}); rerun "
                                            "the same command to resume")
    assert (run / "checkpoints" / "checkpoint-00000003" / "state.json").is_file()


def test_a_resume_after_sources_changed_says_what_changed_since_it_stopped(vae_dir, tmp_path, capsys, monkeypatch):
    """No finished generation to update, but rows of the stopped run whose images changed: both are said."""
    data, out = photos(tmp_path / "imgs", 6), tmp_path / "cache"
    signal_self_at(monkeypatch, pq, "write_table", signal.SIGINT, call=3)  # after 2 shards: p00-p03
    assert run_cli(encode_args(vae_dir, data, out), capsys)[0] == 130
    monkeypatch.undo()
    make_photo(size=(48, 40), seed=100).save(data / "p00.png")
    (data / "p03.png").unlink()
    code, printed, _ = run_cli(encode_args(vae_dir, data, out), capsys)
    assert code == 0
    assert printed.splitlines()[0] == (f"{out}: resuming an interrupted run: 2 of 5 inputs already encoded, 3 to do; "
                                       "since it stopped 1 input(s) changed, 1 removed, 0 with new metadata")
    assert "updated to generation" not in printed
    assert set(k for k, _ in cache_rows(out)) == {f"p{i:02d}.png" for i in (0, 1, 2, 4, 5)}
