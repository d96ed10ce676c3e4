"""Latent caches: a folder of parquet shards that `datasets.load_dataset(OUT)` reads as it is.

    from latentvae.cache import encode, verify_cache, from_storage
    manifest = encode(EncodeOptions(vae="vae/", data="images/", out="latents/"))   # = latentvae encode
    report = verify_cache("latents/", limit=8)                                     # = latentvae decode

A cache folder:

    README.md                         dataset card: the data is data/*.parquet
    data/part-AAAA-RRR-SSSSS.parquet  attempt AAAA, process RRR, shard SSSSS (writer.py)
    failures-rankN.jsonl              inputs process N could not use, with the reason (writer.py)
    encode-settings.json              what must not change on a resume (manifest.py)
    manifest.json                     written last, once every input is accounted for (manifest.py)

The modules: schema (the columns and storage dtypes, what readers import), writer (shards written
exactly once, failure logs), manifest (settings, manifest, dataset card, the VAE's identity: family,
layout, formula), inputs (images in, rows out), clips (video data: one input per clip of a video VAE, rows
(C, T', h, w)), encoder (the VAE checked, pixels to latent columns),
encode (the run and `latentvae encode`), update (what a rerun changes), verify (decode and compare,
`latentvae decode`; verify_clips: per frame, for clips), and the reading side: reader (LatentDataset), normalize (the family's consumer rule
and formula), loader (BucketBatchSampler, LatentLoader, collate), memory (shared memory for workers).
docs/encode.md describes the columns and how a trainer reads them.

`latentvae.cache.encode` is the function; the module of that name is
`importlib.import_module("latentvae.cache.encode")` (or `from latentvae.cache.encode import ...`).
Importing the package loads no model library (diffusers is imported when a job runs).
"""
from .encode import encode
from .manifest import read_manifest
from .loader import BucketBatchSampler, LatentLoader, collate
from .reader import LatentDataset
from .schema import DTYPES, FORMAT_VERSION, OWN_COLUMNS, STORES, from_storage, to_storage
from .verify import verify_cache

__all__ = ["encode", "verify_cache", "read_manifest", "LatentDataset", "LatentLoader", "BucketBatchSampler", "collate", "from_storage", "to_storage", "STORES", "DTYPES",
           "OWN_COLUMNS", "FORMAT_VERSION"]
