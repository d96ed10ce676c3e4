"""Rerunning `latentvae encode` into a cache updates it: sources edited, added, removed, recaptioned,
touched; another VAE or preprocessing refused; a kill -9 at any moment of an update loses nothing.

    python -m pytest tests/test_cache_update.py -q
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import make_photo, save_tiny_vae
from latentvae.cache import LatentDataset, encode, from_storage, verify_cache
from latentvae.errors import BadInputError
from latentvae.options import EncodeOptions

REPO = Path(__file__).resolve().parents[1]


def cfg(vae_dir, data, out, **kw) -> EncodeOptions:
    # fp32 pinned: latents are compared across runs; `auto` means bf16 on CPUs with bf16 kernels
    base = dict(resolution=32, batch_size=2, shard_size=3, num_workers=0, progress=False, mixed_precision="no")
    return EncodeOptions(vae=str(vae_dir), data=str(data), out=str(out), **{**base, **kw})


def captioned_folder(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        make_photo(size=(48, 40), seed=i).save(folder / f"p{i:02d}.png")
    write_captions(folder, {f"p{i:02d}.png": f"photo {i}" for i in range(n)})
    return folder


def write_captions(folder: Path, captions: dict[str, str]) -> None:
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": k, "text": v}) + "\n"
                                                   for k, v in sorted(captions.items())))


def cache_rows(out: Path) -> dict[tuple[str, bool], dict]:
    """(source_key, flipped) -> row, from the shards the manifest lists; asserts each is there once and that
    data/ holds exactly those shards (what `datasets.load_dataset(OUT)` reads)."""
    manifest = json.loads((out / "manifest.json").read_text())
    listed = sorted(Path(s["file"]).name for s in manifest["shards"])
    assert sorted(p.name for p in (out / "data").glob("*.parquet")) == listed
    assert not (out / "update.json").exists()
    rows = [r for name in listed for r in pq.read_table(out / "data" / name).to_pylist()]
    count = Counter((r["source_key"], r["flipped"]) for r in rows)
    assert max(count.values()) == 1, count
    return {(r["source_key"], r["flipped"]): r for r in rows}


def latent(row: dict) -> np.ndarray:
    return from_storage(row["latent_mean"], "fp16").numpy()


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny")


def test_an_update_encodes_what_changed_drops_what_is_gone_and_carries_the_rest(vae_dir, tmp_path):
    data = captioned_folder(tmp_path / "imgs", 8)
    out = tmp_path / "cache"
    m = encode(cfg(vae_dir, data, out))
    assert m["generation"] == 1 and m["counts"]["rows"] == 8
    before = cache_rows(out)
    shards_before = {p.name for p in (out / "data").glob("*.parquet")}

    make_photo(size=(48, 40), seed=101).save(data / "p01.png")  # edited
    (data / "p02.png").unlink()  # removed
    (data / "sub").mkdir()
    make_photo(size=(40, 48), seed=102).save(data / "sub" / "new.png")  # added, in a subfolder
    captions = {f"p{i:02d}.png": f"photo {i}" for i in range(8) if i != 2}
    captions["p03.png"] = "a new caption"  # recaptioned only
    captions["sub/new.png"] = "added"
    write_captions(data, captions)
    st = os.stat(data / "p04.png")
    os.utime(data / "p04.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes, newer mtime

    m = encode(cfg(vae_dir, data, out))
    run = m["this_run"]
    assert run["rows_encoded"] == 2, run  # the edited and the added image, nothing else
    assert run["changes"] == {**run["changes"], "added": 1, "changed": 1, "removed": 1, "metadata_changed": 1}
    assert m["generation"] == 2 and m["counts"]["rows"] == 8 and m["counts"]["inputs"] == 8
    after = cache_rows(out)
    assert set(after) == {(k, False) for k in captions}
    # the edited image's latent is the new image's: the same as a fresh cache of the folder as it is now
    fresh = cache_rows(Path(encode(cfg(vae_dir, data, tmp_path / "fresh"))["cache"]))
    for key in after:
        np.testing.assert_array_equal(latent(after[key]), latent(fresh[key]))
        assert after[key]["text"] == fresh[key]["text"] == captions[key[0]]
        assert after[key]["source_sha256"] == fresh[key]["source_sha256"]
    assert not np.array_equal(latent(after[("p01.png", False)]), latent(before[("p01.png", False)]))
    # carried rows keep their latents (no re-encoding) and record the source as it is now
    np.testing.assert_array_equal(latent(after[("p03.png", False)]), latent(before[("p03.png", False)]))
    assert after[("p04.png", False)]["source_mtime_ns"] == st.st_mtime_ns + 10**9
    assert {p.name for p in (out / "data").glob("*.parquet")} & shards_before  # untouched shards stay as they were
    # the manifest's statistics are those of the rows now (the fresh cache's, up to storage rounding)
    a, b = m["latent_statistics"], json.loads((tmp_path / "fresh" / "manifest.json").read_text())["latent_statistics"]
    np.testing.assert_allclose(a["channel_std"], b["channel_std"], rtol=2e-3)
    # a reader and `latentvae decode` work on the updated cache
    ds = LatentDataset(out, convention=None)
    assert len(ds) == 8 and sorted(ds[k]["text"] for k in range(8)) == sorted(captions.values())
    assert verify_cache(out, limit=8)["min_psnr"] > 0

    # nothing changed: nothing is written
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    m = encode(cfg(vae_dir, data, out))
    assert m["this_run"]["rows_encoded"] == 0 and m["generation"] == 2
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes


def test_a_failed_input_is_retried_once_it_changes_and_dropped_once_removed(vae_dir, tmp_path):
    data = captioned_folder(tmp_path / "imgs", 3)
    (data / "bad.png").write_text("not an image")
    out = tmp_path / "cache"
    assert encode(cfg(vae_dir, data, out))["counts"]["failures"] == 1
    assert encode(cfg(vae_dir, data, out))["this_run"]["rows_encoded"] == 0  # unchanged: still counts as done
    make_photo(size=(40, 40), seed=7).save(data / "bad.png", format="PNG")  # fixed
    m = encode(cfg(vae_dir, data, out))
    assert m["this_run"]["rows_encoded"] == 1 and m["counts"]["failures"] == 0 and m["counts"]["rows"] == 4
    assert not list(out.glob("failures-rank*.jsonl")) or all(
        not p.read_text().strip() for p in out.glob("failures-rank*.jsonl"))
    assert ("bad.png", False) in cache_rows(out)


def test_another_vae_or_preprocessing_is_refused_saying_what_differs(vae_dir, tmp_path):
    data = captioned_folder(tmp_path / "imgs", 2)
    out = tmp_path / "cache"
    encode(cfg(vae_dir, data, out))
    other = save_tiny_vae(tmp_path / "other", seed=1)
    before = sorted(p.name for p in (out / "data").iterdir())
    with pytest.raises(BadInputError, match=r"vae_weights_sha256: .* there, .* now.*pass a new --out"):
        encode(cfg(other, data, out))
    with pytest.raises(BadInputError, match=r"preprocessing.resolution: 32 there, 16 now.*start a new cache"):
        encode(cfg(vae_dir, data, out, resolution=16))
    with pytest.raises(BadInputError, match=r"dtype: \"fp16\" there, \"fp32\" now"):
        encode(cfg(vae_dir, data, out, dtype="fp32"))
    assert sorted(p.name for p in (out / "data").iterdir()) == before


def test_a_dataset_input_is_compared_by_fingerprint_then_row_content(vae_dir, tmp_path):
    import io

    def png(seed):
        buf = io.BytesIO()
        make_photo(size=(40, 40), seed=seed).save(buf, format="PNG")
        return buf.getvalue()

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": png(i), "path": None} for i in range(5)],
                                     "label": list(range(5))}, features=features)
    ds.save_to_disk(str(tmp_path / "ds1"))
    out = tmp_path / "cache"
    encode(cfg(vae_dir, tmp_path / "ds1", out))
    before = cache_rows(out)
    assert encode(cfg(vae_dir, tmp_path / "ds1", out))["this_run"]["rows_encoded"] == 0  # same fingerprint
    # row 2 gets another image, row 4 another label: a new dataset saved in the same place
    images = [{"bytes": png(50 if i == 2 else i), "path": None} for i in range(5)]
    changed = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2, 3, 40]}, features=features)
    changed.save_to_disk(str(tmp_path / "ds2"))
    os.rename(tmp_path / "ds1", tmp_path / "old")
    os.rename(tmp_path / "ds2", tmp_path / "ds1")
    m = encode(cfg(vae_dir, tmp_path / "ds1", out))
    assert m["this_run"]["rows_encoded"] == 1 and m["this_run"]["changes"]["metadata_changed"] == 1
    after = cache_rows(out)
    assert after[("[4]", False)]["label"] == 40
    np.testing.assert_array_equal(latent(after[("[0]", False)]), latent(before[("[0]", False)]))
    assert not np.array_equal(latent(after[("[2]", False)]), latent(before[("[2]", False)]))


def _run_killed(kill: str, args: list[str], cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "encode_kill_worker.py"), kill, *args], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, (kill, proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])


@pytest.mark.parametrize("kill", ["shard:999:1", pytest.param("shard:0:1", marks=pytest.mark.slow), "committed"])
def test_kill9_during_an_update_leaves_a_whole_generation_and_a_rerun_finishes_it(vae_dir, tmp_path, kill):
    data = captioned_folder(tmp_path / "imgs", 9)
    out = tmp_path / "cache"
    args = ["--vae", str(vae_dir), "--data", str(data), "--out", str(out), "--resolution", "32", "--batch-size", "2",
            "--shard-size", "3", "--num-workers", "0", "--mixed-precision", "no", "--no-progress"]
    encode(cfg(vae_dir, data, out))
    old = cache_rows(out)
    for i in (1, 4, 7):  # one edit in each shard: every shard is superseded
        make_photo(size=(48, 40), seed=200 + i).save(data / f"p{i:02d}.png")
    (data / "p05.png").unlink()
    write_captions(data, {f"p{i:02d}.png": f"photo {i}" for i in range(9) if i != 5})
    _run_killed(kill, args, tmp_path)
    # whatever moment it died at, the manifest names one whole generation: every listed shard exists, once each
    m = json.loads((out / "manifest.json").read_text())
    listed = [Path(s["file"]).name for s in m["shards"]]
    assert all((out / "data" / n).is_file() for n in listed)
    ds = LatentDataset(out, convention=None)
    keys = Counter((ds[k]["source_key"], ds[k]["flipped"]) for k in range(len(ds)))
    assert max(keys.values()) == 1
    if kill == "committed":
        assert m["generation"] == 2 and ("p05.png", False) not in keys
    else:
        assert m["generation"] == 1 and set(keys) == set(old)
    subprocess.run([sys.executable, "-m", "latentvae", "encode", *args], check=True, cwd=tmp_path, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, timeout=300)
    after = cache_rows(out)
    fresh = cache_rows(Path(encode(cfg(vae_dir, data, tmp_path / "fresh"))["cache"]))
    assert set(after) == set(fresh) and len(after) == 8
    for key in after:  # the rerun ran in another process (other thread count): equal up to fp16 rounding
        np.testing.assert_allclose(latent(after[key]), latent(fresh[key]), rtol=2e-3, atol=1e-4)
        assert after[key]["source_sha256"] == fresh[key]["source_sha256"]


def test_crops_mode_gives_seeded_crops_per_image_that_follow_their_image(vae_dir, tmp_path):
    data = captioned_folder(tmp_path / "imgs", 3)
    make_photo(size=(96, 64), seed=9).save(data / "p00.png")  # a larger image: crops at different places
    out = tmp_path / "cache"
    m = encode(cfg(vae_dir, data, out, preprocess="crops", crops=4, crop_scale=48, resolution=16, flip=True))
    assert m["counts"]["inputs"] == 12 and m["counts"]["rows"] == 24 and m["preprocessing"]["crops"] == 4
    rows = cache_rows(out)
    assert set(rows) == {(f"p{i:02d}.png#crop{k}", f) for i in range(3) for k in range(4) for f in (False, True)}
    big = [rows[(f"p00.png#crop{k}", False)] for k in range(4)]
    assert all(r["pixel_size"] == [16, 16] and r["original_size"] == [64, 96] for r in big)
    assert len({tuple(r["crop_top_left"]) for r in big}) > 1  # four crops, not one repeated
    assert all(0 <= r["crop_top_left"][0] <= 48 - 16 and 0 <= r["crop_top_left"][1] <= 72 - 16 for r in big)
    assert rows[("p01.png#crop2", False)]["text"] == "photo 1"  # each crop keeps its image's caption
    again = cache_rows(Path(encode(cfg(vae_dir, data, tmp_path / "again", preprocess="crops", crops=4, crop_scale=48,
                                       resolution=16, flip=True))["cache"]))
    assert all(again[k]["crop_top_left"] == rows[k]["crop_top_left"] for k in rows)  # seeded: the same crops
    assert verify_cache(out, limit=6)["min_psnr"] > 0  # decode finds each crop's source and cuts it again
    make_photo(size=(48, 40), seed=300).save(data / "p02.png")  # an edited image: all its crops, nothing else
    assert encode(cfg(vae_dir, data, out, preprocess="crops", crops=4, crop_scale=48, resolution=16,
                      flip=True))["this_run"]["rows_encoded"] == 8


def test_an_update_carries_rows_of_several_latent_shapes_out_of_one_shard(vae_dir, tmp_path):
    """--preprocess buckets: one shard holds rows of several latent shapes; an edit supersedes it, and its
    other rows are carried over with their latents and their moments, whatever their shapes."""
    data = tmp_path / "imgs"
    data.mkdir()
    sizes = ((48, 40), (40, 64), (64, 32), (48, 48))
    for i, size in enumerate(sizes):
        make_photo(size=size, seed=i).save(data / f"p{i:02d}.png")
    opts = dict(preprocess="buckets", shard_size=4, batch_size=1, store="moments", dtype="fp32")
    encode(cfg(vae_dir, data, tmp_path / "cache", **opts))
    before = cache_rows(tmp_path / "cache")
    assert len({tuple(r["latent_shape"]) for r in before.values()}) > 1  # one shard, several shapes
    make_photo(size=(48, 40), seed=101).save(data / "p00.png")
    m = encode(cfg(vae_dir, data, tmp_path / "cache", **opts))
    assert m["this_run"]["rows_encoded"] == 1 and m["this_run"]["rows_carried"] == 3
    after = cache_rows(tmp_path / "cache")
    for key in (("p01.png", False), ("p02.png", False), ("p03.png", False)):
        assert after[key]["latent_mean"] == before[key]["latent_mean"]
    fresh = encode(cfg(vae_dir, data, tmp_path / "fresh", **opts))  # the carried moments count as encoded ones
    np.testing.assert_allclose(m["latent_statistics"]["channel_std"], fresh["latent_statistics"]["channel_std"],
                               rtol=1e-5)
