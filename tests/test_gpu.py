"""What only a CUDA device can show; skipped elsewhere, run by benchmarks/gpu_check.sh on a lent GPU.

Issue 16: no host syncs inside a gradient-accumulation window (each would stall the GPU until the
host catches up); the update itself reads the gradient norms' finiteness: one sync, two with the
GAN (its discriminator's norm)."""
import warnings

import pytest
import torch

from conftest import fresh_trainer
from latentvae.train.step import train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (benchmarks/gpu_check.sh runs it on one)")


@pytest.mark.parametrize("gan", [False, True])
def test_no_host_sync_inside_the_accumulation_window(tiny_config, tmp_path, gan):
    cfg = tiny_config(**{"train.grad_accum": "3", "train.mixed_precision": "auto", "train.ema_decay": "0.999",
                         "loss.gan": "true" if gan else "false", "loss.gan_start": "0"})
    trainer = fresh_trainer(cfg, tmp_path / "run")
    p, st = trainer.parts, trainer.state
    assert p.precision == "bf16" or not torch.cuda.is_bf16_supported()
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).pin_memory()  # as the training DataLoader hands batches over
    for _ in range(3):  # one whole window first: lazy initialisation (cuBLAS, cuDNN) may sync
        train_step(p, st, x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing CUDA call raises
    try:
        for _ in range(2):
            assert train_step(p, st, x) is None  # forward, losses, backward: no update yet
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logs = train_step(p, st, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert logs is not None and st.step == 2
    assert len(syncs) <= (2 if gan else 1), [str(w.message) for w in syncs]
