"""Where images come from: a folder (recursive) or a `datasets` dataset, as one indexable source.

    src = open_source("data/samples/train")                 # or a saved dataset, or a hub name
    len(src); src.name(i); src.load(i) -> PIL RGB; src.raw(i) -> what images.load_rgb takes

Every job reads images through this (training, encoding, calibration, evaluation), so `--data`
means the same everywhere. A file that cannot be decoded raises images.BadImage naming it; the
jobs skip and report such files, they never crash on one.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from PIL import Image

from .errors import BadInputError, MissingInputError
from .images import BadImage, list_images, load_rgb


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
