"""A video VAE's decoder fine-tuned on clips: `model.init_from` a video VAE folder, `model.train_decoder_only`,
`data.source` a folder of video files, `data.frames` per clip (train/clips.py).

    python -m pytest -q tests/test_train_video.py

Each video family's tiny random instance (tests/families.py) is saved as a diffusers folder and trained on
real 32x32 files written with PyAV (tests/videos.py), fp32 and channels_last pinned: a run of every family
trains only the decoder (the encoder bit-equal), scores validation per frame and lists a broken video; a
few steps on a fixed batch lower the loss; a run stopped after its first checkpoint resumes to the
uninterrupted run's weights bit for bit (also under a real SIGKILL) and exports a folder its class loads;
a latent tile decodes exactly the window of the latent and is scored against the matching pixels; what
cannot be trained exits 2 with one line before anything is written.
"""
from __future__ import annotations

import copy
import json
import shutil
import signal

import pytest
import torch

from conftest import REPO, fresh_trainer, tiny_overrides
from families import VIDEO_FAMILY_NAMES, VIDEO_STEP, save_folder, tiny_video_vae
from helpers_ckpt import assert_same_checkpoint
from latentvae import runs as ckpt
from latentvae.config import load_config
from latentvae.train.clips import draw_cut
from latentvae.train.step import train_step
from latentvae.vae.families import family
from test_train_families import DECODER, _resume_and_export, _train, _worker
from videos import broken_video, moving_shapes

PINNED = {"train.mixed_precision": "no", "train.channels_last": "false", "train.cpu_threads": "2",
          "loss.lpips_weight": "0", "train.eval_every": "0", "train.image_every": "100", "data.frame_size": "32x32",
          "data.fps": "8"}
RUN = {"train.steps": "4", "train.save_every": "2", "train.ema_decay": "0.9", "loss.gan": "true",
       "loss.gan_start": "1", "loss.disc_channels": "8", "loss.disc_layers": "2", "loss.lpips_frames": "2",
       "data.latent_tile": "3"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("video-vaes")
    return {name: save_folder(tiny_video_vae(name), root / name) for name in VIDEO_FAMILY_NAMES}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """train/: two 12-frame videos; one/: one video and a broken one (one clip each with data.clip_stride=12, so
    a step of two clips sees both); val/: one video."""
    root = tmp_path_factory.mktemp("videos")
    for sub in ("train", "one", "val"):
        (root / sub).mkdir()
    for i in range(2):
        moving_shapes(root / "train" / f"v{i}.mp4", 12, size=(32, 32), fps=8, seed=i)
    shutil.copy(root / "train" / "v0.mp4", root / "one" / "v0.mp4")
    broken_video(root / "one" / "broken.mp4", "truncated")
    moving_shapes(root / "val" / "v.mp4", 12, size=(32, 32), fps=8, seed=5)
    return root


def _overrides(videos, folder, name, **extra):
    return tiny_overrides(videos / "train", **{
        **PINNED, "model.init_from": str(folder), "model.train_decoder_only": "true",
        "data.val_source": str(videos / "val"), "data.frames": str(1 + VIDEO_STEP[name]), **extra})


def _config(videos, folders, name, **extra):
    return load_config(None, _overrides(videos, folders[name], name, **extra))


# ----------------------------------------------------------------------------- every family, one quick run
@pytest.mark.parametrize("name", VIDEO_FAMILY_NAMES)
def test_a_decoder_run_on_clips_trains_only_the_decoder_scores_frames_and_lists_a_broken_video(name, folders, videos,
                                                                                               tmp_path):
    cfg = _config(videos, folders, name, **{"train.steps": "1", "train.save_every": "1", "train.eval_every": "1",
                                            "train.image_every": "1", "train.lr": "3e-3", "data.clip_stride": "12",
                                            "data.source": str(videos / "one")})
    trainer = fresh_trainer(cfg, tmp_path / "run")
    trained = {id(p) for group in trainer.parts.opt_g.param_groups for p in group["params"]}
    assert trained == {id(p) for p in family(name).decoder_parameters(trainer.vae)}
    trainer.run()
    run, start = tmp_path / "run", tiny_video_vae(name).state_dict()
    weights = ckpt.load_tensors(ckpt.final_dir(run, 1) / "model.safetensors")
    assert any(not torch.equal(weights[k], start[k]) for k in weights if k.startswith(DECODER))
    for k in weights:
        if not k.startswith(DECODER):
            assert torch.equal(weights[k], start[k]), k  # the frozen encoder, bit for bit
    record = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
    assert record["clips"] == 1 and record["images"] == 1 + VIDEO_STEP[name]  # one clip, scored per frame
    assert record["psnr"] > 5 and (run / "samples" / "recon-00000001.png").is_file()
    skipped = (run / "skipped_images.txt").read_text()
    assert "broken.mp4" in skipped and skipped.count("\n") == 1


@pytest.mark.parametrize("name", ["ltx2"])
def test_decoder_steps_on_a_fixed_batch_of_clips_lower_the_loss(name, folders, videos, tmp_path):
    trainer = fresh_trainer(_config(videos, folders, name, **{"train.lr": "3e-3", "train.ema_decay": "0"}),
                            tmp_path / "run")
    x = torch.stack([trainer.stream[k]["pixels"] for k in range(2)])  # (2, 3, T, 32, 32) decoded from the files
    assert x.shape == (2, 3, 1 + VIDEO_STEP[name], 32, 32)
    losses = [float(train_step(trainer.parts, trainer.state, x)["rec"]) for _ in range(6)]
    assert max(losses[1:]) < losses[0] and losses[-1] < 0.95 * losses[0], losses


# ----------------------------------------------------------------------------- latent tiles
@pytest.mark.parametrize("name", ["ltx2", "wan"])
def test_a_latent_tile_decodes_its_window_against_the_matching_pixels(name, folders, videos, tmp_path):
    """data.latent_tile=2 of a 4x4 latent (32 px, /8): the decoder sees (B, C, T', 2, 2) and the loss compares
    its (B, 3, T, 16, 16) frames with the same 16x16 window of the clip."""
    trainer = fresh_trainer(_config(videos, folders, name, **{"data.latent_tile": "2", "model.mode": "ae"}),
                            tmp_path / "run")
    x = torch.stack([trainer.stream[k]["pixels"] for k in range(2)])
    before, fam = copy.deepcopy(trainer.vae).eval(), family(name)
    seen = []
    trainer.vae.decoder.register_forward_hook(lambda m, i, o: seen.append((tuple(i[0].shape), tuple(o.shape))))
    torch.manual_seed(7)
    cut = draw_cut(trainer.cfg, 8, x)
    torch.manual_seed(7)
    logs = train_step(trainer.parts, trainer.state, x)  # draws the same cut
    top, left, h, w = cut.tile
    assert (h, w) == (2, 2) and 0 <= top <= 2 and 0 <= left <= 2
    assert seen and all(i[-2:] == (2, 2) and o[-2:] == (16, 16) for i, o in seen)  # (Wan decodes frame by frame)
    with torch.no_grad():
        x_hat = fam.decode(before, cut.latent(fam.moments(before, x)[0]))
    assert x_hat.shape == (2, 3, x.shape[2], 16, 16)
    target = x[..., 8 * top:8 * top + 16, 8 * left:8 * left + 16]
    assert torch.allclose((x_hat - target).abs().mean(), logs["rec"], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- resume, export, kill -9
def test_a_clip_run_resumes_bit_exactly_and_exports_a_folder_its_class_loads(folders, videos, tmp_path):
    """Latent tiles, LPIPS frames and the GAN's frames are drawn each step: the resumed run draws the same."""
    name = "cogvideox"
    cfg = _config(videos, folders, name, **{**RUN, "train.steps": "2", "train.save_every": "1"})
    _resume_and_export(cfg, tmp_path, name)


def test_a_clip_run_killed_with_sigkill_resumes_bit_exactly(folders, videos, tmp_path):
    name = "hunyuanvideo15"
    overrides = _overrides(videos, folders[name], name, **{**RUN, "train.cpu_threads": "1"})
    fresh_trainer(load_config(None, overrides), tmp_path / "uninterrupted").run()
    run = tmp_path / "killed"
    code, log = _worker(run, "step:3", overrides)
    assert code == -signal.SIGKILL, f"the kill point was never reached\n{log[-2000:]}"
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["checkpoint-00000002"]
    code, log = _worker(run, "none", overrides)
    assert code == 0, log[-3000:]
    assert "checkpoint-00000002 at step 2" in log
    assert_same_checkpoint(ckpt.final_dir(tmp_path / "uninterrupted", 4), ckpt.final_dir(run, 4),
                           {"model.safetensors", "ema.safetensors", "disc.safetensors", "optim-g.safetensors"})


def test_the_example_config_passes_the_checks_of_each_video_family(folders, videos):
    from latentvae.train.build import starting_vae

    for name in VIDEO_FAMILY_NAMES:  # 17 frames: 1 + 4k and 1 + 8k; 480x832: multiples of 8 and 16
        cfg = load_config(REPO / "configs" / "video-decoder-finetune.yaml",
                          [f"model.init_from={folders[name]}", f"data.source={videos / 'train'}"])
        assert starting_vae(cfg).family.name == name and cfg.data.frames == 17


# ----------------------------------------------------------------------------- refusals
REFUSED = {  # family, overrides -> the one line that refuses them
    "wan-frames": ("wan", {"data.frames": "6"}, "data.frames=6: model.init_from="),
    "ltx2-frames": ("ltx2", {"data.frames": "5"}, "takes clips of 1 + 8k frames; the nearest are 1 and 9"),
    "no-frames": ("cogvideox", {"data.frames": "0"}, "data.frames: data.source="),
    "frame-size": ("hunyuanvideo15", {"data.frame_size": "32x36"}, "data.frame_size: 32x36 frames must be multiples "
                                                                   "of the spatial factor 8"),
    "wan-checkpointing": ("wan", {"model.gradient_checkpointing": "true"},
                          "no gradient checkpointing for AutoencoderKLWan"),
    "ltx2-in-full": ("ltx2", {"model.train_decoder_only": "false"},
                     "AutoencoderKLLTX2Video (ltx2 family) cannot be fine-tuned in full"),
    "wan-in-full": ("wan", {"model.train_decoder_only": "false"},
                    "AutoencoderKLWan (wan family) cannot be fine-tuned in full on clips"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_cannot_be_trained_on_clips_exits_2_with_one_line_before_anything_is_written(case, folders, videos,
                                                                                          tmp_path, capsys):
    name, extra, message = REFUSED[case]
    code, err = _train(tmp_path / "run", _overrides(videos, folders[name], name, **extra), capsys)
    assert code == 2 and err.startswith("latentvae train: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not (tmp_path / "run").exists()


def test_gradient_checkpointing_trains_the_same_step(folders, videos, tmp_path):
    """LTX-2's decoder with diffusers' gradient checkpointing on: the same gradients as without (fp32)."""
    grads = []
    for on in ("false", "true"):
        trainer = fresh_trainer(_config(videos, folders, "ltx2", **{"model.gradient_checkpointing": on,
                                                                     "model.mode": "ae"}), tmp_path / on)
        assert trainer.vae.decoder.gradient_checkpointing == (on == "true")
        x = torch.stack([trainer.stream[k]["pixels"] for k in range(2)])
        torch.manual_seed(0)
        logs = train_step(trainer.parts, trainer.state, x)
        grads.append(float(logs["grad_norm"]))
    assert grads[0] == pytest.approx(grads[1], rel=1e-5)
