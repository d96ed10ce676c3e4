"""Video data in the encode cache: clips of a video VAE as the cache's inputs, one row per clip.

    if is_video_job(opts):                                # video files, or a dataset with a --video-column
        pre = clip_preprocess(opts, lv)                   # --frames / --resolution / options against the VAE
        src, passthrough = open_clip_inputs(opts, pre)    # video_sources.ClipSource: one input per clip
        PreprocessedClips(src, indices, pre)[k]           # {"pixels": uint8 (3, T, H, W), ...} or the reason

Everything else is the images' machinery (encode.py, update.py, writer.py): a clip is one input keyed
`rel/path.mp4#clipK` with its video's identity (size, mtime, sha256 of the bytes), so exactly-once after
kill -9, resume, update in place (a changed video: all its clips re-encoded; a longer one: new clips), failure
logs and manifest generations carry over. A video that gives no clip (too short, unreadable, corrupt) is one
input whose failure lists the reason; a clip that does not fit in memory is a failure naming --tiling (and
tried again on the next run: writer.FailureLog `retry`).

The clip rule: a video VAE decodes 1 + step*k frames to themselves (lv.layout.frame_step: Wan and HunyuanVideo
1.5 4, LTX-2 8, CogVideoX 8: its decoder pairs latent frames after the first, so T' must be odd; the cited
diffusers lines in lv.family.frames_cite); T' = 1 + (T - 1) / temporal. --frames off the rule is refused with
the two nearest valid lengths; --resolution (N or HxW) off lv.layout.multiple with the nearest valid sides.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch

from ..errors import BadInputError
from ..images import BadImage
from ..options import EncodeOptions
from ..options.cache import resolution_hw

DEFAULT_FRAMES = 49  # 1 + 48: a valid clip length for every video family's rule (steps 4 and 8)
IMAGE_ONLY = ("crop_scale", "max_image_pixels")  # options of images only: refused for clips unless left at the default


@dataclass(frozen=True)
class ClipPreprocess:
    """What happens to every clip before encoding; recorded in encode-settings.json and the manifest."""
    mode: str  # center-crop (every clip resize + centre crop to `size`) or buckets (the size nearest its aspect)
    size: tuple[int, int]  # (H, W); buckets: the size whose area the buckets hold
    frames: int  # T, 1 + frame_step * k
    fps: float  # 0: each video's own rate
    clip_stride: int  # output frames between clip starts
    factor: int  # every side a multiple of it (lv.layout.multiple)
    temporal: int  # the VAE's temporal factor: T' = 1 + (T - 1) // temporal
    frame_step: int
    max_aspect: float = 2.0
    flip: bool = False  # refused for clips (clip_preprocess)
    resize: str = "bicubic"  # videos.RESIZE_MODES
    buckets: tuple[tuple[int, int], ...] = field(default=())  # (H, W) of each size (buckets mode)
    video = True  # (a class attribute, not a field: what build_manifest asks)

    def target_size(self, info) -> tuple[int, int]:
        """(H, W) a clip of a video of VideoInfo `info` is stored at."""
        if self.mode != "buckets":
            return self.size
        from ..videos import nearest_size

        return nearest_size((info.height, info.width), list(self.buckets))

    @property
    def latent_frames(self) -> int:
        return 1 + (self.frames - 1) // self.temporal

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"], d["buckets"] = list(self.size), [list(b) for b in self.buckets]
        return d

    def manifest_entry(self, lv_family) -> dict:
        """The manifest's `video`: the clip rule (with its cited lines), length, rate, sizes, temporal factor."""
        return {"frames": self.frames, "latent_frames": self.latent_frames, "fps": self.fps or None,
                "fps_rule": "resampled to fps: output frame j is the source frame at or before j / fps" if self.fps
                else "each video's own rate", "clip_stride": self.clip_stride, "resolution": list(self.size),
                "mode": self.mode, "temporal_factor": self.temporal, "frame_step": self.frame_step,
                "clip_rule": f"1 + {self.frame_step}k frames -> 1 + (T - 1) / {self.temporal} latent frames",
                "clip_rule_cite": lv_family.frames_cite, "latent_layout": "(C, T', H', W')"}


# ----------------------------------------------------------------------------- checks
def is_video_job(opts: EncodeOptions) -> bool:
    """--data holds videos (video_sources.is_video_data: video files and no images, or a video column)."""
    from ..video_sources import is_video_data

    return is_video_data(opts.data, opts.data_kind, opts.video_column, opts.split)


def image_options(opts: EncodeOptions) -> EncodeOptions:
    """Image data: the video-only options refused in one line; --resolution as the int side images take."""
    from dataclasses import replace

    given = [f for f, v in (("--frames", opts.frames), ("--fps", opts.fps), ("--clip-stride", opts.clip_stride),
                            ("--tiling", opts.tiling)) if v]
    if given:
        raise BadInputError(f"{', '.join(given)}: for video data, but --data {opts.data} holds images (a folder with "
                            "video files and no images, or a dataset with a --video-column, is video data; images "
                            "encode whole: a smaller --batch-size bounds their memory)")
    h, w = resolution_hw(opts.resolution)
    if h != w:
        raise BadInputError(f"--resolution {opts.resolution}: images take a square side (--preprocess buckets for "
                            "aspect ratios about its area); HxW is for video data")
    return replace(opts, resolution=h)


def _nearest_side(n: int, m: int) -> str:
    lo = n - n % m
    return f"{lo} or {lo + m}" if lo else f"{m}"


def clip_preprocess(opts: EncodeOptions, lv) -> ClipPreprocess:
    """The clip settings of `opts` checked against the video VAE `lv` (vae/loaded.LoadedVae), each mistake in one
    line: an image VAE, --frames off its clip rule (the two nearest valid lengths and the rule's source), a
    side off its spatial multiple (the nearest valid sides), options that make no sense for clips."""
    lv.require("encode-video", f"--vae {opts.vae}")
    layout, fam = lv.layout, lv.family
    frames = opts.frames or DEFAULT_FRAMES
    if not layout.frames_ok(frames):
        lo, hi = layout.nearest_frames(frames)
        near = f"{lo} or {hi}" if lo != hi else f"{lo}"
        raise BadInputError(f"--frames {frames}: {lv.class_name} ({fam.name}) takes clips of 1 + {layout.frame_step}k "
                            f"frames ({fam.frames_cite}); use {near}")
    h, w = resolution_hw(opts.resolution)
    m = layout.multiple
    bad = [(what, n) for what, n in (("height", h), ("width", w)) if n % m]
    if bad:
        sides = "; ".join(f"{what} {n}: use {_nearest_side(n, m)}" for what, n in bad)
        raise BadInputError(f"--resolution {opts.resolution}: {lv.class_name}'s sides must be multiples of {m} (its "
                            f"spatial factor) ({sides})")
    refused = [("--preprocess crops", opts.preprocess == "crops"), ("--flip", opts.flip),
               *((f"--{f.name.replace('_', '-')}", getattr(opts, f.name) != f.default) for f in fields(opts)
                 if f.name in IMAGE_ONLY)]
    refused = [flag for flag, given in refused if given]
    if refused:
        raise BadInputError(f"{', '.join(refused)}: options of image data, but --data {opts.data} holds videos "
                            "(clips take --preprocess center-crop or buckets; flip the videos themselves to augment)")
    buckets = ()
    if opts.preprocess == "buckets":
        from ..preprocess import make_buckets

        side = max(m, round((h * w) ** 0.5 / m) * m)
        buckets = tuple((bh, bw) for bw, bh in make_buckets(side, m, opts.max_aspect))
    return ClipPreprocess(opts.preprocess, (h, w), frames, float(opts.fps), opts.clip_stride or frames, m,
                          layout.temporal, layout.frame_step, opts.max_aspect, False, buckets=buckets)


def open_clip_inputs(opts: EncodeOptions, pre: ClipPreprocess):
    """(video_sources.ClipSource, passthrough or None): a folder's captions and metadata, or a dataset's other
    columns, one row per clip (its video's)."""
    from ..video_sources import ClipSource, open_video_source
    from .schema import OWN_COLUMNS

    videos = open_video_source(opts.data, opts.data_kind, opts.split, opts.video_column)
    src = ClipSource(videos, pre.frames, pre.fps, pre.clip_stride)
    rest = src.passthrough()
    if rest is not None:
        clash = [c for c in rest.column_names if c in OWN_COLUMNS]
        if clash:
            raise BadInputError(f"{opts.data}: columns {clash} clash with the cache's own columns "
                                f"({', '.join(OWN_COLUMNS)})")
    return src, rest


# ----------------------------------------------------------------------------- rows
class PreprocessedClips(torch.utils.data.Dataset):
    """Item k: clip `indices[k]` decoded and fitted, or the reason it could not be (in a DataLoader worker)."""

    def __init__(self, src, indices: list[int], pre: ClipPreprocess):
        self.src, self.indices, self.pre = src, indices, pre

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        i = self.indices[k]
        try:
            pixels, info = self.src.load_clip(i, self.pre.target_size(self.src.info(i)))
        except BadImage as e:  # videos.BadVideo
            try:
                identity = self.src.stat_identity(i)  # a rerun retries it once this changes
            except OSError:
                identity = None
            return {"index": i, "error": str(e), "identity": identity}
        key = self.src.relative_name(i)
        return {"index": i, "pixels": pixels, "identity": info["identity"], "original_size": info["original_size"],
                "crop_top_left": info["crop_top_left"], "frame_indices": info["frame_indices"], "fps": info["fps"],
                "video_key": key[:key.rindex("#clip")], "clip_index": int(key[key.rindex("#clip") + 5:]),
                "source_fps": self.src.info(i).fps}


def clip_values(rows: list[dict]) -> dict[str, list]:
    """The VIDEO_COLUMNS of encoded clip rows (schema.py)."""
    return {c: [r[c] for r in rows] for c in ("video_key", "clip_index", "frame_indices", "fps", "source_fps")}


def clip_items(src, indices: list[int], pre: ClipPreprocess, requested: int, device, log):
    """(batch size, the PreprocessedClips of `indices`, skip(row)): encode.encode_share's clip inputs. The batch
    size: as requested, or the device's pixel budget over a clip's T * H * W (one clip on the CPU); `skip` lists
    a clip that ran out of memory in `log` (writer.FailureLog) to be tried again on the next run."""
    from .encoder import resolve_batch_size

    h, w = pre.size
    batch_size = resolve_batch_size(requested, device, 0, pre.frames * h * w)

    def skip(row: dict) -> None:
        i = row["index"]
        log.add(i, src.name(i), out_of_memory_reason(src, row, device), src.relative_name(i), src.stat_identity(i),
                retry=True)

    return batch_size, PreprocessedClips(src, indices, pre), skip


def out_of_memory_reason(src, row: dict, device) -> str:
    """The failure of a clip that does not fit in memory at one clip a call."""
    _, t, h, w = row["pixels"].shape
    return (f"{src.name(row['index'])}: out of memory encoding this clip ({t} frames at {h}x{w}) on {device}; "
            "use --tiling (memory bounded by the tile; --tile-size smaller), or a smaller --resolution or --frames "
            "(it is tried again on the next run)")
