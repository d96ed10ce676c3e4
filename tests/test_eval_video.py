"""`latentvae evaluate` on videos: per-frame figures as the class itself gives them, temporal PSNR against flicker,
FVD only with I3D weights, the clip rule of every VAE at once, broken videos listed, strips, VAEs side by side.

    pytest tests/test_eval_video.py       # tiny video VAEs (tests/families.py), 32x32 px clips of 17 frames

Two runs are shared by the tests (module fixtures): wan + ltx2 side by side over two good videos, a broken one and
a too-short one; and wan with an I3D of random weights saved as safetensors (FVD's wiring, never real figures).
"""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage.metrics import peak_signal_noise_ratio

from conftest import LPIPS_DIR, make_photo
from families import save_folder, tiny_video_vae
from latentvae import cli, fid, fvd, metrics
from latentvae.videos import fit_clip, read_frames
from videos import broken_video, camera_pan, moving_shapes

FRAMES, SIDE, STRIP = 17, 32, 5
LPIPS = ["--lpips", "alex", "--lpips-dir", LPIPS_DIR] if LPIPS_DIR else ["--lpips", "none"]


def evaluate(argv: list[str]) -> None:
    cli.main(["evaluate", *argv])


def read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Two tiny video VAEs (wan: clips of 1 + 4k frames, ltx2: 1 + 8k) and a folder of videos: two good ones,
    a corrupt one and one too short for a clip."""
    ws = tmp_path_factory.mktemp("video-eval")
    for name in ("wan", "ltx2"):
        save_folder(tiny_video_vae(name), ws / name)
    videos = ws / "videos"
    videos.mkdir()
    moving_shapes(videos / "a.mp4", FRAMES, size=(SIDE, SIDE), fps=8)
    camera_pan(videos / "b.mp4", make_photo((96, 48)), FRAMES, size=(40, 48), fps=8)
    broken_video(videos / "bad.mp4", "garbage")
    moving_shapes(videos / "short.mp4", 5, size=(SIDE, SIDE), fps=8)
    return ws


def base_argv(ws, *vaes: str) -> list[str]:
    return [*(a for v in vaes for a in ("--vae", str(ws / v))), "--data", str(ws / "videos"), "--frames", str(FRAMES),
            "--fps", "8", "--resolution", f"{SIDE}x{SIDE}", "--mixed-precision", "no", "--strip-frames", str(STRIP)]


@pytest.fixture(scope="module")
def side_by_side(ws):
    """wan and ltx2 over the videos, without --i3d: (report folder, summary, stderr lines)."""
    import contextlib
    import io

    out, err = ws / "report", io.StringIO()
    with contextlib.redirect_stderr(err):
        evaluate([*base_argv(ws, "wan", "ltx2"), *LPIPS, "--out", str(out)])
    return out, json.loads((out / "summary.json").read_text()), err.getvalue()


# ----------------------------------------------------------------------------- the figures
def test_per_frame_psnr_is_the_class_own_encode_decode(ws, side_by_side):
    """The report's per-frame PSNR (and temporal PSNR) of each clip = the diffusers class called directly on the
    same decoded, fitted frames: encode -> posterior mean -> decode, in fp32, scored on uint8 pixels."""
    from diffusers import AutoencoderKLWan

    out, summary, _ = side_by_side
    vae = AutoencoderKLWan.from_pretrained(ws / "wan").eval()
    clips = {r["clip"]: r for r in read_csv(out / "per_clip.csv") if r["vae"] == "wan"}
    frames = [r for r in read_csv(out / "per_frame.csv") if r["vae"] == "wan"]
    assert set(clips) == {"a.mp4#clip0", "b.mp4#clip0"}
    for clip, row in clips.items():
        indices = [int(k) for k in row["video_frames"].split()]
        x_u8 = fit_clip(read_frames(ws / "videos" / clip.split("#")[0], indices), (SIDE, SIDE))  # (3, T, H, W)
        with torch.no_grad():
            z = vae.encode(x_u8[None].float() / 127.5 - 1).latent_dist.mean
            y = vae.decode(z).sample[0]
        y_u8 = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        a, b = x_u8.permute(1, 2, 3, 0).numpy(), y_u8.permute(1, 2, 3, 0).numpy()
        by_hand = [peak_signal_noise_ratio(f, g, data_range=255) for f, g in zip(a, b)]
        reported = [float(r["psnr"]) for r in frames if r["clip"] == clip]
        assert len(reported) == FRAMES and reported == pytest.approx(by_hand, abs=1e-6)
        assert float(row["psnr"]) == pytest.approx(np.mean(by_hand), abs=1e-6)
        assert float(row["tpsnr"]) == pytest.approx(metrics.temporal_psnr(a, b), abs=1e-6)
    assert summary["vaes"]["wan"]["psnr"] == pytest.approx(np.mean([float(r["psnr"]) for r in clips.values()]))
    assert summary["settings"]["precision_resolved"] == "no"


def test_temporal_psnr_falls_with_flicker_while_per_frame_psnr_barely_moves(tmp_path):
    """A good reconstruction (a fixed error pattern) with ±2 of brightness flicker added frame by frame: per-frame
    PSNR loses under 1.5 dB, temporal PSNR over 10 dB."""
    x = moving_shapes(tmp_path / "a.mp4", FRAMES, size=(SIDE, SIDE))
    noise = np.random.default_rng(0).normal(0, 4, x.shape[1:])  # the same on every frame: no flicker
    rec = np.clip(np.round(x + noise), 0, 255).astype(np.uint8)
    flicker = 2 * (-1) ** np.arange(FRAMES)[:, None, None, None]
    flickered = np.clip(rec.astype(int) + flicker, 0, 255).astype(np.uint8)

    def psnr(y):
        return np.mean([metrics.psnr(a, b) for a, b in zip(x, y)])

    assert psnr(rec) - psnr(flickered) < 1.5
    assert metrics.temporal_psnr(x, rec) - metrics.temporal_psnr(x, flickered) > 10
    assert metrics.temporal_psnr(x, x) == float("inf") and metrics.temporal_psnr(x[:1], rec[:1]) is None


# ----------------------------------------------------------------------------- the report
def test_two_vaes_side_by_side_with_strips_and_the_broken_video_listed(ws, side_by_side):
    out, summary, err = side_by_side
    assert list(summary["vaes"]) == ["wan", "ltx2"]
    for label, s in summary["vaes"].items():
        assert s["clips"] == 2 and s["frames"] == FRAMES and np.isfinite(s["tpsnr"])
        assert (s["lpips_alex"] is not None) == bool(LPIPS_DIR)
    assert summary["vaes"]["wan"]["latent_shape"] == "4 x 5 x 4 x 4"  # T' = 1 + 16/4
    assert summary["vaes"]["ltx2"]["latent_shape"] == "4 x 3 x 4 x 4"  # T' = 1 + 16/8
    table = (out / "report.md").read_text()
    assert "| wan |" in table and "| ltx2 |" in table and "temporal PSNR" in table
    skipped = {s["clip"]: s["reason"] for s in summary["settings"]["skipped"]}
    assert set(skipped) == {"bad.mp4#clip0", "short.mp4#clip0"}
    assert "cannot open" in skipped["bad.mp4#clip0"] and "a clip needs 17" in skipped["short.mp4#clip0"]
    assert "bad.mp4" in table and "bad.mp4" in err
    for label in ("wan", "ltx2"):
        strips = sorted((out / "strips" / label).glob("*.png"))
        assert [p.name for p in strips] == ["0000-a.mp4_clip0.png", "0001-b.mp4_clip0.png"]
        with Image.open(strips[0]) as im:
            assert im.size == (STRIP * SIDE, 2 * SIDE)
            top = np.asarray(im)[:SIDE, :SIDE]
    first = fit_clip(read_frames(ws / "videos" / "a.mp4", [0]), (SIDE, SIDE))[:, 0].permute(1, 2, 0).numpy()
    assert np.array_equal(top, first)  # the top row is the original clip's first frame


def test_without_i3d_weights_one_line_and_no_fvd_column(side_by_side):
    out, summary, err = side_by_side
    lines = [line for line in err.splitlines() if "FVD" in line]
    assert len(lines) == 1 and "--i3d" in lines[0]
    assert all("fvd" not in s for s in summary["vaes"].values()) and summary["settings"]["i3d"] is None
    assert "FVD ↓" not in (out / "report.md").read_text()


def test_frames_off_every_vae_rule_are_refused_naming_valid_lengths(ws, capsys):
    """13 = 1 + 4*3 suits wan but not ltx2 (1 + 8k): refused in one line naming 1 + 8k (9 or 17)."""
    argv = base_argv(ws, "wan", "ltx2")
    argv[argv.index("--frames") + 1] = "13"
    with pytest.raises(SystemExit) as e:
        evaluate([*argv, "--out", str(ws / "refused")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "--frames 13" in err and "1 + 8k" in err and "9 or 17" in err
    assert not (ws / "refused").exists()


@pytest.mark.parametrize("change, words", [
    (("--resolution", "36x32"), ("--resolution 36x32", "multiples of 8")),
    (("--vae", None), ("AutoencoderKL", "cannot be evaluated on videos")),
])
def test_sizes_off_the_multiple_and_image_vaes_are_refused(ws, capsys, change, words):
    from conftest import save_tiny_vae

    argv = base_argv(ws, "wan")
    flag, value = change
    if value is None:
        value = str(save_tiny_vae(ws / "image-vae"))
    argv[argv.index(flag) + 1] = value
    with pytest.raises(SystemExit) as e:
        evaluate([*argv, "--out", str(ws / "refused")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and all(w in err for w in words), err


# ----------------------------------------------------------------------------- FVD
def random_i3d(path) -> fvd.I3D:
    """An I3D of seeded random weights (He-initialized, so features vary with the input), saved as safetensors."""
    torch.manual_seed(0)
    model = fvd.I3D().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv3d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


def test_fvd_with_i3d_weights(ws, capsys, monkeypatch):
    """--i3d: FVD in the report = the Fréchet distance of the I3D features of the originals and of a random VAE's
    reconstructions, > 0; ~0 between the originals' features and themselves in another order; a file that is not
    an I3D is refused in one line."""
    path = ws / "i3d.safetensors"
    random_i3d(path)
    seen = []  # (clip, features) of every call: the originals' first, then the VAE's, clip by clip
    real = fvd.i3d_features

    def recorded(model, clip):
        seen.append((clip, real(model, clip)))
        return seen[-1][1]

    monkeypatch.setattr(fvd, "i3d_features", recorded)
    out = ws / "report-fvd"
    evaluate([*base_argv(ws, "wan"), "--lpips", "none", "--i3d", str(path), "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    s = summary["vaes"]["wan"]
    assert s["fvd_clips"] == 2 and s["fvd_windows"] == 2 and summary["settings"]["i3d"]["features"] == 400
    assert "FVD ↓" in (out / "report.md").read_text()

    originals = [fit_clip(read_frames(ws / "videos" / v, range(FRAMES)), (SIDE, SIDE)) for v in ("a.mp4", "b.mp4")]
    assert len(seen) == 4 and all(torch.equal(seen[2 * i][0], x) for i, x in enumerate(originals))
    ref, rec, ref_reversed = fid.FeatureStats(400), fid.FeatureStats(400), fid.FeatureStats(400)
    for k, (_, f) in enumerate(seen):
        (ref if k % 2 == 0 else rec).add_features(f)
    for _, f in reversed(seen[0::2]):
        ref_reversed.add_features(f)
    assert s["fvd"] == pytest.approx(fid.frechet_distance(ref, rec), rel=1e-9) and s["fvd"] > 0
    assert abs(fid.frechet_distance(ref, ref_reversed)) < 1e-6 * s["fvd"]

    save_file({"logits.conv3d.weight": torch.zeros(400, 1024, 1, 1, 1)}, str(ws / "not-i3d.safetensors"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        evaluate([*base_argv(ws, "wan"), "--i3d", str(ws / "not-i3d.safetensors"), "--out", str(ws / "refused")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "not-i3d.safetensors: missing" in err
