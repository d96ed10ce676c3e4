"""Files that are either complete or absent: write to a hidden temporary, fsync, rename, fsync the folder.

    atomic_write_bytes(path, data)          # bytes
    atomic_write_json(path, obj)            # JSON, indented, sorted keys
    atomic_write(path, lambda f: ...)       # anything written to a binary file object
    atomic_save_image(pil_image, path)      # a PIL image, format from the suffix
    publish_folder(staging, target)         # a finished staging folder replaces `target` in one rename
    with staged_folder(target) as tmp:      # the whole staging-then-rename: a hidden empty folder beside
        write files into tmp                #   `target` (stale ones of killed runs removed), published
                                            #   by one rename when the block ends, removed if it raises
    check_output_folder(out, "--out", is_ours=lambda p: (p / "summary.json").is_file(), what="an evaluation
                        report (summary.json)")  # new, empty, or one of ours: never someone's other folder
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
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional


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


def staging_name(target: Path) -> Path:
    """The hidden staging folder beside `target` for this process."""
    return target.parent / f".{target.name}.tmp-{os.getpid()}"


def remove_stale_staging(target: str | Path) -> None:
    """Remove hidden staging folders (and atomic_write temporaries) that killed earlier writes of `target`
    left beside it: they were never published, so nothing in them counts."""
    target = Path(target)
    for p in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for p in target.parent.glob(f".{target.name}.*.tmp"):
        if p.is_file():
            p.unlink(missing_ok=True)


@contextmanager
def staged_folder(target: str | Path, publish: Optional[Callable[[Path, Path], None]] = None):
    """Staging-then-rename, the one implementation: yields an empty hidden folder beside `target`; when the
    block ends normally, its files are fsynced and it replaces `target` in one rename (`publish(staging,
    target)`, default publish_folder); if the block raises (an error, an interrupt), the staging folder is
    removed and `target` is as it was. A crash at any point leaves `target` old or new, never half-written."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    tmp = staging_name(target)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        (publish or publish_folder)(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_folder(out: str | Path, flag: str, is_ours: Callable[[Path], bool], what: str) -> None:
    """An output folder must be new, empty, or `what` (`is_ours(out)`: an earlier output of the same job, to
    resume or replace): never a file, never someone's other folder. A BadInputError naming `flag` otherwise."""
    from .errors import BadInputError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInputError(f"{flag} {out} exists and is not a folder; expected a new folder or {what}")
    if out.is_dir() and any(out.iterdir()) and not is_ours(out):
        raise BadInputError(f"{flag} {out} is a non-empty folder that is not {what}; choose a new or empty folder")


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
