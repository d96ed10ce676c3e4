"""`latentvae export --calibrate VIDEOS` for the video VAEs: factors measured on clips, checked by the pipelines' formulas.

A video VAE's pipelines normalize 5-D clip latents per channel over time and space; calibrating on images
would measure only first frames (a causal encoder's frame 0 is encoded alone). Here the exported folder is
read by diffusers alone, the same clips are encoded with the class's own `encode`, the latent its pipelines
take is formed (the mode; CogVideoX: a posterior sample) and the formula written out from the cited lines
must give unit scale on them. Tiny random instances (tests/families.py), real mp4 files (tests/videos.py).
"""
from __future__ import annotations

import json

import diffusers
import pytest
import torch
from families import save_folder, tiny_video_vae
from videos import moving_shapes

from latentvae.cli import main as cli_main
from latentvae.video_sources import ClipSource, open_video_source

FRAMES = {"wan": 9, "ltx2": 9, "cogvideox": 9}


@pytest.fixture
def videos(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    for i in range(3):
        moving_shapes(folder / f"v{i}.mp4", 12, size=(40, 40), fps=8, seed=i)
    return folder


def clips_of(folder, frames: int) -> torch.Tensor:
    """The calibration clips as export reads them: every clip, 32x32, in [-1, 1]."""
    src = ClipSource(open_video_source(str(folder)), frames)
    return torch.stack([src.load_clip(i, (32, 32))[0] for i in range(len(src))]).float() / 127.5 - 1.0


@pytest.mark.parametrize("name", sorted(FRAMES))
def test_factors_measured_on_clips_give_unit_latents_under_the_pipeline_formula(name, videos, tmp_path):
    src = save_folder(tiny_video_vae(name), tmp_path / "src")
    out = tmp_path / "out"
    cli_main(["export", str(src), "--out", str(out), "--calibrate", str(videos), "--frames", str(FRAMES[name]),
              "--limit", "3", "--resolution", "32", "--fp16-images", "1"])
    vae = getattr(diffusers, type(tiny_video_vae(name)).__name__).from_pretrained(out).eval()
    x = clips_of(videos, FRAMES[name])
    assert x.shape == (3, 3, FRAMES[name], 32, 32)
    with torch.no_grad():
        dist = [vae.encode(x[i:i + 1]).latent_dist for i in range(3)]
    c = vae.config
    if name == "wan":  # pipeline_wan_video2video.py:424-435: the mode, (z - mean) * (1 / std) per channel
        z = torch.cat([d.mode() for d in dist])
        view = (1, c.z_dim, 1, 1, 1)
        d = (z - torch.tensor(c.latents_mean).view(view)) * (1.0 / torch.tensor(c.latents_std).view(view))
    elif name == "ltx2":  # pipeline_ltx2_image2video.py:837-846, pipeline_ltx2.py:687-693: the mode, buffers
        z = torch.cat([d.mode() for d in dist])
        d = (z - vae.latents_mean.view(1, -1, 1, 1, 1)) * c.scaling_factor / vae.latents_std.view(1, -1, 1, 1, 1)
    else:  # cogvideox_video2video.py:382-388: a posterior sample, times scaling_factor
        g = torch.Generator().manual_seed(0)
        z = torch.cat([d.mean + d.std * torch.randn(d.mean.shape, generator=g) for d in dist for _ in range(8)])
        d = z * c.scaling_factor
    assert z.shape[2] == 1 + (FRAMES[name] - 1) // {"wan": 4, "ltx2": 8, "cogvideox": 4}[name]
    if name == "cogvideox":  # one scalar: the whole latent's std is 1 (a sample: 8 draws per clip)
        assert float(d.double().std(correction=0)) == pytest.approx(1.0, abs=0.05)
    else:  # per channel, over clips, time and space: the mode, so the measured values themselves
        flat = d.double().transpose(0, 1).reshape(d.shape[1], -1)
        assert flat.mean(1).abs().max() < 1e-3 and (flat.std(1, correction=0) - 1).abs().max() < 1e-3
    meta = json.loads((out / "latentvae_export.json").read_text())
    assert meta["scaling_measured"] and meta["family"] == name
    assert f"Measured on 3 clips of {FRAMES[name]} frames" in (out / "README.md").read_text()


def test_calibrating_a_video_vae_on_clips_off_its_rule_is_one_line(videos, tmp_path, capsys):
    src = save_folder(tiny_video_vae("ltx2"), tmp_path / "src")
    with pytest.raises(SystemExit) as e:
        cli_main(["export", str(src), "--out", str(tmp_path / "out"), "--calibrate", str(videos), "--frames", "12"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "--frames 12: AutoencoderKLLTX2Video takes clips of 1 + 8k frames" in err and "use 9 or 17" in err
    assert not (tmp_path / "out").exists()
