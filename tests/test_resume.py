"""Resume edge cases: a finished run, an empty folder, the GAN switched on, damaged checkpoints, fsync."""
from __future__ import annotations

import os

import pytest
import torch

from conftest import fresh_trainer
from latentvae import runs as ckpt
from latentvae import fsutil


def _tensors(path):
    return {f.name: ckpt.load_tensors(f) for f in sorted(path.glob("*.safetensors"))}


def _run(cfg, out, resume=None):
    trainer = fresh_trainer(cfg, out, resume=resume)
    trainer.run()
    return trainer


@pytest.fixture
def cfg(tiny_config):
    return tiny_config(**{"train.steps": "4", "train.save_every": "2", "loss.lpips_weight": "0"})


def test_resuming_a_finished_run_trains_no_extra_step(cfg, tmp_path, capsys):
    _run(cfg, tmp_path / "r")
    before = _tensors(ckpt.final_dir(tmp_path / "r", 4))
    mtime = (ckpt.final_dir(tmp_path / "r", 4) / "state.json").stat().st_mtime_ns
    trainer = _run(cfg, tmp_path / "r", resume="latest")
    assert trainer.state.step == 4 and trainer.state.micro_step == 4
    assert "already at step 4 of train.steps=4; nothing to train" in capsys.readouterr().out
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "r")][-1] == "checkpoint-00000004"
    assert (ckpt.final_dir(tmp_path / "r", 4) / "state.json").stat().st_mtime_ns == mtime  # not rewritten
    after = {k: v for k, v in trainer.vae.state_dict().items()}
    for k, v in before["model.safetensors"].items():
        assert torch.equal(v, after[k]), k


def test_resume_latest_without_a_checkpoint_starts_from_step_0(cfg, tmp_path, capsys):
    trainer = _run(cfg, tmp_path / "fresh", resume="latest")
    assert "no checkpoint in" in capsys.readouterr().out and trainer.state.step == 4
    # the same as a run started without --resume
    plain = _run(cfg, tmp_path / "plain")
    a, b = _tensors(ckpt.final_dir(tmp_path / "fresh", 4)), _tensors(ckpt.final_dir(tmp_path / "plain", 4))
    for k in a["model.safetensors"]:
        assert torch.equal(a["model.safetensors"][k], b["model.safetensors"][k]), k
    assert plain.state.step == 4


def test_resume_from_a_path_that_does_not_exist_is_a_clear_error(cfg, tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="nowhere does not exist"):
        fresh_trainer(cfg, tmp_path / "r", resume=str(tmp_path / "nowhere"))


def test_switching_the_gan_on_at_resume_starts_a_fresh_discriminator(cfg, tmp_path, capsys):
    from dataclasses import replace
    _run(replace(cfg, train=replace(cfg.train, steps=2)), tmp_path / "r")
    gan = replace(cfg, loss=replace(cfg.loss, gan=True, gan_start=0))
    trainer = _run(gan, tmp_path / "r", resume="latest")
    out = capsys.readouterr().out
    assert "has no discriminator: a fresh one starts" in out and trainer.state.step == 4
    assert (ckpt.final_dir(tmp_path / "r", 4) / "disc.safetensors").is_file()
    # and switching it off again: the saved discriminator is named and left alone
    _run(replace(cfg, train=replace(cfg.train, steps=6)), tmp_path / "r", resume="latest")
    assert "the discriminator saved in checkpoint-00000004 is not used" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncate", "flip-a-byte", "delete"])
def test_a_damaged_checkpoint_is_detected_and_latest_falls_back(cfg, tmp_path, capsys, damage):
    from dataclasses import replace
    cfg = replace(cfg, train=replace(cfg.train, keep_last=3))
    _run(cfg, tmp_path / "r")
    newest = ckpt.final_dir(tmp_path / "r", 4)
    target = newest / "model.safetensors"
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip-a-byte":
        target.write_bytes(data[:-10] + bytes([data[-10] ^ 1]) + data[-9:])  # still a loadable file
    else:
        target.unlink()
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors"):
        ckpt.verify(newest)
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors"):
        fresh_trainer(cfg, tmp_path / "r", resume=str(newest))  # named explicitly: refused
    trainer = fresh_trainer(cfg, tmp_path / "r", resume="latest")
    out = capsys.readouterr().out
    assert "checkpoint-00000004 is damaged; falling back to checkpoint-00000002" in out
    assert trainer.state.step == 2


def test_checkpoint_files_are_fsynced_before_the_rename_that_publishes_them(cfg, tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(fsutil.os, "fsync", fsync)
    monkeypatch.setattr(ckpt.os, "replace", replace)
    from dataclasses import replace as dc_replace
    _run(dc_replace(cfg, train=dc_replace(cfg.train, steps=2)), tmp_path / "r")
    final = ckpt.final_dir(tmp_path / "r", 2)
    publish = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(final))
    staged = ckpt.staging_dir(tmp_path / "r", 2)
    synced_before = {e[1] for e in events[:publish] if e[0] == "fsync"}
    for f in final.iterdir():
        assert str(staged / f.name) in synced_before, f.name  # every file, state.json included
    assert str(staged) in synced_before  # the folder's entries
    assert ("fsync", str(final.parent)) in events[publish:]  # and the rename itself


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_fused_adamw_restored_from_its_files_steps_bit_for_bit_like_the_live_one(tmp_path, layout):
    """The fused kernels pair param, grad and moments by flat memory: a restored state must keep the
    parameter's layout (channels_last here, as `auto` picks on CUDA and bf16 CPUs), whatever the CPU."""
    def grads(params, gen):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(memory_format=layout if p.dim() == 4 else
                                                             torch.contiguous_format)

    torch.manual_seed(0)
    live = [torch.nn.Parameter(torch.randn(16, 8, 3, 3).to(memory_format=layout)), torch.nn.Parameter(torch.randn(16))]
    opt = torch.optim.AdamW(live, lr=1e-2, fused=True)
    grads(live, torch.Generator().manual_seed(1))
    opt.step()
    tensors, meta = ckpt.optimizer_to_files(opt.state_dict())
    ckpt.save_tensors(tmp_path / "optim.safetensors", tensors)
    restored = [torch.nn.Parameter(p.detach().clone()) for p in live]
    opt2 = torch.optim.AdamW(restored, lr=1e-2, fused=True)
    ckpt.restore_optimizer(opt2, ckpt.load_tensors(tmp_path / "optim.safetensors"), meta)
    for p in restored:
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt2.state[p][key].stride() == p.stride(), key
    for params, o in ((live, opt), (restored, opt2)):
        gen = torch.Generator().manual_seed(2)
        for _ in range(3):
            grads(params, gen)
            o.step()
    for a, b in zip(live, restored):
        assert torch.equal(a, b)
