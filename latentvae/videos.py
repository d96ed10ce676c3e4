"""Video files in, uint8 clips out, and back: probing, picking a clip's frames, decoding them, fitting them to a size.

    info = probe("walk.mp4")                    # VideoInfo(frames=240, fps=24.0, width=832, height=480, duration=10.0)
    clips = plan_clips(info, 81, fps=16)        # [[0, 1, 3, 4, 6, ...]]: each clip's source frames, at 16 fps
    frames = read_frames("walk.mp4", clips[0])  # uint8 (T, H, W, 3), in the order asked
    clip = fit_clip(frames, (480, 832))         # uint8 (3, T, 480, 832): resized to cover, centre cropped
    write_video("out.webm", frames, fps=16)     # mp4/mov/m4v/mkv: h264, webm: vp9, avi: mpeg4

Decoding is PyAV's (`av` on PyPI): its wheels carry their own FFmpeg, so `pip install av` is all a fresh machine
needs. torchcodec (0.17) loads the system's FFmpeg libraries at its first decode and fails without them (`Could not
load this library: .../libtorchcodec_core4.so` on a machine with no libavcodec), and torchvision.io has no video
reading left (deprecated in favour of torchcodec; 0.29 has no `read_video`).

Frame k of a video is the k-th frame in presentation order (the order the decoder gives them; each packet is one
frame, which is what a container's frame count counts). A clip at `fps` samples times j / fps from its start and
takes, for each, the source frame at or before it, frame k lying at k / source fps: 24 fps to 8 fps takes every
third frame, 30000/1001 to 16 keeps the frames nearest below each sixteenth of a second (the plan takes the average
rate as the rate throughout: a variable-rate video's clips are even in frames, not in time). `read_frames` decodes only
what it needs: from the keyframe at or before a clip's first frame (seeking by presentation timestamp, pts *
time_base, the frames told apart by their pts from one pass over the packets, which does not decode), up to its last
frame; a container whose timestamps do not allow that (missing or repeated pts, a seek that lands late) is decoded
from the start, the reference the seek is tested against. A file that cannot be opened or decoded, holds no video,
or ends before a frame asked for raises BadVideo naming it and saying why, in one line.
"""
from __future__ import annotations

import io
import math
import os
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch

from .errors import BadInputError
from .images import BadImage, list_files

VIDEO_EXTENSIONS = {".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v"}
RESIZE_MODES = {
    "bicubic": "antialiased bicubic (torch.nn.functional.interpolate), as images.cover_crop's PIL bicubic",
    "area": "area averaging: for downscaling; upscaling repeats pixels",
}
# suffix -> (container format, encoders tried in order)
CONTAINERS = {".mp4": ("mp4", ("libx264", "mpeg4")), ".m4v": ("mp4", ("libx264", "mpeg4")),
              ".mov": ("mov", ("libx264", "mpeg4")), ".mkv": ("matroska", ("libx264", "libvpx-vp9", "mpeg4")),
              ".webm": ("webm", ("libvpx-vp9", "libvpx")), ".avi": ("avi", ("mpeg4",))}
ENCODER_OPTIONS = {"libx264": {"crf": "16", "preset": "medium"},
                   "libvpx-vp9": {"crf": "20", "b": "0", "deadline": "good", "cpu-used": "4"},
                   "libvpx": {"crf": "10", "b": "1M"}}
FIT_CHUNK = 8  # frames resized at once: memory stays a few frames in float32, however long the clip


class BadVideo(BadImage):
    """A video that cannot give the clip asked of it (unreadable, corrupt, too short); the message names the
    file and the reason. A BadImage, so every job that lists bad images and goes on lists these too."""


class VideoInfo(NamedTuple):
    """What the container says of its first video stream, without decoding it."""
    frames: int  # frames in the stream (counted from the packets where the container does not state it)
    fps: float  # average frame rate
    width: int
    height: int
    duration: float  # seconds


def list_videos(folder: str | Path) -> list[Path]:
    """Every video file below `folder` (recursive, by extension: VIDEO_EXTENSIONS), sorted (images.list_files).

    MissingInputError for a missing or video-less folder, BadInputError for a file."""
    return list_files(folder, VIDEO_EXTENSIONS, "video")


IMAGE_BRANDS = {b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"}  # ftyp, not video


def looks_like_video(data: bytes) -> bool:
    """Whether bytes start as a video container does (ISO/QuickTime ftyp or moov/mdat, Matroska/WebM EBML,
    RIFF AVI); HEIF/AVIF images (also ftyp) are not videos."""
    head = bytes(data[:12])
    if head[4:8] == b"ftyp":
        return head[8:12] not in IMAGE_BRANDS
    return head[4:8] in (b"moov", b"mdat", b"wide", b"free") or head[:4] == b"\x1aE\xdf\xa3" or (
        head[:4] == b"RIFF" and head[8:12] == b"AVI ")


# ----------------------------------------------------------------------------- opening and probing
def _label(source, name: Optional[str]) -> str:
    if name is not None:
        return name
    return str(source) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__}>"


def _said(e: BaseException) -> str:
    """What PyAV said, on one line (FFmpeg's words, without the errno and the path the message already names)."""
    return " ".join(f"{type(e).__name__}: {getattr(e, 'strerror', None) or e}".split())


@contextmanager
def _opened(source, name: str):
    """(container, its first video stream) of a path or bytes; BadVideo if it cannot be opened."""
    import av

    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            if not len(source):
                raise BadVideo(f"{name}: empty file (0 bytes)")
            source = io.BytesIO(source)
        elif os.path.getsize(source) == 0:
            raise BadVideo(f"{name}: empty file (0 bytes)")
        container = av.open(source, metadata_errors="ignore")
    except (OSError, av.FFmpegError) as e:  # a missing file, a format FFmpeg does not know, a damaged header
        raise BadVideo(f"{name}: cannot open as a video ({_said(e)})") from e
    try:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise BadVideo(f"{name}: no video stream (streams: {', '.join(kinds)})")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        yield container, stream
    finally:
        container.close()


def _count_packets(container, stream) -> int:
    """Frames of a stream whose container does not state them (webm, mkv): its packets, demuxed, not decoded;
    a damaged tail ends the count."""
    import av

    n = 0
    try:
        for packet in container.demux(stream):
            n += packet.size > 0
    except av.FFmpegError:
        pass
    return n


def probe(source, name: Optional[str] = None) -> VideoInfo:
    """VideoInfo of a path or bytes from the container's header (frame count, rate, duration); where the
    header has no frame count (webm, mkv), the packets are counted, still without decoding. BadVideo if it
    cannot be opened or states no usable frame rate or size. `name`: what errors call it (default: the path)."""
    name = _label(source, name)
    with _opened(source, name) as (container, stream):
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        width, height = stream.codec_context.width, stream.codec_context.height
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        else:
            duration = container.duration / 1_000_000 if container.duration else None
        frames = stream.frames or _count_packets(container, stream)
    if frames < 1:
        raise BadVideo(f"{name}: the video stream holds no frames")
    if not rate and duration:
        rate = Fraction(frames) / Fraction(duration)
    if not rate or width < 1 or height < 1:
        raise BadVideo(f"{name}: the container states no frame rate or size ({width}x{height} at {rate} fps)")
    return VideoInfo(int(frames), float(rate), int(width), int(height), duration or frames / float(rate))


# ----------------------------------------------------------------------------- which frames
def _rate(fps: float) -> Fraction:
    """A frame rate as the fraction it stands for (29.97002997 -> 30000/1001): indices computed exactly."""
    return Fraction(fps).limit_denominator(100_000)


def resampled_frames(info: VideoInfo, fps: Optional[float]) -> int:
    """How many frames the video gives at `fps` (0/None: its own rate)."""
    if not fps:
        return info.frames
    return math.ceil(info.frames * _rate(fps) / _rate(info.fps))


def check_clip_settings(frames: int, fps: Optional[float], stride: Optional[int]) -> None:
    """BadInputError unless frames >= 1 and fps, stride >= 0 (or None)."""
    if frames < 1:
        raise BadInputError(f"a clip needs at least 1 frame, got frames={frames}")
    if (fps or 0) < 0 or (stride or 0) < 0:
        raise BadInputError(f"fps and clip stride must be >= 0 (0: the video's rate, clips end to end), "
                            f"got fps={fps}, stride={stride}")


def plan_clips(info: VideoInfo, frames: int, fps: Optional[float] = None,
               stride: Optional[int] = None) -> list[list[int]]:
    """Source frame indices of every clip of `frames` frames at `fps` (0/None: the video's own rate), clip k
    starting `stride` output frames after clip k-1 (0/None: `frames`, clips end to end). Output frame j is the
    source frame at or before time j / fps. BadVideo (without the file's name, which the caller adds) when not
    even one clip fits, with the figures that say why."""
    check_clip_settings(frames, fps, stride)
    stride = stride or frames
    have = resampled_frames(info, fps)
    if have < frames:
        at = f"{info.fps:g} fps gives {have} frames" + (f" at {fps:g} fps" if fps else "")
        raise BadVideo(f"{info.duration:.1f} s at {at}; a clip needs {frames}")
    step = _rate(info.fps) / _rate(fps) if fps else Fraction(1)
    return [[min(info.frames - 1, math.floor((start + j) * step)) for j in range(frames)]
            for start in range(0, have - frames + 1, stride)]


# ----------------------------------------------------------------------------- decoding
def _presentation_pts(container, stream) -> Optional[list[int]]:
    """Every packet's pts in presentation order (one pass over the packets, no decoding); None when some
    packet has none or two share one, so that a frame cannot be told by its pts."""
    pts = []
    for packet in container.demux(stream):
        if packet.size:
            if packet.pts is None:
                return None
            pts.append(packet.pts)
    pts.sort()
    return pts if len(set(pts)) == len(pts) else None


def _decode_from_keyframe(container, stream, wanted: list[int], take) -> bool:
    """Seek to the keyframe at or before frame wanted[0], decode up to wanted[-1], `take` the wanted frames
    (each told by its pts). False when the timestamps do not allow it; what was taken was right."""
    pts = _presentation_pts(container, stream)
    if pts is None or len(pts) <= wanted[-1]:
        return False
    index = {p: k for k, p in enumerate(pts)}
    todo = set(wanted)
    for back in (0, 16):  # a container may index keyframes by dts: land a little earlier when it lands late
        container.seek(pts[max(0, wanted[0] - back)], stream=stream, backward=True, any_frame=False)
        for n, frame in enumerate(container.decode(stream)):
            k = index.get(frame.pts)
            if k is None:
                return False
            if n == 0 and k > wanted[0]:
                break  # landed after the first frame wanted
            if k in todo:
                take(k, frame)
                todo.discard(k)
                if not todo:
                    return True
        else:
            return False  # the frames ran out first
    return False


def decode_into(source, indices: Sequence[int], take: Callable, name: Optional[str] = None, seek: bool = True) -> None:
    """`take(k, av.VideoFrame)` for every distinct frame k of `indices`, in increasing k (see the module
    docstring for how frames are found; after a seek abandoned midway, rare, a k comes again: keep the later).
    BadVideo naming the file if it cannot be decoded or ends before one."""
    import av

    name = _label(source, name)
    wanted = sorted(set(int(k) for k in indices))
    if not wanted:
        return
    if wanted[0] < 0:
        raise BadInputError(f"{name}: frame indices must be >= 0, got {wanted[0]}")
    if seek and wanted[0] > 0:
        try:
            with _opened(source, name) as (container, stream):
                if _decode_from_keyframe(container, stream, wanted, take):
                    return
        except av.FFmpegError:
            pass  # decoded from the start below, which says what is wrong
    count = -1
    try:
        with _opened(source, name) as (container, stream):  # from the start, counting frames
            todo = iter(wanted)
            k = next(todo)
            for count, frame in enumerate(container.decode(stream)):
                if count == k:
                    take(k, frame)
                    k = next(todo, None)
                    if k is None:
                        return
    except av.FFmpegError as e:
        raise BadVideo(f"{name}: cannot decode frame {count + 1} ({_said(e)})") from e
    raise BadVideo(f"{name}: the video ends after {count + 1} frames; frame {k} was asked for")


def read_frames(source, indices: Sequence[int], name: Optional[str] = None, seek: bool = True) -> np.ndarray:
    """uint8 (T, H, W, 3) RGB: frame indices[t] of a path or bytes at position t (an index may repeat).
    `seek=False` decodes from the start (the reference; for a container whose timestamps mislead)."""
    got: dict[int, np.ndarray] = {}
    decode_into(source, indices, lambda k, frame: got.__setitem__(k, frame.to_ndarray(format="rgb24")), name, seek)
    return np.stack([got[int(k)] for k in indices])


# ----------------------------------------------------------------------------- fitting to a size
def cover_geometry(size: tuple[int, int], target: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """((rh, rw), (top, left)): the size (h, w) `size` is resized to so it covers `target` = (H, W), and
    where the centre crop starts in it; images.cover_crop's rule, so frames and images are fitted alike."""
    (h, w), (H, W) = size, target
    scale = max(W / w, H / h)
    rh, rw = max(H, round(h * scale)), max(W, round(w * scale))
    return (rh, rw), ((rh - H) // 2, (rw - W) // 2)


def _fit(x: torch.Tensor, target: tuple[int, int], mode: str) -> torch.Tensor:
    """uint8 (t, h, w, 3) -> uint8 (t, 3, H, W), resized in float32 to cover `target`, centre cropped."""
    (rh, rw), (top, left) = cover_geometry(tuple(x.shape[1:3]), target)
    x = x.permute(0, 3, 1, 2)
    if (rh, rw) != tuple(x.shape[2:]):
        y = torch.nn.functional.interpolate(x.float(), size=(rh, rw), mode=mode, antialias=mode == "bicubic",
                                            **({"align_corners": False} if mode == "bicubic" else {}))
        x = y.round_().clamp_(0, 255).to(torch.uint8)
    return x[:, :, top:top + target[0], left:left + target[1]]


def check_resize_mode(mode: str) -> None:
    if mode not in RESIZE_MODES:
        raise BadInputError(f"unknown resize mode {mode!r}; valid choices: {', '.join(RESIZE_MODES)}")


def fit_clip(frames, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """uint8 (T, h, w, 3) frames (numpy or torch) -> uint8 (3, T, H, W): every frame resized alike (`mode`, a key
    of RESIZE_MODES) so it covers `size` = (H, W), then centrally cropped to it; a few frames at a time."""
    check_resize_mode(mode)
    x = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"fit_clip takes uint8 (T, H, W, 3) frames, got {x.dtype} {tuple(x.shape)}")
    H, W = size
    out = torch.empty((3, x.shape[0], H, W), dtype=torch.uint8)
    for a in range(0, x.shape[0], FIT_CHUNK):
        out[:, a:a + FIT_CHUNK] = _fit(x[a:a + FIT_CHUNK], (H, W), mode).permute(1, 0, 2, 3)
    return out


def nearest_size(size: tuple[int, int], sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The (H, W) of `sizes` whose aspect ratio is nearest that of a video of `size` = (h, w) (log space; ties:
    the larger, then the wider), as preprocess.nearest_bucket picks images' buckets."""
    from .preprocess import nearest_bucket

    w, h = nearest_bucket((size[1], size[0]), [(W, H) for H, W in sizes])
    return h, w


# ----------------------------------------------------------------------------- writing
def _encoder(suffix: str, codec: Optional[str]) -> tuple[str, str]:
    import av

    if suffix not in CONTAINERS:
        raise BadInputError(f"cannot write a video as {suffix or 'a file without a suffix'}; "
                            f"valid suffixes: {', '.join(sorted(CONTAINERS))}")
    fmt, tried = CONTAINERS[suffix]
    for name in ([codec] if codec else tried):
        try:
            av.Codec(name, "w")
            return fmt, name
        except (av.FFmpegError, ValueError):
            continue
    raise BadInputError(f"no encoder for {suffix} in this PyAV build (tried {', '.join([codec] if codec else tried)})")


def write_video(path: str | Path, frames, fps: float, codec: Optional[str] = None,
                keyframe_every: Optional[int] = None) -> Path:
    """Write uint8 (T, H, W, 3) RGB frames as a video of `fps` frames per second, the container and codec from
    the suffix (CONTAINERS: h264 where PyAV has libx264, else mpeg4; vp9 for webm) unless `codec` names the
    encoder; `keyframe_every`: the GOP length (default: the encoder's). Atomic (fsutil.atomic_write)."""
    import av

    from .fsutil import atomic_write

    path = Path(path)
    a = np.asarray(frames.cpu() if isinstance(frames, torch.Tensor) else frames)
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3 or not len(a):
        raise ValueError(f"write_video takes uint8 (T, H, W, 3) frames, got {a.dtype} {a.shape}")
    fmt, name = _encoder(path.suffix.lower(), codec)
    h, w = a.shape[1:3]

    def write(f):
        with av.open(f, "w", format=fmt) as container:
            stream = container.add_stream(name, rate=_rate(fps), options=ENCODER_OPTIONS.get(name, {}))
            stream.width, stream.height = w, h
            stream.pix_fmt = "yuv444p" if name == "libx264" and (w % 2 or h % 2) else "yuv420p"
            if name == "mpeg4":
                stream.bit_rate = int(4 * w * h * fps)
            if keyframe_every:
                stream.codec_context.gop_size = int(keyframe_every)
            for frame in a:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())

    atomic_write(path, write)
    return path
