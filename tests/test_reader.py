"""latentvae.cache.reader: LatentDataset (normalized latents, posterior samples, passthrough columns) and
BucketBatchSampler (one shape per batch, seeded epochs, disjoint ranks), on tiny synthetic caches written
directly with the schema helpers, and on a real cache from `encode`.

    python -m pytest tests/test_reader.py -q
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from latentvae import BucketBatchSampler, LatentDataset, collate
from latentvae.cache.manifest import MANIFEST_FILE, SETTINGS_FILE, measured_statistics
from latentvae.cache.schema import arrow_schema, make_table
from latentvae.cache.writer import ShardWriter, row_moments, scan_shards
from latentvae.errors import UserError

MEAN = torch.tensor([0.5, -1.0, 2.0, 0.0])
STD = torch.tensor([2.0, 0.5, 1.0, 3.0])


def write_cache(out: Path, shapes=((4, 4, 4),) * 12 + ((4, 2, 6),) * 7, store="mean", dtype="fp32", flip=False,
                logvar=None, vae_factors="as published with this VAE", shard_size=5, seed=0) -> Path:
    """A cache of len(shapes) rows (two per shape with flip) with latents ~ N(MEAN, STD) per channel
    (logvar given: the stored mean and that log-variance), a caption and a label per row, and a manifest."""
    g = torch.Generator().manual_seed(seed)
    extra_features = datasets.Features({"caption": datasets.Value("string"), "label": datasets.Value("int64")})
    (out / "data").mkdir(parents=True)
    writer = ShardWriter(out / "data", 1, 0, shard_size, arrow_schema(dtype, store, extra_features))
    channels = shapes[0][0]
    for i, (c, h, w) in enumerate(shapes):
        for flipped in ((False, True) if flip else (False,)):
            m, sd = MEAN.repeat(2)[:c].view(1, c, 1, 1), STD.repeat(2)[:c].view(1, c, 1, 1)
            mean = m + sd * torch.randn(1, c, h, w, generator=g)
            latents = {"latent_mean": mean}
            if store == "moments":
                latents["latent_logvar"] = torch.full_like(mean, logvar)
            values = {"source_index": [i], "source_id": [f"img{i}.png"], "flipped": [flipped],
                      "pixel_size": [[8 * h, 8 * w]], "original_size": [[100 + i, 200 + i]],
                      "crop_top_left": [[i, 2 * i]], "latent_shape": [[c, h, w]]}
            extra = datasets.Dataset.from_dict({"caption": [f"caption {i}"], "label": [i % 3]}).data.table
            writer.add(make_table(values, latents, dtype, extra), row_moments(latents))
    writer.close()
    (out / SETTINGS_FILE).write_text("{}")
    shards = scan_shards(out)
    manifest = {"format_version": 1, "store": store, "dtype": dtype,
                "vae": {"latent_channels": channels, "scaling_factor": 0.18215, "shift_factor": None,
                        "factors": vae_factors},
                "shards": [{"file": f"data/{s['name']}", "rows": s["rows"]} for s in shards],
                "latent_statistics": measured_statistics(shards, channels, ("sd", "sdxl", "sd3"))}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    return out


def dataset(cache: Path, **kw) -> LatentDataset:
    return LatentDataset(cache, cache_dir=str(cache.parent / "hf-cache"), **kw)


def epoch_rows(sampler) -> list[int]:
    return [i for b in sampler for i in b]


# ----------------------------------------------------------------------------- sampler
def test_batches_hold_one_shape_and_every_row_once(tmp_path):
    ds = dataset(write_cache(tmp_path / "c"))
    sampler = BucketBatchSampler(ds, batch_size=4, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 + 2  # 12 rows of 4x4x4 in 3 batches, 7 of 4x2x6 in 2
    rows = epoch_rows(sampler)
    assert sorted(rows) == list(range(19))  # each row once, none twice (drop_last False)
    for b in batches:
        assert len({tuple(ds[i]["latent_shape"]) for i in b}) == 1
    dropped = BucketBatchSampler(ds, batch_size=4, seed=1, drop_last=True)
    assert len(dropped) == len(list(dropped)) == 4 and all(len(b) == 4 for b in dropped)


def test_same_seed_same_order_other_epoch_other_order(tmp_path):
    ds = dataset(write_cache(tmp_path / "c"))
    a, b = BucketBatchSampler(ds, batch_size=3, seed=7), BucketBatchSampler(ds, batch_size=3, seed=7)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(epoch_rows(a)) == list(range(19))
    assert list(BucketBatchSampler(ds, batch_size=3, seed=8)) != first


@pytest.mark.parametrize("drop_last", [False, True])
def test_two_ranks_get_disjoint_rows_and_equal_lengths(tmp_path, drop_last):
    ds = dataset(write_cache(tmp_path / "c", shapes=((4, 4, 4),) * 16 + ((4, 2, 6),) * 8))
    ranks = [BucketBatchSampler(ds, batch_size=4, seed=3, num_replicas=2, rank=r, drop_last=drop_last)
             for r in range(2)]
    for s in ranks:
        s.set_epoch(2)
    got = [epoch_rows(s) for s in ranks]
    assert len(ranks[0]) == len(ranks[1]) == len(list(ranks[0])) == len(list(ranks[1])) == 3
    assert not set(got[0]) & set(got[1]) and sorted(got[0] + got[1]) == list(range(24))
    # 19 rows in 5 batches: padded (drop_last False) or cut (True) to the same number on both ranks
    ds = dataset(write_cache(tmp_path / "odd"))
    lengths = [len(list(BucketBatchSampler(ds, 4, num_replicas=2, rank=r, drop_last=drop_last))) for r in range(2)]
    assert lengths == [2 if drop_last else 3] * 2
    if drop_last:
        parts = [set(epoch_rows(BucketBatchSampler(ds, 4, num_replicas=2, rank=r, drop_last=True))) for r in range(2)]
        assert not parts[0] & parts[1]


# ----------------------------------------------------------------------------- normalization
@pytest.mark.parametrize("convention", ["sd", "sdxl", "sd3"])
def test_each_convention_normalizes_to_unit_scale_with_the_cache_factors(tmp_path, convention):
    ds = dataset(write_cache(tmp_path / "c", shapes=((4, 16, 16),) * 40, dtype="fp16"), convention=convention,
                 factors="cache")
    x = torch.stack([ds[i]["latents"] for i in range(len(ds))])  # (N, 4, 16, 16)
    assert x.dtype == torch.float32 and ds.factors == "cache"
    if convention == "sd":  # scaling only: unit std overall, the mean left where it was
        assert float(x.std()) == pytest.approx(1.0, abs=1e-2)
    elif convention == "sd3":
        assert float(x.mean()) == pytest.approx(0.0, abs=1e-2) and float(x.std()) == pytest.approx(1.0, abs=1e-2)
    else:  # per channel
        per = x.transpose(0, 1).flatten(1)
        assert per.mean(1).tolist() == pytest.approx([0.0] * 4, abs=1e-2)
        assert per.std(1).tolist() == pytest.approx([1.0] * 4, abs=1e-2)
    raw = dataset(tmp_path / "c", convention=None)
    z = torch.stack([raw[i]["latents"] for i in range(len(raw))])
    assert z.transpose(0, 1).flatten(1).mean(1).tolist() == pytest.approx(MEAN.tolist(), abs=0.15)


def test_vae_factors_are_used_and_refused_when_never_measured(tmp_path):
    """factors='auto' (the default) takes the VAE's own factors, what its pipeline applies, unless they were
    never measured: then those measured on the cache."""
    ds = dataset(write_cache(tmp_path / "c"), convention="sd", factors="vae")
    raw = dataset(tmp_path / "c", convention=None)
    torch.testing.assert_close(ds[3]["latents"], raw[3]["latents"] * 0.18215)
    auto = dataset(tmp_path / "c")  # the manifest's convention (sd, a cache from before it was recorded)
    assert (auto.convention, auto.factors) == ("sd", "vae") and torch.equal(auto[3]["latents"], ds[3]["latents"])
    write_cache(tmp_path / "never", vae_factors="NOT measured: a latentvae training run's config holds ...")
    with pytest.raises(UserError, match="never measured"):
        dataset(tmp_path / "never", convention="sd", factors="vae")
    never = dataset(tmp_path / "never", convention="sd")  # the cache's own factors are fine
    cached = dataset(tmp_path / "never", convention="sd", factors="cache")
    assert never.factors == "cache" and torch.equal(never[3]["latents"], cached[3]["latents"])
    assert not torch.allclose(never[3]["latents"], ds[3]["latents"])


def test_errors_are_user_errors_with_clear_messages(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        dataset(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="not a latent cache"):
        dataset(tmp_path / "plain")
    cache = write_cache(tmp_path / "c")
    with pytest.raises(UserError, match="valid choices: sd, sdxl, sd3"):
        dataset(cache, convention="flux")
    with pytest.raises(UserError, match=r"'flux2' is not one the pipelines of its VAE apply \(AutoencoderKL, kl "
                                        r"family\)"):
        dataset(cache, convention="flux2")  # a formula, but not one an AutoencoderKL's pipelines apply
    with pytest.warns(DeprecationWarning, match="convention"):  # the former name of the argument
        old = dataset(cache, family="sdxl")
    assert old.convention == "sdxl"
    with pytest.raises(UserError, match="valid choices: auto, cache, vae"):
        dataset(cache, factors="config")
    (cache / MANIFEST_FILE).rename(cache / "m.json")
    with pytest.raises(UserError, match="unfinished"):
        dataset(cache)
    eight = write_cache(tmp_path / "c8", shapes=((8, 2, 2),) * 3)
    with pytest.raises(UserError, match="sdxl needs 4 latent channels"):
        dataset(eight, convention="sdxl")
    assert dataset(eight, convention="sd3")[0]["latents"].shape == (8, 2, 2)


# ----------------------------------------------------------------------------- moments
def test_moments_give_fresh_samples_per_epoch_from_the_stored_distribution(tmp_path):
    logvar = 2 * np.log(0.3)
    cache = write_cache(tmp_path / "c", shapes=((4, 8, 8),) * 30, store="moments", logvar=logvar)
    ds = dataset(cache, convention=None, seed=5)
    mean = torch.stack([torch.as_tensor(np.array(r, dtype=np.float32)) for r in ds.data["latent_mean"]])
    draw = lambda d: torch.stack([d[i]["latents"] for i in range(len(d))])
    a = draw(ds)
    assert torch.equal(a, draw(dataset(cache, convention=None, seed=5)))  # same seed, same epoch: same noise
    ds.set_epoch(1)
    b = draw(ds)
    assert not torch.allclose(a, b)
    for x in (a, b):
        eps = x - mean
        assert float(eps.mean()) == pytest.approx(0.0, abs=0.01)
        assert float(eps.std()) == pytest.approx(0.3, rel=0.03)  # exp(logvar / 2)
    assert not torch.allclose(a, draw(dataset(cache, convention=None, seed=6)))


# ----------------------------------------------------------------------------- rows and columns
def test_passthrough_columns_and_flip_copies(tmp_path):
    cache = write_cache(tmp_path / "c", shapes=((4, 2, 2),) * 5 + ((4, 2, 4),) * 3, flip=True)
    ds = dataset(cache)
    assert len(ds) == 16 and Counter(ds[i]["flipped"] for i in range(16)) == {True: 8, False: 8}
    r = ds[0]
    assert r["caption"] == f"caption {r['source_index']}" and r["label"] == r["source_index"] % 3
    i = r["source_index"]
    assert r["original_size"] == [100 + i, 200 + i] and r["crop_top_left"] == [i, 2 * i]
    assert r["pixel_size"] == [16, 16] and r["latent_shape"] == [4, 2, 2]
    originals = dataset(cache, flip=False, columns=["caption", "flipped"])
    assert len(originals) == 8 and not any(originals[i]["flipped"] for i in range(8))
    assert set(originals[0]) == {"latents", "caption", "flipped"}
    with pytest.raises(UserError, match="not in the cache"):
        dataset(cache, columns=["text"])
    items = ds.__getitems__([0, 1, 2])  # a batch read together is one tensor: collate does not copy it
    batch = collate(items)
    assert batch["latents"].data_ptr() == items[0]["latents"].data_ptr() and batch["latents"].shape == (3, 4, 2, 2)
    torch.testing.assert_close(collate([ds[2], ds[0]])["latents"], torch.stack([ds[2]["latents"], ds[0]["latents"]]))
    loader = torch.utils.data.DataLoader(ds, batch_sampler=BucketBatchSampler(ds, 3, seed=0), collate_fn=collate,
                                         num_workers=1)
    seen = []
    for batch in loader:
        B = len(batch["caption"])
        assert batch["latents"].shape[0] == B and batch["latents"].dtype == torch.float32
        assert batch["latents"].shape[1:] == tuple(batch["latent_shape"][0])
        assert all(len(s) == 2 for s in batch["original_size"])
        seen += list(zip(batch["source_index"], batch["flipped"]))
    assert sorted(seen) == sorted((i, f) for i in range(8) for f in (False, True))


def test_a_cache_from_encode_reads_back(tmp_path):
    from test_encode import cfg, photos  # its tiny VAE, saved with save_pretrained
    from diffusers import AutoencoderKL
    from latentvae.cache import encode, from_storage

    torch.manual_seed(0)
    vae_dir = tmp_path / "vae"
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4,
                  layers_per_block=1).save_pretrained(vae_dir)
    data = photos(tmp_path / "imgs", 5)
    m = encode(cfg(vae_dir, data, tmp_path / "cache", preprocess="buckets", flip=True, store="moments"))
    ds = dataset(tmp_path / "cache", convention="sdxl")
    assert len(ds) == m["counts"]["rows"] == 10
    sampler = BucketBatchSampler(ds, batch_size=2)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=0)
    rows = 0
    for batch in loader:
        assert len({tuple(s) for s in batch["latent_shape"]}) == 1
        assert batch["latents"].shape[1] == 4 and torch.isfinite(batch["latents"]).all()
        rows += len(batch["source_id"])
    assert rows == 10
    raw = dataset(tmp_path / "cache", convention=None, seed=0)
    stored = from_storage(raw.data[0]["latent_mean"], m["dtype"])
    assert raw[0]["latents"].shape == stored.shape


# ----------------------------------------------------------------------------- fast arrow index, output dtype
def plain_rows(ds: LatentDataset, idx) -> list[dict]:
    """The rows read through `datasets` (the reader without its arrow index), one at a time."""
    values, ds._values = ds._values, None
    try:
        return [ds.__getitems__([i])[0] for i in idx]
    finally:
        ds._values = values


def assert_same_rows(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert set(g) == set(w) and {k: v for k, v in g.items() if k != "latents"} == \
            {k: v for k, v in w.items() if k != "latents"}
        assert g["latents"].dtype == w["latents"].dtype and torch.equal(g["latents"], w["latents"])


@pytest.mark.parametrize("dtype,store", [("fp16", "mean"), ("bf16", "mean"), ("fp32", "moments")])
def test_fast_gather_equals_the_plain_read_across_shards_chunks_and_slices(tmp_path, dtype, store):
    shapes = ((4, 4, 4),) * 6 + ((4, 2, 6),) * 5 + ((4, 4, 4),) * 4 + ((4, 2, 6),) * 6  # shapes mixed in shards
    cache = write_cache(tmp_path / "c", shapes=shapes, dtype=dtype, store=store, logvar=-1.0, shard_size=4)
    for convention in ("sdxl", None):
        ds = dataset(cache, convention=convention, seed=3)
        assert ds._values is not None and ds.data.data.column("latent_mean").num_chunks > 1
        sampler = BucketBatchSampler(ds, batch_size=5, seed=1)
        for batch in sampler:  # one shape per batch, rows from several chunks, in shuffled order
            assert_same_rows(ds.__getitems__(batch), plain_rows(ds, batch))
        assert_same_rows(ds.__getitems__([0, 7, 20]), plain_rows(ds, [0, 7, 20]))  # two shapes: row by row
    # a contiguous selection is a slice of the arrow table: chunks with an offset into their buffers
    sliced = ds.data.select(range(3, 19))
    assert sliced._indices is None
    ds.data, ds.rows, ds._shapes = sliced, np.arange(len(sliced)), ds._shapes[3:19]
    ds._arrow = sliced.with_format("arrow", columns=ds.latent_columns + ds.columns)
    ds._index_arrow()
    assert ds._values is not None and sliced.data.column("latent_mean").chunks[0].offset > 0
    for batch in BucketBatchSampler(ds, batch_size=3, seed=2):
        assert_same_rows(ds.__getitems__(batch), plain_rows(ds, batch))
    with pytest.raises(IndexError):
        ds.__getitems__([0, 16])


@pytest.mark.parametrize("stored", ["fp16", "bf16"])
def test_output_dtype_is_the_float32_result_rounded_once(tmp_path, stored):
    cache = write_cache(tmp_path / "c", shapes=((4, 8, 8),) * 10 + ((4, 4, 8),) * 6, dtype=stored)
    for convention in ("sdxl", "sd"):  # per-channel factors; one factor (computed in one op when dtypes match)
        ref = dataset(cache, convention=convention, factors="cache")
        x32 = [ref[i]["latents"] for i in range(len(ref))]
        for dtype, eps in ((torch.float16, 2 ** -11), (torch.bfloat16, 2 ** -8)):
            ds = dataset(cache, convention=convention, factors="cache", dtype=dtype)
            for batch in BucketBatchSampler(ds, batch_size=4, seed=0):
                got = collate(ds.__getitems__(batch))["latents"]
                want = torch.stack([x32[i] for i in batch])
                assert got.dtype == dtype and torch.equal(got, want.to(dtype))
                torch.testing.assert_close(got.float(), want, rtol=eps, atol=0)
    raw = dataset(cache, convention=None, dtype=torch.float16 if stored == "fp16" else torch.bfloat16)
    assert torch.equal(raw[3]["latents"].float(), dataset(cache, convention=None)[3]["latents"])  # exact
    if stored == "bf16":
        return
    half = dataset(cache, convention="sd", factors="cache", dtype=torch.float16)  # x32's: sd, the cache's factors
    loader = torch.utils.data.DataLoader(half, num_workers=1,
                                         batch_sampler=BucketBatchSampler(ref, 4, seed=0), collate_fn=collate)
    for batch, rows in zip(loader, BucketBatchSampler(ref, 4, seed=0)):
        assert batch["latents"].dtype == torch.float16
        assert torch.equal(batch["latents"], torch.stack([x32[i] for i in rows]).half())
    with pytest.raises(UserError, match="dtype"):
        dataset(cache, dtype=torch.float64)


def test_pickled_dataset_leaves_the_arrow_views_behind(tmp_path):
    import pickle

    cache = write_cache(tmp_path / "c", shapes=((4, 16, 16),) * 30, dtype="fp16")
    ds = dataset(cache, convention="sd")
    ds.__getitems__([0, 1])  # makes the thread's scratch, which is not pickled either
    blob = pickle.dumps(ds)
    assert len(blob) < 30 * 4 * 16 * 16 * 2  # not the latents' bytes
    again = pickle.loads(blob)
    assert again._values is not None
    assert_same_rows(again.__getitems__([4, 2, 9]), ds.__getitems__([4, 2, 9]))


# ----------------------------------------------------------------------------- LatentLoader
def reference_batches(ds, sampler) -> list[dict]:
    """What DataLoader(ds, batch_sampler=sampler, collate_fn=collate) gives, in the main process."""
    return list(torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate))


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert set(a) == set(b)
        assert torch.equal(a["latents"], b["latents"]) and a["latents"].dtype == b["latents"].dtype
        assert all(a[k] == b[k] for k in a if k != "latents")


@pytest.mark.parametrize("threads", [1, 3])
def test_latent_loader_gives_the_dataloaders_batches_in_its_order(tmp_path, threads):
    from latentvae import LatentLoader

    cache = write_cache(tmp_path / "c", shapes=((4, 4, 4),) * 20 + ((4, 2, 6),) * 9, store="moments",
                        logvar=2 * np.log(0.3))
    ds = dataset(cache, convention="sdxl", seed=4)
    loader = LatentLoader(ds, batch_size=4, seed=2, threads=threads, prefetch=2)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        ref_ds = dataset(cache, convention="sdxl", seed=4)
        ref_ds.set_epoch(epoch)
        sampler = BucketBatchSampler(ref_ds, 4, seed=2)
        sampler.set_epoch(epoch)
        got = list(loader)
        assert len(got) == len(loader) == 5 + 3
        assert_same_batches(got, reference_batches(ref_ds, sampler))  # same order, same noise, same columns
    # the two epochs differ in order and in posterior noise; every row is read once per epoch
    loader.set_epoch(0)
    first = list(loader)
    loader.set_epoch(1)
    second = list(loader)
    assert [b["source_index"] for b in first] != [b["source_index"] for b in second]
    assert sorted(i for b in first for i in b["source_index"]) == list(range(29))


def test_latent_loader_keeps_the_epoch_it_started_with(tmp_path):
    from latentvae import LatentLoader

    cache = write_cache(tmp_path / "c", shapes=((4, 4, 4),) * 24, store="moments", logvar=0.0)
    loader = LatentLoader(dataset(cache, convention=None), batch_size=4, prefetch=1)
    whole = list(loader)
    it = iter(loader)
    got = [next(it)]
    loader.set_epoch(3)  # as with DataLoader workers: takes effect at the next iteration
    got += list(it)
    assert_same_batches(got, whole)
    assert not torch.equal(next(iter(loader))["latents"], whole[0]["latents"])


def test_latent_loader_ranks_read_disjoint_rows(tmp_path):
    from latentvae import LatentLoader

    ds = dataset(write_cache(tmp_path / "c", shapes=((4, 4, 4),) * 16 + ((4, 2, 6),) * 8))
    parts = [[i for b in LatentLoader(ds, 4, seed=1, num_replicas=2, rank=r) for i in b["source_index"]]
             for r in range(2)]
    assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == list(range(24))


def test_latent_loader_raises_a_read_error_at_its_batch_and_stops_its_threads(tmp_path, monkeypatch):
    import threading

    from latentvae import LatentLoader

    ds = dataset(write_cache(tmp_path / "c", shapes=((4, 4, 4),) * 40))
    loader = LatentLoader(ds, batch_size=4, shuffle=False, threads=2, prefetch=3)
    real = LatentDataset.read_batch

    def failing(self, indices):
        if 20 in indices:
            raise OSError("shard unreadable")
        return real(self, indices)

    monkeypatch.setattr(LatentDataset, "read_batch", failing)
    seen = []
    with pytest.raises(OSError, match="shard unreadable"):
        for batch in loader:
            seen.append(batch["source_index"])
    assert seen == [list(range(k, k + 4)) for k in range(0, 20, 4)]  # every batch before the failing one

    def readers() -> list:
        return [t for t in threading.enumerate() if t.name.startswith("latentvae-reader")]

    assert not readers()
    monkeypatch.setattr(LatentDataset, "read_batch", real)
    for batch in loader:  # leaving the loop early stops the reading too
        break
    del batch
    import gc
    gc.collect()
    assert not readers()


def test_latent_loader_refuses_mixed_shapes_and_bad_arguments(tmp_path):
    from latentvae import LatentLoader

    ds = dataset(write_cache(tmp_path / "c"))
    mixed = [[0, 1, 12]]  # rows 0-11 are 4x4x4, 12-18 are 4x2x6
    with pytest.raises(UserError, match=r"mixes latent shapes \[\(4, 2, 6\), \(4, 4, 4\)\].*BucketBatchSampler"):
        list(LatentLoader(ds, sampler=mixed))
    with pytest.raises(UserError, match="batch_size"):
        LatentLoader(ds)
    with pytest.raises(UserError, match="not both"):
        LatentLoader(ds, 4, sampler=mixed)
    with pytest.raises(UserError, match="threads"):
        LatentLoader(ds, 4, threads=0)
    if not torch.cuda.is_available():
        with pytest.warns(UserWarning, match="pin_memory"):
            assert not LatentLoader(ds, 4, pin_memory=True).pin_memory
