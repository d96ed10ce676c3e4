"""Encode an image folder or a `datasets` dataset to a cache of latents: resumable, multi-process.

    latentvae encode --vae VAE --data SRC --out DST [--resolution 256] [--preprocess buckets] [--flip]
    accelerate launch -m latentvae.encode --vae VAE --data SRC --out DST     # any number of processes
    latentvae decode DST --num 16                                          # PSNR of a random sample

Every check of the inputs (VAE, data source, resolution against the VAE's factor, DST itself: a
folder that is not a cache, or a cache made with other settings) runs before anything is written,
and a new DST that fails before its first shard is removed again: a mistake leaves nothing behind.

DST holds parquet shards (`data/part-AAAA-RRR-SSSSS.parquet`) that `datasets.load_dataset(DST)`
loads as is, one `failures-rankN.jsonl` per process, and, once every input is accounted for,
`manifest.json` (VAE identity, scaling/shift factors, preprocessing, dtype, counts, failures).
docs/encode.md describes the columns and how a trainer reads them.

Exactly once: a shard is written under a temporary name, fsynced and renamed, so a shard name is
only ever seen complete; its `source_index`/`flipped` columns are the record of what it holds. A
rerun of the same command reads those columns, skips what is done and encodes only the rest (in
new shards of a new attempt number); `encode-settings.json` refuses a rerun with other settings.
This module owns the pipeline (DataLoader workers decode and preprocess, the main process batches
same-shape images and runs the encoder only), the shard format, the manifest and the PSNR check.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from .preprocess import PREPROCESS_MODES, Preprocess, load_preprocessed
from .errors import BadInputError, MissingInputError
from .images import BadImage, load_rgb, oriented_size, to_uint8
from .model import decode, downsample_factor, encode_moments, latent_channels

FORMAT_VERSION = 1
SHARD_RE = re.compile(r"part-(\d{4})-(\d{3})-(\d{5})\.parquet$")

# --store: which latent columns each row holds
STORES = {
    "mean": ("latent_mean",),
    "moments": ("latent_mean", "latent_logvar"),  # trainers sample mean + exp(logvar / 2) * eps
    "sample": ("latent_sample",),  # one posterior sample, seeded by (seed, source_index, flipped)
}
# --dtype: torch dtype of the values and the arrow type they are stored as. bf16 is stored as its
# raw 16 bits (uint16): exact and half the size of float32; parquet has no bf16 type.
DTYPES = {
    "fp16": (torch.float16, pa.float16()),
    "bf16": (torch.bfloat16, pa.uint16()),
    "fp32": (torch.float32, pa.float32()),
}
MIXED_PRECISION = {"auto": None, "no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SOURCE_KINDS = ("auto", "folder", "hf")
OWN_COLUMNS = ("source_index", "source_id", "flipped", "pixel_size", "original_size", "crop_top_left",
               "latent_shape", "latent_mean", "latent_logvar", "latent_sample")


def choice(table: dict, key: str, what: str):
    if key not in table:
        raise BadInputError(f"unknown {what} {key!r}; valid choices: {', '.join(table)}")
    return table[key]


@dataclass(frozen=True)
class EncodeConfig:
    vae: str
    data: str
    out: str
    kind: str = "auto"  # auto | folder | hf
    split: str = "train"
    image_column: str = "image"
    preprocess: str = "center-crop"  # a key of buckets.PREPROCESS_MODES
    resolution: int = 256
    max_aspect: float = 2.0
    flip: bool = False
    store: str = "mean"  # a key of STORES
    dtype: str = "fp16"  # a key of DTYPES
    shard_size: int = 1000  # rows per shard (a flipped copy is a row)
    batch_size: int = 8
    num_workers: int = -1  # -1: auto (one fewer than the CPU cores, at most 4)
    mixed_precision: str = "auto"  # auto | no | bf16 | fp16 (see precision.py)
    channels_last: Optional[bool] = None  # None: auto
    jpeg_draft: bool = True  # decode JPEGs at a reduced DCT scale that still covers the target
    max_image_pixels: int = 100_000_000
    seed: int = 0
    verify: int = 0  # after encoding, decode this many random rows and report PSNR
    progress: bool = True

    def __post_init__(self):
        choice(STORES, self.store, "store")
        choice(DTYPES, self.dtype, "dtype")
        choice(MIXED_PRECISION, self.mixed_precision, "mixed precision")
        choice(PREPROCESS_MODES, self.preprocess, "preprocessing mode")
        if self.kind not in SOURCE_KINDS:
            raise BadInputError(f"unknown source kind {self.kind!r}; valid choices: {', '.join(SOURCE_KINDS)}")
        for flag, value in (("--shard-size", self.shard_size), ("--batch-size", self.batch_size),
                            ("--resolution", self.resolution)):
            if value < 1:
                raise BadInputError(f"{flag} must be >= 1, got {value}")
        if self.max_aspect < 1:
            raise BadInputError(f"--max-aspect must be >= 1 (the widest bucket's width/height), got {self.max_aspect}")
        if self.verify < 0:
            raise BadInputError(f"--verify must be >= 0, got {self.verify}")


# ----------------------------------------------------------------------------- files, atomically
def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, write) -> None:
    """`write(fileobj)` into a hidden temporary beside `path`, fsync, rename, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def read_jsonl(path: Path) -> list[dict]:
    """Complete records of a JSON-lines file; a line cut short by a crash is skipped."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class FailureLog:
    """failures-rankN.jsonl: one fsynced line per input that could not be used."""

    def __init__(self, path: Path):
        self.path = path
        if path.exists() and path.stat().st_size:
            with open(path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a crash cut the last line: start a fresh one
                    f.write(b"\n")
        self.count = 0

    def add(self, index: int, source_id: str, reason: str) -> None:
        with open(self.path, "ab") as f:
            f.write((json.dumps({"source_index": index, "source_id": source_id, "reason": reason}) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        self.count += 1


# ----------------------------------------------------------------------------- inputs
def open_inputs(cfg: EncodeConfig):
    """(image source, passthrough dataset or None): every non-image column of a `datasets` input."""
    from .sources import HFImageSource, open_source

    src = open_source(cfg.data, cfg.kind, cfg.split, cfg.image_column, cfg.max_image_pixels)
    if not isinstance(src, HFImageSource):
        return src, None
    rest = src.dataset.remove_columns([cfg.image_column])
    clash = [c for c in rest.column_names if c in OWN_COLUMNS]
    if clash:
        raise BadInputError(f"{cfg.data}: columns {clash} clash with the cache's own columns ({', '.join(OWN_COLUMNS)})")
    return src, rest


class PreprocessedImages(torch.utils.data.Dataset):
    """Item k: image `indices[k]` preprocessed, or the reason it could not be (in a DataLoader worker)."""

    def __init__(self, src, indices: list[int], pre: Preprocess, draft: bool):
        self.src, self.indices, self.pre, self.draft = src, indices, pre, draft

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        i = self.indices[k]
        try:
            return {"index": i, **load_preprocessed(self.src, i, self.pre, self.draft)}
        except BadImage as e:
            return {"index": i, "error": str(e)}


def collate_list(items: list[dict]) -> list[dict]:
    return items


# ----------------------------------------------------------------------------- batching
class BucketBatcher:
    """Groups rows by pixel shape; `add` returns a full batch of one shape or None; `flush` the rest."""

    def __init__(self, batch_size: int):
        self.batch_size, self.queues = batch_size, {}

    def add(self, row: dict) -> Optional[list[dict]]:
        q = self.queues.setdefault(tuple(row["pixels"].shape), [])
        q.append(row)
        if len(q) == self.batch_size:
            return self.queues.pop(tuple(row["pixels"].shape))
        return None

    def flush(self) -> Iterator[list[dict]]:
        while self.queues:
            yield self.queues.pop(next(iter(self.queues)))


def sample_noise(shape, seed: int, index: int, flipped: bool) -> torch.Tensor:
    """The posterior noise of one row: a pure function of (seed, index, flipped), not of batching."""
    h = hashlib.blake2b(f"{seed}:{index}:{int(flipped)}".encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(h, "little") >> 1)
    return torch.randn(shape, generator=g)


def encode_rows(vae, rows: list[dict], store: str, seed: int, device, autocast_dtype, channels_last: bool) -> dict:
    """Same-shape rows -> {column: float32 (B, C, h, w)} for the columns of `store`; encoder only."""
    x = torch.stack([r["pixels"] for r in rows]).to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                                enabled=autocast_dtype is not None):
        mean, logvar = encode_moments(vae, x)
    # fp32 from here: exp/sampling of the posterior is numerically delicate in 16 bits
    mean = mean.float().cpu().contiguous()
    logvar = None if logvar is None else logvar.float().cpu().contiguous()
    if store != "mean" and logvar is None:
        raise ValueError(f"--store {store} needs a log-variance, but {type(vae).__name__} is deterministic; use --store mean")
    out = {"latent_mean": mean} if store in ("mean", "moments") else {}
    if store == "moments":
        out["latent_logvar"] = logvar
    if store == "sample":
        noise = torch.stack([sample_noise(mean.shape[1:], seed, r["index"], r["flipped"]) for r in rows])
        out["latent_sample"] = mean + torch.exp(0.5 * logvar) * noise
    return out


# ----------------------------------------------------------------------------- arrow / parquet
def nested_list_array(a: np.ndarray) -> pa.Array:
    """(B, C, h, w) -> a list<list<list<T>>> array of B rows, so `datasets` gives (C, h, w) per row."""
    B, C, h, w = a.shape
    arr = pa.array(a.reshape(-1))
    for step, count in ((w, B * C * h), (h, B * C), (C, B)):
        arr = pa.ListArray.from_arrays(pa.array(np.arange(0, (count + 1) * step, step, dtype=np.int32)), arr)
    return arr


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    torch_dtype, _ = DTYPES[dtype]
    y = x.to(torch_dtype)
    if dtype == "bf16":
        return y.view(torch.int16).numpy().view(np.uint16)
    return y.numpy()


def from_storage(x, dtype: str) -> torch.Tensor:
    """A stored latent (nested lists, numpy or tensor) -> float32 tensor; bf16 bits are widened exactly."""
    if dtype == "bf16":
        bits = torch.as_tensor(np.asarray(x).astype(np.int64))
        return bits.to(torch.int32).bitwise_left_shift(16).view(torch.float32)
    return torch.as_tensor(np.asarray(x, dtype=np.float32))


def rows_table(rows: list[dict], latents: dict, dtype: str, passthrough) -> pa.Table:
    """One encoded batch as an arrow table: our columns, then the input's other columns."""
    B = len(rows)
    shape = list(next(iter(latents.values())).shape[1:])
    cols = {
        "source_index": pa.array([r["index"] for r in rows], pa.int64()),
        "source_id": pa.array([r["source_id"] for r in rows], pa.string()),
        "flipped": pa.array([r["flipped"] for r in rows], pa.bool_()),
        "pixel_size": pa.array([list(r["pixels"].shape[1:]) for r in rows], pa.list_(pa.int32())),
        "original_size": pa.array([list(r["original_size"]) for r in rows], pa.list_(pa.int32())),
        "crop_top_left": pa.array([list(r["crop_top_left"]) for r in rows], pa.list_(pa.int32())),
        "latent_shape": pa.array([shape] * B, pa.list_(pa.int32())),
    }
    for name, x in latents.items():
        cols[name] = nested_list_array(to_storage(x, dtype))
    table = pa.table(cols)
    if passthrough is not None:
        extra = passthrough.select([r["index"] for r in rows]).with_format("arrow")[:]
        for name in extra.column_names:
            table = table.append_column(name, extra.column(name))
    return table


def table_schema(dtype: str, store: str, passthrough) -> pa.Schema:
    """The shards' arrow schema, with `datasets` features (passthrough ClassLabels etc.) in its metadata."""
    import datasets

    _, pa_type = DTYPES[dtype]
    nested = pa.list_(pa.list_(pa.list_(pa_type)))
    fields = [("source_index", pa.int64()), ("source_id", pa.string()), ("flipped", pa.bool_()),
              ("pixel_size", pa.list_(pa.int32())), ("original_size", pa.list_(pa.int32())),
              ("crop_top_left", pa.list_(pa.int32())), ("latent_shape", pa.list_(pa.int32()))]
    fields += [(name, nested) for name in STORES[store]]
    features = datasets.Features.from_arrow_schema(pa.schema(fields))
    if passthrough is not None:
        features = datasets.Features({**features, **passthrough.features})
    return features.arrow_schema


class ShardWriter:
    """Collects encoded batches; writes exactly `shard_size` rows per shard (the last may be short)."""

    def __init__(self, folder: Path, attempt: int, rank: int, shard_size: int, schema: pa.Schema):
        self.folder, self.attempt, self.rank, self.shard_size, self.schema = folder, attempt, rank, shard_size, schema
        self.pending: list[pa.Table] = []
        self.n_pending, self.seq, self.written = 0, 0, []

    def add(self, table: pa.Table) -> None:
        self.pending.append(table.cast(self.schema))
        self.n_pending += table.num_rows
        while self.n_pending >= self.shard_size:
            self._write(self.shard_size)

    def close(self) -> None:
        if self.n_pending:
            self._write(self.n_pending)

    def _write(self, n: int) -> None:
        table = pa.concat_tables(self.pending)
        head, rest = table.slice(0, n), table.slice(n)
        path = self.folder / f"part-{self.attempt:04d}-{self.rank:03d}-{self.seq:05d}.parquet"
        atomic_write_bytes(path, lambda f: pq.write_table(head, f))
        self.pending, self.n_pending = ([rest] if rest.num_rows else []), rest.num_rows
        self.seq += 1
        self.written.append(path.name)


def list_shards(out: Path) -> list[Path]:
    folder = out / "data"
    return sorted(p for p in folder.glob("part-*.parquet") if SHARD_RE.match(p.name)) if folder.is_dir() else []


def scan_shards(out: Path) -> list[dict]:
    """Per finished shard: its name, rows and the (source_index, flipped) pairs it holds."""
    result = []
    for p in list_shards(out):
        t = pq.read_table(p, columns=["source_index", "flipped", "pixel_size"])
        result.append({"name": p.name, "rows": t.num_rows, "index": t.column("source_index").to_pylist(),
                       "flipped": t.column("flipped").to_pylist(), "pixel_size": t.column("pixel_size").to_pylist()})
    return result


def scan_failures(out: Path) -> dict[int, dict]:
    failures = {}
    for p in sorted(out.glob("failures-rank*.jsonl")):
        for rec in read_jsonl(p):
            failures[int(rec["source_index"])] = rec
    return failures


def todo_copies(n: int, flips: tuple[bool, ...], shards: list[dict], failures: dict) -> dict[int, list[bool]]:
    """index -> the copies (flipped or not) still to encode; failed inputs count as done."""
    done = {(i, f) for s in shards for i, f in zip(s["index"], s["flipped"])}
    todo = {}
    for i in range(n):
        if i in failures:
            continue
        missing = [f for f in flips if (i, f) not in done]
        if missing:
            todo[i] = missing
    return todo


# ----------------------------------------------------------------------------- identity, manifest
def weights_sha256(vae) -> str:
    """sha256 over the state dict (sorted keys; name, dtype, shape, raw bytes): same weights, same id."""
    h = hashlib.sha256()
    for k, t in sorted(vae.state_dict().items()):
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        # flattened in logical order, so channels_last weights hash like contiguous ones (a (C, C, 1, 1)
        # channels_last weight counts as contiguous yet has stride(-1) != 1, which view(uint8) refuses)
        flat = t.detach().cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def vae_identity(vae, path: str) -> dict:
    cfg = vae.config
    files = {}
    if Path(path).is_dir():
        files = {p.name: file_sha256(p) for p in sorted(Path(path).glob("*.safetensors"))}
    return {"path": str(path), "class": type(vae).__name__, "weights_sha256": weights_sha256(vae),
            "files_sha256": files, "scaling_factor": cfg.get("scaling_factor"),
            "shift_factor": cfg.get("shift_factor"), "latent_channels": latent_channels(vae),
            "downsample_factor": downsample_factor(vae)}


def inputs_fingerprint(src) -> str:
    h = hashlib.sha256()
    fp = getattr(getattr(src, "dataset", None), "_fingerprint", None)
    h.update(f"{fp}|{len(src)}|".encode())
    for i in range(len(src)):
        h.update(src.name(i).encode() + b"\0")
    return h.hexdigest()


def run_settings(cfg: EncodeConfig, vae_id: dict, pre: Preprocess, src) -> dict:
    """What must not change between a run and its resumption."""
    return {"format_version": FORMAT_VERSION, "vae_weights_sha256": vae_id["weights_sha256"],
            "source": {"data": cfg.data, "kind": cfg.kind, "split": cfg.split, "image_column": cfg.image_column},
            "inputs": len(src), "inputs_sha256": inputs_fingerprint(src), "preprocessing": pre.to_dict(),
            "jpeg_draft": cfg.jpeg_draft, "max_image_pixels": cfg.max_image_pixels,
            "store": cfg.store, "dtype": cfg.dtype, "seed": cfg.seed if cfg.store == "sample" else None}


def check_out_folder(out: Path) -> None:
    """DST must be new, empty, or a cache (with encode-settings.json): never someone's other folder."""
    if out.exists() and not out.is_dir():
        raise BadInputError(f"--out {out} exists and is not a folder; expected a new folder or a latent cache")
    if not out.is_dir() or (out / "encode-settings.json").is_file():
        return
    entries = list(out.iterdir())
    # an empty data/ is what a killed earlier version left before writing its settings: resumable
    if all(p.name == "data" and p.is_dir() and not list_shards(out) for p in entries):
        return
    raise BadInputError(f"--out {out} is a non-empty folder that is not a latent cache (no encode-settings.json); "
                        "choose a new or empty folder")


def _flat(d: Any, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _short(value: Any, width: int = 40) -> str:
    text = json.dumps(value)
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
        return value[:12] + "…"
    return text if len(text) <= width else text[:width - 1] + "…"


def settings_diff(old: dict, new: dict) -> list[str]:
    """'key: OLD there, NEW now' for each setting that differs (derived bucket lists left out when
    the settings they derive from are listed)."""
    a, b = _flat(old), _flat(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if any(k.startswith("preprocessing.") and k != "preprocessing.buckets" for k in keys):
        keys = [k for k in keys if k != "preprocessing.buckets"]
    return [f"{k}: {_short(a.get(k))} there, {_short(b.get(k))} now" for k in keys]


def check_settings(out: Path, settings: dict) -> None:
    path = out / "encode-settings.json"
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BadInputError(f"{path}: unreadable ({e}); use a new --out") from e
    diff = settings_diff(old, settings)
    if diff:
        raise BadInputError(f"--out {out} holds a cache made with other settings ({'; '.join(diff)}); "
                            "use a new --out, or the same settings to resume")


def dataset_card(manifest_hint: str) -> str:
    return ("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/*.parquet\n---\n"
            f"# Latent cache\n\nMade by `latentvae encode`. {manifest_hint}\n"
            "Latents are raw (unscaled): a diffusion model sees (z - shift_factor) * scaling_factor.\n")


def build_manifest(out: Path, settings: dict, vae_id: dict, cfg: EncodeConfig, pre: Preprocess) -> dict:
    """Read every shard and failure log; check that each input is in exactly once; the manifest."""
    shards, failures = scan_shards(out), scan_failures(out)
    flips = (False, True) if pre.flip else (False,)
    seen = Counter((i, f) for s in shards for i, f in zip(s["index"], s["flipped"]))
    dup = [k for k, c in seen.items() if c > 1]
    missing = [(i, f) for i in range(settings["inputs"]) if i not in failures for f in flips if (i, f) not in seen]
    both = sorted({i for i, _ in seen} & set(failures))
    if dup or missing or both:
        raise RuntimeError(f"{out}: cache inconsistent: {len(dup)} duplicated rows {dup[:5]}, {len(missing)} missing "
                           f"{missing[:5]}, {len(both)} inputs both encoded and failed {both[:5]}")
    buckets = Counter(f"{w}x{h}" for s in shards for h, w in s["pixel_size"])
    return {
        "format_version": FORMAT_VERSION,
        "vae": vae_id,
        "source": settings["source"],
        "preprocessing": {**pre.to_dict(), "jpeg_draft": cfg.jpeg_draft, "resize": "bicubic, antialiased, cover + center crop",
                          "pixel_range": "[-1, 1] = uint8 / 127.5 - 1"},
        "store": cfg.store, "columns": list(STORES[cfg.store]), "dtype": cfg.dtype,
        "dtype_storage": {"fp16": "float16", "fp32": "float32",
                          "bf16": "uint16 raw bfloat16 bits (float32 = bits << 16)"}[cfg.dtype],
        "sample_seed": settings["seed"],
        "counts": {"inputs": settings["inputs"], "encoded_inputs": len({i for i, _ in seen}), "rows": sum(seen.values()),
                   "failures": len(failures), "shards": len(shards), "rows_per_bucket": dict(sorted(buckets.items()))},
        "shards": [{"file": f"data/{s['name']}", "rows": s["rows"]} for s in shards],
        "failures": [failures[i] for i in sorted(failures)],
        "inputs_sha256": settings["inputs_sha256"],
    }


# ----------------------------------------------------------------------------- the run
def resolve_workers(n: int) -> int:
    if n >= 0:
        return n
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def check_vae_fits(cfg: EncodeConfig, vae) -> None:
    """What the VAE itself rules out: a resolution off its factor, a log-variance it does not have."""
    f = downsample_factor(vae)
    if cfg.resolution % f:
        lo = cfg.resolution - cfg.resolution % f
        hint = f"; use {lo} or {lo + f}" if lo else f"; use {f} or a multiple of it"
        raise BadInputError(f"--resolution {cfg.resolution} is not a multiple of the downsampling factor {f} of "
                            f"--vae {cfg.vae}{hint}")
    from diffusers import AutoencoderTiny

    if cfg.store != "mean" and isinstance(vae, AutoencoderTiny):
        raise BadInputError(f"--store {cfg.store} needs a log-variance, but --vae {cfg.vae} is a deterministic "
                            f"{type(vae).__name__}; use --store mean")


def first_missing(path: Path) -> Optional[Path]:
    """The outermost folder that creating `path` would create (None if `path` exists)."""
    if path.exists():
        return None
    path = path.absolute()
    while not path.parent.exists():
        path = path.parent
    return path


def discard_if_unstarted(out: Path, created: Path) -> None:
    """Remove what this run created (DST, and any parent folders it made) when no shard made it:
    a failed first run leaves nothing behind."""
    if created.exists() and not list_shards(out):
        shutil.rmtree(created, ignore_errors=True)


def prepare_vae(path: str, device, channels_last: Optional[bool], flag: Optional[str] = "--vae"):
    from .loading import NotAnAutoencoder, load_autoencoder, with_flag
    from .precision import resolve_channels_last

    try:
        vae = load_autoencoder(path)
    except NotAnAutoencoder as e:
        if flag is None:
            raise
        raise with_flag(flag, path, e) from e
    vae = vae.to(device).eval().requires_grad_(False)
    cl = resolve_channels_last(channels_last, device.type, inference=True)
    if cl:
        vae = vae.to(memory_format=torch.channels_last)
    return vae, cl


def encode(cfg: EncodeConfig) -> dict:
    """Encode `cfg.data` into `cfg.out` (resuming what is there); returns the manifest, on every rank.

    The manifest carries `this_run` stats (seconds, rows encoded by this process, images/s)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from .precision import resolve_mixed_precision

    # as Accelerator does: `accelerate launch --cpu` (ACCELERATE_USE_CPU=1) makes gloo processes on CPUs
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    out = Path(cfg.out)
    created = first_missing(out)
    t0 = time.perf_counter()
    # -- every check, on every rank, before anyone writes: all fail alike and nothing is left behind
    check_out_folder(out)
    vae, cl = prepare_vae(cfg.vae, state.device, cfg.channels_last)
    mp = resolve_mixed_precision(cfg.mixed_precision, state.device.type)
    autocast_dtype = choice(MIXED_PRECISION, mp, "mixed precision")
    check_vae_fits(cfg, vae)
    pre = Preprocess(cfg.preprocess, cfg.resolution, downsample_factor(vae), cfg.max_aspect, cfg.flip)
    src, passthrough = open_inputs(cfg)
    if len(src) == 0:
        raise MissingInputError(f"--data {cfg.data}: no images (split {cfg.split!r} has no rows)")
    vae_id = vae_identity(vae, cfg.vae)
    settings = run_settings(cfg, vae_id, pre, src)
    check_settings(out, settings)
    try:
        return _encode_into(out, cfg, state, t0, vae, cl, mp, autocast_dtype, pre, src, passthrough, vae_id, settings)
    except BaseException:
        if created is not None and state.is_main_process:
            discard_if_unstarted(out, created)
        raise


def _encode_into(out: Path, cfg: EncodeConfig, state, t0: float, vae, cl: bool, mp: str, autocast_dtype, pre,
                 src, passthrough, vae_id: dict, settings: dict) -> dict:
    """encode() once every input is known to be good: write, resume, manifest."""
    from tqdm.auto import tqdm

    # -- what is done: read before the barrier, while nobody writes
    shards, failures = scan_shards(out), scan_failures(out)
    attempt = 1 + max((int(SHARD_RE.match(s["name"]).group(1)) for s in shards), default=0)
    flips = (False, True) if cfg.flip else (False,)
    todo = todo_copies(len(src), flips, shards, failures)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "encode-settings.json").exists():  # first: a folder with data/ is always a cache
            atomic_write_json(out / "encode-settings.json", settings)
        (out / "data").mkdir(exist_ok=True)
        for stale in (out / "data").glob(".*.tmp"):  # partial shards of a killed run: never finished
            stale.unlink()
        (out / "README.md").write_text(dataset_card("manifest.json appears when every input is accounted for."))
    state.wait_for_everyone()

    mine = sorted(todo)[state.process_index::state.num_processes]  # deterministic shard by index
    log = FailureLog(out / f"failures-rank{state.process_index}.jsonl")
    writer = ShardWriter(out / "data", attempt, state.process_index, cfg.shard_size,
                         table_schema(cfg.dtype, cfg.store, passthrough))
    loader = torch.utils.data.DataLoader(
        PreprocessedImages(src, mine, pre, cfg.jpeg_draft), batch_size=cfg.batch_size, collate_fn=collate_list,
        num_workers=resolve_workers(cfg.num_workers), pin_memory=state.device.type == "cuda")
    batcher = BucketBatcher(cfg.batch_size)
    bar = tqdm(total=sum(len(todo[i]) for i in mine), unit="img", dynamic_ncols=True,
               disable=not (cfg.progress and state.is_local_main_process), desc=f"encode x{state.num_processes}")

    stats = {"rows": 0}

    def run(batch: list[dict]) -> None:
        latents = encode_rows(vae, batch, cfg.store, cfg.seed, state.device, autocast_dtype, cl)
        writer.add(rows_table(batch, latents, cfg.dtype, passthrough))
        bar.update(len(batch))
        stats["rows"] += len(batch)

    t_enc = time.perf_counter()
    for items in loader:
        for it in items:
            if "error" in it:
                log.add(it["index"], src.name(it["index"]), it["error"])
                bar.update(len(todo[it["index"]]))
                bar.set_postfix(failed=log.count)
                continue
            for flipped in todo[it["index"]]:
                row = {**it, "flipped": flipped, "source_id": src.name(it["index"]),
                       "pixels": it["pixels"].flip(-1) if flipped else it["pixels"]}
                batch = batcher.add(row)
                if batch:
                    run(batch)
    for batch in batcher.flush():
        run(batch)
    writer.close()
    bar.close()
    seconds = time.perf_counter() - t_enc
    encoded = stats["rows"]
    state.wait_for_everyone()

    if state.is_main_process:
        manifest = build_manifest(out, settings, vae_id, cfg, pre)
        atomic_write_json(out / "manifest.json", manifest)
    state.wait_for_everyone()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["this_run"] = {"process": state.process_index, "processes": state.num_processes, "attempt": attempt,
                            "rows_encoded": encoded, "failures": log.count, "encode_seconds": seconds,
                            "total_seconds": time.perf_counter() - t0,
                            "images_per_second": encoded / seconds if seconds > 0 else 0.0,
                            "mixed_precision": mp, "channels_last": cl}
    if cfg.verify and state.is_main_process:
        manifest["verify"] = verify_cache(out, num=cfg.verify, seed=cfg.seed, vae=vae)
    return manifest


# ----------------------------------------------------------------------------- checking the cache
def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two uint8 images (as saved to PNG)."""
    mse = (a.double() - b.double()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def read_manifest(out: Path) -> dict:
    """A finished cache's manifest, or a MissingInputError/BadInputError saying what `out` is instead."""
    path = out / "manifest.json"
    if not out.is_dir():
        raise MissingInputError(f"cache folder {out} does not exist" if not out.exists() else
                                f"{out} is not a folder; expected a latent cache written by `latentvae encode`")
    if not path.is_file():
        if (out / "encode-settings.json").is_file():
            raise MissingInputError(f"{path} not found: the cache is unfinished; rerun the same `latentvae encode` "
                                    "command to complete it")
        raise MissingInputError(f"{out} is not a latent cache (no manifest.json); expected a folder written by "
                                "`latentvae encode`")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BadInputError(f"{path}: unreadable ({e})") from e


def sample_rows(out: Path, num: int, seed: int) -> list[tuple[str, int]]:
    """`num` random (shard file, row) pairs, the same for the same seed."""
    pairs = [(p.name, r) for p in list_shards(out) for r in range(pq.read_metadata(p).num_rows)]
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(pairs), generator=g)[:num].tolist()
    return [pairs[k] for k in sorted(pick)]


def verify_cache(out: str | Path, num: int = 8, seed: int = 0, vae=None, vae_path: Optional[str] = None,
                 save_dir: Optional[str] = None) -> dict:
    """Decode `num` random stored latents; PSNR against the source images preprocessed the same way."""
    from .sources import open_source
    from .images import make_grid
    from .loading import NotAnAutoencoder

    out = Path(out)
    manifest = read_manifest(out)
    if save_dir and Path(save_dir).exists() and not Path(save_dir).is_dir():
        raise BadInputError(f"--save-dir {save_dir} exists and is not a folder")
    if vae is None:
        try:
            vae, _ = prepare_vae(vae_path or manifest["vae"]["path"], torch.device("cpu"), False,
                                 flag="--vae" if vae_path else None)
        except NotAnAutoencoder as e:
            if vae_path:
                raise
            raise NotAnAutoencoder(f"{e} (the VAE path in {out}/manifest.json; pass --vae to use another copy "
                                   "of that VAE)") from e
    if weights_sha256(vae) != manifest["vae"]["weights_sha256"]:
        which = f"--vae {vae_path}" if vae_path else f"the VAE at {manifest['vae']['path']} (from the manifest)"
        raise BadInputError(f"{which} is not the VAE that made {out}: its weights sha256 differs from the "
                            f"manifest's {manifest['vae']['weights_sha256'][:12]}…; pass the VAE it was encoded with")
    s = manifest["source"]
    src = open_source(s["data"], s["kind"], s["split"], s["image_column"], 10**12)
    pre_d = dict(manifest["preprocessing"])
    pre = Preprocess(**{k: pre_d[k] for k in ("mode", "resolution", "factor", "max_aspect", "flip")},
                     buckets=tuple(tuple(b) for b in pre_d["buckets"]))
    column = "latent_mean" if "latent_mean" in manifest["columns"] else "latent_sample"
    device = next(vae.parameters()).device
    records = []  # every sampled row checked against the source before anything is decoded or saved
    for shard, row in sample_rows(out, num, seed):
        rec = pq.read_table(out / "data" / shard, columns=["source_index", "source_id", "flipped", column]).slice(row, 1)
        i, sid = rec["source_index"][0].as_py(), rec["source_id"][0].as_py()
        if i >= len(src) or src.name(i) != sid:
            now = repr(src.name(i)) if i < len(src) else "gone"
            raise BadInputError(f"{out}: row {shard}:{row} is {sid!r} but input {i} of its source {s['data']} is now "
                                f"{now}: the source changed since it was encoded")
        records.append((shard, row, rec))
    results = []
    for shard, row, rec in records:
        i, sid, flipped = rec["source_index"][0].as_py(), rec["source_id"][0].as_py(), rec["flipped"][0].as_py()
        z = from_storage(rec[column][0].as_py(), manifest["dtype"])[None].to(device)
        with torch.inference_mode():
            x_hat = to_uint8(decode(vae, z.to(next(vae.parameters()).dtype))[0].float().cpu())
        try:
            x = load_preprocessed(src, i, pre, pre_d["jpeg_draft"])["pixels"]
        except BadImage as e:
            raise BadInputError(f"{out}: the source of row {shard}:{row} cannot be read any more ({e})") from e
        x = x.flip(-1) if flipped else x
        results.append({"shard": shard, "row": row, "source_id": sid, "flipped": flipped, "psnr": psnr(x, x_hat)})
        if save_dir:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
            make_grid([x[None].float() / 127.5 - 1, x_hat[None].float() / 127.5 - 1]).save(
                Path(save_dir) / f"{len(results) - 1:03d}-{Path(sid).stem}.png")
    values = [r["psnr"] for r in results]
    return {"samples": results, "column": column, "mean_psnr": float(np.mean(values)) if values else float("nan"),
            "min_psnr": float(np.min(values)) if values else float("nan")}


# ----------------------------------------------------------------------------- command line
def _bool_auto(text: str) -> Optional[bool]:
    return choice({"auto": None, "yes": True, "no": False}, text, "channels-last setting")


def _parser() -> argparse.ArgumentParser:
    from .cli import make_parser

    d = EncodeConfig("", "", "")
    p = make_parser("latentvae encode", "Encode images to a resumable parquet cache of latents.")
    p.add_argument("--vae", required=True, help="diffusers AutoencoderKL/AutoencoderTiny folder, or a latentvae run")
    p.add_argument("--data", required=True, help="image folder, saved `datasets` folder, or hub dataset name")
    p.add_argument("--out", required=True, help="cache folder: new, empty, or an earlier cache of the same "
                   "command (rerun it to resume)")
    p.add_argument("--kind", default=d.kind, choices=SOURCE_KINDS, help="what --data is (auto: from the path)")
    p.add_argument("--split", default=d.split, help="split of a `datasets` input")
    p.add_argument("--image-column", default=d.image_column, help="image column of a `datasets` input")
    p.add_argument("--preprocess", default=d.preprocess, choices=list(PREPROCESS_MODES), help="resize and crop mode")
    p.add_argument("--resolution", type=int, default=d.resolution,
                   help="square side, a multiple of the VAE's downsampling factor; buckets hold about its square")
    p.add_argument("--max-aspect", type=float, default=d.max_aspect, help="widest bucket aspect ratio")
    p.add_argument("--flip", action="store_true", help="also store a horizontally flipped copy of every image")
    p.add_argument("--store", default=d.store, choices=list(STORES), help="latent columns of each row")
    p.add_argument("--dtype", default=d.dtype, choices=list(DTYPES), help="stored dtype of the latents")
    p.add_argument("--shard-size", type=int, default=d.shard_size, help="rows per parquet shard")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per encoder call")
    p.add_argument("--num-workers", type=int, default=d.num_workers, help="DataLoader workers; -1: auto")
    p.add_argument("--mixed-precision", default=d.mixed_precision, choices=list(MIXED_PRECISION),
                   help="autocast dtype of the encoder (auto: see precision.py)")
    p.add_argument("--channels-last", default="auto", choices=["auto", "yes", "no"], help="channels-last memory format")
    p.add_argument("--no-jpeg-draft", action="store_true", help="always decode JPEGs at full size")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, help="larger images are failures")
    p.add_argument("--seed", type=int, default=d.seed, help="noise of --store sample; rows of --verify")
    p.add_argument("--verify", type=int, default=0, metavar="N", help="then decode N random rows and report PSNR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> EncodeConfig:
    return EncodeConfig(
        vae=args.vae, data=args.data, out=args.out, kind=args.kind, split=args.split, image_column=args.image_column,
        preprocess=args.preprocess, resolution=args.resolution, max_aspect=args.max_aspect, flip=args.flip,
        store=args.store, dtype=args.dtype, shard_size=args.shard_size, batch_size=args.batch_size,
        num_workers=args.num_workers, mixed_precision=args.mixed_precision, channels_last=_bool_auto(args.channels_last),
        jpeg_draft=not args.no_jpeg_draft, max_image_pixels=args.max_image_pixels, seed=args.seed,
        verify=args.verify, progress=not args.no_progress)


def print_verify(report: dict) -> None:
    print(f"{'shard:row':<28} {'flip':<5} {'PSNR dB':>8}  source")
    for r in report["samples"]:
        print(f"{r['shard'] + ':' + str(r['row']):<28} {str(r['flipped']):<5} {r['psnr']:8.2f}  {r['source_id']}")
    print(f"mean PSNR {report['mean_psnr']:.2f} dB, min {report['min_psnr']:.2f} dB over {len(report['samples'])} "
          f"rows of {report['column']}")


def _encode_command(argv=None) -> None:
    args = _parser().parse_args(argv)
    cfg = config_from_args(args)
    manifest = encode(cfg)
    run = manifest["this_run"]
    if run["process"] == 0:
        c = manifest["counts"]
        print(f"{cfg.out}: {c['rows']} rows of {c['encoded_inputs']}/{c['inputs']} inputs in {c['shards']} shards, "
              f"{c['failures']} failures; this run {run['rows_encoded']} rows at {run['images_per_second']:.2f} img/s "
              f"on {run['processes']} process(es)")
        if "verify" in manifest:
            print_verify(manifest["verify"])


def main(argv=None) -> None:
    """`latentvae encode`; a mistake in the inputs is one line on stderr and exit status 2."""
    from .cli import run_command

    run_command("encode", _encode_command, argv)


def _decode_command(argv=None) -> None:
    from .cli import make_parser

    p = make_parser("latentvae decode", "Decode a random sample of a latent cache; PSNR against the source images "
                    "preprocessed the same way.")
    p.add_argument("cache", help="folder written by `latentvae encode` (with manifest.json)")
    p.add_argument("--vae", help="the VAE (default: the path in the manifest; its weights must match)")
    p.add_argument("--num", type=int, default=8, help="rows to decode")
    p.add_argument("--seed", type=int, default=0, help="which rows")
    p.add_argument("--save-dir", help="write source|decoded PNG pairs here")
    p.add_argument("--min-psnr", type=float, help="exit 1 if the mean PSNR is below this")
    args = p.parse_args(argv)
    if args.num < 1:
        raise BadInputError(f"--num must be >= 1, got {args.num}")
    report = verify_cache(args.cache, num=args.num, seed=args.seed, vae_path=args.vae, save_dir=args.save_dir)
    print_verify(report)
    if args.min_psnr is not None and report["mean_psnr"] < args.min_psnr:
        sys.exit(f"mean PSNR {report['mean_psnr']:.2f} dB is below --min-psnr {args.min_psnr:g}")


def decode_main(argv=None) -> None:
    """`latentvae decode`; a mistake in the inputs is one line on stderr and exit status 2."""
    from .cli import run_command

    run_command("decode", _decode_command, argv)


if __name__ == "__main__":
    main()
