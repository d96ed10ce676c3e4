"""Where videos come from: a folder (recursive) or a `datasets` dataset with a video column; the clips cut from them.

    if is_video_data("clips/", "auto", "video"):            # video files, or a dataset whose column holds videos
        videos = open_video_source("clips/", "auto", "train", "video")
    len(videos); videos.name(i); videos.fetch(i) -> (bytes, identity); videos.passthrough()   # captions, as images
    clips = ClipSource(videos, frames=49, fps=16, stride=0)  # probes each video once, in order
    len(clips); clips.name(i) -> "walk.mp4#clip2"; clips.frame_indices(i); clips.video(i)
    pixels, info = clips.load_clip(i, (480, 832))             # uint8 (3, T, H, W), where it came from

A folder of video files (videos.VIDEO_EXTENSIONS) is read as sources.FolderImageSource reads images, with the
same captions and metadata (metadata.jsonl / metadata.csv, .txt / .caption sidecars: sources.folder_columns) and
the same identity (size and mtime without reading; the sha256 of exactly the bytes decoded). A `datasets` column
may hold a Video feature (read undecoded, {"path", "bytes"}: we decode with PyAV, not the feature's torchcodec),
file paths or the files' bytes; the identity is the dataset's fingerprint and the bytes' sha256, as for images.

A ClipSource is an input source of the encode cache (cache.update.Inputs): each clip is one input, keyed
`RELATIVE_NAME#clipK`, with its video's identity, so an edited video makes all its clips stale and the
exactly-once machinery needs nothing new. A video that gives no clip (too short at the clip's length and rate,
unreadable, corrupt) is one input, `#clip0`, whose load_clip raises BadVideo with the reason: the job lists it
and goes on, and a rerun retries it once the file changes.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import BadInputError, MissingInputError, UserError
from .images import IMAGE_EXTENSIONS, BadImage
from .sources import FolderImageSource, HFImageSource, _is_saved_dataset, _load_hf, _looks_local
from .videos import (VIDEO_EXTENSIONS, BadVideo, VideoInfo, check_clip_settings, check_resize_mode, cover_geometry,
                     decode_into, fit_clip, list_videos, looks_like_video, plan_clips, probe)

EXPECTED = ("expected a folder of video files, a saved `datasets` folder (save_to_disk) or a hub dataset name "
            "such as user/name")


# ----------------------------------------------------------------------------- sources of videos
class _Videos:
    """What a source of videos changes in a source of images: no `load` (videos give clips: ClipSource), and
    its reading errors are BadVideo."""

    def load(self, i: int):
        raise TypeError("a source of videos has no load(); cut it into clips with ClipSource")

    def raw(self, i: int) -> Any:
        with _as_bad_video():
            return super().raw(i)

    def fetch(self, i: int) -> tuple[Any, dict]:
        with _as_bad_video():
            return super().fetch(i)


@contextmanager
def _as_bad_video():
    """A source of images' BadImage raised as BadVideo (its message names the file already)."""
    try:
        yield
    except BadVideo:
        raise
    except BadImage as e:
        raise BadVideo(str(e)) from e


class FolderVideoSource(_Videos, FolderImageSource):
    """The video files below `root`: raw(i) is the path; columns() and passthrough() as for an image folder."""


class HFVideoSource(_Videos, HFImageSource):
    """Rows of a `datasets.Dataset` whose `column` holds videos: an undecoded Video feature, bytes or paths."""

    def passthrough(self):
        """The dataset's other columns (one row per video), or None when it has none."""
        ds = self.dataset if self.indices == list(range(len(self.dataset))) else self.dataset.select(self.indices)
        rest = ds.remove_columns([self.column])
        return rest if rest.column_names else None


def _folder_kind(path: Path, kind: str) -> bool:
    return kind == "folder" or (kind == "auto" and path.is_dir() and not _is_saved_dataset(path))


def _load_videos(source: str, split: str, column: str):
    """The dataset, its video column undecoded (a Video feature cast to decode=False)."""
    from datasets.features import Video

    ds = _load_hf(source, split, column, what="video")
    if isinstance(ds.features[column], Video):
        ds = ds.cast_column(column, Video(decode=False))  # {"path", "bytes"}: PyAV decodes, rows fail alone
    return ds


def _holds_videos(value) -> bool:
    if isinstance(value, dict):  # an undecoded feature: {"bytes", "path"}
        return _holds_videos(value.get("bytes") or value.get("path"))
    if isinstance(value, (bytes, bytearray)):
        return looks_like_video(value)
    return isinstance(value, str) and Path(value).suffix.lower() in VIDEO_EXTENSIONS


def is_video_data(data: str, data_kind: str = "auto", column: str = "video", split: str = "train") -> bool:
    """Whether --data holds videos: a folder with video files and no image files (a folder of both is an image
    folder, as before), or a `datasets` dataset whose `column` is a Video feature or holds video files' paths
    or bytes (the first non-empty of its first rows). False for anything that cannot be read: the job's own
    source then says why."""
    path = Path(data)
    if _folder_kind(path, data_kind):
        if not path.is_dir():
            return False
        suffixes = {p.suffix.lower() for p in path.rglob("*") if p.is_file()}
        return bool(suffixes & VIDEO_EXTENSIONS) and not suffixes & IMAGE_EXTENSIONS
    if path.is_file() or (data_kind == "auto" and not path.exists() and _looks_local(data)):
        return False
    from datasets.features import Image, Video

    try:
        ds = _load_videos(data, split, column)
    except UserError:
        return False
    feature = ds.features[column]
    if isinstance(feature, (Video, Image)):
        return isinstance(feature, Video)
    head = ds.select(range(min(8, len(ds))))[column]
    return _holds_videos(next((v for v in head if v is not None), None))


def open_video_source(data: str, data_kind: str = "auto", split: str = "train", video_column: str = "video"):
    """A folder of video files or a `datasets` dataset with a video column, as a source of videos (see the
    module docstring). MissingInputError for a missing path or a folder without videos, BadInputError for a
    file or a dataset without the column, naming them."""
    path = Path(data)
    if path.is_file():
        raise BadInputError(f"data source {data} is a file; {EXPECTED}")
    if _folder_kind(path, data_kind):
        files = [str(f) for f in list_videos(path)]
        return FolderVideoSource(files, list(files), 0, root=str(path))
    if data_kind == "auto" and not path.exists() and _looks_local(data):
        raise MissingInputError(f"data source {data} does not exist ({EXPECTED})")
    ds = _load_videos(data, split, video_column)
    return HFVideoSource(ds, video_column, list(range(len(ds))), 0, label=f"{data}:{split}")


# ----------------------------------------------------------------------------- clips
class ClipSource:
    """One input per clip of `frames` frames at `fps` (0/None: each video's own rate), clip k of a video
    starting `stride` output frames after clip k-1 (0/None: `frames`): videos.plan_clips. Each video is probed
    once, in order, here; one that gives no clip is one input whose load_clip raises BadVideo with the reason."""

    def __init__(self, videos, frames: int, fps: Optional[float] = None, stride: Optional[int] = None):
        self.videos, self.frames, self.fps, self.stride = videos, int(frames), fps or None, stride or None
        check_clip_settings(self.frames, fps, stride)
        self.infos: list[Optional[VideoInfo]] = []  # per video; None where it could not be probed
        self.reasons: list[Optional[str]] = []  # per video: why it gives no clip, or None
        self._items: list[tuple[int, int, Optional[list[int]]]] = []  # (video, clip number, source frames)
        for v in range(len(videos)):
            info, clips, reason = None, [], None
            try:
                info = probe(videos.raw(v), name=videos.name(v))
                clips = plan_clips(info, self.frames, self.fps, self.stride)
            except BadVideo as e:
                reason = str(e) if info is None else f"{videos.name(v)}: {e}"
            self.infos.append(info)
            self.reasons.append(reason)
            self._items += [(v, k, c) for k, c in enumerate(clips)] or [(v, 0, None)]

    def __len__(self) -> int:
        return len(self._items)

    def video(self, i: int) -> int:
        """The index in `videos` of clip i's video."""
        return self._items[i][0]

    def name(self, i: int) -> str:
        v, k, _ = self._items[i]
        return f"{self.videos.name(v)}#clip{k}"

    def relative_name(self, i: int) -> str:
        v, k, _ = self._items[i]
        return f"{self.videos.relative_name(v)}#clip{k}"

    def failure(self, i: int) -> Optional[str]:
        """Why clip i's video gives no clip (one line naming the file), or None."""
        return self.reasons[self._items[i][0]]

    def frame_indices(self, i: int) -> list[int]:
        """Clip i's source frames (frame k: the k-th the decoder gives); [] for a video that gives no clip."""
        return list(self._items[i][2] or [])

    def info(self, i: int) -> VideoInfo:
        """The VideoInfo of clip i's video (as the bucket of its size is chosen from); BadVideo if unprobed."""
        v = self._items[i][0]
        if self.infos[v] is None:
            raise BadVideo(self.reasons[v])
        return self.infos[v]

    def clip_fps(self, i: int) -> float:
        """Clip i's frame rate: `fps`, or its video's own."""
        return float(self.fps) if self.fps else self.info(i).fps

    def raw(self, i: int) -> Any:
        return self.videos.raw(self._items[i][0])

    def stat_identity(self, i: int) -> dict:
        return self.videos.stat_identity(self._items[i][0])

    def fetch(self, i: int) -> tuple[Any, dict]:
        return self.videos.fetch(self._items[i][0])

    def subset(self, indices: list[int]) -> "ClipSource":
        """The clips `indices` (their videos probed once, here: not again)."""
        sub = object.__new__(ClipSource)
        sub.__dict__.update(self.__dict__)
        sub._items = [self._items[i] for i in indices]
        return sub

    def passthrough(self):
        """The video source's columns (captions, metadata), one row per clip; None without any."""
        rest = self.videos.passthrough()
        return None if rest is None else rest.select([it[0] for it in self._items])

    def load_clip(self, i: int, size: Optional[tuple[int, int]] = None,
                  mode: str = "bicubic") -> tuple[torch.Tensor, dict]:
        """(uint8 (3, T, H, W), info): clip i decoded from the bytes that `fetch` reads, each frame resized to
        cover `size` = (H, W) (None: the video's own) and centrally cropped as it is decoded (memory: the
        output, not the source frames); info holds `identity` (of those bytes: size, mtime_ns, sha256),
        `frame_indices`, `fps`, `original_size` (h, w) and `crop_top_left`. BadVideo naming the file and why
        for a video that gives no clip, cannot be read or decoded, or changed since it was probed."""
        check_resize_mode(mode)
        v, _, indices = self._items[i]
        if indices is None:
            raise BadVideo(self.reasons[v])
        name = self.videos.name(v)
        data, identity = self.videos.fetch(v)
        now = probe(data, name=name)
        if now[:4] != self.infos[v][:4]:  # frames, fps, width, height: what the plan and the size came from
            raise BadVideo(f"{name}: changed since it was probed ({self.infos[v]} then, {now} now); run again")
        size = tuple(size) if size else (now.height, now.width)
        fitted: dict[int, torch.Tensor] = {}

        def take(k, frame):
            fitted[k] = fit_clip(frame.to_ndarray(format="rgb24")[None], size, mode)[:, 0]

        decode_into(data, indices, take, name=name)
        pixels = torch.stack([fitted[k] for k in indices], dim=1)
        _, crop = cover_geometry((now.height, now.width), size)
        return pixels, {"identity": identity, "frame_indices": list(indices), "fps": self.clip_fps(i),
                        "original_size": (now.height, now.width), "crop_top_left": crop}
