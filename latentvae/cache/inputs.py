"""The inputs of `latentvae encode`: images in, rows of one pixel shape out, and the shards' rows of an encoded batch.

    src, passthrough = open_inputs(opts)          # an image source, and a dataset of the other columns (or None)
    items = PreprocessedImages(src, indices, pre, draft)   # what DataLoader workers decode and preprocess
    for row in rows_to_encode(loader, todo, src, log, bar): batch = batcher.add(row)   # BucketBatcher
    table = batch_table(batch, latents, "fp16", passthrough)   # our columns, the latents, the input's columns
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Iterator, Optional

import pyarrow as pa
import torch

from ..errors import BadInputError
from ..images import BadImage
from ..options import EncodeOptions
from ..preprocess import Preprocess, load_preprocessed
from .schema import OWN_COLUMNS, make_table
from .writer import FailureLog


# ----------------------------------------------------------------------------- inputs
def open_inputs(opts: EncodeOptions):
    """(image source, passthrough dataset or None): every non-image column of a `datasets` input, or the
    captions and metadata of an image folder (metadata.jsonl / metadata.csv, .txt / .caption sidecars)."""
    from ..sources import CropSource, FolderImageSource, HFImageSource, open_source

    src = open_source(opts.data, opts.data_kind, opts.split, opts.image_column, opts.max_image_pixels)
    if opts.preprocess == "crops":  # one input per crop; each crop keeps its image's columns
        src, rest = CropSource(src, opts.crops, opts.seed), open_inputs(replace(opts, preprocess="center-crop"))[1]
        if rest is not None:
            rest = rest.select([src.image(j) for j in range(len(src))])
        return src, rest
    if isinstance(src, HFImageSource):
        rest = src.dataset.remove_columns([opts.image_column])
    elif isinstance(src, FolderImageSource):
        rest = src.passthrough()
        if rest is None:
            return src, None
    else:
        return src, None
    clash = [c for c in rest.column_names if c in OWN_COLUMNS]
    if clash:
        raise BadInputError(f"{opts.data}: columns {clash} clash with the cache's own columns ({', '.join(OWN_COLUMNS)})")
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
            return {"index": i, **load_preprocessed(self.src, i, self.pre, self.draft, identify=True)}
        except BadImage as e:
            try:
                identity = self.src.stat_identity(i)  # a rerun retries it once this changes
            except OSError:
                identity = None
            return {"index": i, "error": str(e), "identity": identity}


def collate_list(items: list[dict]) -> list[dict]:
    return items


def resolve_workers(n: int, device: str) -> int:
    """--num-workers: -1 is 0 when the encoder runs on the CPU, else one fewer than the CPU cores, at most 4.

    On the CPU the encoder's threads use every core, and decoding is a small part of the time (a JPEG
    at 256x256 decodes 100-150x faster than the `sd` encoder encodes it), so a worker process has
    little to overlap and competes with those threads for the cores: on the 2-core AVX2 development
    CPU decoding in the main process ran 1.18x, 0.98x and 1.06x the speed with one worker in three
    paired runs (benchmarks/RESULTS.md, "Batch size on the CPU"), and it saves starting a process."""
    if n >= 0:
        return n
    if device == "cpu":
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


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


def rows_to_encode(loader, todo: dict[int, list[bool]], src, log: FailureLog, bar) -> Iterator[dict]:
    """One row per copy still to do (flipped or not) of each preprocessed item; unreadable inputs go
    to the failure log instead."""
    for items in loader:
        for it in items:
            i = it["index"]
            if "error" in it:
                log.add(i, src.name(i), it["error"], src.relative_name(i), it["identity"])
                bar.update(len(todo[i]))
                bar.set_postfix(failed=log.count)
                continue
            for flipped in todo[i]:
                yield {**it, "flipped": flipped, "source_id": src.name(i), "source_key": src.relative_name(i),
                       "pixels": it["pixels"].flip(-1) if flipped else it["pixels"]}


def batch_table(rows: list[dict], latents: dict, dtype: str, passthrough) -> pa.Table:
    """One encoded batch as the shards' rows: our columns, the latents, then the input's other columns."""
    from .update import table_metadata_hashes

    shape = list(next(iter(latents.values())).shape[1:])
    extra = None if passthrough is None else passthrough.select([r["index"] for r in rows]).with_format("arrow")[:]
    ids = [r["identity"] for r in rows]
    values = {"source_index": [r["index"] for r in rows], "source_id": [r["source_id"] for r in rows],
              "source_key": [r["source_key"] for r in rows], "source_size": [d.get("size") for d in ids],
              "source_mtime_ns": [d.get("mtime_ns") for d in ids], "source_sha256": [d["sha256"] for d in ids],
              "source_fingerprint": [d.get("fingerprint") for d in ids],
              "metadata_sha256": table_metadata_hashes(extra) or [None] * len(rows),
              "flipped": [r["flipped"] for r in rows], "pixel_size": [list(r["pixels"].shape[-2:]) for r in rows],
              "original_size": [list(r["original_size"]) for r in rows],
              "crop_top_left": [list(r["crop_top_left"]) for r in rows], "latent_shape": [shape] * len(rows)}
    if "frame_indices" in rows[0]:  # clips (clips.py): which clip of which video, its frames and rate
        from .clips import clip_values

        values.update(clip_values(rows))
    return make_table(values, latents, dtype, extra)
