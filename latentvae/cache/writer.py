"""Writing a cache's rows so that each is stored exactly once: parquet shards and failure logs.

    data/part-AAAA-RRR-SSSSS.parquet   attempt AAAA, process rank RRR, shard SSSSS of that process
                                       (rank 999: rows carried over from shards an update superseded)
    failures-rankN.jsonl               one fsynced line per input process N could not use

A shard holds exactly `shard_size` rows (a process's last one may be short) and is written under
a hidden temporary name, fsynced and renamed (fsutil.atomic_write), so a shard name is only ever
seen complete and never rewritten. Its `source_key`/`flipped` columns and the source identity
beside them are the record of what it holds: `scan_shards` and `scan_failures` read back what is
done, for a resume, an update (update.py) and the manifest.
Each shard also carries, in its parquet metadata (`latentvae.vae.moments`), the per-channel sums of the
latents a trainer draws from it, so the manifest's measured statistics cost no second pass.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..fsutil import atomic_write

SHARD_RE = re.compile(r"part-(\d{4})-(\d{3})-(\d{5})\.parquet$")


def shard_name(attempt: int, rank: int, seq: int) -> str:
    return f"part-{attempt:04d}-{rank:03d}-{seq:05d}.parquet"


def list_shards(out: Path) -> list[Path]:
    """The finished shards of the cache `out`, sorted by name."""
    folder = out / "data"
    return sorted(p for p in folder.glob("part-*.parquet") if SHARD_RE.match(p.name)) if folder.is_dir() else []


MOMENTS_KEY = b"latentvae.vae.moments"


IDENTITY_COLUMNS = ("source_key", "source_size", "source_mtime_ns", "source_sha256", "source_fingerprint",
                    "metadata_sha256")


def scan_shard(p: Path) -> dict:
    """One finished shard: its name, rows, per row (source_index, flipped, pixel_size) and the source
    identity columns (`identity`: {column: list}; absent in format-1 caches), and its latent moments
    ({"count": positions per channel, "sum": [C], "sumsq": [C]}; None in older caches)."""
    schema = pq.read_schema(p)
    identity = [c for c in IDENTITY_COLUMNS if c in schema.names]
    t = pq.read_table(p, columns=["source_index", "flipped", "pixel_size", *identity])
    meta = schema.metadata or {}
    moments = json.loads(meta[MOMENTS_KEY]) if MOMENTS_KEY in meta else None
    return {"name": p.name, "rows": t.num_rows, "index": t.column("source_index").to_pylist(),
            "flipped": t.column("flipped").to_pylist(), "pixel_size": t.column("pixel_size").to_pylist(),
            "identity": {c: t.column(c).to_pylist() for c in identity}, "moments": moments}


def scan_shards(out: Path, names: Optional[list[str]] = None) -> list[dict]:
    """scan_shard of every finished shard of the cache `out` (or of the shards `names`, in data/)."""
    paths = list_shards(out) if names is None else [out / "data" / n for n in names]
    return [scan_shard(p) for p in paths]


COPY_RANK = 999  # the "process" of shards that carry rows of a superseded shard over (cache/update.py)


def shard_attempt_rank(name: str) -> tuple[int, int]:
    m = SHARD_RE.match(name)
    return int(m.group(1)), int(m.group(2))


def next_attempt(shards: list[dict]) -> int:
    """The attempt number of a new run's shards: one past the highest written, so names never collide."""
    return 1 + max((int(SHARD_RE.match(s["name"]).group(1)) for s in shards), default=0)


def remove_stale_temporaries(out: Path) -> None:
    """Delete the partial shards a killed run left (hidden temporaries, never renamed into place)."""
    for stale in (out / "data").glob(".*.tmp"):
        stale.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- failures
def failure_log_paths(out: Path) -> list[Path]:
    return sorted(out.glob("failures-rank*.jsonl"))


def failure_log_path(out: Path, rank: int) -> Path:
    return out / f"failures-rank{rank}.jsonl"


def read_jsonl(path: Path) -> list[dict]:
    """Complete records of a JSON-lines file; a line cut short by a crash is skipped."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def scan_failures(out: Path) -> list[dict]:
    """Every failure record of every process's log, in log order (a key may appear more than once: an
    image that failed, changed and failed again)."""
    return [rec for p in failure_log_paths(out) for rec in read_jsonl(p)]


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

    def add(self, index: int, source_id: str, reason: str, key: Optional[str] = None,
            identity: Optional[dict] = None, retry: bool = False) -> None:
        """One input that could not be used: where it was, why, and what identified it then (its key and
        stat identity: a rerun retries it once it changed). `retry`: a rerun tries it again anyway (a clip
        that ran out of memory: the rerun may have --tiling); until then it counts as failed."""
        rec = {"source_index": index, "source_id": source_id, "reason": reason, "source_key": key,
               "identity": identity}
        if retry:
            rec["retry"] = True
        with open(self.path, "ab") as f:
            f.write((json.dumps(rec) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        self.count += 1


# ----------------------------------------------------------------------------- shards
def row_moments(latents: dict, sample: bool = True, patch: int = 1):
    """Per row and channel, the sums [sum z, sum z^2] over positions of the latents a diffusion trainer
    draws from these columns, exactly as moments.batch_moments counts them. (B, 2, C * patch**2) float64.

    The draw (LatentDataset): the stored sample; the mean; or, with the log-variance and `sample` (a family
    whose consumers sample, families.py), posterior samples. `patch` > 1: of the patchified latent
    (flux2: its pipeline's statistics are per channel of the 2x2-patchified latent)."""
    import torch

    from ..vae.conventions import patchify
    from ..vae.moments import batch_moments

    z = latents.get("latent_sample", latents.get("latent_mean"))
    logvar = latents.get("latent_logvar") if sample and "latent_sample" not in latents else None
    if z.dim() == 5:  # clips (B, C, T, h, w): per-channel sums, so time folds into height exactly
        z = z.reshape(z.shape[0], z.shape[1], -1, z.shape[-1])
        logvar = None if logvar is None else logvar.reshape(z.shape)
    if patch > 1:
        z, logvar = patchify(z, patch), None if logvar is None else patchify(logvar, patch)
    rows = [batch_moments(z[i:i + 1], None if logvar is None else logvar[i:i + 1]) for i in range(len(z))]
    return torch.stack([torch.stack([m.sum, m.sumsq]) for m in rows]).numpy()


class ShardWriter:
    """Collects encoded batches; writes exactly `shard_size` rows per shard (the last may be short).

    `sample`, `patch`: what a trainer draws from the rows (row_moments), for the moments each shard records."""

    def __init__(self, folder: Path, attempt: int, rank: int, shard_size: int, schema: pa.Schema,
                 sample: bool = True, patch: int = 1):
        self.folder, self.attempt, self.rank, self.shard_size, self.schema = folder, attempt, rank, shard_size, schema
        self.sample, self.patch = sample, patch
        self.pending: list[pa.Table] = []
        self.pending_moments: list[np.ndarray] = []  # (rows, 2, C) per-row channel sums, beside the rows
        self.n_pending, self.seq, self.written = 0, 0, []

    def moments(self, latents: dict) -> np.ndarray:
        """row_moments of `latents` ({column: (B, C, h, w)}, or clips' (B, C, T, h, w)) as this cache's trainers
        draw them."""
        return row_moments(latents, self.sample, self.patch)

    def add(self, table: pa.Table, row_moments: np.ndarray) -> None:
        """Rows, and per row the channel sums [sum z, sum z^2] of its latent (`moments`)."""
        self.pending.append(table.cast(self.schema))
        self.pending_moments.append(np.asarray(row_moments, dtype=np.float64))
        self.n_pending += table.num_rows
        while self.n_pending >= self.shard_size:
            self.write(self.shard_size)

    def close(self) -> None:
        if self.n_pending:
            self.write(self.n_pending)

    def write(self, n: int) -> None:
        """The first `n` pending rows as the next shard."""
        table = pa.concat_tables(self.pending)
        moments = np.concatenate(self.pending_moments)
        head, rest = table.slice(0, n), table.slice(n)
        shapes = head.column("latent_shape").to_pylist()
        count = int(sum(np.prod(s[1:]) for s in shapes)) // self.patch ** 2  # positions per (patchified) channel
        record = {"count": count, "sum": moments[:n, 0].sum(0).tolist(),
                  "sumsq": moments[:n, 1].sum(0).tolist()}
        head = head.replace_schema_metadata({**(head.schema.metadata or {}), MOMENTS_KEY: json.dumps(record)})
        path = self.folder / shard_name(self.attempt, self.rank, self.seq)
        atomic_write(path, lambda f: pq.write_table(head, f))
        self.pending, self.n_pending = ([rest] if rest.num_rows else []), rest.num_rows
        self.pending_moments = [moments[n:]] if rest.num_rows else []
        self.seq += 1
        self.written.append(path.name)
