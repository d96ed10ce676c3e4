"""Training data: an endless, seeded stream of augmented crops that resumes exactly.

Item k of the stream is a pure function of (seed, k): epoch k // N uses a seeded permutation of
the N images, and the crop and flip of item k come from a generator seeded with (seed, k). So a
run resumed at micro-step s sees exactly the batches it would have seen, whatever the number of
DataLoader workers; each process takes its own disjoint slice of the stream.

Sources: a folder of images (recursive), a `datasets` dataset saved with `save_to_disk`, or a
name/path that `datasets.load_dataset` understands, with an image column. Files that cannot be
decoded are skipped (the next image of the permutation takes their place) and reported with the
batch, so the training loop can count and list them; the run never crashes on one.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import DataConfig
from .errors import BadInputError, MissingInputError
from .images import BadImage, list_images, load_rgb, to_tensor


# ----------------------------------------------------------------------------- sources
class ImageSource:
    """Indexable list of images: `len(src)`, `src.load(i) -> PIL RGB`, `src.name(i) -> str`."""

    def __init__(self, items: list[Any], names: list[str], max_pixels: int):
        self.items, self.names, self.max_pixels = items, names, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def name(self, i: int) -> str:
        return self.names[i]

    def raw(self, i: int) -> Any:
        """What `load_rgb` takes for image i (here a path), undecoded."""
        return self.items[i]

    def load(self, i: int) -> Image.Image:
        return load_rgb(self.raw(i), self.max_pixels)

    def subset(self, indices: list[int]) -> "ImageSource":
        return type(self)([self.items[i] for i in indices], [self.names[i] for i in indices], self.max_pixels)


class HFImageSource(ImageSource):
    """Rows of a `datasets.Dataset`; the image column may hold PIL images, bytes or paths."""

    def __init__(self, dataset, column: str, indices: list[int], max_pixels: int, label: str):
        self.dataset, self.column, self.indices, self.max_pixels, self.label = dataset, column, indices, max_pixels, label

    def __len__(self) -> int:
        return len(self.indices)

    def name(self, i: int) -> str:
        return f"{self.label}[{self.indices[i]}]"

    def raw(self, i: int) -> Any:
        """Row i's image cell as `load_rgb` takes it: PIL image, bytes or path; BadImage if empty."""
        value = self.dataset[self.indices[i]][self.column]
        if isinstance(value, dict):  # undecoded Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if value is None:
            raise BadImage(f"{self.name(i)}: column {self.column!r} is empty")
        return value

    def load(self, i: int) -> Image.Image:
        value = self.raw(i)
        try:
            return load_rgb(value, self.max_pixels)
        except BadImage as e:
            raise BadImage(f"{self.name(i)}: {e}") from e

    def subset(self, indices: list[int]) -> "HFImageSource":
        return HFImageSource(self.dataset, self.column, [self.indices[i] for i in indices], self.max_pixels, self.label)


DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes
EXPECTED = "expected an image folder, a saved `datasets` folder (save_to_disk) or a hub dataset name such as user/name"


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in DATASET_MARKERS)


def _load_hf(source: str, split: str, column: str):
    import datasets
    from datasets.features import Image as ImageFeature

    path = Path(source)
    if _is_saved_dataset(path):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise BadInputError(f"{source}: no split {split!r}; splits: {', '.join(ds)}")
            ds = ds[split]
    else:
        try:
            ds = datasets.load_dataset(source, split=split)
        except (FileNotFoundError, ConnectionError) as e:  # DatasetNotFoundError, offline, ...
            raise MissingInputError(f"data source {source}: no such local path, and the hub dataset could not be "
                                    f"loaded ({type(e).__name__}: {' '.join(str(e).split())}); {EXPECTED}") from e
        except ValueError as e:
            if "split" not in str(e).lower():
                raise
            raise BadInputError(f"data source {source}: {' '.join(str(e).split())}") from e
    if column not in ds.column_names:
        raise BadInputError(f"{source}: no image column {column!r}; columns: {', '.join(ds.column_names)} "
                            "(set --image-column, or data.image_column in a training config)")
    if isinstance(ds.features[column], ImageFeature):
        ds = ds.cast_column(column, ImageFeature(decode=False))  # decode ourselves, to skip bad rows
    return ds


def _looks_local(source: str) -> bool:
    """A path rather than a hub name (`name` or `user/name`)."""
    return source.startswith(("/", ".", "~")) or "/" not in source or source.count("/") > 1


def open_source(source: str, kind: str = "auto", split: str = "train", column: str = "image",
                max_pixels: int = 100_000_000) -> ImageSource:
    """A folder of images or a `datasets` dataset, as an ImageSource.

    A missing path or an empty folder raises MissingInputError, a file (not a folder) BadInputError,
    both naming the path."""
    path = Path(source)
    if path.is_file():
        raise BadInputError(f"data source {source} is a file; {EXPECTED}")
    if kind == "folder" or (kind == "auto" and path.is_dir() and not _is_saved_dataset(path)):
        files = list_images(path)
        return ImageSource([str(f) for f in files], [str(f) for f in files], max_pixels)
    if kind == "auto" and not path.exists() and _looks_local(source):
        raise MissingInputError(f"data source {source} does not exist ({EXPECTED})")
    ds = _load_hf(source, split, column)
    return HFImageSource(ds, column, list(range(len(ds))), max_pixels, label=f"{source}:{split}")


def split_holdout(src: ImageSource, count: int) -> tuple[ImageSource, ImageSource]:
    """Hold aside `count` images, chosen by a hash of their names (stable as files are added)."""
    if count <= 0:
        return src, src.subset([])
    if count >= len(src):
        raise BadInputError(f"cannot hold aside {count} of {len(src)} images for validation; set data.val_count lower "
                            "or data.val_source")
    order = sorted(range(len(src)), key=lambda i: hashlib.sha1(src.name(i).encode()).hexdigest())
    val = sorted(order[:count])
    train = sorted(order[count:])
    return src.subset(train), src.subset(val)


# ----------------------------------------------------------------------------- augmentation
def _resize_short(img: Image.Image, short: int) -> Image.Image:
    w, h = img.size
    scale = short / min(w, h)
    if abs(scale - 1) < 1e-6:
        return img
    size = (max(short, round(w * scale)), max(short, round(h * scale)))
    return img.resize(size, Image.BICUBIC, reducing_gap=3.0 if scale < 0.5 else None)


def random_crop(img: Image.Image, cfg: DataConfig, g: torch.Generator) -> torch.Tensor:
    """Resize the short side (random in [short_side_min, short_side_max], or native), then a
    random `resolution` crop and an optional horizontal flip, all drawn from `g`."""
    res = cfg.resolution
    lo, hi = cfg.short_side_min, cfg.short_side_max or cfg.short_side_min
    short = min(img.size)
    if lo:
        short = int(torch.randint(lo, hi + 1, (1,), generator=g))
    img = _resize_short(img, max(short, res))
    w, h = img.size
    left = int(torch.randint(0, w - res + 1, (1,), generator=g))
    top = int(torch.randint(0, h - res + 1, (1,), generator=g))
    x = to_tensor(img.crop((left, top, left + res, top + res)))
    if cfg.flip and bool(torch.rand((), generator=g) < 0.5):
        x = x.flip(-1)
    return x


def center_crop(img: Image.Image, res: int) -> torch.Tensor:
    """Native scale (upscaled only if smaller than `res`), central res x res crop."""
    img = _resize_short(img, max(min(img.size), res))
    w, h = img.size
    left, top = (w - res) // 2, (h - res) // 2
    return to_tensor(img.crop((left, top, left + res, top + res)))


# ----------------------------------------------------------------------------- the stream
def _mix(seed: int, k: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{k}".encode(), digest_size=8).digest(), "little") >> 1


class CropStream(Dataset):
    """Item k: an augmented crop of image perm_{k // N}[k % N]; bad images replaced by the next one."""

    def __init__(self, src: ImageSource, cfg: DataConfig, seed: int):
        if len(src) == 0:
            raise MissingInputError(f"data.source={cfg.source}: no training images")
        self.src, self.cfg, self.seed = src, cfg, seed
        self._perm_epoch, self._perm = -1, None
        self._bad: set[int] = set()

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, -1 - epoch))
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
                img = self.src.load(i)
            except BadImage as e:
                self._bad.add(i)
                bad.append(str(e))
                continue
            g = torch.Generator().manual_seed(_mix(self.seed, k))
            return {"pixels": random_crop(img, self.cfg, g), "bad": bad}
        raise RuntimeError(f"data.source={self.cfg.source}: none of the {n} images could be decoded; "
                           f"first errors: {bad[:3]}")


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
    g = torch.Generator().manual_seed(_mix(stream.seed, -10**9 - rank))
    return DataLoader(stream, batch_size=batch_size, sampler=StreamSampler(batch_size, start_micro_step, rank, world),
                      collate_fn=collate, num_workers=num_workers, pin_memory=torch.cuda.is_available(), generator=g,
                      persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers else None)


def load_val_batch(src: ImageSource, res: int) -> tuple[torch.Tensor, list[str]]:
    """Central crops of every decodable validation image, (N, 3, res, res), and the skip messages."""
    xs, bad = [], []
    for i in range(len(src)):
        try:
            xs.append(center_crop(src.load(i), res))
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
