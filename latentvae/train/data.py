"""Training data: an endless, seeded stream of augmented crops that resumes exactly.

Item k of the stream is a pure function of (seed, k): epoch k // N uses a seeded permutation of
the N images, and the crop and flip of item k come from a generator seeded with (seed, k). So a
run resumed at micro-step s sees exactly the batches it would have seen, whatever the number of
DataLoader workers; each process takes its own disjoint slice of the stream. Images that cannot
be decoded are skipped (the next image of the permutation takes their place) and reported with
the batch, so the loop can count and list them.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import DataConfig
from ..errors import MissingInputError
from ..images import BadImage, crop_center, resize_short_side, to_tensor
from ..interrupts import ignore_in_worker
from ..sources import ImageSource, open_source, split_holdout


# ----------------------------------------------------------------------------- augmentation
def random_crop(img: Image.Image, cfg: DataConfig, g: torch.Generator) -> torch.Tensor:
    """Resize the short side (random in [short_side_min, short_side_max], or native), then a
    random `resolution` crop and an optional horizontal flip, all drawn from `g`."""
    res = cfg.resolution
    lo, hi = cfg.short_side_min, cfg.short_side_max or cfg.short_side_min
    short = min(img.size)
    if lo:
        short = int(torch.randint(lo, hi + 1, (1,), generator=g))
    img = resize_short_side(img, max(short, res))
    w, h = img.size
    left = int(torch.randint(0, w - res + 1, (1,), generator=g))
    top = int(torch.randint(0, h - res + 1, (1,), generator=g))
    x = to_tensor(img.crop((left, top, left + res, top + res)))
    if cfg.flip and bool(torch.rand((), generator=g) < 0.5):
        x = x.flip(-1)
    return x


# ----------------------------------------------------------------------------- the stream
def mix_seed(seed: int, k: int) -> int:
    """A 63-bit seed for item k of a stream seeded with `seed` (independent of process and worker)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{k}".encode(), digest_size=8).digest(), "little") >> 1


class PermutedStream(Dataset):
    """Item k: input perm_{k // N}[k % N] of `src`, the permutation drawn afresh each epoch from the run's seed,
    augmented by a generator seeded by (seed, k); an input that cannot be read (BadImage, BadVideo) is replaced
    by the next one of the permutation and listed in the item's "bad". Subclasses say how an input is read
    (`read`) and augmented (`augment`)."""
    what = "images"

    def __init__(self, src, cfg: DataConfig, seed: int):
        if len(src) == 0:
            raise MissingInputError(f"data.source={cfg.source}: no training {self.what}")
        self.src, self.cfg, self.seed = src, cfg, seed
        self._perm_epoch, self._perm = -1, None
        self._bad: set[int] = set()

    def read(self, i: int):
        raise NotImplementedError

    def augment(self, item, g: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(mix_seed(self.seed, -1 - epoch))
            self._perm, self._perm_epoch = torch.randperm(len(self.src), generator=g).tolist(), epoch
        return self._perm

    def __getitem__(self, k: int) -> dict[str, Any]:
        n = len(self.src)
        epoch, pos = divmod(k, n)
        perm = self._permutation(epoch)
        bad = []
        for j in range(n):
            i = perm[(pos + j) % n]
            if i in self._bad:
                continue
            try:
                item = self.read(i)
            except BadImage as e:  # BadVideo too: too short, unreadable, corrupt
                self._bad.add(i)
                bad.append(str(e))
                continue
            g = torch.Generator().manual_seed(mix_seed(self.seed, k))
            return {"pixels": self.augment(item, g), "bad": bad}
        raise MissingInputError(f"data.source={self.cfg.source}: none of the {n} {self.what} could be read; "
                                f"first errors: {bad[:3]}")


class CropStream(PermutedStream):
    """Item k: an augmented crop of image perm_{k // N}[k % N]; bad images replaced by the next one."""

    def read(self, i: int) -> Image.Image:
        return self.src.load(i)

    def augment(self, img: Image.Image, g: torch.Generator) -> torch.Tensor:
        return random_crop(img, self.cfg, g)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"pixels": torch.stack([it["pixels"] for it in items]), "bad": [b for it in items for b in it["bad"]]}


class StreamSampler(Sampler):
    """Indices of this process's slice of the stream, from micro-step `start` on, forever.

    Micro-step s of rank r takes items [(s * world + r) * B, (s * world + r + 1) * B).
    """

    def __init__(self, batch_size: int, start: int = 0, rank: int = 0, world: int = 1):
        self.b, self.start, self.rank, self.world = batch_size, start, rank, world

    def __iter__(self) -> Iterator[int]:
        s = self.start
        while True:
            base = (s * self.world + self.rank) * self.b
            yield from range(base, base + self.b)
            s += 1


def make_loader(stream: CropStream, batch_size: int, start_micro_step: int, rank: int, world: int,
                num_workers: int) -> DataLoader:
    # an own generator: creating the iterator must not draw from the global RNG (exact resume)
    g = torch.Generator().manual_seed(mix_seed(stream.seed, -10**9 - rank))
    return DataLoader(stream, batch_size=batch_size, sampler=StreamSampler(batch_size, start_micro_step, rank, world),
                      collate_fn=collate, num_workers=num_workers, pin_memory=torch.cuda.is_available(), generator=g,
                      persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers else None,
                      worker_init_fn=ignore_in_worker)  # the trainer stops them (interrupts.py)


def load_val_batch(src: ImageSource, res: int) -> tuple[torch.Tensor, list[str]]:
    """Central crops of every decodable validation image, (N, 3, res, res), and the skip messages."""
    xs, bad = [], []
    for i in range(len(src)):
        try:
            xs.append(to_tensor(crop_center(src.load(i), res)))
        except BadImage as e:
            bad.append(str(e))
    return (torch.stack(xs) if xs else torch.empty(0, 3, res, res)), bad


def build_sources(cfg: DataConfig) -> tuple[ImageSource, ImageSource]:
    """(train, val) sources from the data config."""
    src = open_source(cfg.source, cfg.kind, cfg.split, cfg.image_column, cfg.max_image_pixels)
    if cfg.val_source:
        val = open_source(cfg.val_source, cfg.kind, cfg.split, cfg.image_column, cfg.max_image_pixels)
        return src, val
    return split_holdout(src, cfg.val_count)
