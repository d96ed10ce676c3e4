"""A user's mistake on the command line: one line naming the path, flag or key and what was expected,
a non-zero exit, no traceback, and nothing left behind (or, for a rerun, nothing changed).

    python -m pytest -q tests/test_cli_errors.py

Each mistake is tried as a new user would, with relative paths in a folder of its own: a few in
subprocesses (`python -m latentvae ...`, `python eval/demos.py ...`: the whole way, interpreter
included; they start in parallel, two at a time), the rest in-process through `latentvae.cli.main`,
which is the same code path after the interpreter has started.
"""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from conftest import make_photo
from helpers_ckpt import make_run
from latentvae import cli
from latentvae.cache import encode
from latentvae.options import EncodeOptions

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- a user's folder
def tiny_kl(seed: int, levels: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8,) * levels, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, norm_num_groups=4, latent_channels=4,
                         layers_per_block=1)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """vae8 (/8, like SD's), vae8b (same shape, other weights), taesd-like (deterministic), images,
    an empty folder, a file, a saved dataset, a finished cache, an unfinished one, a training run,
    someone's folder of notes and an earlier evaluation report."""
    import datasets

    ws = tmp_path_factory.mktemp("ws")
    tiny_kl(0, 4).save_pretrained(ws / "vae8")
    tiny_kl(1, 4).save_pretrained(ws / "vae8b")
    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=4).save_pretrained(ws / "tiny")
    (ws / "imgs").mkdir()
    for i in range(3):
        make_photo(seed=i).save(ws / "imgs" / f"p{i}.png")
    (ws / "empty").mkdir()
    (ws / "photo.png").write_bytes((ws / "imgs" / "p0.png").read_bytes())
    datasets.Dataset.from_dict({"img": [make_photo(seed=5)]}, features=datasets.Features(
        {"img": datasets.Image()})).save_to_disk(str(ws / "hfds"))
    cwd = os.getcwd()
    os.chdir(ws)  # the cache made as a user makes it, with relative paths
    try:
        encode(EncodeOptions(vae="vae8", data="imgs", out="cache", resolution=32, num_workers=0, progress=False,
                             mixed_precision="no"))
    finally:
        os.chdir(cwd)
    (ws / "unfinished").mkdir()
    (ws / "unfinished" / "encode-settings.json").write_text("{}")
    make_run(ws / "run")
    (ws / "notes").mkdir()
    (ws / "notes" / "todo.txt").write_text("mine")
    (ws / "report").mkdir()
    (ws / "report" / "summary.json").write_text("{}")
    return ws


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """`root` and everything below it: (size, mtime_ns); equal snapshots = nothing added, changed or even
    created and removed again (a folder's mtime changes with its entries)."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in [root, *sorted(root.rglob("*"))]}


def assert_one_line(stderr: str, *names: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


# ----------------------------------------------------------------------------- in subprocesses
# no LPIPS weights anywhere (TORCH_HOME: an empty folder of its own), and torchvision's download fails at once
NO_WEIGHTS = {"LATENTVAE_LPIPS_DIR": "", "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
# id -> (command after the interpreter, extra environment, words the one line must hold, path that must not appear)
SUBPROCESS = {
    "encode-wrong-vae": (["-m", "latentvae", "encode", "--vae", "vea8", "--data", "imgs", "--out", "latents"], {},
                         ["latentvae encode: error:", "--vae vea8", "does not exist", "taesd:sd"], "latents"),
    "decode-other-vae": (["-m", "latentvae", "decode", "cache", "--vae", "vae8b"], {},
                         ["latentvae decode: error:", "--vae vae8b", "not the VAE that made cache", "sha256"], None),
    "evaluate-no-lpips-weights": (["-m", "latentvae", "evaluate", "--vae", "vae8", "--data", "imgs", "--out", "rep"],
                                  NO_WEIGHTS, ["latentvae evaluate: error:", "--lpips-dir", "LATENTVAE_LPIPS_DIR"],
                                  "rep"),
    "demo-resolution-not-a-multiple": ([str(REPO / "eval" / "demos.py"), "interpolate", "--vae", "vae8", "--a",
                                        "imgs/p0.png", "--b", "imgs/p1.png", "--out", "interp", "--resolution", "36"],
                                       {}, ["latentvae demo interpolate: error:", "--resolution 36",
                                            "downsampling factor 8", "use 32 or 40"], "interp"),
    "tradeoff-missing-run": ([str(REPO / "eval" / "tradeoff.py"), "--runs", "vae8", "--runs", "vae9", "--data", "imgs",
                              "--out", "sweep"], {},
                             ["latentvae tradeoff: error:", "--runs vae9 does not exist"], "sweep"),
    "export-inside-its-source": (["-m", "latentvae", "export", "run", "--out", "run/export"], {},
                                 ["latentvae export: error:", "run/export", "inside its source run"], "run/export"),
    # no torch import on these: they answer at once
    "no-command": (["-m", "latentvae"], {}, None, None),
    "unknown-command": (["-m", "latentvae", "encdoe"], {},
                        ["latentvae: error: unknown command 'encdoe'; valid commands: train, export, encode, decode, "
                         "evaluate, probe, tradeoff, demo"], None),
}


@pytest.fixture(scope="module")
def ran(ws, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, dict, dict]]:
    """Every SUBPROCESS case, two at a time; with the workspace before and after."""
    before = snapshot(ws)
    torch_home = str(tmp_path_factory.mktemp("torch-home"))

    def run(case):
        args, extra, _, _ = SUBPROCESS[case]
        return case, subprocess.run([sys.executable, *args], cwd=ws, env=env(TORCH_HOME=torch_home, **extra),
                                    capture_output=True, text=True, timeout=240)
    with ThreadPoolExecutor(2) as pool:
        results = dict(pool.map(run, SUBPROCESS))
    return {case: (proc, before, snapshot(ws)) for case, proc in results.items()}


@pytest.mark.parametrize("case", list(SUBPROCESS))
def test_a_mistake_in_a_subprocess_is_one_line_and_leaves_nothing(ran, ws, case):
    proc, before, after = ran[case]
    _, _, words, gone = SUBPROCESS[case]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    if words is None:  # no command: the usage, then the error
        assert "Traceback" not in proc.stderr
        usage, error = [line for line in proc.stderr.splitlines() if line.strip()]
        assert usage.startswith("usage: latentvae") and "encode" in usage
        assert error.startswith("latentvae: error: no command given; valid commands: train, export, encode")
    else:
        assert_one_line(proc.stderr, *words)
    if gone:
        assert not (ws / gone).exists()
    assert after == before  # nothing anywhere in the user's folder appeared or changed


def test_help_lists_every_command_and_exits_0():
    for flag in ("--help", "-h"):
        proc = subprocess.run([sys.executable, "-m", "latentvae", flag], env=env(), capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0 and proc.stderr == ""
        for name in ("train", "export", "encode", "decode", "evaluate", "tradeoff", "demo"):
            assert any(line.split()[:1] == [name] and len(line.split()) > 2 for line in proc.stdout.splitlines()), name


# ----------------------------------------------------------------------------- in-process
MISTAKES = {  # id -> (argv of `latentvae`, words the one line must hold)
    # encode: every check before OUT is created
    "encode-missing-data": (["encode", "--vae", "vae8", "--data", "imgz", "--out", "new"],
                            ["latentvae encode: error:", "data source imgz does not exist"]),
    "encode-empty-folder": (["encode", "--vae", "vae8", "--data", "empty", "--out", "new"],
                            ["no image files", "found below empty"]),
    "encode-data-is-a-file": (["encode", "--vae", "vae8", "--data", "photo.png", "--out", "new"],
                              ["data source photo.png is a file", "expected an image folder"]),
    "encode-no-image-column": (["encode", "--vae", "vae8", "--data", "hfds", "--out", "new"],
                               ["hfds: no image column 'image'; columns: img", "--image-column"]),
    "encode-resolution-100": (["encode", "--vae", "vae8", "--data", "imgs", "--out", "new", "--resolution", "100"],
                              ["--resolution 100 is not a multiple of the downsampling factor 8", "use 96 or 104"]),
    "encode-vae-is-an-image": (["encode", "--vae", "photo.png", "--data", "imgs", "--out", "new"],
                               ["--vae photo.png", "unknown weight file type '.png'"]),
    "encode-moments-of-a-deterministic-vae": (["encode", "--vae", "tiny", "--data", "imgs", "--out", "new",
                                               "--store", "moments"],
                                              ["--store moments needs a log-variance", "--vae tiny", "--store mean"]),
    "encode-out-not-a-cache": (["encode", "--vae", "vae8", "--data", "imgs", "--out", "notes", "--resolution", "32"],
                               ["--out notes is a non-empty folder that is not a latent cache", "encode-settings.json"]),
    "encode-out-is-a-file": (["encode", "--vae", "vae8", "--data", "imgs", "--out", "photo.png"],
                             ["--out photo.png exists and is not a folder"]),
    "encode-rerun-other-resolution": (["encode", "--vae", "vae8", "--data", "imgs", "--out", "cache", "--resolution",
                                       "16"], ["--out cache holds a cache made with other settings",
                                               "preprocessing.resolution: 32 there, 16 now", "pass a new --out"]),
    "encode-rerun-other-vae": (["encode", "--vae", "vae8b", "--data", "imgs", "--out", "cache", "--resolution", "32"],
                               ["--out cache holds a cache made with other settings", "vae_weights_sha256"]),
    "encode-bad-batch-size": (["encode", "--vae", "vae8", "--data", "imgs", "--out", "new", "--batch-size", "-1"],
                              ["--batch-size must be >= 0 (0: suited to the device), got -1"]),
    "encode-negative-limit": (["encode", "--vae", "vae8", "--data", "imgs", "--out", "new", "--limit", "-1"],
                              ["--limit must be >= 0, got -1"]),
    # decode
    "decode-missing-cache": (["decode", "latentz"], ["latentvae decode: error: cache folder latentz does not exist"]),
    "decode-not-a-cache": (["decode", "imgs"], ["imgs is not a latent cache (no manifest.json)"]),
    "decode-unfinished-cache": (["decode", "unfinished"], ["unfinished/manifest.json not found", "rerun the same"]),
    "decode-other-vae": (["decode", "cache", "--vae", "vae8b"], ["--vae vae8b is not the VAE that made cache"]),
    "decode-limit-0": (["decode", "cache", "--limit", "0"], ["--limit must be >= 1, got 0"]),
    "decode-out-is-a-file": (["decode", "cache", "--out", "photo.png"], ["--out photo.png exists and is not a folder"]),
    # evaluate
    "evaluate-lpips-dir-missing": (["evaluate", "--vae", "vae8", "--data", "imgs", "--out", "new", "--lpips-dir",
                                    "weights"], ["--lpips-dir weights is not a folder", "LATENTVAE_LPIPS_DIR"]),
    "evaluate-out-not-a-report": (["evaluate", "--vae", "vae8", "--data", "imgs", "--out", "notes", "--lpips", "none"],
                                  ["--out notes is a non-empty folder that is not an evaluation report"]),
    "evaluate-data-is-a-file": (["evaluate", "--vae", "vae8", "--data", "photo.png", "--out", "new", "--lpips", "none"],
                                ["data source photo.png is a file", "expected an image folder"]),
    "evaluate-missing-data": (["evaluate", "--vae", "vae8", "--data", "imgz", "--out", "new", "--lpips", "none"],
                              ["latentvae evaluate: error:", "data source imgz does not exist"]),
    "evaluate-dataset-no-image-column": (["evaluate", "--vae", "vae8", "--data", "hfds", "--out", "new", "--lpips",
                                          "none"], ["hfds: no image column 'image'; columns: img", "--image-column"]),
    "evaluate-wrong-vae": (["evaluate", "--vae", "taesd:sd2", "--data", "imgs", "--out", "new", "--lpips", "none"],
                           ["--vae taesd:sd2", "valid choices: taesd:sd, taesd:sdxl"]),
    "evaluate-negative-limit": (["evaluate", "--vae", "vae8", "--data", "imgs", "--out", "new", "--limit", "-1"],
                                ["--limit and --max-side must be >= 0"]),
    "evaluate-device-without-gpu": (["evaluate", "--vae", "vae8", "--data", "imgs", "--out", "new", "--device",
                                     "cuda" if not torch.cuda.is_available() else "nonsense"],
                                    ["latentvae evaluate: error: --device"]),
    # demo: --resolution against every VAE's factor, before any file
    "demo-interpolate-resolution": (["demo", "interpolate", "--vae", "vae8", "--a", "imgs/p0.png", "--b", "imgs/p1.png",
                                     "--out", "new", "--resolution", "36"],
                                    ["latentvae demo interpolate: error: --resolution 36", "factor 8"]),
    "demo-interpolate-missing-image": (["demo", "interpolate", "--vae", "vae8", "--a", "imgs/p0.png", "--b", "p9.png",
                                        "--out", "new", "--resolution", "32"], ["--b p9.png does not exist"]),
    "demo-recon-grid-resolution": (["demo", "recon-grid", "--vae", "tiny", "--vae", "vae8", "--data", "imgs", "--out",
                                    "new.png", "--resolution", "36"], ["--resolution 36", "factor 8", "--vae vae8"]),
    "demo-prior-resolution": (["demo", "prior", "--vae", "vae8", "--data", "imgs", "--out", "new", "--resolution",
                               "20"], ["--resolution 20", "factor 8", "use 16 or 24"]),
    "demo-prior-limit-0": (["demo", "prior", "--vae", "vae8", "--data", "imgs", "--out", "new", "--limit", "0"],
                           ["latentvae demo prior: error: --limit must be >= 1, got 0"]),
    # tradeoff: every check before anything is trained or written
    "tradeoff-unknown-variant": (["tradeoff", "--variants", "mse", "--variants", "l1", "--data", "imgs", "--out",
                                  "new"], ["latentvae tradeoff: error: --variants: unknown variant 'l1'", "mse+lpips"]),
    "tradeoff-runs-and-variants": (["tradeoff", "--runs", "vae8", "--variants", "mse", "--data", "imgs", "--out",
                                    "new"], ["--variants chooses the sweep runs to train; with --runs nothing"]),
    "tradeoff-wrong-run": (["tradeoff", "--runs", "vae8", "--runs", "photo.png", "--data", "imgs", "--out", "new"],
                           ["latentvae tradeoff: error: --runs photo.png", "unknown weight file type '.png'"]),
    # export
    "export-onto-its-run": (["export", "run/checkpoints/checkpoint-00000004", "--out", "run", "--overwrite"],
                            ["latentvae export: error: export target run is its source run"]),
    "export-out-not-empty": (["export", "run", "--out", "notes"], ["--out notes is a non-empty folder that is not an "
                                                                   "earlier export"]),
    "export-missing-run": (["export", "runz", "--out", "new"], ["runz does not exist", "training run"]),
    "export-bad-calibration-resolution": (["export", "run", "--out", "new", "--calibrate", "imgs", "--resolution", "33"],
                                          ["--resolution 33 is not a multiple", "factor 2"]),
    # train: the config is checked before anything is written
    "train-unknown-key": (["train", "--out", "new", "--set", "train.learning_rate=1e-4"],
                          ["latentvae train: error:", "unknown key train.learning_rate", "lr"]),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_a_mistake_is_one_line_exit_2_and_changes_nothing(ws, case, capsys, monkeypatch):
    argv, words = MISTAKES[case]
    monkeypatch.chdir(ws)
    monkeypatch.setenv("LATENTVAE_LPIPS_DIR", "")
    before = snapshot(ws)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert_one_line(capsys.readouterr().err, *words)
    assert snapshot(ws) == before  # no OUT, no staging folder, no change to an existing cache or folder


@pytest.mark.parametrize("argv,flag", [(["decode", "cache", "--lim", "2"], "--lim"),
                                       (["encode", "--vae", "vae8", "--data", "imgs", "--out", "new", "--res", "32"],
                                        "--res"),
                                       (["demo", "interpolate", "--vae", "vae8", "--a", "x", "--b", "y", "--out", "o",
                                         "--st", "2"], "--st"),
                                       (["evaluate", "--vae", "vae8", "--data", "imgs", "--out", "o", "--mixed", "no"],
                                        "--mixed"),
                                       (["tradeoff", "--run", "vae8", "--data", "imgs", "--out", "o"], "--run"),
                                       # the flags' earlier names: --size, --num, --precision
                                       (["demo", "recon-grid", "--vae", "vae8", "--data", "imgs", "--out", "o.png",
                                         "--size", "32"], "--size"),
                                       (["demo", "prior", "--vae", "vae8", "--data", "imgs", "--out", "o",
                                         "--num", "2"], "--num"),
                                       (["evaluate", "--vae", "vae8", "--data", "imgs", "--out", "o", "--precision",
                                         "no"], "--precision")])
def test_abbreviated_flags_are_refused_by_name(ws, argv, flag, capsys, monkeypatch):
    monkeypatch.chdir(ws)
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[0].startswith("usage: latentvae ")
    assert lines[-1].startswith(f"latentvae {argv[0]}") and "error: unrecognized arguments" in lines[-1]
    assert flag in lines[-1]
    assert not (ws / "new").exists() and not (ws / "o").exists()


@pytest.mark.parametrize("argv,flag,value", [
    (["evaluate", "--vae", "vae8", "--data", "imgs", "--out", "new", "--lpips", "squeeze"], "--lpips", "squeeze"),
    (["evaluate", "--vae", "vae8", "--data", "imgs", "--out", "new", "--mixed-precision", "fp8"], "--mixed-precision",
     "fp8")])
def test_an_unknown_choice_names_its_flag_and_the_choices(ws, argv, flag, value, capsys, monkeypatch):
    """A Literal option (--lpips alex,vgg|alex|vgg|none): argparse refuses other values, before any work."""
    monkeypatch.chdir(ws)
    before = snapshot(ws)
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith(f"latentvae {argv[0]}: error: argument {flag}: invalid choice: '{value}'"), last
    assert "choose from" in last
    assert snapshot(ws) == before


def test_module_entry_points_report_alike(ws, capsys, monkeypatch):
    """`python eval/evaluate.py`, `train/train.py`: their main() goes through the same helper."""
    import runpy

    def script(name):  # eval/NAME.py's main(), as `python eval/NAME.py` runs it
        return runpy.run_path(str(REPO / "eval" / f"{name}.py"))["main"]

    monkeypatch.chdir(ws)
    calls = [(cli.script_main("encode"), ["--vae", "vae8", "--data", "empty", "--out", "new"],
              "latentvae encode: error:"),
             (cli.script_main("decode"), ["latentz"], "latentvae decode: error:"),
             (script("evaluate"), ["--vae", "vae8", "--data", "empty", "--out", "new", "--lpips", "none"],
              "latentvae evaluate: error:"),
             (script("demos"), ["prior", "--vae", "vae8", "--data", "empty", "--out", "new"],
              "latentvae demo prior: error:"),
             (script("tradeoff"), ["--runs", "vae8", "--data", "empty", "--out", "new"], "latentvae tradeoff: error:"),
             (cli.script_main("export"), ["runz", "--out", "new"], "latentvae export: error:"),
             (runpy.run_path(str(REPO / "train" / "train.py"))["train_main"], ["--out", "new", "--set", "x=1"],
              "latentvae train: error:")]
    for main, argv, prefix in calls:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert assert_one_line(capsys.readouterr().err).startswith(prefix)
    assert not (ws / "new").exists()


def test_a_bug_keeps_its_traceback(monkeypatch):
    def bug(_argv):
        raise KeyError("a bug, not a mistake")
    with pytest.raises(KeyError):
        cli.run_command("encode", bug, [])


def test_a_message_on_several_lines_is_printed_as_one(capsys):
    from latentvae.errors import BadInputError

    def mistake(_argv):
        raise BadInputError("first\n  second\n\nthird")
    with pytest.raises(SystemExit) as e:
        cli.run_command("encode", mistake, [])
    assert e.value.code == 2 and capsys.readouterr().err == "latentvae encode: error: first second third\n"


def test_a_failed_first_encode_leaves_no_folder(ws, tmp_path, monkeypatch):
    """A new OUT (and the parents made for it) is removed when the run fails before its first shard."""
    import importlib

    enc = importlib.import_module("latentvae.cache.encode")  # the module (latentvae.cache.encode is the function)

    def fail(*_a, **_k):
        raise RuntimeError("the encoder crashed")
    monkeypatch.setattr(enc, "encode_rows", fail)
    with pytest.raises(RuntimeError, match="crashed"):
        encode(EncodeOptions(vae=str(ws / "vae8"), data=str(ws / "imgs"), out=str(tmp_path / "a" / "b" / "latents"),
                             resolution=32, num_workers=0, progress=False, mixed_precision="no"))
    assert list(tmp_path.iterdir()) == []
