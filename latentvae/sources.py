"""Where images come from: a folder (recursive) or a `datasets` dataset, as one indexable source.

    src = open_source("data/samples/train")                 # or a saved dataset, or a hub name
    len(src); src.name(i); src.load(i) -> PIL RGB; src.raw(i) -> what images.load_rgb takes

Every job reads images through this (training, encoding, calibration, evaluation), so `--data`
means the same everywhere. A folder's captions and metadata (FolderImageSource.columns: metadata.jsonl /
metadata.csv files as `datasets`' ImageFolder reads them, .txt / .caption sidecars as diffusion trainers
do) are read only when asked for: encoding passes them through into the cache rows, training never
reads them. A file that cannot be decoded raises images.BadImage naming it; the
jobs skip and report such files, they never crash on one.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

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

    def relative_name(self, i: int) -> str:
        """Image i's name without the part that depends on how the source was spelled (a folder's path)."""
        return self.name(i)

    def stat_identity(self, i: int) -> dict:
        """What identifies image i without reading it: its file's size and modification time (ns).
        OSError if the file is gone."""
        st = os.stat(self.items[i])
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def fetch(self, i: int) -> tuple[Any, dict]:
        """(image i's bytes, as `load_rgb` takes them; their identity: size, mtime_ns and the sha256 of
        exactly the bytes returned, size and time from the same open file). BadImage if unreadable."""
        try:
            with open(self.items[i], "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except OSError as e:
            raise BadImage(f"{self.name(i)}: cannot read ({e.strerror or e})") from e
        return data, {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": hashlib.sha256(data).hexdigest()}


METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # as `datasets`' ImageFolder reads them
SIDECARS = (".txt", ".caption")  # a caption next to an image, as diffusion trainers read them


class FolderImageSource(ImageSource):
    """The images below `root`; `columns()` reads their captions and metadata (read only when asked:
    training never asks, so a folder's metadata files cannot stop it)."""

    def __init__(self, items: list[Any], names: list[str], max_pixels: int, root: Optional[str] = None):
        super().__init__(items, names, max_pixels)
        self.root = root
        self._columns = None
        self._parent, self._picked = None, None  # a subset's columns are its parent's, picked

    def subset(self, indices: list[int]) -> "FolderImageSource":
        sub = type(self)([self.items[i] for i in indices], [self.names[i] for i in indices], self.max_pixels,
                         self.root)
        sub._parent, sub._picked = self, list(indices)
        return sub

    def relative_name(self, i: int) -> str:
        if self.root is None:
            return self.name(i)
        return Path(self.items[i]).relative_to(self.root).as_posix()

    def columns(self) -> dict[str, list]:
        """{column: one value per image}: every column of the folder's metadata.jsonl / metadata.csv files
        (file_name aside) and `text` from .txt/.caption sidecars; None where an image has no value.
        {} when the folder has neither. BadInputError naming the file and line for a conflict or a
        malformed line."""
        if self._columns is None:
            if self._parent is not None:
                full = self._parent.columns()
                self._columns = {k: [v[i] for i in self._picked] for k, v in full.items()}
            elif self.root is None:
                self._columns = {}
            else:
                self._columns = folder_columns(Path(self.root), [Path(p) for p in self.items])
        return self._columns

    def passthrough(self):
        """The columns as a `datasets.Dataset` (one row per image), or None when there are none."""
        cols = self.columns()
        if not cols:
            return None
        import datasets
        import pyarrow as pa

        arrays = {}
        for name, values in cols.items():
            try:
                arrays[name] = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
                raise BadInputError(f"{self.root}: metadata column {name!r} mixes values of different types "
                                    f"({' '.join(str(e).split())}); give it one type in every metadata file") from e
        return datasets.Dataset(pa.table(arrays))


def _metadata_rows_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInputError(f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(row, dict):
                raise BadInputError(f"{path}, line {n}: expected a JSON object with a file_name, got "
                                    f"{type(row).__name__}")
            rows.append((n, row))
    return rows


def _infer(values: list[str]) -> list:
    """A CSV column's strings as ints or floats when they all are (empty cells: None), else as they are
    (file_name and text always stay strings)."""
    for kind in (int, float):
        try:
            return [None if v == "" else kind(v) for v in values]
        except ValueError:
            continue
    return values


def _metadata_rows_csv(path: Path) -> list[tuple[int, dict]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise BadInputError(f"{path}, line 1: no header row; expected a header with a file_name column")
        if len(set(header)) != len(header):
            dup = sorted({h for h in header if header.count(h) > 1})
            raise BadInputError(f"{path}, line 1: column {dup[0]!r} appears twice in the header")
        if "file_name" not in header:
            raise BadInputError(f"{path}, line 1: no file_name column in the header (the image's path relative to "
                                f"{path.parent})")
        lines, cells = [], []
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise BadInputError(f"{path}, line {reader.line_num}: {len(row)} fields, but the header has "
                                    f"{len(header)}")
            lines.append(reader.line_num)
            cells.append(row)
    typed = {h: (_infer([r[k] for r in cells]) if h not in ("file_name", "text") else [r[k] for r in cells])
             for k, h in enumerate(header)}
    return [(n, {h: typed[h][j] for h in header}) for j, n in enumerate(lines)]


def folder_columns(root: Path, images: list[Path]) -> dict[str, list]:
    """See FolderImageSource.columns."""
    index = {os.path.normpath(os.path.abspath(p)): k for k, p in enumerate(images)}
    values: dict[str, dict[int, Any]] = {}  # column -> {image position: value}
    where: dict[int, str] = {}  # image position -> "FILE, line N" of its metadata row
    metadata = sorted(p for name in METADATA_FILES for p in root.rglob(name) if p.is_file())
    for path in metadata:
        rows = _metadata_rows_jsonl(path) if path.suffix == ".jsonl" else _metadata_rows_csv(path)
        for n, row in rows:
            name = row.get("file_name")
            if name is None or name == "":
                raise BadInputError(f"{path}, line {n}: no file_name (the image's path relative to {path.parent})")
            if not isinstance(name, str):
                raise BadInputError(f"{path}, line {n}: file_name {name!r} is not a string")
            target = os.path.normpath(os.path.abspath(path.parent / name))
            if target not in index:
                what = "does not exist" if not os.path.exists(target) else f"is not an image file below {root}"
                raise BadInputError(f"{path}, line {n}: file_name {name!r} ({target}) {what}")
            k = index[target]
            if k in where:
                raise BadInputError(f"{path}, line {n}: {name!r} ({target}) is listed twice: also at {where[k]}")
            where[k] = f"{path}, line {n}"
            for col, v in row.items():
                if col != "file_name":
                    values.setdefault(col, {})[k] = v
    # sidecars: IMAGE_STEM.txt / .caption in the image's folder
    texts: dict[int, tuple[str, str]] = {}
    for k, p in enumerate(images):
        found = [p.with_suffix(ext) for ext in SIDECARS if p.with_suffix(ext).is_file()]
        if len(found) > 1:
            raise BadInputError(f"{found[0]} and {found[1]}, line 1: two captions for {p}; keep one")
        if found:
            texts[k] = (str(found[0]), found[0].read_text(encoding="utf-8").strip())
    if texts:
        column = values.setdefault("text", {})
        for k, (file, text) in texts.items():
            given = column.get(k)
            if given is not None and not (isinstance(given, str) and given.strip() == text):
                raise BadInputError(f"{where[k]}: text {given!r} for {images[k]} disagrees with its caption file "
                                    f"{file} ({text!r})")
            if given is None:
                column[k] = text
    return {col: [vals.get(k) for k in range(len(images))] for col, vals in values.items()}


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

    @property
    def fingerprint(self) -> Optional[str]:
        """The dataset's `datasets` fingerprint: the same data and transforms, the same fingerprint."""
        return getattr(self.dataset, "_fingerprint", None)

    def stat_identity(self, i: int) -> dict:
        return {"fingerprint": self.fingerprint}

    def fetch(self, i: int) -> tuple[Any, dict]:
        """(row i's image as `load_rgb` takes it, its identity: the dataset fingerprint and the sha256 of the
        encoded bytes, of the file a path names, or of a decoded image's mode, size and pixels)."""
        value = self.raw(i)
        if isinstance(value, Image.Image):
            h = hashlib.sha256(f"{value.mode}|{value.size}|".encode())
            h.update(value.tobytes())
            return value, {"size": None, "fingerprint": self.fingerprint, "sha256": h.hexdigest()}
        if isinstance(value, (str, os.PathLike)):
            try:
                value = Path(value).read_bytes()
            except OSError as e:
                raise BadImage(f"{self.name(i)}: cannot read {value} ({e.strerror or e})") from e
        return value, {"size": len(value), "fingerprint": self.fingerprint, "sha256": hashlib.sha256(value).hexdigest()}

    def subset(self, indices: list[int]) -> "HFImageSource":
        return type(self)(self.dataset, self.column, [self.indices[i] for i in indices], self.max_pixels, self.label)

    def relative_name(self, i: int) -> str:
        return f"[{self.indices[i]}]"


class CropSource(ImageSource):
    """`count` crops of every image of `base` as inputs of their own (the `crops` preprocessing mode):
    input j is crop j % count of image j // count, named `NAME#cropK`. Everything about the bytes
    (raw, fetch, stat_identity) is the image's, so an edited image makes all its crops stale; where a
    crop lies is a pure function of (seed, the image's relative name, K, the resized size)."""

    def __init__(self, base: ImageSource, count: int, seed: int = 0):
        self.base, self.count, self.seed, self.max_pixels = base, int(count), int(seed), base.max_pixels

    def __len__(self) -> int:
        return len(self.base) * self.count

    def image(self, j: int) -> int:
        """The index in `base` of input j's image."""
        return j // self.count

    def name(self, j: int) -> str:
        return f"{self.base.name(j // self.count)}#crop{j % self.count}"

    def relative_name(self, j: int) -> str:
        return f"{self.base.relative_name(j // self.count)}#crop{j % self.count}"

    def raw(self, j: int) -> Any:
        return self.base.raw(j // self.count)

    def load(self, j: int) -> Image.Image:
        return self.base.load(j // self.count)

    def fetch(self, j: int) -> tuple[Any, dict]:
        return self.base.fetch(j // self.count)

    def stat_identity(self, j: int) -> dict:
        return self.base.stat_identity(j // self.count)

    def crop_origin(self, j: int, size: tuple[int, int], crop: int) -> tuple[int, int]:
        """(top, left) of input j's crop x crop window in an image of `size` = (w, h)."""
        w, h = size
        digest = hashlib.blake2b(f"{self.seed}|{self.base.relative_name(j // self.count)}|{j % self.count}".encode(),
                                 digest_size=16).digest()
        a, b = int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")
        return a % (h - crop + 1), b % (w - crop + 1)

    def subset(self, indices: list[int]) -> "ImageSource":
        raise NotImplementedError("a CropSource is not split; split its base source first")


DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes
EXPECTED = "expected an image folder, a saved `datasets` folder (save_to_disk) or a hub dataset name such as user/name"


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in DATASET_MARKERS)


def _load_hf(source: str, split: str, column: str, what: str = "image"):
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
        raise BadInputError(f"{source}: no {what} column {column!r}; columns: {', '.join(ds.column_names)} "
                            f"(set --{what}-column, or data.{what}_column in a training config)")
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
        return FolderImageSource([str(f) for f in files], [str(f) for f in files], max_pixels, root=str(path))
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
