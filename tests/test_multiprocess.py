"""Two gloo ranks on the CPU: gradients are synchronised, and 2 x B equals 1 x 2B."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import LPIPS_DIR, tiny_overrides

WORKER = Path(__file__).with_name("ddp_worker.py")


def _launch(nproc, out, overrides, tmp_path, check=True):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(WORKER), str(out)] + overrides
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    if check:
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
    from latentvae.vae.model import build_vae
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
    # the discriminator trained (moved from its initial weights), identically on both ranks, and was saved
    gan = tmp_path / "gan"
    init0, init1, d0, d1 = (load_file(str(gan / f"disc-{w}-rank{r}.safetensors"))
                            for w, r in (("init", 0), ("init", 1), ("final", 0), ("final", 1)))
    saved = load_file(str(gan / "checkpoints" / "checkpoint-00000003" / "disc.safetensors"))
    assert set(d0) == set(saved)
    # parameters; BatchNorm running statistics are per rank between forwards (DDP broadcasts rank 0's
    # buffers at every forward, and the discriminator always runs in train mode, so they are never used)
    params = [k for k in d0 if k.endswith((".weight", ".bias"))]
    assert len(params) >= 6
    for k in params:
        assert torch.equal(init0[k], init1[k]) and torch.equal(d0[k], d1[k]) and torch.equal(d0[k], saved[k]), k
        assert not torch.equal(d0[k], init0[k]), f"{k} did not train"


def test_ranks_that_do_not_share_the_output_folder_stop_at_start(image_folder, tmp_path):
    """Each rank writes its RNG state into the checkpoint folder, so all must see the same one."""
    extra = {"loss.lpips_weight": "0", "train.steps": "2"}
    proc = _launch(2, str(tmp_path / "node{rank}"), tiny_overrides(image_folder, **extra), tmp_path, check=False)
    assert proc.returncode != 0
    assert "process(es) [1] do not see the folder that process 0 writes" in proc.stderr + proc.stdout
    assert not (tmp_path / "node0" / "checkpoints").exists() and not (tmp_path / "node1" / "checkpoints").exists()


@pytest.mark.parametrize("env, name", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_fsdp_and_deepspeed_are_refused_at_start_pointing_to_ddp(env, name, image_folder, tmp_path, monkeypatch):
    """`accelerate launch --use_fsdp/--use_deepspeed` sets these; the run stops before writing anything."""
    from conftest import fresh_trainer
    from latentvae.config import load_config
    from latentvae.errors import UserError
    monkeypatch.setenv(env, "true")
    cfg = load_config(None, tiny_overrides(image_folder, **{"loss.lpips_weight": "0"}))
    with pytest.raises(UserError, match=f"set up for {name}.*train with DDP"):
        fresh_trainer(cfg, tmp_path / "r")
    assert not (tmp_path / "r").exists()
