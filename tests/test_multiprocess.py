"""Two gloo ranks on the CPU: gradients are synchronised, and 2 x B equals 1 x 2B."""
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import LPIPS_DIR, tiny_overrides

WORKER = Path(__file__).with_name("ddp_worker.py")


def _launch(nproc, out, overrides, tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(WORKER), str(out)] + overrides
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_ranks_hold_identical_weights_equal_to_one_rank_with_twice_the_batch(image_folder, tmp_path):
    extra = {"model.mode": "ae", "train.cpu_threads": "1", "train.steps": "4", "train.save_every": "4", "train.image_every": "4"}
    if LPIPS_DIR:
        extra["loss.lpips_dir"] = LPIPS_DIR
    else:
        extra["loss.lpips_weight"] = "0"
    two = _launch(2, tmp_path / "two", tiny_overrides(image_folder, **{**extra, "train.batch_size": "2"}), tmp_path)
    assert "2 process(es)" in two.stdout
    r0, r1 = (load_file(str(tmp_path / "two" / f"final-rank{r}.safetensors")) for r in (0, 1))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    _launch(1, tmp_path / "one", tiny_overrides(image_folder, **{**extra, "train.batch_size": "4"}), tmp_path)
    one = load_file(str(tmp_path / "one" / "final-rank0.safetensors"))
    from latentvae.config import load_config
    from latentvae.model import build_vae
    torch.manual_seed(0)
    init = build_vae(load_config(None, ["model.preset=test"]).model).state_dict()
    for k in r0:
        # equal up to summation order; Adam can turn a rounding difference in a near-zero gradient
        # into a full step on that element, so compare norms against how far training moved
        moved = (one[k] - init[k]).norm()
        assert moved > 0, k
        assert (r0[k] - one[k]).norm() <= 1e-6 + 0.02 * moved, (k, float((r0[k] - one[k]).norm()), float(moved))


def test_two_ranks_with_the_gan_and_accumulation_stay_in_sync(image_folder, tmp_path):
    extra = {"loss.gan": "true", "loss.gan_start": "1", "train.grad_accum": "2", "train.steps": "3",
             "train.save_every": "3", "train.image_every": "3", "loss.lpips_weight": "0"}
    _launch(2, tmp_path / "gan", tiny_overrides(image_folder, **extra), tmp_path)
    r0, r1 = (load_file(str(tmp_path / "gan" / f"final-rank{r}.safetensors")) for r in (0, 1))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    disc = load_file(str(next((tmp_path / "gan" / "checkpoints").glob("checkpoint-*")) / "disc.safetensors"))
    assert disc  # the discriminator trained and was saved
