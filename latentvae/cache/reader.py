"""Reading a latent cache the way a diffusion training loop needs it: normalized latents, batched by shape.

    from latentvae import LatentDataset, LatentLoader

    ds = LatentDataset("latents/", family="sdxl")                  # the factors measured on this cache
    loader = LatentLoader(ds, batch_size=64, seed=0)               # one latent shape per batch; ranks split
    for epoch in range(epochs):
        loader.set_epoch(epoch)                                    # new order, new posterior noise
        for batch in loader:                                       # read ahead by a thread of this process
            x = batch["latents"]                                   # float32 (B, C, h, w), ~N(0, 1)

`DataLoader(ds, batch_sampler=BucketBatchSampler(ds, 64), collate_fn=collate)` gives the same batches
(then call `set_epoch` on the sampler and on the dataset).

The shards are read through `datasets` (arrow files, memory-mapped: the cache is never held in
memory). When the dataset opens, each memory-mapped arrow chunk of a latent column is viewed as one
flat array of its values (zero-copy) and every row's start in it computed from the list offsets
(per row a chunk number and a start: 12 bytes a row, the only part of the reader that grows with the
cache, with the (C, h, w) of each row: 12 more). A batch of rows of one shape is then gathered with
one copy of each row's values into a (B, C, h, w) scratch array, then widened and normalized in
place by torch (a copy and a multiply, plus an add for families with a shift), never through Python
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

import copy
import os
import threading
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import torch

from ..vae.conventions import check_convention, to_diffusion
from ..errors import BadInputError
from .manifest import read_manifest
from .schema import DTYPES, LATENT_COLUMNS, STORES

FACTOR_SOURCES = ("cache", "vae")
OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def stored_latents(column: Union[pa.ChunkedArray, pa.Array], dtype: str, count: int) -> torch.Tensor:
    """A latent column of `count` same-shape rows (arrow list<list<list<T>>>) -> a read-only tensor
    (count, C, h, w) of the stored dtype (float16, bfloat16, float32) over arrow's buffer, without
    Python lists: the three list levels are flattened to the values buffer and reshaped."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    c = column.value_lengths()[0].as_py()
    level2 = column.flatten()
    h = level2.value_lengths()[0].as_py()
    values = level2.flatten().flatten().to_numpy(zero_copy_only=False)
    return _stored_tensor(values, dtype).view(count, c, h, values.size // (count * c * h))


def _stored_tensor(values: np.ndarray, dtype: str) -> torch.Tensor:
    """A flat numpy array of stored latent values (bf16: their uint16 bits) -> a tensor over the same memory."""
    with warnings.catch_warnings():  # arrow's buffer is read-only: torch warns; it is only read from
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16) if dtype == "bf16" else torch.from_numpy(values)


def latents_from_arrow(column: Union[pa.ChunkedArray, pa.Array], dtype: str, count: int) -> torch.Tensor:
    """As `stored_latents`, widened to a new float32 tensor (bf16 exactly: its bits are the top half)."""
    return stored_latents(column, dtype, count).to(torch.float32, copy=True) if count else torch.empty(0)


def noise_seed(seed: int, epoch: int, row: int) -> int:
    """The seed of one row's posterior noise in one epoch: a pure function of (seed, epoch, row)."""
    return int(np.random.SeedSequence([seed, epoch, row]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class LatentDataset(torch.utils.data.Dataset):
    """The rows of a finished latent cache, as a diffusion trainer reads them.

    Each item is a dict: `latents` (float32 (C, h, w)) and every other column as Python values
    (`source_index`, `source_id`, `flipped`, `pixel_size`, `original_size`, `crop_top_left`,
    `latent_shape`, and the input's passthrough columns: captions, labels, ...; `columns` picks a subset).

    family    "sd", "sdxl" or "sd3": latents normalized by that family's formula (latentvae/conventions.py)
              with the factors `factors` names; None: the raw latents the VAE decodes.
    factors   "cache": the factors measured on this cache's own latents (manifest latent_statistics);
              "vae": the VAE config's scaling_factor/shift_factor recorded in the manifest (refused when
              the manifest says they were never measured).
    seed      with `--store moments`, row i of epoch e is mean + exp(logvar / 2) * eps, eps seeded by
              (seed, e, i): other noise each epoch (`set_epoch`), the same for the same seed.
    flip      False: leave out the flipped copies that `latentvae encode --flip` stored. Latents are
              never flipped at read time (a flipped image's latent is not the flipped latent).
    cache_dir where `datasets` keeps its arrow files (default: its own cache).
    dtype     of the returned latents: torch.float32 (default: the stored values exactly, normalized in
              float32), torch.float16 or torch.bfloat16: the same float32 result rounded once to
              nearest (relative error <= 2**-11 for float16, <= 2**-8 for bfloat16; float16 overflows
              beyond +-65504 and loses precision below 6.1e-5, far from unit-scale latents). Half the
              bytes per batch: what a DataLoader worker hands to the main process is the bottleneck of
              reading (benchmarks/RESULTS.md). Stored fp16 latents with family=None in float16 are exact.
    """

    def __init__(self, cache: Union[str, os.PathLike], family: Optional[str] = "sd", factors: str = "cache",
                 seed: int = 0, flip: bool = True, columns: Optional[Sequence[str]] = None,
                 cache_dir: Optional[str] = None, dtype: torch.dtype = torch.float32):
        import datasets

        if dtype not in OUTPUT_DTYPES:
            raise BadInputError(f"dtype {dtype} is not one of {', '.join(map(str, OUTPUT_DTYPES))}")
        self.out_dtype = dtype
        self.cache = Path(cache)
        self.manifest = m = read_manifest(self.cache)  # refuses a missing, non-cache or unfinished folder
        self.dtype, self.store = m["dtype"], m["store"]
        self.channels = int(m["vae"]["latent_channels"])
        self.family, self.seed, self.epoch = family, int(seed), 0
        self.config = None if family is None else self._factors(family, factors)
        if self.config is not None:  # every family's formula is affine per channel: x = z * scale + bias
            zero, one = torch.zeros(1, self.channels, 1, 1), torch.ones(1, self.channels, 1, 1)
            self._bias = to_diffusion(zero, self.config, family)
            self._scale = to_diffusion(one, self.config, family) - self._bias
            self._bias_nonzero = bool(self._bias.any())  # sd: scaling only (adding 0 changes nothing)
            scale = self._scale.flatten()
            self._uniform_scale = float(scale[0]) if bool((scale == scale[0]).all()) else None
        files = [str(self.cache / s["file"]) for s in m["shards"]]
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise BadInputError(f"{self.cache}: {len(missing)} shard(s) in manifest.json are missing, e.g. {missing[0]}")
        self.data = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache_dir)
        self.latent_columns = list(STORES[self.store])
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
        self._shapes = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, 3).astype(np.int32)
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
                l2 = chunk.values
                l3 = l2.values
                leaf = l3.values
                if chunk.null_count or l2.null_count or l3.null_count or leaf.null_count:
                    return
                o1, o2, o3 = (a.offsets.to_numpy(zero_copy_only=False) for a in (chunk, l2, l3))
                at = o3[o2[o1]].astype(np.int64)  # the flat position of each row's first value, and the end
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

    def _factors(self, family: str, factors: str) -> dict:
        if family not in ("sd", "sdxl", "sd3"):
            check_convention(family)  # the UserError naming the valid choices
        try:
            check_convention(family, self.channels)
        except BadInputError as e:
            raise BadInputError(f"{self.cache}: {e}") from None
        if factors == "cache":
            stats = self.manifest.get("latent_statistics")
            if not stats or family not in (stats.get("factors") or {}):
                raise BadInputError(f"{self.cache}: manifest.json has no latent_statistics.factors[{family!r}] (a cache "
                                    "written before latentvae measured them); pass factors='vae' or re-encode")
            return stats["factors"][family]
        if factors == "vae":
            vae = self.manifest["vae"]
            provenance = str(vae.get("factors") or "")
            if provenance.startswith("NOT measured") or vae.get("scaling_factor") is None:
                raise BadInputError(f"{self.cache}: the VAE config's scaling factors were never measured ({provenance}); "
                                    "use factors='cache' (measured on this cache's latents) or calibrate the VAE "
                                    "with `latentvae export --calibrate`")
            return {"scaling_factor": vae["scaling_factor"], "shift_factor": vae.get("shift_factor"),
                    "latents_mean": vae.get("latents_mean"), "latents_std": vae.get("latents_std")}
        raise BadInputError(f"unknown factors {factors!r}; valid choices: {', '.join(FACTOR_SOURCES)}")

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose posterior noise (`--store moments`) the next reads draw. With DataLoader
        workers, call it before iterating (workers copy the dataset when the iteration starts)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def latent_shapes(self) -> np.ndarray:
        """(len, 3) int array of every row's [C, h, w], from the `latent_shape` column only."""
        return self._shapes[self.rows].astype(np.int64)

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
        """A (B, C, h, w) batch of self.out_dtype from `stored(column)`, the stored values of a latent
        column for `rows` (any layout, read only): normalized in float32, rounded once to out_dtype.
        A new tensor each call; in a DataLoader worker a new shared-memory one (see `shared_copy`)."""
        worker = torch.utils.data.get_worker_info() is not None
        if self.store == "moments":
            mean = stored("latent_mean").to(torch.float32, copy=True)
            logvar = stored("latent_logvar").to(torch.float32, copy=True)
            eps = torch.empty_like(mean)
            for k, r in enumerate(rows.tolist()):
                g = torch.Generator().manual_seed(noise_seed(self.seed, self.epoch, r))
                eps[k] = torch.randn(mean.shape[1:], generator=g)
            z = mean.addcmul_(logvar.mul_(0.5).exp_(), eps)
            # = conventions.to_diffusion(z, self.config, self.family), in place
            z = z if self.config is None else z.mul_(self._scale).add_(self._bias)
            z = z.to(self.out_dtype)
            return shared_copy(z) if worker else z
        z = stored(self.latent_columns[0])
        # in a worker the batch is made in scratch memory and written into its shared memory through
        # the file (shared_copy): writing a fresh mapping page by page costs a page fault a page
        out = self._scratch("out", z.shape, self.out_dtype) if worker else torch.empty(z.shape, dtype=self.out_dtype)
        if self.config is None:
            out.copy_(z)
            return shared_copy(out) if worker else out
        # = conventions.to_diffusion(z, self.config, self.family): z * scale + bias in float32, then
        # rounded once to out's dtype (torch.addcmul, or mul with z of another dtype, are 2-3x slower
        # here than widening, then mul_, then add_ in place). The float32 values of a float16/bfloat16
        # batch go through a scratch buffer of this thread's that is never handed out (a fresh one
        # each batch costs its page faults).
        if z.dtype == out.dtype != torch.float32 and self._uniform_scale is not None and not self._bias_nonzero:
            # (sd: one factor) a float16/bfloat16 tensor times a Python float is computed in float32 and
            # rounded once by torch's CPU kernels: the same values, in one pass
            torch.mul(z, self._uniform_scale, out=out)
            return shared_copy(out) if worker else out
        x = out if self.out_dtype == torch.float32 else self._scratch("float32", z.shape, torch.float32)
        x.copy_(z).mul_(self._scale)
        if self._bias_nonzero:
            x.add_(self._bias)
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


def batch_tensor(shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A new tensor; in a DataLoader worker in shared memory (as default_collate allocates), so
    the batch goes to the main process without being copied again. Always a fresh one: the batch a
    training loop holds is never written again."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(int(np.prod(shape)), device="cpu")
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


def shared_copy(x: torch.Tensor) -> torch.Tensor:
    """A new shared-memory tensor holding the contiguous `x`, for a DataLoader worker to hand over.

    With torch's default file_descriptor sharing the bytes go in with os.pwrite, not through this
    process's mapping: a fresh mapping written page by page takes a page fault per 4 KiB page (~1,000
    for a 4 MiB batch, most of what writing it costs), while the write fills the same pages in the
    kernel. Linux: into a new memfd (anonymous shared memory, the kind torch maps when it receives a
    tensor; the pages are allocated by the write: creating torch's own shared memory of 2 MiB cost as
    much as filling it, measured), mapped as the tensor's storage. Else into batch_tensor's file; anything else: copied in.
    Always new memory: the batch a training loop holds is never written again."""
    file_descriptor = torch.multiprocessing.get_sharing_strategy() == "file_descriptor" and x.is_contiguous()
    if file_descriptor and hasattr(os, "memfd_create") and hasattr(torch.UntypedStorage, "_new_shared_fd_cpu"):
        data = memoryview(x.reshape(-1).view(torch.uint8).numpy())
        try:
            fd = os.memfd_create("latentvae-batch", os.MFD_CLOEXEC)
        except OSError:
            fd = None
        if fd is not None:
            try:
                done = 0
                while done < data.nbytes:
                    done += os.pwrite(fd, data[done:], done)
                storage = torch.UntypedStorage._new_shared_fd_cpu(fd, data.nbytes)  # maps a dup of fd
                return torch.empty(0, dtype=x.dtype).set_(storage, 0, x.shape)
            except (RuntimeError, OSError):
                pass
            finally:
                os.close(fd)
    out = batch_tensor(x.shape, x.dtype)
    if file_descriptor:
        try:
            fd, size = out.untyped_storage()._share_fd_cpu_()
            data = memoryview(x.reshape(-1).view(torch.uint8).numpy())
            done = 0
            while done < min(size, data.nbytes):
                done += os.pwrite(fd, data[done:], done)
            if done == data.nbytes:
                return out
        except (AttributeError, RuntimeError, OSError, TypeError):
            pass
    return out.copy_(x)


def _stacked(latents: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """The (B, C, h, w) tensor whose rows `latents` are, in order (how __getitems__ returns a batch), or None."""
    first = latents[0]
    if not first.is_contiguous():
        return None
    step, base = first.numel() * first.element_size(), first.data_ptr()
    storage = first.untyped_storage()
    if storage.nbytes() < step * len(latents) + first.storage_offset() * first.element_size():
        return None
    if any(x.untyped_storage().data_ptr() != storage.data_ptr() or x.data_ptr() != base + k * step
           or x.shape != first.shape or x.dtype != first.dtype or not x.is_contiguous() for k, x in enumerate(latents)):
        return None
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (len(latents), *first.shape))


def collate(items: list[dict]) -> dict[str, Any]:
    """A list of LatentDataset rows -> one batch: `latents` stacked (B, C, h, w), every other column a list.
    Rows read together by `LatentDataset.__getitems__` (a DataLoader batch) are already one tensor: no copy."""
    latents = [it["latents"] for it in items]
    stacked = _stacked(latents)
    batch = {"latents": stacked if stacked is not None else torch.stack(latents, out=batch_tensor(
        (len(latents), *latents[0].shape), latents[0].dtype))}
    for key in items[0]:
        if key != "latents":
            batch[key] = [it[key] for it in items]
    return batch


def _world(num_replicas: Optional[int], rank: Optional[int]) -> tuple[int, int]:
    """(processes, this one's rank): explicit, else torch.distributed, else accelerate/torchrun's env."""
    if num_replicas is None or rank is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world, me = torch.distributed.get_world_size(), torch.distributed.get_rank()
        else:
            world, me = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
        num_replicas = world if num_replicas is None else num_replicas
        rank = me if rank is None else rank
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise BadInputError(f"rank {rank} is not within num_replicas {num_replicas}")
    return int(num_replicas), int(rank)


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of row indices of one latent shape each (grouped by the `latent_shape` column alone).

    Each epoch (`set_epoch`) the rows of each shape are shuffled with (seed, epoch), cut into batches
    (a shape's last batch may be short unless drop_last), and the batches shuffled. With several
    processes (torch.distributed / accelerate, or explicit num_replicas and rank) process r takes
    batches r, r + world, ...: disjoint rows, the same number of batches on every process; without
    drop_last the batch list is padded with its first batches to a multiple of the world size (as
    DistributedSampler pads), with drop_last the surplus batches are left out.
    """

    def __init__(self, dataset: LatentDataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, num_replicas: Optional[int] = None, rank: Optional[int] = None):
        if batch_size < 1:
            raise BadInputError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.shuffle, self.seed, self.drop_last = int(batch_size), shuffle, int(seed), drop_last
        self.num_replicas, self.rank = _world(num_replicas, rank)
        self.epoch = 0
        shapes = dataset.latent_shapes() if hasattr(dataset, "latent_shapes") else np.asarray(dataset)
        keys, inverse = np.unique(shapes, axis=0, return_inverse=True)
        inverse = np.asarray(inverse).reshape(-1)
        self.groups = [np.flatnonzero(inverse == k) for k in range(len(keys))]
        self.shapes = [tuple(int(v) for v in k) for k in keys]
        per_group = [len(g) // self.batch_size if drop_last else -(-len(g) // self.batch_size) for g in self.groups]
        total = sum(per_group)
        self.num_batches = total // self.num_replicas if drop_last else -(-total // self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def batches(self) -> list[list[int]]:
        """Every process's batches of this epoch, before the split among processes."""
        rng = np.random.default_rng([self.seed, self.epoch])
        out = []
        for g in self.groups:
            g = rng.permutation(g) if self.shuffle else g
            stop = len(g) - len(g) % self.batch_size if self.drop_last else len(g)
            out += [g[i:i + self.batch_size].tolist() for i in range(0, stop, self.batch_size)]
        if self.shuffle:
            out = [out[i] for i in rng.permutation(len(out))]
        return out

    def __iter__(self) -> Iterator[list[int]]:
        out = self.batches()
        need = self.num_batches * self.num_replicas
        if len(out) < need:  # pad (drop_last=False): every process the same number of batches
            out += (out * (need // max(len(out), 1) + 1))[:need - len(out)]
        return iter(out[:need][self.rank::self.num_replicas])

    def __len__(self) -> int:
        return self.num_batches


class LatentLoader:
    """Batches of a LatentDataset for a training loop, read ahead by threads of this process.

        loader = LatentLoader(ds, batch_size=64, seed=0)     # one reader thread, 4 batches ahead
        for epoch in range(epochs):
            loader.set_epoch(epoch)                          # the sampler's order and the dataset's noise
            for batch in loader:                             # what DataLoader(..., collate_fn=collate) gives
                x0 = batch["latents"].to(device, non_blocking=True)

    The batches are those of `sampler` (default: a BucketBatchSampler built from batch_size, shuffle,
    seed, drop_last, num_replicas and rank: one latent shape per batch, disjoint shares of the ranks),
    in its order, whatever `threads` is. Each is read by `dataset.read_batch` on one of `threads`
    threads, at most `prefetch` batches ahead of the loop; an error reading one is raised by the loop
    at that batch. Leaving the loop early stops the reading (the threads finish the batch in hand).

    Why threads and not DataLoader workers: a worker must hand every batch to the training process in
    new shared memory, and new memory costs page faults (on the 2-core development CPU, a worker
    delivers 8-11k rows/s, of which ~30% is that handover; benchmarks/RESULTS.md). A thread hands
    over a pointer. The gather, the normalization and the copies run in numpy/torch/arrow code that
    releases the GIL; the per-batch Python (row indexing, the other columns) holds it for ~1 ms a
    batch of 64, so the reading overlaps a training step that spends its time in torch ops.

    pin_memory  put each batch's latents in page-locked memory (for `.to("cuda", non_blocking=True)`);
                ignored with a warning where CUDA is not available, as DataLoader does.
    """

    def __init__(self, dataset: LatentDataset, batch_size: Optional[int] = None, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, num_replicas: Optional[int] = None,
                 rank: Optional[int] = None, sampler: Optional[torch.utils.data.Sampler] = None,
                 threads: int = 1, prefetch: int = 4, pin_memory: bool = False):
        if not isinstance(dataset, LatentDataset):
            raise BadInputError(f"LatentLoader reads a LatentDataset, got {type(dataset).__name__}")
        if sampler is None:
            if batch_size is None:
                raise BadInputError("LatentLoader needs batch_size (or a batch sampler as sampler=)")
            sampler = BucketBatchSampler(dataset, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                                         num_replicas=num_replicas, rank=rank)
        elif batch_size is not None:
            raise BadInputError("LatentLoader takes batch_size or sampler, not both")
        if int(threads) < 1:
            raise BadInputError(f"threads must be >= 1, got {threads}")
        if int(prefetch) < 1:
            raise BadInputError(f"prefetch must be >= 1, got {prefetch}")
        self.dataset, self.sampler = dataset, sampler
        self.threads, self.prefetch = int(threads), int(prefetch)
        self.pin_memory = bool(pin_memory)
        if self.pin_memory and not torch.cuda.is_available():
            warnings.warn("LatentLoader: pin_memory=True but CUDA is not available: not pinning", stacklevel=2)
            self.pin_memory = False

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration reads: the sampler's order and the posterior noise (--store moments)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def _read(self, dataset: LatentDataset, indices: list[int]) -> dict[str, Any]:
        batch = dataset.read_batch(indices)
        if self.pin_memory:
            batch["latents"] = batch["latents"].pin_memory()
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # the epoch as it is now, as a DataLoader worker's copy of the dataset would keep it
        dataset = copy.copy(self.dataset)
        batches = iter(list(self.sampler))
        pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="latentvae-reader")
        pending: deque = deque()
        try:
            for indices in batches:
                pending.append(pool.submit(self._read, dataset, list(indices)))
                if len(pending) > self.prefetch:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
