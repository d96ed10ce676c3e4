"""Video files: probing, which frames a clip takes, seeking, fitting, broken files, and the sources of clips."""
from __future__ import annotations

import hashlib
import json

import av
import numpy as np
import pytest
import torch
from conftest import make_photo
from videos import broken_video, camera_pan, moving_shapes, square_x

from latentvae.errors import BadInputError, MissingInputError
from latentvae.images import BadImage
from latentvae.video_sources import ClipSource, is_video_data, open_video_source
from latentvae.videos import (BadVideo, VideoInfo, fit_clip, nearest_size, plan_clips, probe, read_frames,
                              write_video)

SUFFIXES = [".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v"]


@pytest.fixture(scope="module")
def long_videos(tmp_path_factory):
    """96 frames at 24 fps, 32x128 (the square never wraps), a keyframe every 8 frames: {suffix: (path, frames)}."""
    folder = tmp_path_factory.mktemp("long")
    return {s: (folder / f"v{s}", moving_shapes(folder / f"v{s}", 96, size=(32, 128), fps=24, keyframe_every=8))
            for s in (".mp4", ".webm", ".mkv")}


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_probe_reads_the_figures_the_file_was_written_with(tmp_path, suffix):
    path = tmp_path / f"v{suffix}"
    moving_shapes(path, 20, size=(32, 48), fps=8)
    info = probe(path)
    assert info == VideoInfo(frames=20, fps=8.0, width=48, height=32, duration=pytest.approx(2.5, abs=0.13))
    assert probe(path.read_bytes()) == info  # bytes give what the path gives


def test_probe_counts_frames_where_the_container_does_not_state_them_and_trusts_it_where_it_does(tmp_path):
    path = tmp_path / "v.webm"
    moving_shapes(path, 13, fps=8)
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 0  # webm states no frame count
    assert probe(path).frames == 13
    cut = broken_video(tmp_path / "cut.mp4", "cut")  # its index states 24 frames; its data holds fewer
    assert probe(cut).frames == 24  # read from the index, not decoded
    with pytest.raises(BadVideo, match=r"cut\.mp4: the video ends after \d+ frames; frame 20 was asked for"):
        read_frames(cut, [20])


def test_resampling_takes_the_frame_at_or_before_each_time(long_videos):
    path, written = long_videos[".mp4"]
    info = probe(path)
    clip = plan_clips(info, 9, fps=8)[0]
    assert clip == [0, 3, 6, 9, 12, 15, 18, 21, 24]  # 24 fps -> 8 fps: every third frame
    got = read_frames(path, clip)
    assert got.shape == (9, 32, 128, 3) and got.dtype == np.uint8
    assert [square_x(f) for f in got] == clip  # the square's column says which frame each one is
    assert np.abs(got.astype(int) - written[clip]).mean() < 6
    ntsc = VideoInfo(300, 30000 / 1001, 64, 64, 10.01)
    assert plan_clips(VideoInfo(60, 30.0, 64, 64, 2.0), 5, fps=12)[0] == [0, 2, 5, 7, 10]  # every 2.5 frames
    assert plan_clips(ntsc, 4, fps=16)[0] == [0, 1, 3, 5]  # 29.97/16 = 1.873 frames a step
    assert plan_clips(VideoInfo(8, 8.0, 64, 64, 1.0), 6, fps=16)[0] == [0, 0, 1, 1, 2, 2]  # up: frames repeat
    assert plan_clips(info, 4, fps=0)[:2] == [[0, 1, 2, 3], [4, 5, 6, 7]] and len(plan_clips(info, 4)) == 24


def test_clips_follow_the_stride_and_a_short_video_says_why():
    info = VideoInfo(48, 24.0, 64, 64, 2.0)  # 16 frames at 8 fps
    clips = plan_clips(info, 5, fps=8, stride=3)
    assert [c[0] for c in clips] == [0, 9, 18, 27]  # output frames 0, 3, 6, 9; 12 + 5 > 16
    assert clips[1] == [9, 12, 15, 18, 21]
    assert len(plan_clips(info, 5, fps=8)) == 3  # stride default: end to end
    with pytest.raises(BadVideo, match=r"^2\.1 s at 24 fps gives 34 frames at 16 fps; a clip needs 81$"):
        plan_clips(VideoInfo(50, 24.0, 64, 64, 50 / 24), 81, fps=16)
    with pytest.raises(BadInputError, match="stride"):
        plan_clips(info, 5, fps=8, stride=-1)


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".mkv"])
def test_a_late_clip_seeks_and_gives_what_decoding_from_the_start_gives(long_videos, suffix, monkeypatch):
    import latentvae.videos

    path, _ = long_videos[suffix]
    late = plan_clips(probe(path), 9, fps=8)[-1]
    assert late[0] == 54  # 32 frames at 8 fps: the third clip of 9
    seek, found = latentvae.videos._decode_from_keyframe, []
    monkeypatch.setattr(latentvae.videos, "_decode_from_keyframe", lambda *a: found.append(seek(*a)) or found[-1])
    seeked = read_frames(path, late)
    assert found == [True]  # found from the keyframe before frame 54, not by decoding from the start
    assert np.array_equal(seeked, read_frames(path, late, seek=False))
    assert [square_x(f) for f in seeked] == late
    assert np.array_equal(read_frames(path.read_bytes(), late), seeked)  # bytes as the path
    odd = read_frames(path, [70, 3, 70, 41])  # any order, repeats kept
    assert [square_x(f) for f in odd] == [70, 3, 70, 41]


def test_fit_clip_resizes_to_cover_then_crops_the_centre():
    frames = np.full((3, 32, 48, 3), 200, np.uint8)
    frames[:, :, :8] = frames[:, :, 40:] = 20  # dark side bands: outside a centred square crop
    frames[1, :, :, 1] = 90  # frame 1 differs, in green only
    out = fit_clip(frames, (16, 16))
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.uint8
    assert (out[0, :, :, 2:-2] == 200).all()  # 48x32 -> 24x16, centre 16 columns: the bright middle only
    assert out[0, :, :, 0].max() < 200  # resized whole, then cropped: the bands just outside blur its edges
    assert (out[1, 1] == 90).all() and (out[1, 0, :, 2:-2] == 200).all()  # each frame its own, alike
    wide = fit_clip(frames, (32, 64), mode="area")
    assert wide.shape == (3, 3, 32, 64)
    assert fit_clip(frames, (32, 48)).numpy().transpose(1, 2, 3, 0).tolist() == frames.tolist()  # same size: as is
    assert nearest_size((480, 832), [(512, 512), (832, 480), (480, 832)]) == (480, 832)
    assert nearest_size((900, 500), [(512, 512), (832, 480), (480, 832)]) == (832, 480)
    with pytest.raises(BadInputError, match="valid choices: bicubic, area"):
        fit_clip(frames, (16, 16), mode="lanczos")


@pytest.mark.parametrize("kind", ["garbage", "truncated", "cut"])
def test_a_broken_video_is_one_clip_whose_load_says_why_and_the_rest_load(tmp_path, kind):
    moving_shapes(tmp_path / "good.mp4", 16, fps=8)
    broken_video(tmp_path / "bad.mp4", kind)
    clips = ClipSource(open_video_source(str(tmp_path)), 9, fps=8)
    bad = ["bad.mp4#clip0"] + (["bad.mp4#clip1"] if kind == "cut" else [])  # cut: its index states 24 frames
    assert [clips.relative_name(i) for i in range(len(clips))] == bad + ["good.mp4#clip0"]
    assert clips.load_clip(len(bad), (16, 16))[0].shape == (3, 9, 16, 16)
    with pytest.raises(BadVideo) as e:
        clips.load_clip(0, (16, 16))
    assert isinstance(e.value, BadImage) and "\n" not in str(e.value)
    assert str(e.value).startswith(f"{tmp_path / 'bad.mp4'}: ")
    why = {"garbage": "cannot open as a video (InvalidDataError", "truncated": "cannot open as a video",
           "cut": "the video ends after"}[kind]
    assert why in str(e.value)


def test_camera_pan_round_trips(tmp_path):
    written = camera_pan(tmp_path / "pan.webm", make_photo((160, 48)), 12, size=(32, 48), fps=12, step=3)
    got = read_frames(tmp_path / "pan.webm", range(12)).astype(int)
    error = np.abs(got[:, None] - written[None].astype(int)).mean(axis=(2, 3, 4))  # (decoded, written)
    assert (error.argmin(1) == np.arange(12)).all() and error.diagonal().max() < 12  # each frame where it was
    assert np.array_equal(written[1][:, :-3], written[0][:, 3:])  # the camera moves 3 pixels a frame


def test_folder_clips_carry_captions_identity_and_fit_as_fit_clip_does(tmp_path):
    (tmp_path / "sub").mkdir()
    moving_shapes(tmp_path / "a.mp4", 48, size=(32, 48), fps=24)
    moving_shapes(tmp_path / "sub" / "b.webm", 20, fps=8)
    moving_shapes(tmp_path / "short.mkv", 5, fps=8)
    (tmp_path / "a.txt").write_text("a square\n")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "sub/b.webm", "text": "bee", "n": 3}) + "\n")
    assert is_video_data(str(tmp_path))
    clips = ClipSource(open_video_source(str(tmp_path)), 9, fps=8, stride=4)
    keys = [clips.relative_name(i) for i in range(len(clips))]
    assert keys == ["a.mp4#clip0", "a.mp4#clip1", "short.mkv#clip0", "sub/b.webm#clip0", "sub/b.webm#clip1",
                    "sub/b.webm#clip2"]
    assert clips.failure(2) == f"{tmp_path / 'short.mkv'}: 0.6 s at 8 fps gives 5 frames at 8 fps; a clip needs 9"
    assert clips.frame_indices(1) == [12, 15, 18, 21, 24, 27, 30, 33, 36] and clips.video(1) == 0
    rows = clips.passthrough().to_list()
    assert [r["text"] for r in rows] == ["a square"] * 2 + [None] + ["bee"] * 3 and rows[4]["n"] == 3
    pixels, info = clips.load_clip(1, (16, 16))
    data = (tmp_path / "a.mp4").read_bytes()
    assert info["identity"]["sha256"] == hashlib.sha256(data).hexdigest() == clips.fetch(0)[1]["sha256"]
    assert clips.stat_identity(1) == {"size": len(data), "mtime_ns": (tmp_path / "a.mp4").stat().st_mtime_ns}
    assert info["frame_indices"] == clips.frame_indices(1) and info["original_size"] == (32, 48)
    assert info["crop_top_left"] == (0, 4) and info["fps"] == 8.0
    assert np.array_equal(pixels, fit_clip(read_frames(tmp_path / "a.mp4", info["frame_indices"]), (16, 16)))
    moving_shapes(tmp_path / "a.mp4", 30, size=(32, 48), fps=24)  # edited after it was probed
    with pytest.raises(BadVideo, match=r"a\.mp4: changed since it was probed"):
        clips.load_clip(1, (16, 16))


def test_what_counts_as_video_data(tmp_path, image_folder):
    assert not is_video_data(str(image_folder))
    write_video(image_folder / "stray.mp4", np.zeros((2, 16, 16, 3), np.uint8), 8)
    assert not is_video_data(str(image_folder))  # images and a video: an image folder, as before
    assert not is_video_data(str(tmp_path / "missing"))
    (tmp_path / "none").mkdir()
    with pytest.raises(MissingInputError, match="no video files"):
        open_video_source(str(tmp_path / "none"))


def test_a_datasets_video_column_gives_the_clips_a_folder_gives(tmp_path):
    import datasets
    from datasets.features import Video

    (tmp_path / "files").mkdir()
    paths = [str(tmp_path / "files" / n) for n in ("a.mp4", "b.webm")]
    moving_shapes(paths[0], 24, fps=8)
    moving_shapes(paths[1], 12, fps=8, seed=1)
    ds = datasets.Dataset.from_dict({"video": paths, "text": ["x", "y"]}).cast_column("video", Video())
    ds.save_to_disk(str(tmp_path / "ds"))
    datasets.Dataset.from_dict({"clip": [open(p, "rb").read() for p in paths]}).save_to_disk(str(tmp_path / "raw"))
    assert is_video_data(str(tmp_path / "ds"), "auto", "video")
    assert not is_video_data(str(tmp_path / "ds"), "auto", "text")
    assert is_video_data(str(tmp_path / "raw"), "auto", "clip")
    folder = ClipSource(open_video_source(str(tmp_path / "files")), 9, fps=8)
    for data, column in (("ds", "video"), ("raw", "clip")):
        clips = ClipSource(open_video_source(str(tmp_path / data), "auto", "train", column), 9, fps=8)
        assert [clips.relative_name(i) for i in range(len(clips))] == ["[0]#clip0", "[0]#clip1", "[1]#clip0"]
        assert "fingerprint" in clips.stat_identity(0)
        for i in range(len(clips)):
            assert np.array_equal(clips.load_clip(i, (16, 16))[0], folder.load_clip(i, (16, 16))[0])
    assert ClipSource(open_video_source(str(tmp_path / "ds")), 9, 8).passthrough()["text"] == ["x", "x", "y"]
    with pytest.raises(BadInputError, match=r"no video column 'video'; columns: clip \(set --video-column"):
        open_video_source(str(tmp_path / "raw"))
