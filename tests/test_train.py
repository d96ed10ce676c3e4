"""Training end to end on tiny configs: exact resume, skipped non-finite steps, checkpoints."""
import json
import shutil
from dataclasses import replace

import pytest
import torch

from conftest import fresh_trainer
from latentvae import runs as ckpt
from latentvae.train import NonFiniteError


def _run(cfg, out, resume=None):
    trainer = fresh_trainer(cfg, out, resume=resume)
    trainer.run()
    return trainer


def _tensors(path):
    return {f.name: ckpt.load_tensors(f) for f in sorted(path.glob("*.safetensors"))}


# channels_last pinned both ways: it is `auto`'s choice on CUDA and on CPUs with bf16 kernels, and the layout
# in which a restored optimizer state that lost its strides makes the fused AdamW diverge (on every CPU)
@pytest.mark.parametrize("channels_last,precision", [("true", "no"), ("false", "no"), ("true", "bf16")])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_config, tmp_path, channels_last, precision):
    cfg = tiny_config(**{"loss.gan": "true", "loss.gan_start": "2", "train.lr_schedule": "cosine",
                         "train.lr_warmup_steps": "2", "train.grad_accum": "2", "train.ema_decay": "0.9",
                         "loss.lpips_crop": "32", "data.resolution": "48", "train.channels_last": channels_last,
                         "train.mixed_precision": precision})
    _run(cfg, tmp_path / "a")
    full = ckpt.final_dir(tmp_path / "a", 6)
    # "crash" after step 3: keep only that checkpoint, resume with a different worker count
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(ckpt.final_dir(tmp_path / "b", 6))
    _run(replace(cfg, data=replace(cfg.data, num_workers=1)), tmp_path / "b", resume="latest")
    resumed = ckpt.final_dir(tmp_path / "b", 6)
    a, b = _tensors(full), _tensors(resumed)
    assert set(a) == {"model.safetensors", "ema.safetensors", "disc.safetensors", "optim-g.safetensors",
                      "optim-d.safetensors", "rng-rank0.safetensors"}
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)  # bit for bit
    sa, sb = ckpt.read_state(full), ckpt.read_state(resumed)
    assert sa["micro_step"] == sb["micro_step"] == 12 and sa["scheduler_g"] == sb["scheduler_g"]
    # and training did move the weights
    first = _tensors(ckpt.final_dir(tmp_path / "b", 3))["model.safetensors"]
    assert any(not torch.equal(first[k], a["model.safetensors"][k]) for k in first)


def test_run_folder_holds_checkpoints_logs_grids_and_rotates(tiny_config, tmp_path):
    cfg = tiny_config(**{"train.steps": "8", "train.save_every": "2", "train.keep_last": "2"})
    _run(cfg, tmp_path / "r")
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "r")]
    assert names == ["checkpoint-00000006", "checkpoint-00000008"]
    assert not [p for p in (tmp_path / "r" / "checkpoints").iterdir() if p.name.startswith(".")]
    assert sorted(p.name for p in (tmp_path / "r" / "samples").glob("*.png"))[-1] == "recon-00000008.png"
    assert list((tmp_path / "r" / "tb").rglob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "r" / "config.json").read_text())["model"]["preset"] == "test"


def test_interrupted_checkpoint_write_is_never_taken_as_complete(tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config(**{"train.steps": "4", "train.save_every": "2"})
    calls = {"n": 0}
    real = ckpt.write_json

    def crash_on_second_state(path, data):
        if path.name == "state.json":
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError("disk full")
        return real(path, data)

    monkeypatch.setattr(ckpt, "write_json", crash_on_second_state)
    with pytest.raises(OSError, match="disk full"):
        _run(cfg, tmp_path / "r")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "r")] == ["checkpoint-00000002"]
    assert ckpt.find_checkpoint(tmp_path / "r").name == "checkpoint-00000002"
    monkeypatch.setattr(ckpt, "write_json", real)
    _run(cfg, tmp_path / "r", resume="latest")  # leftovers cleaned, run completes
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "r")][-1] == "checkpoint-00000004"


def test_nonfinite_steps_are_skipped_counted_and_eventually_stop_the_run(tiny_config, tmp_path, monkeypatch):
    import latentvae.train.step as tr
    real = tr.generator_loss
    poison = {"from_step": 3, "calls": 0}

    def sometimes_nan(cfg, x, *a, **k):
        loss, logs = real(cfg, x, *a, **k)
        poison["calls"] += 1
        if poison["calls"] == 2 or poison["calls"] > poison["from_step"]:
            loss = loss * float("nan")
        return loss, logs

    monkeypatch.setattr(tr, "generator_loss", sometimes_nan)
    cfg = tiny_config(**{"train.steps": "50", "train.save_every": "100", "train.max_nonfinite_in_row": "4"})
    with pytest.raises(NonFiniteError, match="4 consecutive updates had non-finite gradients"):
        _run(cfg, tmp_path / "r")
    last = ckpt.find_checkpoint(tmp_path / "r")
    state = ckpt.read_state(last)
    assert state["step"] == 2 and state["nonfinite_total"] == 5 and state["nonfinite_in_row"] == 4
    weights = ckpt.load_tensors(last / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_decoder_only_training_leaves_the_encoder_untouched(tiny_config, tmp_path):
    cfg = tiny_config(**{"model.train_decoder_only": "true", "train.steps": "3", "train.save_every": "3"})
    t = _run(cfg, tmp_path / "r")
    first = _tensors(tmp_path / "r" / "checkpoints" / "checkpoint-00000003")["model.safetensors"]
    torch.manual_seed(cfg.train.seed)
    from latentvae.vae.model import build_vae
    init = build_vae(cfg.model).state_dict()
    for k, v in first.items():
        if k.startswith(("encoder.", "quant_conv.")):
            assert torch.equal(v, init[k]), k
    assert any(not torch.equal(first[k], init[k]) for k in first if k.startswith("decoder."))
    assert all(not p.requires_grad for p in t.vae.encoder.parameters())


def test_init_from_a_diffusers_folder_starts_from_its_weights(tiny_config, tmp_path):
    from diffusers import AutoencoderKL
    from latentvae.vae.model import diffusers_kwargs
    cfg = tiny_config(**{"train.steps": "1", "train.save_every": "1", "train.lr": "1e-12", "train.ema_decay": "0"})
    torch.manual_seed(123)
    pretrained = AutoencoderKL(**diffusers_kwargs(cfg.model))
    pretrained.save_pretrained(tmp_path / "pre")
    cfg = replace(cfg, model=replace(cfg.model, init_from=str(tmp_path / "pre")))
    _run(cfg, tmp_path / "r")
    trained = _tensors(ckpt.final_dir(tmp_path / "r", 1))["model.safetensors"]
    for k, v in pretrained.state_dict().items():
        assert torch.allclose(v, trained[k], atol=1e-6), k  # lr ~ 0: still the pretrained weights
    state = ckpt.read_state(ckpt.final_dir(tmp_path / "r", 1))
    assert state["vae_config"]["block_out_channels"] == [8, 16]


def _compiled(module) -> bool:
    return isinstance(module, torch._dynamo.eval_frame.OptimizedModule)


def test_compile_lpips_compiles_the_loss_network_and_validation_keeps_the_plain_one(tiny_config, tmp_path):
    """train.compile_lpips: the loss's LPIPS is compiled; validation, which sees images of many sizes
    (each would compile again), keeps the plain network."""
    for on in (False, True):
        cfg = tiny_config(**{"train.compile_lpips": "true" if on else "false", "train.eval_every": "2"})
        p = (trainer := fresh_trainer(cfg, tmp_path / f"run-{on}")).parts
        assert _compiled(p.lpips) is on and not _compiled(p.lpips_eval)
        assert getattr(p.lpips, "_orig_mod", p.lpips) is p.lpips_eval
        assert trainer.validator is not None and any(m is p.lpips_eval for m in trainer.validator.lpips.values())


@pytest.mark.slow
def test_compiled_lpips_trains_as_the_plain_network_does(tiny_config, tmp_path):
    """The compiled LPIPS's forward and its backward to the reconstruction: the first step's loss and
    gradient norm as the plain network gives them, and the next steps' losses."""
    from latentvae.train.step import train_step

    runs = {}
    for on in (False, True):
        cfg = tiny_config(**{"train.compile_lpips": "true" if on else "false", "train.eval_every": "0"})
        trainer = fresh_trainer(cfg, tmp_path / f"run-{on}")
        torch.manual_seed(0)
        x = torch.rand(2, 3, 32, 32) * 2 - 1
        logs = [train_step(trainer.parts, trainer.state, x) for _ in range(3)]
        runs[on] = [(float(g["loss"]), float(g["grad_norm"])) for g in logs]
    (loss0, grad0), (loss1, grad1) = runs[False][0], runs[True][0]
    assert loss1 == pytest.approx(loss0, rel=1e-5) and grad1 == pytest.approx(grad0, rel=1e-4), runs
    assert [r[0] for r in runs[True]] == pytest.approx([r[0] for r in runs[False]], rel=1e-3), runs
