"""Batches of a LatentDataset for a training loop: one latent shape per batch, seeded epochs, disjoint ranks.

    loader = LatentLoader(ds, batch_size=64, seed=0)        # BucketBatchSampler batches, read ahead by a thread
    sampler = BucketBatchSampler(ds, 64, seed=0)            # for a DataLoader(ds, batch_sampler=..., collate_fn=collate)
    batch = collate(ds.__getitems__(indices))               # rows -> one batch (no copy of rows read together)
"""
from __future__ import annotations

import copy
import os
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Optional

import numpy as np
import torch

from ..errors import BadInputError
from .memory import batch_tensor, stacked_view


def collate(items: list[dict]) -> dict[str, Any]:
    """A list of LatentDataset rows -> one batch: `latents` stacked (B, C, h, w), every other column a list.
    Rows read together by `LatentDataset.__getitems__` (a DataLoader batch) are already one tensor: no copy."""
    latents = [it["latents"] for it in items]
    stacked = stacked_view(latents)
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

    def __init__(self, dataset, batch_size: int, shuffle: bool = True, seed: int = 0,
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

    def __init__(self, dataset, batch_size: Optional[int] = None, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, num_replicas: Optional[int] = None,
                 rank: Optional[int] = None, sampler: Optional[torch.utils.data.Sampler] = None,
                 threads: int = 1, prefetch: int = 4, pin_memory: bool = False):
        from .reader import LatentDataset

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

    def _read(self, dataset, indices: list[int]) -> dict[str, Any]:
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
