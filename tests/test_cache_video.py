"""The latent cache of video data: `latentvae encode` of real video files (tests/videos.py, PyAV) with a tiny random
instance of each video VAE class, read back by LatentDataset / LatentLoader as 5-D latents in the family's units,
decoded by `latentvae decode` per frame; the clip rule per family; exactly-once after a real SIGKILL; updates in
place; broken, too-short and out-of-memory clips listed while the rest encode; --tiling against the class's own.

The expected latents are written out here from the class's own `encode`/`decode` and each pipeline's formula
(cited in vae/conventions.py), never through latentvae's family table. fp32 pinned (--mixed-precision no).

    python -m pytest tests/test_cache_video.py -q
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from families import VIDEO_FAMILY_NAMES, VIDEO_STEP, save_folder, tiny_vae, tiny_video_vae
from videos import broken_video, moving_shapes
from latentvae import LatentDataset, LatentLoader, cli
from latentvae.cache import encode, verify_cache
from latentvae.cache.normalize import noise_seed
from latentvae.metrics import psnr
from latentvae.options import EncodeOptions
from latentvae.videos import read_frames

REPO = Path(__file__).resolve().parents[1]
SEED = 5  # LatentDataset's: the posterior noise of CogVideoX, whose pipelines sample
SAMPLES = {"cogvideox"}  # cogvideo/pipeline_cogvideox_video2video.py: retrieve_latents (sample); the others argmax
FIXED = ["--dtype", "fp32", "--mixed-precision", "no", "--num-workers", "0", "--no-progress"]


@dataclass
class Made:
    name: str
    vae: torch.nn.Module
    folder: Path
    videos: Path
    cache: Path
    frames: int


def write_videos(folder: Path, frames: int) -> None:
    """a.mp4 (two and a bit clips, 32x40: centre-cropped to 32x32), b.webm (one clip), a too-short and a broken one;
    a caption for a.mp4 and b.webm (metadata.jsonl)."""
    folder.mkdir(parents=True)
    moving_shapes(folder / "a.mp4", 2 * frames + 2, size=(32, 40), fps=8, seed=1)
    moving_shapes(folder / "b.webm", frames, size=(32, 32), fps=8, seed=2)
    moving_shapes(folder / "short.mp4", frames - 2, size=(32, 32), fps=8, seed=3)
    broken_video(folder / "bad.mp4", "garbage")
    (folder / "metadata.jsonl").write_text('{"file_name": "a.mp4", "text": "a square"}\n'
                                           '{"file_name": "b.webm", "text": "a disc"}\n')


def encode_args(vae: Path, data: Path, out: Path, frames: int, *more: str) -> list[str]:
    return ["encode", "--vae", str(vae), "--data", str(data), "--out", str(out), "--frames", str(frames),
            "--resolution", "32", "--batch-size", "1", *FIXED, *more]


@pytest.fixture(scope="module", params=VIDEO_FAMILY_NAMES)
def made(request, tmp_path_factory) -> Made:
    name = request.param
    root = tmp_path_factory.mktemp(name)
    vae = tiny_video_vae(name, seed=1)
    folder = save_folder(vae, root / "vae")
    frames = 1 + VIDEO_STEP[name]
    write_videos(root / "vids", frames)
    cli.main(encode_args(folder, root / "vids", root / "cache", frames, "--store", "moments"))
    return Made(name, vae, folder, root / "vids", root / "cache", frames)


def source_clip(made: Made, row: dict) -> torch.Tensor:
    """The clip a row was encoded from, (1, 3, T, 32, 32) in [-1, 1]: its frames decoded by PyAV, centre-cropped."""
    frames = read_frames(str(made.videos / row["video_key"]), row["frame_indices"])  # (T, H, W, 3)
    left = (frames.shape[2] - 32) // 2
    x = torch.from_numpy(frames[:, :, left:left + 32].copy()).permute(3, 0, 1, 2).float() / 127.5 - 1
    return x[None]


def pipeline_formula(name: str, vae, z: torch.Tensor) -> torch.Tensor:
    """VAE latents (B, C, T', h, w) -> the diffusion latents, as each pipeline writes it."""
    c, per_channel = vae.config, (1, -1, 1, 1, 1)
    if name == "wan":  # wan/pipeline_wan_video2video.py:428-435: (z - latents_mean) * (1 / latents_std), config
        return (z - torch.tensor(c.latents_mean).view(per_channel)) * (1.0 / torch.tensor(c.latents_std).view(per_channel))
    if name == "ltx2":  # ltx2/pipeline_ltx2.py _normalize_latents: (z - mean) * scaling_factor / std, buffers
        return (z - vae.latents_mean.view(per_channel)) * c.scaling_factor / vae.latents_std.view(per_channel)
    return z * c.scaling_factor  # HunyuanVideo 1.5, CogVideoX: z * scaling_factor


def expected(made: Made, ds: LatentDataset, row: int) -> torch.Tensor:
    """Cache row `row` as a trainer must get it: the class's encode of its clip, the consumer's latent (mode, or a
    posterior draw seeded as LatentDataset documents), through the pipeline's formula."""
    with torch.no_grad():
        dist = type(made.vae).encode(made.vae, source_clip(made, ds[row])).latent_dist
    z = dist.mode()
    if made.name in SAMPLES:
        g = torch.Generator().manual_seed(noise_seed(SEED, ds.epoch, row))
        z = dist.mean + dist.std * torch.randn(dist.mean.shape[1:], generator=g)
    return pipeline_formula(made.name, made.vae, z)[0]


# ----------------------------------------------------------------------------- every family
def test_clips_read_back_as_the_class_and_pipeline_give_them(made):
    ds = LatentDataset(made.cache, seed=SEED, cache_dir=str(made.cache.parent / "hf"))
    latent_frames = 3 if made.name == "cogvideox" else 2  # 1 + (T - 1) / temporal: (9-1)/4, (5-1)/4, (9-1)/8
    assert len(ds) == 3 and ds.latent_shapes().tolist() == [[4, latent_frames, 4, 4]] * 3
    want = {r: expected(made, ds, r) for r in range(len(ds))}
    for row in range(len(ds)):
        item = ds[row]
        assert item["latents"].shape == (4, latent_frames, 4, 4)
        torch.testing.assert_close(item["latents"], want[row], rtol=1e-5, atol=1e-5)
        assert item["fps"] == 8 and len(item["frame_indices"]) == made.frames
        assert item["source_key"] == f"{item['video_key']}#clip{item['clip_index']}"
    a = sorted((ds[r]["clip_index"], ds[r]["frame_indices"]) for r in range(3) if ds[r]["video_key"] == "a.mp4")
    assert a == [(0, list(range(made.frames))), (1, list(range(made.frames, 2 * made.frames)))]  # end to end
    # LatentLoader: 5-D batches of one shape with their captions, the same rows
    row_of = {k: r for r, k in enumerate(ds.data["source_key"])}
    seen = Counter()
    for batch in LatentLoader(ds, batch_size=2, seed=0):
        assert batch["latents"].dim() == 5 and batch["latents"].shape[1:] == (4, latent_frames, 4, 4)
        for k, key in enumerate(batch["source_key"]):
            assert batch["text"][k] == {"a.mp4": "a square", "b.webm": "a disc"}[key.split("#")[0]]
            torch.testing.assert_close(batch["latents"][k], want[row_of[key]], rtol=1e-5, atol=1e-5)
            seen[key] += 1
    assert sorted(seen) == ["a.mp4#clip0", "a.mp4#clip1", "b.webm#clip0"] and set(seen.values()) == {1}


def test_the_manifest_lists_the_broken_and_the_short_video_and_records_the_clip_rule(made):
    m = json.loads((made.cache / "manifest.json").read_text())
    reasons = {f["source_key"]: f["reason"] for f in m["failures"]}
    assert set(reasons) == {"bad.mp4#clip0", "short.mp4#clip0"}
    assert "cannot open as a video" in reasons["bad.mp4#clip0"]
    assert re.search(rf"gives {made.frames - 2} frames.*a clip needs {made.frames}", reasons["short.mp4#clip0"])
    assert m["counts"]["inputs"] == 5 and m["counts"]["rows"] == 3
    v = m["video"]
    assert (v["frames"], v["frame_step"], v["videos"], v["resolution"]) == (made.frames, VIDEO_STEP[made.name], 4, [32, 32])
    assert v["temporal_factor"] == {"wan": 4, "ltx2": 8, "hunyuanvideo15": 4, "cogvideox": 4}[made.name]
    assert f"1 + {VIDEO_STEP[made.name]}k frames" in v["clip_rule"] and ".py:" in v["clip_rule_cite"]


def test_decoding_clips_matches_the_class_decode_frame_by_frame(made, tmp_path):
    raw = LatentDataset(made.cache, convention=None, cache_dir=str(made.cache.parent / "hf"))
    report = verify_cache(made.cache, limit=1, seed=1, pairs_dir=tmp_path / "strips")
    assert len(report["samples"]) == 1 and len(list((tmp_path / "strips").glob("*.png"))) == 1
    for s in report["samples"]:
        row = next(r for r in range(len(raw)) if raw[r]["source_id"] == s["source_id"])
        z = torch.tensor(raw.data[row]["latent_mean"])[None]  # the stored mean (raw[row] of CogVideoX: a draw)
        with torch.no_grad():  # through the class's own decode
            x_hat = type(made.vae).decode(made.vae, z).sample[0]
        x_hat = ((x_hat.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        x = ((source_clip(made, raw[row])[0] + 1) * 127.5).round().to(torch.uint8)
        want = [psnr(x[:, t].permute(1, 2, 0).numpy(), x_hat[:, t].permute(1, 2, 0).numpy()) for t in range(made.frames)]
        assert s["frame_psnr"] == pytest.approx(want, abs=1e-3)
        assert s["psnr"] == pytest.approx(np.mean(want), abs=1e-3)


@pytest.mark.parametrize("name", VIDEO_FAMILY_NAMES)
def test_frames_off_the_familys_clip_rule_are_refused_naming_the_valid_lengths(name, tmp_path, capsys):
    folder = save_folder(tiny_video_vae(name), tmp_path / "vae")
    (tmp_path / "vids").mkdir()
    moving_shapes(tmp_path / "vids" / "a.mp4", 5, fps=8)
    step = VIDEO_STEP[name]
    with pytest.raises(SystemExit) as e:
        cli.main(encode_args(folder, tmp_path / "vids", tmp_path / "out", 1 + step + 2))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"--frames {step + 3}" in err and f"1 + {step}k" in err and f"use {1 + step} or {1 + 2 * step}" in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- one family: what a run must survive
@pytest.fixture(scope="module")
def wan(tmp_path_factory) -> Path:
    return save_folder(tiny_video_vae("wan", seed=2), tmp_path_factory.mktemp("wan-vae") / "vae")


def rows_of(out: Path) -> dict:
    ds = LatentDataset(out, convention=None, cache_dir=str(out.parent / "hf"))
    got = Counter(ds.data["source_key"])
    assert set(got.values()) == {1}, got  # every clip once
    return {ds[r]["source_key"]: ds[r] for r in range(len(ds))}


def test_a_real_sigkill_mid_run_then_rerun_holds_every_clip_exactly_once(wan, tmp_path):
    (tmp_path / "vids").mkdir()
    for i in range(2):
        moving_shapes(tmp_path / "vids" / f"v{i}.mp4", 10, fps=8, seed=i)  # two 5-frame clips each
    args = encode_args(wan, tmp_path / "vids", tmp_path / "cache", 5, "--shard-size", "1")[1:]
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "encode_kill_worker.py"), "shard:0:2", *args], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (tmp_path / "cache" / "manifest.json").exists()
    assert len(list((tmp_path / "cache" / "data").glob("part-*.parquet"))) == 2  # two clips made it before the kill
    m = encode(EncodeOptions(**cli_values(args)))
    assert m["this_run"]["rows_encoded"] == 2 and m["this_run"]["resumed"]["encoded"] == 2
    after = rows_of(tmp_path / "cache")
    assert sorted(after) == [f"v{i}.mp4#clip{k}" for i in range(2) for k in range(2)]
    fresh = rows_of(Path(encode(EncodeOptions(**{**cli_values(args), "out": str(tmp_path / "fresh")}))["cache"]))
    for key, row in after.items():  # the killed run's rows came from another process: equal in fp32
        torch.testing.assert_close(row["latents"], fresh[key]["latents"], rtol=1e-5, atol=1e-5)


def cli_values(args: list[str]) -> dict:
    """The encode flags `args` as EncodeOptions values (what the command line parses them to)."""
    from latentvae.options.parser import build_parser, values_from_namespace

    return values_from_namespace(EncodeOptions, build_parser(EncodeOptions, "encode").parse_args(args))


def test_a_changed_video_is_re_encoded_in_place_and_the_others_carried(wan, tmp_path):
    data, out = tmp_path / "vids", tmp_path / "cache"
    data.mkdir()
    for i in range(3):
        moving_shapes(data / f"v{i}.mp4", 5, fps=8, seed=i)
    opts = EncodeOptions(**cli_values(encode_args(wan, data, out, 5)[1:]))
    encode(opts)
    before = rows_of(out)
    moving_shapes(data / "v1.mp4", 10, fps=8, seed=9)  # other content, and long enough for a second clip
    (data / "v2.mp4").unlink()
    moving_shapes(data / "v3.mp4", 5, fps=8, seed=3)
    os.utime(data / "v0.mp4", ns=(1_000_000_000, 1_000_000_000))  # touched, the same bytes: carried, not re-encoded
    m = encode(opts)
    assert m["generation"] == 2 and m["this_run"]["rows_encoded"] == 3  # v1's two clips and v3's
    ch = m["this_run"]["changes"]
    assert (ch["changed"], ch["removed"]) == (1, 1) and ch["added"] == 2  # v1#clip1 and v3#clip0 are new
    after = rows_of(out)
    assert sorted(after) == ["v0.mp4#clip0", "v1.mp4#clip0", "v1.mp4#clip1", "v3.mp4#clip0"]
    assert torch.equal(after["v0.mp4#clip0"]["latents"], before["v0.mp4#clip0"]["latents"])  # carried as it was
    assert after["v0.mp4#clip0"]["source_mtime_ns"] == 1_000_000_000 and m["this_run"]["rows_carried"] == 1
    assert not torch.allclose(after["v1.mp4#clip0"]["latents"], before["v1.mp4#clip0"]["latents"])
    assert after["v1.mp4#clip0"]["source_sha256"] != before["v1.mp4#clip0"]["source_sha256"]


def test_a_clip_out_of_memory_is_listed_naming_tiling_and_retried_on_the_next_run(wan, tmp_path, monkeypatch):
    encode_module = importlib.import_module("latentvae.cache.encode")  # (the package's `encode` is the function)

    data, out = tmp_path / "vids", tmp_path / "cache"
    data.mkdir()
    for i in range(3):
        moving_shapes(data / f"v{i}.mp4", 5, fps=8, seed=i)
    opts = EncodeOptions(**cli_values(encode_args(wan, data, out, 5)[1:]))
    real = encode_module.encode_rows

    def encode_rows(encoder, rows, *a, **k):  # the allocator's error at one clip, as a GPU that cannot fit it
        if any(r["source_key"] == "v1.mp4#clip0" for r in rows):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")
        return real(encoder, rows, *a, **k)

    monkeypatch.setattr(encode_module, "encode_rows", encode_rows)
    m = encode(opts)
    assert m["counts"]["rows"] == 2 and [f["source_key"] for f in m["failures"]] == ["v1.mp4#clip0"]
    reason = m["failures"][0]["reason"]
    assert "out of memory" in reason and "--tiling" in reason and "5 frames at 32x32" in reason
    monkeypatch.setattr(encode_module, "encode_rows", real)
    m = encode(opts)  # with more memory (or --tiling) the rerun encodes it
    assert m["this_run"]["rows_encoded"] == 1 and m["counts"]["rows"] == 3 and not m["failures"]


def test_tiled_latents_are_the_classs_own_tiled_encode_and_near_the_untiled(tmp_path):
    """--tiling --tile-size 32 on 64-px frames runs the class's own tiled encode (tiles of 32 px, stride 24 =
    model._video_tiling's three quarters). Measured on this tiny random Wan (fp32, 5 frames, 64x64, latents of
    std 0.21): tiled vs untiled differ by 0.074 mean and 0.51 at most, since random weights and the mid-block's
    attention see the whole frame; a trained VAE's tiles differ far less. The bound asserted is that measurement
    with 30% headroom."""
    vae = tiny_video_vae("wan", seed=1)
    folder = save_folder(vae, tmp_path / "vae")
    (tmp_path / "vids").mkdir()
    moving_shapes(tmp_path / "vids" / "a.mp4", 5, size=(64, 64), fps=8)
    base = encode_args(folder, tmp_path / "vids", tmp_path / "plain", 5)
    base[base.index("--resolution") + 1] = "64"
    cli.main(base)
    cli.main([*base[:6], str(tmp_path / "tiled"), *base[7:], "--tiling", "--tile-size", "32"])
    plain = LatentDataset(tmp_path / "plain", convention=None, cache_dir=str(tmp_path / "hf"))[0]["latents"]
    tiled = LatentDataset(tmp_path / "tiled", convention=None, cache_dir=str(tmp_path / "hf"))[0]["latents"]
    frames = read_frames(str(tmp_path / "vids" / "a.mp4"), list(range(5)))
    x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
                      tile_sample_stride_width=24)
    with torch.no_grad():
        own = type(vae).encode(vae, x).latent_dist.mode()[0]
    torch.testing.assert_close(tiled, own, rtol=1e-5, atol=1e-5)
    d = (tiled - plain).abs()
    assert d.max() > 1e-3  # it did tile
    assert d.mean() < 0.1 and d.max() < 0.66, (d.mean(), d.max())


def test_video_mistakes_are_one_line(wan, tmp_path, capsys):
    (tmp_path / "vids").mkdir()
    moving_shapes(tmp_path / "vids" / "a.mp4", 5, fps=8)
    (tmp_path / "imgs").mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "imgs" / "a.png")
    image_vae = save_folder(tiny_vae("kl"), tmp_path / "kl")
    cases = [
        (encode_args(image_vae, tmp_path / "vids", tmp_path / "o", 5), ["image VAE", "--vae"]),
        (encode_args(wan, tmp_path / "vids", tmp_path / "o", 5, "--resolution", "36"), ["--resolution 36", "32 or 40"]),
        (encode_args(wan, tmp_path / "vids", tmp_path / "o", 5, "--preprocess", "crops"), ["--preprocess crops"]),
        (encode_args(wan, tmp_path / "imgs", tmp_path / "o", 5), ["--frames", "holds images"]),
        ([*encode_args(image_vae, tmp_path / "imgs", tmp_path / "o", 5)[:7], "--tiling"], ["--tiling", "holds images"]),
    ]
    for argv, words in cases:
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1, (argv, err)
        assert all(w in err for w in words), (words, err)
    assert not (tmp_path / "o").exists()


def test_a_height_by_width_resolution_is_taken_for_clips_and_refused_for_images(wan, tmp_path, capsys):
    (tmp_path / "vids").mkdir()
    moving_shapes(tmp_path / "vids" / "a.mp4", 5, size=(32, 40), fps=8)
    cli.main([*encode_args(wan, tmp_path / "vids", tmp_path / "cache", 5), "--resolution", "24x32"])
    (row,) = rows_of(tmp_path / "cache").values()
    assert row["pixel_size"] == [24, 32] and row["latents"].shape == (4, 2, 3, 4)
    (tmp_path / "imgs").mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "imgs" / "a.png")
    argv = ["encode", "--vae", str(wan), "--data", str(tmp_path / "imgs"), "--out", str(tmp_path / "o"),
            "--resolution", "24x32", *FIXED]
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert "images take a square side" in capsys.readouterr().err


def test_aspect_buckets_give_each_video_the_size_nearest_its_aspect(wan, tmp_path):
    (tmp_path / "vids").mkdir()
    moving_shapes(tmp_path / "vids" / "wide.mp4", 5, size=(32, 48), fps=8)
    moving_shapes(tmp_path / "vids" / "square.mp4", 5, size=(32, 32), fps=8)
    cli.main([*encode_args(wan, tmp_path / "vids", tmp_path / "cache", 5), "--preprocess", "buckets"])
    rows = rows_of(tmp_path / "cache")
    wide, square = rows["wide.mp4#clip0"]["pixel_size"], rows["square.mp4#clip0"]["pixel_size"]
    assert square == [32, 32] and wide[1] > wide[0] and wide[0] % 8 == 0 and wide[1] % 8 == 0
    assert abs(np.log(wide[1] / wide[0]) - np.log(1.5)) < abs(np.log(1.5))  # nearer 3:2 than square
    assert tuple(rows["wide.mp4#clip0"]["latents"].shape) == (4, 2, wide[0] // 8, wide[1] // 8)
