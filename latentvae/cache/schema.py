"""The latent cache's format, defined once: its columns, their storage dtypes and the arrow schema.

This is what a reader imports (a diffusion trainer, a latent loader); it loads no model:

    from latentvae.cache.schema import from_storage
    z = from_storage(row["latent_mean"], manifest["dtype"])      # float32 tensor (C, h, w)

Each row is one stored image (two per input with --flip): the ROW_COLUMNS (where the image came
from and what identifies it, how it was cropped, the latent's shape), then the latent columns of the --store (STORES),
then every other column of a `datasets` input. A latent is a nested list (C, h, w) of the arrow
type DTYPES[dtype] names; bf16 is stored as its raw 16 bits (uint16) since parquet has no bf16.

A video cache (clips of a video VAE) stores one row per clip: the latent is (C, T', h, w), one list level
deeper, `latent_shape` is [C, T', h, w], and the VIDEO_COLUMNS follow the ROW_COLUMNS (which clip of which
video, its frame indices in the source and its frame rate).
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pyarrow as pa
import torch

FORMAT_VERSION = 2  # of the shards, encode-settings.json and manifest.json together (2: rows record their source)

SIZE = pa.list_(pa.int32())
# the columns every row has, in order, with their arrow types
ROW_COLUMNS: dict[str, pa.DataType] = {
    "source_index": pa.int64(),  # position of the input in the source when it was encoded (sorted file list, dataset row)
    "source_id": pa.string(),  # its file path, or `source:split[row]`, as given when it was encoded
    # what identifies the source, so a rerun finds what changed (cache/update.py)
    "source_key": pa.string(),  # the image's path relative to the folder, or `[row]` of a dataset
    "source_size": pa.int64(),  # bytes of the file (or of a dataset row's encoded image)
    "source_mtime_ns": pa.int64(),  # the file's modification time, ns (null for datasets)
    "source_sha256": pa.string(),  # sha256 of exactly the bytes that were decoded
    "source_fingerprint": pa.string(),  # a `datasets` input's fingerprint (null for folders)
    "metadata_sha256": pa.string(),  # sha256 of the row's passthrough columns (captions, ...); null without any
    "flipped": pa.bool_(),  # a horizontally flipped copy
    "pixel_size": SIZE,  # [H, W] of the encoded image (the bucket)
    "original_size": SIZE,  # [H, W] of the source image (SDXL's original_size)
    "crop_top_left": SIZE,  # [top, left] of the crop in the resized image (SDXL's crops_coords_top_left)
    "latent_shape": SIZE,  # [C, h, w]
}
# a video cache's rows (one per clip) also have these, after ROW_COLUMNS
VIDEO_COLUMNS: dict[str, pa.DataType] = {
    "video_key": pa.string(),  # the clip's video: its path relative to the folder, or `[row]` of a dataset
    "clip_index": pa.int64(),  # k of `video_key#clipk`: the k-th clip of that video
    "frame_indices": pa.list_(pa.int64()),  # the source frame of each of the clip's T frames (presentation order)
    "fps": pa.float64(),  # frames per second of the clip (--fps, or its video's own)
    "source_fps": pa.float64(),  # its video's frame rate
}
# --store: the latent columns each row holds
STORES: dict[str, tuple[str, ...]] = {
    "mean": ("latent_mean",),
    "moments": ("latent_mean", "latent_logvar"),  # trainers sample mean + exp(logvar / 2) * eps
    "sample": ("latent_sample",),  # one posterior sample, seeded by (seed, source_key, flipped)
}
LATENT_COLUMNS = ("latent_mean", "latent_logvar", "latent_sample")
OWN_COLUMNS = (*ROW_COLUMNS, *VIDEO_COLUMNS, *LATENT_COLUMNS)  # an input column of one of these names is refused
# --dtype: torch dtype of the values and the arrow type they are stored as. bf16 is stored as its
# raw 16 bits (uint16): exact and half the size of float32; parquet has no bf16 type.
DTYPES: dict[str, tuple[torch.dtype, pa.DataType]] = {
    "fp16": (torch.float16, pa.float16()),
    "bf16": (torch.bfloat16, pa.uint16()),
    "fp32": (torch.float32, pa.float32()),
}
DTYPE_STORAGE = {"fp16": "float16", "fp32": "float32", "bf16": "uint16 raw bfloat16 bits (float32 = bits << 16)"}


def latent_type(dtype: str, ndim: int = 3) -> pa.DataType:
    """The arrow type of one latent: list<list<list<T>>>, (C, h, w); ndim 4: one level more, (C, T, h, w)."""
    t = DTYPES[dtype][1]
    for _ in range(ndim):
        t = pa.list_(t)
    return t


def nested_list_array(a: np.ndarray) -> pa.Array:
    """(B, C, h, w) -> a list<list<list<T>>> array of B rows, so `datasets` gives (C, h, w) per row; (B, C, T, h, w)
    -> one level more, (C, T, h, w) per row."""
    arr = pa.array(a.reshape(-1))
    count = a.size
    for step in reversed(a.shape[1:]):  # innermost level first: w, h, (T,) C
        count //= step
        arr = pa.ListArray.from_arrays(pa.array(np.arange(0, (count + 1) * step, step, dtype=np.int32)), arr)
    return arr


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """float latents -> the numpy array stored for `dtype` (bf16: its raw bits as uint16)."""
    torch_dtype, _ = DTYPES[dtype]
    y = x.to(torch_dtype)
    if dtype == "bf16":
        return y.view(torch.int16).numpy().view(np.uint16)
    return y.numpy()


def from_storage(x: Any, dtype: str) -> torch.Tensor:
    """A stored latent (nested lists, numpy or tensor) -> float32 tensor; bf16 bits are widened exactly."""
    if dtype == "bf16":
        bits = torch.as_tensor(np.asarray(x).astype(np.int64))
        return bits.to(torch.int32).bitwise_left_shift(16).view(torch.float32)
    return torch.as_tensor(np.asarray(x, dtype=np.float32))


def arrow_schema(dtype: str, store: str, extra_features=None, video: bool = False) -> pa.Schema:
    """The shards' arrow schema, with `datasets` features in its metadata: the ROW_COLUMNS (and a video
    cache's VIDEO_COLUMNS), the latent columns of `store` ((C, T, h, w) for video), then `extra_features` (a
    `datasets.Features` of passthrough columns, ClassLabels and all)."""
    import datasets

    own = {**ROW_COLUMNS, **(VIDEO_COLUMNS if video else {})}
    fields = [*own.items(), *((name, latent_type(dtype, 4 if video else 3)) for name in STORES[store])]
    features = datasets.Features.from_arrow_schema(pa.schema(fields))
    if extra_features is not None:
        features = datasets.Features({**features, **extra_features})
    return features.arrow_schema


def make_table(values: dict[str, list], latents: dict[str, torch.Tensor], dtype: str,
               extra: Optional[pa.Table] = None) -> pa.Table:
    """One batch of rows as an arrow table: `values` (a list per ROW_COLUMNS name, and per VIDEO_COLUMNS name
    for clips; a missing source identity column is null, as in synthetic caches), the latent
    columns (float (B, C, h, w) each; clips (B, C, T, h, w)) stored as `dtype`, then the columns of `extra`."""
    n = len(values["source_index"])
    own = {**ROW_COLUMNS, **(VIDEO_COLUMNS if "frame_indices" in values else {})}
    cols = {name: pa.array(values.get(name, [None] * n), typ) for name, typ in own.items()}
    for name, x in latents.items():
        cols[name] = nested_list_array(to_storage(x, dtype))
    table = pa.table(cols)
    if extra is not None:
        for name in extra.column_names:
            table = table.append_column(name, extra.column(name))
    return table
