"""The training entry point as a user runs it: bad configs rejected, bad images skipped and listed."""
import os
import subprocess
import sys
from pathlib import Path

from conftest import make_photo, tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def _train(args, tmp_path, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "2", **(env_extra or {})}
    cmd = [sys.executable, str(REPO / "train" / "train.py")] + args
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_misspelled_key_exits_at_once_naming_the_valid_keys(tmp_path):
    proc = _train(["--out", str(tmp_path / "r"), "--set", "train.learning_rate=1e-4"], tmp_path)
    assert proc.returncode != 0
    assert "unknown key train.learning_rate; valid keys in 'train': seed, steps, batch_size" in proc.stderr
    assert not (tmp_path / "r").exists()  # nothing written for a run that never started


def test_bad_images_are_skipped_listed_and_the_run_finishes(image_folder, tmp_path):
    (image_folder / "zero.jpg").write_bytes(b"")
    (image_folder / "readme.png").write_text("not a png")
    make_photo((30, 30)).convert("CMYK").save(image_folder / "cmyk.jpg")
    overrides = tiny_overrides(image_folder, **{"data.val_count": "0", "data.num_workers": "1", "train.steps": "4",
                                                "data.resolution": "24", "data.val_resolution": "24",
                                                "loss.lpips_weight": "0"})
    args = ["--out", str(tmp_path / "r"), "--no-progress"] + [a for o in overrides for a in ("--set", o)]
    proc = _train(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    listed = (tmp_path / "r" / "skipped_images.txt").read_text()
    assert "zero.jpg: empty file" in listed and "readme.png: cannot decode" in listed
    assert "cmyk.jpg" not in listed  # converted, not skipped
    assert (tmp_path / "r" / "checkpoints" / "checkpoint-00000004" / "state.json").is_file()


def test_missing_lpips_weights_stop_the_run_with_instructions(image_folder, tmp_path):
    overrides = tiny_overrides(image_folder, **{"loss.lpips_dir": str(tmp_path / "no-weights")})
    args = ["--out", str(tmp_path / "r")] + [a for o in overrides for a in ("--set", o)]
    proc = _train(args, tmp_path)
    assert proc.returncode != 0
    assert "loss.lpips_dir=" in proc.stderr and "is not a folder" in proc.stderr and "LATENTVAE_LPIPS_DIR" in proc.stderr


def test_help_answers_without_importing_torch_and_every_command_is_a_function():
    """`latentvae --help` and `latentvae train --help` stay fast: the jobs import their modules (and torch)
    only when they run."""
    code = ("import sys; from latentvae import cli\n"
            "for argv in (['--help'], ['train', '--help'], ['demo', '--help']):\n"
            "    try: cli.main(argv)\n"
            "    except SystemExit as e: assert e.code == 0, argv\n"
            "assert all(callable(c.run) for c in [*cli.COMMANDS.values(), *cli.DEMOS.values()])\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'accelerate') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert "flux2-small: flux2 [32, 64, 128, 128] z=32" in proc.stdout  # the presets, with their families
