"""Training every VAE family: `model.init_from` a folder of each diffusers class, decoder-only for all,
in full where the class has a posterior, from scratch with the family presets.

    python -m pytest -q tests/test_train_families.py

Each family's tiny random instance (tests/families.py) is saved as a diffusers folder and trained at
32 px, fp32 and channels_last pinned (both are `auto` choices that differ between machines): a few
steps on one fixed batch lower the loss, a decoder-only run leaves every encoder weight bit-equal and
moves the decoder's, a run stopped after its first checkpoint resumes to the uninterrupted run's
weights bit for bit (every family also under a real SIGKILL), and `latentvae export RUN`
writes a folder the class's own `from_pretrained` loads with the run's EMA weights. What a family
cannot do exits 2 with one line, before anything is written. (LPIPS is off: it sees images, the same
for every family.)
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import fresh_trainer, tiny_overrides
from families import FAMILY_NAMES, TRAINABLE_FULL, images, save_folder, tiny_vae
from helpers_ckpt import assert_same_checkpoint
from latentvae import cli
from latentvae import runs as ckpt
from latentvae.config import load_config
from latentvae.train.step import train_step
from latentvae.vae.families import family
from latentvae.vae.loaded import make_record

DECODER = ("decoder.", "post_quant_conv.")  # what a decoder-only fine-tune trains (Family.decoder_parameters)
PINNED = {"train.mixed_precision": "no", "train.channels_last": "true", "train.cpu_threads": "2",
          "loss.lpips_weight": "0", "train.eval_every": "0", "train.image_every": "100"}


def _mode(name: str) -> str:
    """A family without a posterior trains as a plain autoencoder only."""
    return "vae" if family(name).stochastic else "ae"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each family's tiny instance saved as a diffusers folder (config.json + safetensors)."""
    root = tmp_path_factory.mktemp("families")
    return {name: save_folder(tiny_vae(name), root / name) for name in FAMILY_NAMES}


def _config(image_folder, **extra):
    return load_config(None, tiny_overrides(image_folder, **{**PINNED, **extra}))


def _fine_tune(image_folder, folder, name, decoder_only=True, **extra):
    return _config(image_folder, **{"model.init_from": str(folder), "model.mode": _mode(name),
                                    "model.train_decoder_only": "true" if decoder_only else "false", **extra})


def _losses(trainer, x, steps):
    return [float(train_step(trainer.parts, trainer.state, x)["rec"]) for _ in range(steps)]


def _assert_lowered(losses):
    """Every step on the fixed batch below the first, the last by 5 % at least."""
    assert max(losses[1:]) < losses[0] and losses[-1] < 0.95 * losses[0], losses


# ----------------------------------------------------------------------------- decoder-only, every family
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_decoder_only_fine_tune_lowers_the_loss_and_leaves_the_encoder_bit_equal(name, folders, image_folder,
                                                                                 tmp_path):
    cfg = _fine_tune(image_folder, folders[name], name, **{"train.lr": "3e-3", "train.ema_decay": "0"})
    trainer = fresh_trainer(cfg, tmp_path / "run")
    trained = {id(p) for group in trainer.parts.opt_g.param_groups for p in group["params"]}
    assert trained == {id(p) for p in family(name).decoder_parameters(trainer.vae)}  # no Adam state for the rest
    before = {k: v.clone() for k, v in trainer.vae.state_dict().items()}
    losses = _losses(trainer, images(2, 32, seed=1), 6)
    _assert_lowered(losses)
    after = trainer.vae.state_dict()
    decoder = [k for k in after if k.startswith(DECODER)]
    assert decoder and any(not torch.equal(before[k], after[k]) for k in decoder)
    for k in after:
        if not k.startswith(DECODER):
            assert torch.equal(before[k], after[k]), k  # the encoder, quant_conv, FLUX.2's BatchNorm statistics
    saved = tiny_vae(name).state_dict()  # the folder's weights: what training started from
    assert all(torch.equal(saved[k], before[k]) for k in saved)


# ----------------------------------------------------------------------------- in full, every class with a posterior
@pytest.mark.parametrize("name", TRAINABLE_FULL)
def test_full_fine_tune_trains_the_encoder_too_with_the_kl_term(name, folders, image_folder, tmp_path):
    cfg = _fine_tune(image_folder, folders[name], name, decoder_only=False,
                     **{"train.lr": "3e-3", "train.ema_decay": "0"})
    trainer = fresh_trainer(cfg, tmp_path / "run")
    before = {k: v.clone() for k, v in trainer.vae.state_dict().items()}
    x = images(2, 32, seed=1)
    logs = train_step(trainer.parts, trainer.state, x)
    assert "kl_per_elem" in logs and float(logs["loss"]) > float(logs["rec"])  # the KL term is in the loss
    losses = [float(logs["rec"])] + _losses(trainer, x, 5)
    _assert_lowered(losses)
    after = trainer.vae.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("encoder."))


# ----------------------------------------------------------------------------- resume, export
def _resume_and_export(cfg, tmp_path, name):
    """Train cfg.train.steps steps, and again from the checkpoint before the last: the same final checkpoint
    bit for bit. Then `latentvae export RUN --out OUT` and the class's own from_pretrained."""
    steps = cfg.train.steps
    fresh_trainer(cfg, tmp_path / "a").run()
    full = ckpt.final_dir(tmp_path / "a", steps)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(ckpt.final_dir(tmp_path / "b", steps))
    fresh_trainer(cfg, tmp_path / "b", resume="latest").run()
    assert_same_checkpoint(full, ckpt.final_dir(tmp_path / "b", steps),
                           {"model.safetensors", "ema.safetensors", "disc.safetensors", "optim-g.safetensors"})

    cli.main(["export", str(tmp_path / "a"), "--out", str(tmp_path / "out")])
    cls = family(name).cls
    exported = cls.from_pretrained(str(tmp_path / "out"))
    assert type(exported) is cls
    ema = ckpt.load_tensors(full / "ema.safetensors")
    assert ema.keys() == exported.state_dict().keys()
    for k, v in exported.named_parameters():  # buffers: FLUX.2's BatchNorm statistics are export's to write
        assert torch.equal(v, ema[k]), k
    return ema, exported


RUN = {"train.steps": "4", "train.save_every": "2", "train.ema_decay": "0.9", "loss.gan": "true",
       "loss.gan_start": "1", "loss.disc_channels": "8", "loss.disc_layers": "2"}


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_decoder_only_run_resumes_bit_exactly_and_exports_a_folder_its_class_loads(name, folders, image_folder,
                                                                                   tmp_path):
    cfg = _fine_tune(image_folder, folders[name], name, **RUN)
    ema, exported = _resume_and_export(cfg, tmp_path, name)
    # the encoder never trained, so the latents are the starting VAE's: an uncalibrated export keeps its
    # published factors (FLUX.2's BatchNorm statistics, Qwen-Image's latents_mean/std, ...), not a placeholder
    assert make_record(exported, {}).factors == make_record(tiny_vae(name), {}).factors
    start = tiny_vae(name).state_dict()
    assert any(not torch.equal(ema[k], start[k]) for k in ema if k.startswith(DECODER))
    for k in ema:
        if not k.startswith(DECODER):
            assert torch.equal(ema[k], start[k]), k  # the EMA of a frozen encoder is that encoder


@pytest.mark.parametrize("preset", ["flux2-test", "qwenimage-test"])
def test_a_family_preset_trains_from_scratch_resumes_and_exports(preset, image_folder, tmp_path):
    cfg = _config(image_folder, **{"model.preset": preset, **RUN})
    _resume_and_export(cfg, tmp_path, cfg.model.family)


# ----------------------------------------------------------------------------- kill -9
WORKER = Path(__file__).with_name("kill_worker.py")


def _worker(out, kill, overrides):
    """tests/kill_worker.py: train OUT with --resume latest, SIGKILLed at `kill` (none: to the end)."""
    env = {**os.environ, "PYTHONPATH": str(WORKER.parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(WORKER), str(out), kill, *overrides], env=env, cwd=out.parent,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


# kill point -> the checkpoints published when it lands: mid-update 3 (after the first checkpoint), and
# in the second checkpoint's commit, staged complete but not yet renamed (it must not count)
KILLS = {"kl": "step:3", "flux2": "step:3", "qwenimage": "publish:2", "wan": "step:3", "dc": "publish:2",
         "hunyuanimage": "publish:2", "tiny": "step:3"}


@pytest.mark.parametrize("name,kill", sorted(KILLS.items()))
def test_a_decoder_only_run_killed_with_sigkill_resumes_bit_exactly(name, kill, folders, image_folder, tmp_path):
    overrides = tiny_overrides(image_folder, **{**PINNED, **RUN, "train.cpu_threads": "1",
                                                "model.init_from": str(folders[name]), "model.mode": _mode(name),
                                                "model.train_decoder_only": "true"})
    fresh_trainer(load_config(None, overrides), tmp_path / "uninterrupted").run()
    run = tmp_path / "killed"
    code, log = _worker(run, kill, overrides)
    assert code == -signal.SIGKILL, f"{kill}: the kill point was never reached\n{log[-2000:]}"
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["checkpoint-00000002"]
    code, log = _worker(run, "none", overrides)
    assert code == 0, log[-3000:]
    assert "resumed from" in log and "checkpoint-00000002 at step 2" in log
    assert_same_checkpoint(ckpt.final_dir(tmp_path / "uninterrupted", 4), ckpt.final_dir(run, 4),
                           {"model.safetensors", "ema.safetensors", "disc.safetensors", "optim-g.safetensors"})


# ----------------------------------------------------------------------------- the command line
def _train(out, sets, capsys, *flags):
    """`latentvae train --out OUT --set ... FLAGS` in this process: (exit status, stderr)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    capsys.readouterr()
    try:
        cli.main(["train", "--out", str(out), "--no-progress", *flags, *[w for s in sets for w in ("--set", s)]])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_latentvae_train_with_a_family_preset_trains_resumes_and_exports(image_folder, tmp_path, capsys):
    """The CPU-sized FLUX.2 architecture (AutoencoderKLFlux2, 32 latent channels, /8) end to end."""
    sets = tiny_overrides(image_folder, **{**PINNED, **RUN, "model.preset": "flux2-small", "train.steps": "2",
                                           "train.save_every": "1"})
    assert _train(tmp_path / "run", sets, capsys) == (0, "")
    code, err = _train(tmp_path / "run", [*sets, "train.steps=3"], capsys, "--resume", "latest")
    assert code == 0, err
    state = ckpt.read_state(ckpt.final_dir(tmp_path / "run", 3))
    assert state["vae_config"]["_class_name"] == "AutoencoderKLFlux2" and state["vae_config"]["latent_channels"] == 32
    cli.main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    from diffusers import AutoencoderKLFlux2
    exported = AutoencoderKLFlux2.from_pretrained(str(tmp_path / "out"))
    ema = ckpt.load_tensors(ckpt.final_dir(tmp_path / "run", 3) / "ema.safetensors")
    assert all(torch.equal(v, ema[k]) for k, v in exported.named_parameters())


REFUSED = {  # what is asked -> the one line that refuses it
    "dc-in-full": ("dc", {"model.mode": "ae", "model.train_decoder_only": "false"},
                   "AutoencoderDC (dc family) cannot be fine-tuned in full: it has no posterior"),
    "tiny-as-vae": ("tiny", {"model.mode": "vae", "model.train_decoder_only": "true"},
                    "AutoencoderTiny (tiny family) cannot be trained with model.mode=vae"),
    "qwenimage-checkpointing": ("qwenimage", {"model.gradient_checkpointing": "true"},
                                "no gradient checkpointing for AutoencoderKLQwenImage"),
    "hunyuanimage-resolution": ("hunyuanimage", {"data.resolution": "30"},
                                "data.resolution=30 must be a multiple of the downsampling factor 4 of model.init_from="),
    "preset-checkpointing": (None, {"model.preset": "qwenimage-test", "model.gradient_checkpointing": "true"},
                             "no gradient checkpointing for AutoencoderKLQwenImage (model.family=qwenimage)"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_a_family_cannot_train_exits_2_with_one_line_before_anything_is_written(case, folders, image_folder,
                                                                                     tmp_path, capsys):
    name, extra, message = REFUSED[case]
    start = {"model.init_from": str(folders[name]), "model.mode": _mode(name),
             "model.train_decoder_only": "true"} if name else {}
    code, err = _train(tmp_path / "run", tiny_overrides(image_folder, **{**PINNED, **start, **extra}), capsys)
    assert code == 2 and err.startswith("latentvae train: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not (tmp_path / "run").exists()
