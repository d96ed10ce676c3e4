"""Reading a latent cache the way a diffusion training loop needs it: latents in its pipeline's units, batched by shape.

    from latentvae import LatentDataset, LatentLoader

    ds = LatentDataset("latents/")                                 # the formula and factors of the cache's VAE
    loader = LatentLoader(ds, batch_size=64, seed=0)               # one latent shape per batch; ranks split
    for epoch in range(epochs):
        loader.set_epoch(epoch)                                    # new order, new posterior noise
        for batch in loader:                                       # read ahead by a thread of this process
            x = batch["latents"]                                   # float32 (B, C', h', w'), ~N(0, 1)
                                                                   # a video cache: (B, C, T', h', w')

A batch holds what the family of the cache's VAE feeds its diffusion model (normalize.py): the latent its
consumers take (FLUX.2, Wan: the posterior mode; SD/SDXL/SD3, Qwen-Image, HunyuanImage: a posterior sample
from --store moments rows), through its pipeline's formula with the VAE's own factors, i.e.
`conventions.to_diffusion(latent, factors, convention)`: for FLUX.2 2x2-patchified to 4C channels at
h/2 x w/2 and normalized by its BatchNorm statistics. `convention=None` gives the raw VAE latents (what
the VAE decodes). The modules: reader (this dataset), normalize (consumer rule and formula), loader
(BucketBatchSampler, LatentLoader, collate), memory (shared memory for DataLoader workers).

`DataLoader(ds, batch_sampler=BucketBatchSampler(ds, 64), collate_fn=collate)` gives the same batches
(then call `set_epoch` on the sampler and on the dataset).

The shards are read through `datasets` (arrow files, memory-mapped: the cache is never held in
memory). When the dataset opens, each memory-mapped arrow chunk of a latent column is viewed as one
flat array of its values (zero-copy) and every row's start in it computed from the list offsets
(per row a chunk number and a start: 12 bytes a row, the only part of the reader that grows with the
cache, with the (C, h, w) of each row: 12 more). A batch of rows of one shape is then gathered with
one copy of each row's values into a (B, C, h, w) scratch array, then widened (and patchified) and
normalized in place by torch (a copy and a multiply, plus an add for formulas with a shift), never through Python
lists or `datasets`' formatting; the other columns come from one-row slices of the arrow record
batches, concatenated and turned into Python values column by column. In a DataLoader worker the
finished batch is written into new shared memory through its file descriptor (`shared_copy`).

`dtype` picks the dtype of the returned latents: float32 (default, exact), or float16 / bfloat16, half
the bytes a DataLoader worker hands to the main process (the normalization is still computed in
float32, then rounded once; see LatentDataset).

Flips: a latent cannot be flipped at read time in general (a VAE's latent of a flipped image is not
the flipped latent: its channels are not mirror-symmetric), so the only flips are the copies encoded
with `latentvae encode --flip` (rows with `flipped = true`). `flip=False` leaves those rows out;
`flip=True` on a cache without them does nothing.
"""
from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import torch

from ..errors import BadInputError
from .manifest import read_manifest
from .memory import shared_copy
from .normalize import DEFAULT, FACTOR_SOURCES, Normalization, draw, noise_seed, resolve  # noqa: F401
from .schema import DTYPES, LATENT_COLUMNS, STORES

OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_UNSET = object()


def stored_latents(column: Union[pa.ChunkedArray, pa.Array], dtype: str, count: int) -> torch.Tensor:
    """A latent column of `count` same-shape rows (arrow list<list<list<T>>>) -> a read-only tensor
    (count, C, h, w) of the stored dtype (float16, bfloat16, float32) over arrow's buffer, without
    Python lists: the three list levels are flattened to the values buffer and reshaped."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    shape = [count]
    while pa.types.is_list(column.type.value_type):  # every level but the innermost: C, h (clips: C, T, h)
        shape.append(column.value_lengths()[0].as_py())
        column = column.flatten()
    values = column.flatten().to_numpy(zero_copy_only=False)
    return _stored_tensor(values, dtype).view(*shape, values.size // int(np.prod(shape)))


def _stored_tensor(values: np.ndarray, dtype: str) -> torch.Tensor:
    """A flat numpy array of stored latent values (bf16: their uint16 bits) -> a tensor over the same memory."""
    with warnings.catch_warnings():  # arrow's buffer is read-only: torch warns; it is only read from
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16) if dtype == "bf16" else torch.from_numpy(values)


def latents_from_arrow(column: Union[pa.ChunkedArray, pa.Array], dtype: str, count: int) -> torch.Tensor:
    """As `stored_latents`, widened to a new float32 tensor (bf16 exactly: its bits are the top half)."""
    return stored_latents(column, dtype, count).to(torch.float32, copy=True) if count else torch.empty(0)


class LatentDataset(torch.utils.data.Dataset):
    """The rows of a finished latent cache, as the diffusion trainer of its VAE's family reads them.

    Each item is a dict: `latents` (float32 (C', h', w'): the stored latent_shape (C, h, w), or for a
    patchifying formula (flux2) (4C, h/2, w/2); `output_shape`) and every other column as Python values
    (`source_index`, `source_id`, `flipped`, `pixel_size`, `original_size`, `crop_top_left`,
    `latent_shape`, and the input's passthrough columns: captions, labels, ...; `columns` picks a subset).

    convention  the formula (vae/conventions.py) the latents go through, one of those the pipelines of the
                cache's VAE family apply (kl: sd, sdxl, sd3; flux2; qwenimage for Qwen-Image and Wan; sd for
                DC and HunyuanImage); default: the one the manifest records (the VAE's own). Another is
                refused in one line. None: the raw latents the VAE decodes (never patchified).
    factors     "auto" (default): the VAE's own factors (what its pipeline reads: the manifest's
                vae.formula.entries), unless the manifest says nobody measured them (a training run, an
                export without --calibrate, an LDM weight file): then those measured on this cache. "vae":
                the VAE's, refused when never measured. "cache": measured on this cache's own latents (manifest latent_statistics).
                `self.factors` says which were taken.
    seed        with `--store moments` and a family whose consumers sample (kl, qwenimage, hunyuanimage), row
                i of epoch e is mean + exp(logvar / 2) * eps, eps seeded by (seed, e, i): other noise each
                epoch (`set_epoch`), the same for the same seed. A family whose consumers take the mode
                (flux2, wan) gets the mean.
    flip        False: leave out the flipped copies that `latentvae encode --flip` stored. Latents are
                never flipped at read time (a flipped image's latent is not the flipped latent).
    cache_dir   where `datasets` keeps its arrow files (default: its own cache).
    dtype       of the returned latents: torch.float32 (default: the stored values exactly, normalized in
                float32), torch.float16 or torch.bfloat16: the same float32 result rounded once to
                nearest (relative error <= 2**-11 for float16, <= 2**-8 for bfloat16; float16 overflows
                beyond +-65504 and loses precision below 6.1e-5, far from unit-scale latents). Half the
                bytes per batch: what a DataLoader worker hands to the main process is the bottleneck of
                reading (benchmarks/RESULTS.md). Stored fp16 latents with convention=None in float16 are exact.
    family      the former name of `convention` (family now names the VAE class): still taken, with a
                DeprecationWarning.
    """

    def __init__(self, cache: Union[str, os.PathLike], convention: Optional[str] = DEFAULT, factors: str = "auto",
                 seed: int = 0, flip: bool = True, columns: Optional[Sequence[str]] = None,
                 cache_dir: Optional[str] = None, dtype: torch.dtype = torch.float32, *, family=_UNSET):
        import datasets

        if family is not _UNSET:
            if convention is not DEFAULT:
                raise BadInputError("LatentDataset takes convention= (family= is its former name), not both")
            warnings.warn("LatentDataset(family=...) is now convention=...: `family` names the VAE's class",
                          DeprecationWarning, stacklevel=2)
            convention = family
        if dtype not in OUTPUT_DTYPES:
            raise BadInputError(f"dtype {dtype} is not one of {', '.join(map(str, OUTPUT_DTYPES))}")
        self.out_dtype = dtype
        self.cache = Path(cache)
        self.manifest = m = read_manifest(self.cache)  # refuses a missing, non-cache or unfinished folder
        self.dtype, self.store = m["dtype"], m["store"]
        self.channels = int(m["vae"]["latent_channels"])
        self.seed, self.epoch = int(seed), 0
        self.norm: Normalization = resolve(self.cache, m, convention, factors)
        self.convention, self.factors, self.config = self.norm.convention, self.norm.factors, self.norm.entries
        files = [str(self.cache / s["file"]) for s in m["shards"]]
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise BadInputError(f"{self.cache}: {len(missing)} shard(s) in manifest.json are missing, e.g. {missing[0]}")
        self.data = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache_dir)
        # the columns read: both moments only where the family's consumers sample
        moments_unread = self.store == "moments" and not self.norm.sample
        self.latent_columns = ["latent_mean"] if moments_unread else list(STORES[self.store])
        others = [c for c in self.data.column_names if c not in LATENT_COLUMNS]
        if columns is not None:
            unknown = [c for c in columns if c not in others]
            if unknown:
                raise BadInputError(f"columns {unknown} are not in the cache {self.cache}; it has {others}")
            others = list(columns)
        self.columns = others
        self._arrow = self.data.with_format("arrow", columns=self.latent_columns + self.columns)
        # the rows this dataset serves: positions in the cache (flipped copies left out with flip=False)
        if flip:
            self.rows = np.arange(len(self.data), dtype=np.int64)
        else:
            flipped = self.data.data.column("flipped").to_numpy(zero_copy_only=False)
            self.rows = np.flatnonzero(~flipped.astype(bool)).astype(np.int64)
        col = self.data.data.column("latent_shape").combine_chunks()
        ndim = col.value_lengths()[0].as_py() if len(col) else 3  # [C, h, w]; clips [C, T, h, w]
        self._shapes = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, ndim).astype(np.int32)
        self._index_arrow()

    def _index_arrow(self) -> None:
        """The fast path's index: per latent column, each arrow chunk's values as one flat zero-copy
        tensor and each cache row's (chunk, start) in them; the other columns' record batches and the
        first row of each. Left unset (the `datasets` path is used) for anything unexpected."""
        self._values = self._batches = None
        table = self.data.data
        if self.data._indices is not None or len(self._shapes) != table.num_rows:
            return
        sizes = self._shapes.astype(np.int64).prod(axis=1)
        values = {}
        for name in self.latent_columns:
            leaves, chunk_of, starts, first = [], [], [], 0
            for k, chunk in enumerate(table.column(name).chunks):
                levels = [chunk]  # the list levels, outermost first: C, h (clips: C, T, h), w
                while pa.types.is_list(levels[-1].type):
                    levels.append(levels[-1].values)
                leaf = levels.pop()
                if any(a.null_count for a in (*levels, leaf)):
                    return
                at = None  # the flat position of each row's first value, and the end
                for a in reversed(levels):
                    o = a.offsets.to_numpy(zero_copy_only=False)
                    at = o if at is None else at[o]
                at = at.astype(np.int64)
                if not np.array_equal(np.diff(at), sizes[first:first + len(chunk)]):
                    return  # a row whose values are not its latent_shape's count
                try:
                    leaves.append(leaf.to_numpy(zero_copy_only=True))  # a view: never the cache in memory
                except pa.ArrowInvalid:
                    return
                chunk_of.append(np.full(len(chunk), k, dtype=np.int32))
                starts.append(at[:-1])
                first += len(chunk)
            if first != len(sizes):
                return
            values[name] = (leaves, np.concatenate(chunk_of or [np.zeros(0, np.int32)]),
                            np.concatenate(starts or [np.zeros(0, np.int64)]))
        self._batches = table.table.select(self.columns).to_batches() if self.columns else []
        self._batch_first = np.cumsum([0] + [b.num_rows for b in self._batches])[:-1]
        self._values = values

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose posterior noise (`--store moments`) the next reads draw. With DataLoader
        workers, call it before iterating (workers copy the dataset when the iteration starts)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def latent_shapes(self) -> np.ndarray:
        """(len, 3) int array of every row's stored [C, h, w] (a video cache: (len, 4), [C, T, h, w]), from the
        `latent_shape` column only."""
        return self._shapes[self.rows].astype(np.int64)

    def output_shape(self, latent_shape) -> tuple[int, ...]:
        """The (C', h', w') of the `latents` of a row whose stored latent_shape is (C, h, w) (clips: (C, T, h, w))."""
        return self.norm.output_shape(latent_shape)

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        """Rows of one latent shape (a BucketBatchSampler batch) read as one arrow gather; DataLoader
        calls this for a whole batch."""
        rows = self._rows_of(indices)
        if not len(rows):
            return []
        shapes = self._shapes[rows]
        if (shapes != shapes[0]).any():  # not one shape: read one row at a time
            return [self.__getitems__([i])[0] for i in indices]
        z, columns = self._read(rows)
        return [{"latents": x, **dict(zip(self.columns, v))} for x, *v in zip(z, *columns)]

    def read_batch(self, indices: Sequence[int]) -> dict[str, Any]:
        """The rows `indices` (one latent shape) as one batch, what `collate(self.__getitems__(indices))`
        gives without the per-row dicts: `latents` (B, C, h, w), every other column a list."""
        rows = self._rows_of(indices)
        if not len(rows):
            raise BadInputError("an empty batch of rows")
        shapes = self._shapes[rows]
        if (shapes != shapes[0]).any():
            found = sorted({tuple(int(v) for v in s) for s in shapes})
            raise BadInputError(f"a batch mixes latent shapes {found}: batch the rows with BucketBatchSampler "
                                "(one latent shape per batch)")
        z, columns = self._read(rows)
        return {"latents": z, **dict(zip(self.columns, columns))}

    def _rows_of(self, indices: Sequence[int]) -> np.ndarray:
        n = len(self.rows)
        idx = [int(i) + n if int(i) < 0 else int(i) for i in indices]
        if any(not 0 <= i < n for i in idx):
            raise IndexError(f"index out of range for {n} rows")
        return self.rows[idx]

    def _read(self, rows: np.ndarray) -> tuple[torch.Tensor, list[list]]:
        """`rows` (all of one shape): their (B, C, h, w) latents and the other columns as lists."""
        if self._values is None:  # through `datasets`: one arrow gather of the rows
            table = self._arrow[rows.tolist()]
            z = self._latents(lambda name: stored_latents(table.column(name), self.dtype, len(rows)), rows)
            return z, [table.column(c).to_pylist() for c in self.columns]
        shape = tuple(int(v) for v in self._shapes[rows[0]])
        z = self._latents(lambda name: self._gather(name, rows, shape), rows)
        return z, self._other_columns(rows)

    def _gather(self, name: str, rows: np.ndarray, shape: tuple) -> torch.Tensor:
        """The stored values of `rows` (all of `shape`) of latent column `name`: one copy of each row's
        contiguous run of values from the memory-mapped chunk it is in, into this thread's scratch
        (valid until its next read: only read from within this call)."""
        leaves, chunk_of, starts = self._values[name]
        size = int(np.prod(shape))
        parts = [leaves[c][s:s + size] for c, s in zip(chunk_of[rows].tolist(), starts[rows].tolist())]
        stored = self._scratch(name, (len(rows), *shape), torch.int16 if self.dtype == "bf16" else DTYPES[self.dtype][0])
        np.concatenate(parts, out=stored.numpy().reshape(-1).view(leaves[0].dtype))
        return stored.view(torch.bfloat16) if self.dtype == "bf16" else stored

    def _other_columns(self, rows: np.ndarray) -> list[list]:
        """The columns besides the latents for `rows`, as Python lists: a one-row slice of the record
        batch each row is in, those concatenated (a small copy) and converted column by column."""
        if not self.columns:
            return []
        k = np.searchsorted(self._batch_first, rows, side="right") - 1
        local = rows - self._batch_first[k]
        table = pa.concat_batches([self._batches[b].slice(i, 1) for b, i in zip(k.tolist(), local.tolist())])
        return [table.column(c).to_pylist() for c in self.columns]

    def _latents(self, stored, rows: np.ndarray) -> torch.Tensor:
        """A (B, C', h', w') batch of self.out_dtype from `stored(column)`, the stored values of a latent
        column for `rows` (any layout, read only): the consumer's latent, normalized in float32
        (normalize.py), rounded once to out_dtype. A new tensor each call; in a DataLoader worker a new
        shared-memory one (see `shared_copy`)."""
        worker = torch.utils.data.get_worker_info() is not None
        norm = self.norm
        if norm.sample:  # --store moments of a family whose consumers sample: a posterior draw
            mean = stored("latent_mean").to(torch.float32, copy=True)
            z = draw(mean, stored("latent_logvar").to(torch.float32, copy=True), rows, self.seed, self.epoch)
            if norm.convention is not None:
                z = norm.into(torch.empty((len(z), *norm.output_shape(z.shape[1:]))), z)
            z = z.to(self.out_dtype)
            return shared_copy(z) if worker else z
        z = stored(self.latent_columns[0])  # the mean (a mode consumer's latent), the latent, or the stored sample
        shape = (len(z), *norm.output_shape(z.shape[1:]))
        # in a worker the batch is made in scratch memory and written into its shared memory through
        # the file (shared_copy): writing a fresh mapping page by page costs a page fault a page
        out = self._scratch("out", shape, self.out_dtype) if worker else torch.empty(shape, dtype=self.out_dtype)
        if norm.convention is None:
            out.copy_(z)
            return shared_copy(out) if worker else out
        # = conventions.to_diffusion(z, entries, convention): z (patchified) * scale + bias in float32, then
        # rounded once to out's dtype (torch.addcmul, or mul with z of another dtype, are 2-3x slower
        # here than widening, then mul_, then add_ in place). The float32 values of a float16/bfloat16
        # batch go through a scratch buffer of this thread's that is never handed out (a fresh one
        # each batch costs its page faults).
        if (z.dtype == out.dtype != torch.float32 and norm.patch == 1 and norm.uniform_scale is not None
                and not norm.bias_nonzero):
            # (sd: one factor) a float16/bfloat16 tensor times a Python float is computed in float32 and
            # rounded once by torch's CPU kernels: the same values, in one pass
            torch.mul(z, norm.uniform_scale, out=out)
            return shared_copy(out) if worker else out
        x = out if self.out_dtype == torch.float32 else self._scratch("float32", shape, torch.float32)
        norm.into(x, z)
        if x is not out:
            out.copy_(x)
        return shared_copy(out) if worker else out

    def _scratch(self, key: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """This thread's scratch tensor `key` of `shape` (reused from call to call: only ever written and
        read within one call, never handed out; one batch's size, whatever the cache's)."""
        local = self.__dict__.get("_local")
        if local is None:
            local = self.__dict__.setdefault("_local", threading.local())
        bufs = local.__dict__.setdefault("bufs", {})
        n = int(np.prod(shape))
        buf = bufs.get(key)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = bufs[key] = torch.empty(n, dtype=dtype)
        return buf[:n].view(shape)

    def __getstate__(self) -> dict:
        """Pickled (a spawned DataLoader worker) without the views of the memory-mapped arrow buffers,
        which would be copied by value: they are made again from the arrow files on unpickling."""
        state = dict(self.__dict__)
        for key in ("_values", "_batches", "_batch_first", "_local"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._index_arrow()
