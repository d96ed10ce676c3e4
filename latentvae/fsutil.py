"""Files that are either complete or absent: write to a hidden temporary, fsync, rename, fsync the folder.

    atomic_write_bytes(path, data)          # bytes
    atomic_write_json(path, obj)            # JSON, indented, sorted keys
    atomic_write(path, lambda f: ...)       # anything written to a binary file object
    atomic_save_image(pil_image, path)      # a PIL image, format from the suffix
    publish_folder(staging, target)         # a finished staging folder replaces `target` in one rename
    entry_id(path)                          # (device, inode) of what `path` names now, None if nothing:
                                            #   whether a rename published something new since
    sha256_file(path)                       # hex digest, streamed
    flatten(record)                         # {"a": {"b": 1}} -> {"a.b": 1}, for JSON records in messages

After `os.replace` returns and the folder is fsynced, a crash (SIGKILL, power loss) leaves either
the old file or the new one under `path`, never a prefix of the new one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable


def fsync_dir(path: str | Path) -> None:
    """Make the folder's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """`write(fileobj)` into `path` itself, then fsync it (for files inside a staging folder)."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """`write(fileobj)` into a hidden temporary beside `path`, fsync, rename over `path`, fsync the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        write_durable(tmp, write)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_image(img, path: str | Path, **kwargs) -> None:
    """A PIL image (format from the file suffix; `kwargs` go to `Image.save`), creating the folder."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image file extension {path.suffix!r}")
    atomic_write(path, lambda f: img.save(f, format=fmt, **kwargs))


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def publish_folder(staging: str | Path, target: str | Path) -> None:
    """Rename a finished staging folder to `target`, replacing an old `target` only once that worked
    (a failure puts the old one back); then fsync the parent and remove the old one (and the hidden old
    ones an earlier publish stopped after its rename left)."""
    staging, target = Path(staging), Path(target)
    for stale in target.parent.glob(f".{target.name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        if old.exists():
            os.replace(old, target)
        raise
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def entry_id(path: str | Path) -> tuple[int, int] | None:
    """(device, inode) of the file or folder `path` names now; None if there is none. A rename into place
    (atomic_write, publish_folder) changes it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def flatten(record: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": value} (JSON records shown as tables or compared key by key)."""
    if not isinstance(record, dict):
        return {prefix: record}
    out = {}
    for k, v in record.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
