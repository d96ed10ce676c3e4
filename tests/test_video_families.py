"""The video VAEs in the family table: clip rules, 5-D latents, pipeline formulas, tiling, refusals.

Tiny random instances of diffusers' own classes (tests/families.py tiny_video_vae, 32-px frames, /8) pin what
the table says about AutoencoderKLWan, AutoencoderKLLTX2Video, AutoencoderKLHunyuanVideo15 and
AutoencoderKLCogVideoX: that a clip of 1 + step*k frames comes back as itself and another length does not,
that latentvae's encode/decode is the class's own, and that each formula is the one its pipeline applies
(written out here from the cited diffusers lines: the pipelines need transformers, which the tests do not).
"""
from __future__ import annotations

import pytest
import torch
from families import VIDEO_FAMILY_NAMES, VIDEO_STEP, clips, images, save_folder, tiny_vae, tiny_video_vae

from latentvae.vae import conventions
from latentvae.vae.families import FAMILIES, VIDEO_FAMILIES, FamilyCannot, TilingMismatch, family
from latentvae.vae.loaded import make_record
from latentvae.vae.loading import load_vae
from latentvae.vae.model import configure_tiling

TEMPORAL = {"wan": 4, "ltx2": 8, "hunyuanvideo15": 4, "cogvideox": 4}


def test_the_table_lists_the_four_video_families():
    assert set(VIDEO_FAMILIES) == set(VIDEO_FAMILY_NAMES)
    assert all(not f.video for n, f in FAMILIES.items() if n not in VIDEO_FAMILIES)
    for name in VIDEO_FAMILY_NAMES:
        f = family(name)
        assert f.five_d and f.frames_cite and f.consumer_cite
        for job in ("encode-video", "evaluate-video", "train-decoder-video", "evaluate", "encode", "train-decoder"):
            f.require(job)


@pytest.mark.parametrize("name", VIDEO_FAMILY_NAMES)
def test_the_record_knows_the_clip_rule(name, tmp_path):
    lv = load_vae(save_folder(tiny_video_vae(name), tmp_path / name))
    step = VIDEO_STEP[name]
    assert lv.video and lv.family.name == name
    assert (lv.layout.temporal, lv.layout.frame_step, lv.layout.factor) == (TEMPORAL[name], step, 8)
    assert lv.layout.frames_ok(1) and lv.layout.frames_ok(1 + 2 * step) and not lv.layout.frames_ok(2 + step)
    assert lv.layout.nearest_frames(2 + step) == (1 + step, 1 + 2 * step)
    assert lv.layout.latent_frames(1 + 2 * step) == 1 + 2 * step // TEMPORAL[name]
    assert f"1 + {step}k frames" in lv.describe()


@pytest.mark.parametrize("name", VIDEO_FAMILY_NAMES)
def test_a_clip_on_the_rule_comes_back_whole_and_one_off_it_does_not(name):
    """The rule is the classes' own behaviour, not a convention: off it, frames are lost or invented."""
    lv = make_record(tiny_video_vae(name), {})
    step = VIDEO_STEP[name]
    with torch.no_grad():
        for frames in (1, 1 + step, 1 + 2 * step):
            mean, _ = lv.moments(clips(1, frames))
            assert mean.shape == (1, 4, lv.layout.latent_frames(frames), 4, 4)
            assert lv.decode(mean).shape == (1, 3, frames, 32, 32)
        off = 1 + step + step // 2
        if name in ("ltx2", "hunyuanvideo15"):  # their encoders refuse lengths off the rule outright
            with pytest.raises(RuntimeError):
                lv.moments(clips(1, off))
        elif name == "wan":  # Wan drops the frames past the rule
            assert lv.decode(lv.moments(clips(1, off))[0]).shape[2] == 1 + step
        else:  # CogVideoX decodes an even latent count to frames that were never there: said in one line
            with pytest.raises(TilingMismatch, match=rf"gave .*untiled\); give it clips of 1 \+ {step}k frames"):
                lv.decode(lv.moments(clips(1, off))[0])


@pytest.mark.parametrize("name", VIDEO_FAMILY_NAMES)
def test_encode_and_decode_of_clips_and_images_are_the_class_own(name):
    vae = tiny_video_vae(name)
    lv = make_record(vae, {})
    x = clips(2, 1 + VIDEO_STEP[name], seed=1)
    with torch.no_grad():
        mean, logvar = lv.moments(x)
        own = [vae.encode(x[i:i + 1]).latent_dist for i in range(2)]
        # batched here (split for hunyuanvideo15), one clip at a time there: equal to fp32 rounding
        assert torch.allclose(mean, torch.cat([d.mean for d in own]), atol=1e-5)
        assert torch.allclose(logvar, torch.cat([d.logvar for d in own]), atol=1e-5)
        back = lv.decode(mean)
        assert torch.allclose(back, torch.cat([vae.decode(mean[i:i + 1]).sample for i in range(2)]), atol=1e-5)
        img = images(2, 32)  # images are clips of one frame: 4-D in, 4-D out
        m4, _ = lv.moments(img)
        assert torch.allclose(m4[:1], vae.encode(img[:1].unsqueeze(2)).latent_dist.mean[:, :, 0], atol=1e-6)
        assert lv.decode(m4).shape == (2, 3, 32, 32)


def test_consumers_take_the_mode_except_cogvideox_which_samples():
    assert {n: family(n).consumer for n in VIDEO_FAMILY_NAMES} == {
        "wan": "mode", "ltx2": "mode", "hunyuanvideo15": "mode", "cogvideox": "sample"}


@pytest.mark.parametrize("name", VIDEO_FAMILY_NAMES)
def test_each_formula_is_its_pipeline_own_on_5d_latents(name):
    """Written out from the lines the table cites."""
    vae = tiny_video_vae(name)
    lv = make_record(vae, {})
    z = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 + 0.5
    x = conventions.to_diffusion(z, lv.factors, lv.convention)
    c = vae.config
    if name == "wan":  # pipeline_wan_video2video.py:428-435: (z - mean) * (1 / std), viewed (1, z_dim, 1, 1, 1)
        mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1, 1)
        expected = (z - mean) * (1.0 / torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1, 1))
    elif name == "ltx2":  # pipeline_ltx2.py:687-693: (z - latents_mean) * scaling_factor / latents_std, buffers
        expected = ((z - vae.latents_mean.view(1, -1, 1, 1, 1)) * c.scaling_factor / vae.latents_std.view(1, -1, 1, 1, 1))
    else:  # hunyuan_video1_5 image2video.py:387 / cogvideox_video2video.py:388: z * scaling_factor
        expected = z * c.scaling_factor
    assert lv.convention == {"wan": "qwenimage", "ltx2": "ltx2"}.get(name, "sd")
    assert torch.allclose(x, expected, atol=1e-6)
    assert torch.allclose(conventions.from_diffusion(x, lv.factors, lv.convention), z, atol=1e-5)
    scale, bias = conventions.affine(lv.factors, lv.convention, 4)
    view = (1, -1, 1, 1, 1)
    assert torch.allclose((z.double() * scale.view(view) + bias.view(view)).float(), x, atol=1e-5)


def test_ltx2_factors_are_its_buffers_and_calibration_writes_them():
    vae = tiny_video_vae("ltx2")
    fam = family("ltx2")
    assert fam.factors(vae)["latents_std"] == [1.5, 0.5, 2.0, 1.0] and fam.factors(vae)["scaling_factor"] == 0.8
    entries = conventions.diffusers_config("ltx2", channel_mean=[1, 2, 3, 4], channel_std=[2, 2, 2, 2], mean=0, std=1)
    fam.write_factors(vae, entries)
    assert vae.latents_mean.tolist() == [1, 2, 3, 4] and vae.latents_std.tolist() == [2, 2, 2, 2]
    assert vae.config.scaling_factor == 1.0
    assert "latents_mean" in vae.state_dict()  # persistent: the weights file carries them


def test_hunyuanvideo15_batches_are_split_as_diffusers_fails_on_more_than_one():
    vae = tiny_video_vae("hunyuanvideo15")
    x = clips(2, 5)
    with torch.no_grad():
        with pytest.raises(RuntimeError):
            vae.encode(x)  # diffusers 0.42.1: the causal mask broadcasts the batch against the heads
        mean, _ = family("hunyuanvideo15").moments(vae, x)
        assert torch.allclose(mean[1:], vae.encode(x[1:]).latent_dist.mean, atol=1e-6)


def test_an_image_vae_refuses_clips_in_one_line():
    lv = make_record(tiny_vae("kl"), {"spec": "sd-vae"})
    with pytest.raises(FamilyCannot, match=r"^AutoencoderKL \(kl family\) is an image VAE: it cannot encode clips"):
        lv.moments(clips(1, 5))
    with pytest.raises(FamilyCannot, match=r"^sd-vae: AutoencoderKL \(kl family\) cannot encode a video dataset: it "
                                           r"is an image VAE.*wan, ltx2"):
        lv.require("encode-video")


def test_a_full_fine_tune_of_a_video_vae_is_refused_but_its_decoder_is_not():
    for name in ("ltx2", "hunyuanvideo15", "cogvideox"):
        with pytest.raises(FamilyCannot, match="fine-tune its decoder with model.train_decoder_only=true"):
            family(name).require("train")
    family("wan").require("train")  # Wan keeps its image-VAE jobs (T=1) as before


TILES = {"wan": (64, 32), "ltx2": (64, 32), "hunyuanvideo15": (128, 64)}  # frame side, tile side (px)


@pytest.mark.parametrize("name", sorted(TILES))
def test_tiling_turns_on_the_class_own_tiles_and_keeps_the_shapes(name):
    """Tiled and untiled latents of one clip (fp32). With random weights the tiles' seams are far from
    invisible (relative difference 0.15-0.5 here: no training taught the encoder to ignore a tile's border),
    so this pins that tiling is on, the shapes and that the latents are of the same clip, not their closeness
    on a trained VAE."""
    vae = tiny_video_vae(name)
    size, tile = TILES[name]
    x = clips(1, 1 + VIDEO_STEP[name], size=size, seed=2)
    with torch.no_grad():
        plain = family(name).moments(vae, x)[0]
        settings = configure_tiling(name, vae, True, tile_size=tile)
        tiled = family(name).moments(vae, x)[0]
        other = family(name).moments(vae, clips(1, 1 + VIDEO_STEP[name], size=size, seed=3))[0]
    assert vae.use_tiling and settings["tile_sample_min_height"] == tile
    if name == "ltx2":
        assert vae.use_framewise_encoding and vae.use_framewise_decoding
    assert tiled.shape == plain.shape
    assert (tiled - plain).norm() < (other - plain).norm()


def test_tiles_that_give_a_wrong_size_are_said_in_one_line():
    """diffusers' CogVideoX tiled decode returns frames wider than asked for tiles that do not divide them."""
    vae = tiny_video_vae("cogvideox")
    configure_tiling("cogvideox", vae, True, tile_size=48)
    z = torch.randn(1, 4, 3, 8, 8)
    with torch.no_grad(), pytest.raises(TilingMismatch, match=r"^AutoencoderKLCogVideoX: decode of \(1, 4, 3, 8, 8\) "
                                                               r"gave \(1, 3, 9, 64, 71\).*tiles of 48x48 px"):
        family("cogvideox").decode(vae, z)


def test_ltx2_tiles_default_to_ones_diffusers_decodes_480_px_frames_with():
    """diffusers' 512-px LTX-2 tiles leave a one-row tile on 480-px frames that its reflect padding refuses."""
    vae = tiny_video_vae("ltx2")
    settings = configure_tiling("ltx2", vae, True)
    assert settings["tile_sample_min_height"] == settings["tile_sample_min_width"] == 256
    assert settings["tile_sample_stride_height"] == 192 and settings["use_framewise_decoding"]
