"""latentvae encode/decode (latentvae.cache): exactly-once after kill -9, two processes, manifest, passthrough,
buckets, --limit.

    python -m pytest tests/test_encode.py -q
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from conftest import make_photo
from latentvae import cli
from latentvae.cache import encode, from_storage, verify_cache
from latentvae.vae.loaded import weights_sha256
from latentvae.vae.model import decode, encode_moments
from latentvae.options import EncodeOptions, OptionError, make_options, validated
from latentvae.preprocess import Preprocess, load_preprocessed, make_buckets, nearest_bucket
from latentvae.sources import open_source

REPO = Path(__file__).resolve().parents[1]


def photos(folder: Path, n: int, sizes=((48, 40), (40, 64), (80, 40))) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        make_photo(size=sizes[i % len(sizes)], seed=i).save(folder / f"p{i:03d}.{'jpg' if i % 2 else 'png'}")
    return folder


def bad_files(folder: Path) -> dict[str, str]:
    """name -> a word the failure reason must contain"""
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image at all")
    make_photo(size=(64, 64), seed=99).save(folder / "full.jpg", quality=95)
    data = (folder / "full.jpg").read_bytes()
    (folder / "full.jpg").unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return {"zero.jpg": "empty", "text.jpg": "cannot identify", "truncated.jpg": "truncated"}


def cfg(vae_dir, data, out, **kw) -> EncodeOptions:
    # fp32 pinned: the latents are compared with fp32 tolerances, and `auto` means bf16 on CPUs with bf16 kernels
    base = dict(resolution=32, batch_size=3, shard_size=4, num_workers=0, progress=False, mixed_precision="no")
    return EncodeOptions(vae=str(vae_dir), data=str(data), out=str(out), **{**base, **kw})


def rows(out: Path) -> datasets.Dataset:
    return datasets.load_dataset("parquet", data_files=sorted(str(p) for p in (out / "data").glob("*.parquet")),
                                 split="train", cache_dir=str(out.parent / "hf-cache"))


def load_folder(out: Path) -> datasets.Dataset:
    """`load_dataset(DST)` as a trainer calls it (own cache dir: tests reuse folder names within a second)"""
    return datasets.load_dataset(str(out), split="train", cache_dir=str(out.parent / "hf-cache-folder"))


def assert_exactly_once(out: Path, ids: list[str], flips=(False,)):
    ds = rows(out)
    got = Counter(zip(ds["source_id"], ds["flipped"]))
    want = Counter((i, f) for i in ids for f in flips)
    assert got == want, (got - want, want - got)


# ----------------------------------------------------------------------------- buckets
def test_buckets_have_factor_sides_about_the_same_area_and_both_orientations():
    b = make_buckets(256, 8, max_aspect=2.0)
    assert (256, 256) in b
    for w, h in b:
        assert w % 8 == 0 and h % 8 == 0
        assert 0.95 * 256 ** 2 <= w * h <= 256 ** 2
        assert 0.5 <= w / h <= 2.0
        assert (h, w) in b
    assert nearest_bucket((1920, 1080), b) == min(b, key=lambda s: abs(np.log(s[0] / s[1]) - np.log(16 / 9)))
    assert nearest_bucket((1000, 1000), b) == (256, 256)
    w, h = nearest_bucket((600, 1800), b)  # 1:3 portrait -> the tallest bucket
    assert h / w == max(y / x for x, y in b)


def test_unknown_preprocessing_mode_names_the_valid_ones():
    with pytest.raises(ValueError, match="center-crop, buckets"):
        Preprocess("random-crop")
    with pytest.raises(ValueError, match="valid choices: mean, moments, sample"):
        make_options(EncodeOptions, {"vae": "v", "data": "d", "out": "o", "store": "latents"})


# ----------------------------------------------------------------------------- one process, in-process
def test_encode_buckets_flip_manifest_failures_and_decode_round_trip(vae_dir, tmp_path, capsys):
    data = photos(tmp_path / "imgs", 7)
    reasons = bad_files(data)
    out = tmp_path / "cache"
    m = encode(cfg(vae_dir, data, out, preprocess="buckets", flip=True, store="moments", dtype="fp32"))
    src = open_source(str(data))
    good = [src.name(i) for i in range(len(src)) if Path(src.name(i)).name not in reasons]
    assert_exactly_once(out, good, flips=(False, True))

    # manifest: identity, factors, preprocessing, counts, failures with reasons
    assert m == {**json.loads((out / "manifest.json").read_text()), "this_run": m["this_run"]}
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    assert m["vae"]["weights_sha256"] == weights_sha256(vae) and m["vae"]["scaling_factor"] == 0.18215
    assert m["vae"]["downsample_factor"] == 2 and m["dtype"] == "fp32" and m["store"] == "moments"
    assert m["preprocessing"]["mode"] == "buckets" and m["preprocessing"]["flip"] is True
    assert m["counts"] == {**m["counts"], "inputs": 10, "encoded_inputs": 7, "rows": 14, "failures": 3}
    assert sum(s["rows"] for s in m["shards"]) == 14 and all(s["rows"] <= 4 for s in m["shards"])
    assert sorted(Path(f["source_id"]).name for f in m["failures"]) == sorted(reasons)
    for f in m["failures"]:
        assert reasons[Path(f["source_id"]).name] in f["reason"], f
    fail_lines = [json.loads(line) for line in (out / "failures-rank0.jsonl").read_text().splitlines()]
    assert len(fail_lines) == 3

    # rows: latent = encoder(preprocessed image), shape = pixels / factor, buckets by aspect
    pre = Preprocess("buckets", 32, 2, flip=True)
    ds = load_folder(out).with_format("numpy")  # the folder itself loads
    assert len(ds) == 14
    for r in ds.select(range(0, 14, 3)):
        x = load_preprocessed(src, int(r["source_index"]), pre, True)["pixels"]
        if r["flipped"]:
            x = x.flip(-1)
        assert list(r["pixel_size"]) == list(x.shape[1:])
        orig_h, orig_w = r["original_size"]
        assert tuple(x.shape[1:][::-1]) == pre.target_size((orig_w, orig_h))
        with torch.no_grad():
            mean, logvar = encode_moments(vae, x[None].float() / 127.5 - 1)
        assert list(r["latent_shape"]) == [4, x.shape[1] // 2, x.shape[2] // 2]
        torch.testing.assert_close(from_storage(r["latent_mean"], "fp32"), mean[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(from_storage(r["latent_logvar"], "fp32"), logvar[0], atol=1e-5, rtol=1e-4)

    # decode round trip: the reported PSNR is that of decoder(stored latent) vs the preprocessed source
    report = verify_cache(out, limit=5, seed=1)
    assert len(report["samples"]) == 5
    for s in report["samples"]:
        i = [src.name(k) for k in range(len(src))].index(s["source_id"])
        x = load_preprocessed(src, i, pre, True)["pixels"]
        x = x.flip(-1) if s["flipped"] else x
        with torch.no_grad():
            x_hat = decode(vae, encode_moments(vae, x[None].float() / 127.5 - 1)[0])[0]
        expect = 10 * np.log10(255 ** 2 / ((x.double() - ((x_hat.clamp(-1, 1) + 1) * 127.5).round().double()) ** 2).mean())
        assert abs(s["psnr"] - float(expect)) < 0.05
    cli.main(["decode", str(out), "--limit", "2", "--out", str(tmp_path / "pairs")])
    assert "mean PSNR" in capsys.readouterr().out and len(list((tmp_path / "pairs").glob("*.png"))) == 2
    with pytest.raises(SystemExit) as e:  # --min-psnr: exit status 1, with the reason
        cli.main(["decode", str(out), "--limit", "1", "--min-psnr", "99"])
    assert "is below --min-psnr 99" in str(e.value.code)


def test_decode_tiling_decodes_in_tiles_close_to_whole(vae_dir, tmp_path, capsys, monkeypatch):
    """`latentvae decode --tiling`: diffusers' tiled decode (bounded memory for large latents), the tiles reported."""
    from latentvae.errors import BadInputError

    data = photos(tmp_path / "imgs", 3)
    out = tmp_path / "cache"
    encode(cfg(vae_dir, data, out, dtype="fp32"))  # 32x32 images, 16x16 latents
    whole = verify_cache(out, limit=3, seed=0)
    tiled_latents = []
    tiled_decode = AutoencoderKL.tiled_decode
    monkeypatch.setattr(AutoencoderKL, "tiled_decode",
                        lambda self, z, *a, **k: tiled_latents.append(z.shape) or tiled_decode(self, z, *a, **k))
    tiled = verify_cache(out, limit=3, seed=0, tiling=True, tile_size=16)  # 8x8 latent tiles, overlapping
    assert len(tiled_latents) == 3 and whole["tiles"] is None
    assert tiled["tiles"] == {"tile_sample_min_size": 16, "tile_latent_min_size": 8, "tile_overlap_factor": 0.25}
    for a, b in zip(whole["samples"], tiled["samples"]):
        assert a["source_id"] == b["source_id"] and b["psnr"] == pytest.approx(a["psnr"], abs=1.5)
    assert [a["psnr"] for a in whole["samples"]] != [b["psnr"] for b in tiled["samples"]]  # blended seams differ
    cli.main(["decode", str(out), "--limit", "1", "--tiling", "--tile-size", "16"])
    assert "decoded in tiles of 16 px (8 latent, overlap 0.25)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["decode", str(out), "--tile-size", "16"])
    assert e.value.code == 2 and "needs --tiling" in capsys.readouterr().err
    with pytest.raises(BadInputError, match="--tile-size 15: must be a multiple of .* downsampling factor 2"):
        verify_cache(out, limit=1, tiling=True, tile_size=15)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_storage_round_trips_to_the_fp32_latent(vae_dir, tmp_path, dtype):
    data = photos(tmp_path / "imgs", 3)
    ref = encode(cfg(vae_dir, data, tmp_path / "fp32", dtype="fp32"))
    half = encode(cfg(vae_dir, data, tmp_path / dtype, dtype=dtype, num_workers=1))
    assert half["dtype"] == dtype and ref["counts"]["rows"] == half["counts"]["rows"] == 3
    a = {r["source_index"]: r for r in rows(tmp_path / "fp32")}
    for r in rows(tmp_path / dtype):
        z32 = from_storage(a[r["source_index"]]["latent_mean"], "fp32")
        z = from_storage(r["latent_mean"], dtype)
        torch.testing.assert_close(z, z32.to(getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[dtype])).float())


def test_channels_last_encodes_the_same_latents_under_the_same_vae_id(vae_dir, tmp_path):
    """channels_last is the default on CUDA: the cache it writes must match the contiguous one, and the
    VAE's identity (the weights hash) must not depend on the memory format."""
    data = photos(tmp_path / "imgs", 3)
    plain = encode(cfg(vae_dir, data, tmp_path / "plain", dtype="fp32", channels_last=False))
    cl = encode(cfg(vae_dir, data, tmp_path / "cl", dtype="fp32", channels_last=True))
    assert cl["this_run"]["channels_last"] and not plain["this_run"]["channels_last"]
    assert cl["vae"]["weights_sha256"] == plain["vae"]["weights_sha256"]
    a = {r["source_index"]: r for r in rows(tmp_path / "plain")}
    for r in rows(tmp_path / "cl"):
        torch.testing.assert_close(from_storage(r["latent_mean"], "fp32"),
                                   from_storage(a[r["source_index"]]["latent_mean"], "fp32"), rtol=1e-4, atol=1e-5)


def test_auto_batch_size_follows_the_device_and_the_image_size():
    from latentvae.cache.encoder import resolve_batch_size

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [resolve_batch_size(0, cpu, r) for r in (64, 128, 256, 512)] == [16, 4, 1, 1]
    assert [resolve_batch_size(0, cuda, r) for r in (256, 512, 64)] == [64, 16, 128]
    assert resolve_batch_size(5, cuda, 256) == 5  # given: kept
    with pytest.raises(OptionError, match="--batch-size"):
        validated(EncodeOptions(vae="v", data="d", out="o", batch_size=-1))


def test_auto_workers_decode_in_the_main_process_when_the_cpu_encodes(monkeypatch):
    """--num-workers -1: a worker process would compete with the encoder's threads for the CPU's cores."""
    from latentvae.cache.inputs import resolve_workers

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert (resolve_workers(-1, "cpu"), resolve_workers(-1, "cuda")) == (0, 4)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert (resolve_workers(-1, "cuda"), resolve_workers(3, "cpu")) == (1, 3)  # given: kept


def test_out_of_memory_halves_the_batch_and_encodes_every_image_once(vae_dir, tmp_path, monkeypatch, capsys):
    """A device that cannot hold 4 images: the run goes on 2 at a time and writes the cache a run of 2 at a time
    writes; out of memory on a single image stops the run with the allocator's error."""
    import importlib

    enc = importlib.import_module("latentvae.cache.encode")  # the module (latentvae.cache.encode is also its function)
    data = photos(tmp_path / "imgs", 9, sizes=((40, 40),))
    reference = encode(cfg(vae_dir, data, tmp_path / "by2", dtype="fp32", batch_size=2))
    real, calls = enc.encode_rows, []

    def small_device(encoder, rows, *args):
        calls.append(len(rows))
        if len(rows) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(encoder, rows, *args)

    monkeypatch.setattr(enc, "encode_rows", small_device)
    m = encode(cfg(vae_dir, data, tmp_path / "oom", dtype="fp32", batch_size=8))
    assert "out of memory encoding 8 images at once" in capsys.readouterr().err
    assert m["this_run"]["batch_size"] == 8 and m["this_run"]["batch_size_after_oom"] == 2
    assert calls[:4] == [8, 4, 2, 2] and max(calls[4:]) == 2  # halved twice, then kept at 2
    assert_exactly_once(tmp_path / "oom", [str(p) for p in sorted(data.iterdir())])
    want = {r["source_index"]: r["latent_mean"] for r in rows(tmp_path / "by2")}
    assert reference["counts"]["rows"] == m["counts"]["rows"] == 9
    for r in rows(tmp_path / "oom"):
        torch.testing.assert_close(from_storage(r["latent_mean"], "fp32"), from_storage(want[r["source_index"]], "fp32"))

    def no_memory(encoder, rows, *args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(enc, "encode_rows", no_memory)
    with pytest.raises(torch.OutOfMemoryError):
        encode(cfg(vae_dir, data, tmp_path / "none", batch_size=8))
    assert not (tmp_path / "none" / "manifest.json").exists()


def test_passthrough_columns_of_a_datasets_input(vae_dir, tmp_path):
    names = ["cat", "dog"]
    items = {"image": [make_photo(size=(40 + 8 * i, 40), seed=i) for i in range(5)],
             "caption": [f"photo number {i}" for i in range(5)], "label": [i % 2 for i in range(5)]}
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=names)})
    datasets.Dataset.from_dict(items, features=features).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "cache"
    m = encode(cfg(vae_dir, tmp_path / "ds", out, flip=True, store="sample"))
    ds = load_folder(out)
    assert len(ds) == 10 and m["counts"]["failures"] == 0
    assert ds.features["label"] == datasets.ClassLabel(names=names)  # the feature, not just the ints
    for r in ds:
        i = r["source_index"]
        assert r["caption"] == f"photo number {i}" and r["label"] == i % 2
        assert r["source_id"].endswith(f"[{i}]") and len(r["latent_sample"]) == 4
    # a sample is mean + std * noise with noise seeded per (seed, index, flip): the same on a rerun
    # with another batch size (up to fp16 rounding of a mean whose conv summation order changed)
    again = encode(cfg(vae_dir, tmp_path / "ds", tmp_path / "again", flip=True, store="sample", batch_size=2))
    assert again["counts"]["rows"] == 10
    b = {(r["source_index"], r["flipped"]): r["latent_sample"] for r in rows(tmp_path / "again")}
    for r in ds:
        np.testing.assert_allclose(np.array(r["latent_sample"]), np.array(b[(r["source_index"], r["flipped"])]),
                                   rtol=2e-3, atol=2e-3)


def test_resume_ignores_partial_files_and_refuses_other_settings(vae_dir, tmp_path):
    data = photos(tmp_path / "imgs", 9)
    out = tmp_path / "cache"
    c = cfg(vae_dir, data, out)
    encode(c)
    shards = sorted((out / "data").glob("*.parquet"))
    shards[1].rename(out / "data" / f".{shards[1].name}.tmp")  # as if killed before the rename
    (out / "manifest.json").unlink()
    with open(out / "failures-rank0.jsonl", "a") as f:
        f.write('{"source_index": 3, "source_id": "cut sho')  # as if killed mid-line
    m = encode(c)
    assert m["this_run"]["rows_encoded"] == 4 and m["this_run"]["attempt"] == 2
    assert not list((out / "data").glob(".*.tmp"))
    src = open_source(str(data))
    assert_exactly_once(out, [src.name(i) for i in range(len(src))])
    assert encode(c)["this_run"]["rows_encoded"] == 0  # finished: a rerun does nothing
    with pytest.raises(ValueError, match="preprocessing"):
        encode(cfg(vae_dir, data, out, resolution=16))


def test_limit_encodes_the_first_inputs_and_a_larger_limit_encodes_more(vae_dir, tmp_path, capsys):
    data = photos(tmp_path / "imgs", 9)
    out = tmp_path / "cache"
    src = open_source(str(data))
    m = encode(cfg(vae_dir, data, out, limit=4))
    assert m["counts"]["inputs"] == 4 and m["limit"] == 4 and m["this_run"]["rows_encoded"] == 4
    assert_exactly_once(out, [src.name(i) for i in range(4)])
    m = encode(cfg(vae_dir, data, out, limit=3))  # fewer: the fourth input leaves the cache, nothing is encoded
    assert m["counts"]["inputs"] == 3 and m["this_run"]["rows_encoded"] == 0 and m["limit"] == 3
    assert m["this_run"]["changes"]["removed"] == 1 and m["this_run"]["rows_carried"] == 3
    assert_exactly_once(out, [src.name(i) for i in range(3)])
    with pytest.raises(ValueError, match="preprocessing"):  # more, but with other settings
        encode(cfg(vae_dir, data, out, limit=6, resolution=16))
    m = encode(cfg(vae_dir, data, out, limit=6))  # more of the same: only the new inputs are encoded
    assert m["counts"]["inputs"] == 6 and m["this_run"]["rows_encoded"] == 3 and m["this_run"]["attempt"] == 3
    assert m["limit"] == 6 and m["generation"] == 3
    assert_exactly_once(out, [src.name(i) for i in range(6)])
    # 0 = all, from the command line; --verify reports as `latentvae decode OUT` does
    cli.main(["encode", "--vae", str(vae_dir), "--data", str(data), "--out", str(out), "--resolution", "32",
              "--batch-size", "3", "--shard-size", "4", "--num-workers", "0", "--mixed-precision", "no",
              "--no-progress", "--verify"])
    printed = capsys.readouterr().out
    assert "9 rows of 9/9 inputs" in printed and "this run 3 rows" in printed
    assert "mean PSNR" in printed and "over 8 rows of latent_mean" in printed
    assert_exactly_once(out, [src.name(i) for i in range(9)])
    with pytest.raises(OptionError, match="--limit must be >= 0"):
        make_options(EncodeOptions, {"vae": "v", "data": "d", "out": "o", "limit": -1})


# ----------------------------------------------------------------------------- subprocesses
def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}


def test_kill9_mid_run_then_resume_holds_every_image_exactly_once(vae_dir, tmp_path):
    data = photos(tmp_path / "imgs", 80, sizes=((96, 96), (128, 80)))
    (data / "zero.png").write_bytes(b"")
    out = tmp_path / "cache"
    args = ["--vae", str(vae_dir), "--data", str(data), "--out", str(out), "--resolution", "64",
            "--shard-size", "2", "--batch-size", "2", "--num-workers", "1", "--no-progress", "--flip"]
    proc = subprocess.Popen([sys.executable, "-m", "latentvae", "encode", *args], env=_env(), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while len(list((out / "data").glob("*.parquet"))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(list((out / "data").glob("*.parquet")))
    assert not (out / "manifest.json").exists() and 3 <= n_before < 80, "the kill did not land mid-run"
    cli.main(["encode", *args])  # the same command resumes
    src = open_source(str(data))
    ids = [src.name(i) for i in range(len(src)) if not src.name(i).endswith("zero.png")]
    assert_exactly_once(out, ids, flips=(False, True))
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["rows"] == 160 and m["counts"]["failures"] == 1


def test_two_processes_give_the_union_of_inputs_without_duplicates(vae_dir, tmp_path):
    data = photos(tmp_path / "imgs", 11)
    (data / "text.jpg").write_text("not an image")
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "latentvae", "encode", "--vae", str(vae_dir), "--data", str(data), "--out", str(out),
           "--resolution", "32", "--shard-size", "3", "--batch-size", "2", "--num-workers", "0", "--no-progress"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stdout
    ranks = {p.name.split("-")[2] for p in (out / "data").glob("*.parquet")}
    assert ranks == {"000", "001"}  # each process wrote its own shards
    src = open_source(str(data))
    assert_exactly_once(out, [src.name(i) for i in range(len(src)) if not src.name(i).endswith("text.jpg")])
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["failures"] == 1 and m["failures"][0]["source_id"].endswith("text.jpg")


# ----------------------------------------------------------------------------- measured latent statistics
@pytest.mark.parametrize("store", ["mean", "moments", "sample"])
def test_the_manifest_measures_the_latents_a_trainer_draws(vae_dir, tmp_path, store):
    """Per-channel and global mean/std of what a trainer draws from the cache (the mean, posterior
    samples from the moments, or the stored sample), summed from per-shard moments across several
    shards and buckets, equal those computed from the stored rows; and each family's factors follow."""
    from latentvae.vae.conventions import to_diffusion
    data = photos(tmp_path / "imgs", 7)
    m = encode(cfg(vae_dir, data, tmp_path / "cache", dtype="fp32", store=store, preprocess="buckets", flip=True))
    assert m["counts"]["shards"] > 2
    stats = m["latent_statistics"]
    per_channel = [[] for _ in range(4)]
    sums = np.zeros(4)
    sumsq = np.zeros(4)
    count = 0
    for r in rows(tmp_path / "cache"):
        if store == "sample":
            z = from_storage(r["latent_sample"], "fp32").double()
            sums += z.sum((1, 2)).numpy()
            sumsq += z.square().sum((1, 2)).numpy()
        else:
            mu = from_storage(r["latent_mean"], "fp32").double()
            var = from_storage(r["latent_logvar"], "fp32").double().exp() if store == "moments" else 0 * mu
            sums += mu.sum((1, 2)).numpy()
            sumsq += (mu.square() + var).sum((1, 2)).numpy()
        count += r["latent_shape"][1] * r["latent_shape"][2]
        if store != "moments":
            for c in range(4):
                per_channel[c].append(z[c].flatten() if store == "sample" else mu[c].flatten())
    mean = sums / count
    std = np.sqrt(sumsq / count - mean ** 2)
    np.testing.assert_allclose(stats["channel_mean"], mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats["channel_std"], std, rtol=1e-6)
    if store != "moments":  # the plain population statistics of the stored values
        np.testing.assert_allclose(stats["channel_std"], [float(torch.cat(v).std(unbiased=False)) for v in per_channel],
                                   rtol=1e-5)
    # the sdxl factors give unit latents per channel, the sd3 ones unit latents overall
    z = torch.tensor(mean).view(1, 4, 1, 1) + torch.tensor(std).view(1, 4, 1, 1) * torch.randn(64, 4, 8, 8)
    x = to_diffusion(z, stats["factors"]["sdxl"], "sdxl")
    assert x.transpose(0, 1).flatten(1).std(1).tolist() == pytest.approx([1.0] * 4, abs=0.05)
    assert stats["factors"]["sd3"]["shift_factor"] == pytest.approx(stats["mean"])


def test_factors_never_measured_are_said_so_and_measured_ones_reported(vae_dir, tmp_path, capsys):
    """A latentvae run's config holds diffusers' default scaling_factor (0.18215), never measured:
    the manifest says so and `latentvae encode` warns with the command that measures them."""
    from helpers_ckpt import make_run
    data = photos(tmp_path / "imgs", 3)
    run = make_run(tmp_path / "run")
    cli.main(["encode", "--vae", str(run), "--data", str(data), "--out", str(tmp_path / "c1"), "--resolution", "32",
              "--no-progress", "--mixed-precision", "no", "--num-workers", "0"])
    out = capsys.readouterr().out
    m = json.loads((tmp_path / "c1" / "manifest.json").read_text())
    assert m["vae"]["factors"].startswith("NOT measured") and m["vae"]["scaling_factor"] == 0.18215
    assert "never measured" in out and f"latentvae export {run} --out VAE --calibrate DATA" in out
    assert m["latent_statistics"]["factors"]["sd"]["scaling_factor"] == pytest.approx(1 / m["latent_statistics"]["std"])
    # a pretrained diffusers folder's factors are its authors'
    m2 = encode(cfg(vae_dir, data, tmp_path / "c2"))
    assert m2["vae"]["factors"].startswith("as published")
