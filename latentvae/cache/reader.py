"""Reading a latent cache the way a diffusion training loop needs it: normalized latents, batched by shape.

    from torch.utils.data import DataLoader
    from latentvae import LatentDataset
    from latentvae.cache.reader import BucketBatchSampler, collate

    ds = LatentDataset("latents/", family="sdxl")                  # the factors measured on this cache
    sampler = BucketBatchSampler(ds, batch_size=64, seed=0)        # one latent shape per batch; ranks split
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=1)
    for epoch in range(epochs):
        sampler.set_epoch(epoch); ds.set_epoch(epoch)              # new order, new posterior noise
        for batch in loader:
            x = batch["latents"]                                   # float32 (B, C, h, w), ~N(0, 1)

The shards are read through `datasets` (arrow files, memory-mapped: the cache is never held in
memory). A batch of rows is gathered as one arrow table and its latent column turned into one
(B, C, h, w) array without going through Python lists, which is what makes the reader fast.

Flips: a latent cannot be flipped at read time in general (a VAE's latent of a flipped image is not
the flipped latent: its channels are not mirror-symmetric), so the only flips are the copies encoded
with `latentvae encode --flip` (rows with `flipped = true`). `flip=False` leaves those rows out;
`flip=True` on a cache without them does nothing.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import torch

from ..conventions import check_family, to_diffusion
from ..errors import BadInputError
from .manifest import read_manifest
from .schema import LATENT_COLUMNS, STORES

FACTOR_SOURCES = ("cache", "vae")


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
    with warnings.catch_warnings():  # arrow's buffer is read-only: torch warns; it is only read from
        warnings.simplefilter("ignore", UserWarning)
        z = torch.from_numpy(values.view(np.int16)).view(torch.bfloat16) if dtype == "bf16" else torch.from_numpy(values)
    return z.view(count, c, h, values.size // (count * c * h))


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
    """

    def __init__(self, cache: Union[str, os.PathLike], family: Optional[str] = "sd", factors: str = "cache",
                 seed: int = 0, flip: bool = True, columns: Optional[Sequence[str]] = None,
                 cache_dir: Optional[str] = None):
        import datasets

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

    def _factors(self, family: str, factors: str) -> dict:
        if family not in ("sd", "sdxl", "sd3"):
            check_family(family)  # the UserError naming the valid choices
        try:
            check_family(family, self.channels)
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
        col = self.data.data.column("latent_shape").combine_chunks()
        shapes = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, 3)
        return shapes[self.rows]

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        """Rows of one latent shape (a BucketBatchSampler batch) read as one arrow gather; DataLoader
        calls this for a whole batch."""
        n = len(self.rows)
        idx = [int(i) + n if int(i) < 0 else int(i) for i in indices]
        if any(not 0 <= i < n for i in idx):
            raise IndexError(f"index out of range for {n} rows")
        rows = self.rows[idx]
        table = self._arrow[rows.tolist()]
        shapes = {tuple(s) for s in self.latent_shapes_of(table, rows)}
        if len(shapes) > 1:  # not one shape: read one row at a time
            return [self.__getitems__([i])[0] for i in idx]
        z = self._latents(table, rows)
        columns = [table.column(c).to_pylist() for c in self.columns]
        return [{"latents": x, **dict(zip(self.columns, v))} for x, *v in zip(z, *columns)]

    def latent_shapes_of(self, table: pa.Table, rows: np.ndarray) -> list:
        if "latent_shape" in table.column_names:
            return table.column("latent_shape").to_pylist()
        return [tuple(s) for s in self.data.data.column("latent_shape").take(pa.array(rows)).to_pylist()]

    def _latents(self, table: pa.Table, rows: np.ndarray) -> torch.Tensor:
        count = table.num_rows
        if self.store == "moments":
            mean = latents_from_arrow(table.column("latent_mean"), self.dtype, count)
            logvar = latents_from_arrow(table.column("latent_logvar"), self.dtype, count)
            eps = torch.empty_like(mean)
            for k, r in enumerate(rows.tolist()):
                g = torch.Generator().manual_seed(noise_seed(self.seed, self.epoch, r))
                eps[k] = torch.randn(mean.shape[1:], generator=g)
            z = mean.addcmul_(logvar.mul_(0.5).exp_(), eps)
            # = conventions.to_diffusion(z, self.config, self.family), in place
            return z if self.config is None else z.mul_(self._scale).add_(self._bias)
        z = stored_latents(table.column(self.latent_columns[0]), self.dtype, count)
        out = batch_tensor(z.shape).copy_(z)  # widened to float32
        # = conventions.to_diffusion(z, self.config, self.family), in place
        return out if self.config is None else out.mul_(self._scale).add_(self._bias)


def batch_tensor(shape) -> torch.Tensor:
    """A new float32 tensor; in a DataLoader worker in shared memory (as default_collate allocates), so
    the batch goes to the main process without being copied again."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape)
    storage = torch.empty(0)._typed_storage()._new_shared(int(np.prod(shape)), device="cpu")
    return torch.empty(0).new(storage).view(shape)


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
    batch = {"latents": stacked if stacked is not None else torch.stack(latents, out=batch_tensor((len(latents),
                                                                                                  *latents[0].shape)))}
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
