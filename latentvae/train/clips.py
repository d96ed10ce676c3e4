"""Clips: a video VAE's decoder fine-tuned on clips of a folder of videos (or a `datasets` video column).

    if clip_data(cfg.data): stream, val = clip_sources(cfg, lv)       # item k: a (3, T, H, W) clip in [-1, 1]
    cut = draw_cut(cfg, lv_layout_factor, x)                           # per micro-batch: latent tile, frames
    x_hat = ae(x, tile=cut.tile); loss on fold(cut.pixels(x)), fold(x_hat)

The data: `data.frames` frames per clip (the VAE's clip rule: 1 + step*k, checked against the loaded VAE by
`check_clips`), resampled to `data.fps`, a clip every `data.clip_stride` frames of each video, every frame
resized to cover `data.frame_size` (H x W, multiples of the VAE's spatial factor) and center cropped
(latentvae.video_sources.ClipSource); a random horizontal flip of the whole clip with `data.flip`. Item k of
the stream is a pure function of (seed, k), as for images (data.py), so a resumed run sees the same clips. A
video that gives no clip (too short, unreadable) is skipped and listed, the next clip of the permutation
taking its place. Validation holds aside the clips of `data.val_count` whole videos (by a hash of their
names), so no training clip shares a frame with a validation clip.

Memory: the encoder is frozen, so the clip is encoded without autograd (model.tiling: the class's own
spatial+temporal tiling); the decoder trains on the whole latent or on a random `data.latent_tile` square of
it (every latent frame), against the matching pixel window; LPIPS and the GAN term see `loss.lpips_frames`
random frames of each clip (frames folded into the batch). No KL term: the encoder does not train.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import Config, ConfigError, DataConfig, frame_size
from ..errors import MissingInputError
from ..images import BadImage
from ..vae.families import NO_VIDEO_FULL, FamilyCannot
from .data import PermutedStream


# ----------------------------------------------------------------------------- which data
def clip_data(d: DataConfig) -> bool:
    """Whether data.source holds videos (then the run trains on clips)."""
    from ..video_sources import is_video_data

    return bool(is_video_data(d.source, d.kind, d.video_column))


def check_clips(cfg: Config, lv, label: str, video: bool) -> None:
    """The clip options against the loaded VAE (`lv`), before any data is read: one line naming the key."""
    d, lo, m = cfg.data, cfg.loss, cfg.model
    if not video:
        if d.frames:
            raise ConfigError(f"data.frames={d.frames}: data.source={d.source} holds no videos (clips need a folder "
                              f"of video files or a `datasets` column data.video_column={d.video_column}); set "
                              "data.frames=0 to train on its images")
        return
    fam, layout = lv.family, lv.layout
    fam.require("train-decoder-video", label)
    if not m.train_decoder_only:
        raise FamilyCannot(f"{label}: {fam.class_name} ({fam.name} family) cannot be fine-tuned in full on clips: "
                           f"{NO_VIDEO_FULL}")
    if not d.frames:
        raise ConfigError(f"data.frames: data.source={d.source} holds videos; set the frames per clip "
                          f"({label} takes 1 + {layout.frame_step}k: e.g. {1 + layout.frame_step}, "
                          f"{1 + 2 * layout.frame_step})")
    if not layout.frames_ok(d.frames):
        lo_n, hi_n = layout.nearest_frames(d.frames)
        raise ConfigError(f"data.frames={d.frames}: {label} ({fam.class_name}) takes clips of 1 + {layout.frame_step}k "
                          f"frames; the nearest are {lo_n} and {hi_n}")
    h, w = frame_size(d)
    if h % layout.multiple or w % layout.multiple:
        key = "data.frame_size" if d.frame_size else "data.resolution"
        raise ConfigError(f"{key}: {h}x{w} frames must be multiples of the spatial factor {layout.multiple} of "
                          f"{label} ({fam.class_name})")
    if lo.equivariance_weight > 0:
        raise ConfigError("loss.equivariance_weight: EQ-VAE's transforms are built for images; set it 0 to train "
                          "on clips")
    if d.latent_tile and lo.lpips_weight > 0 and d.latent_tile * layout.factor < 32:
        raise ConfigError(f"data.latent_tile={d.latent_tile} gives {d.latent_tile * layout.factor}-px tiles "
                          f"(x{layout.factor}); LPIPS needs 32 px at least: a larger tile or loss.lpips_weight=0")
    if lo.lpips_frames > d.frames:
        raise ConfigError(f"loss.lpips_frames={lo.lpips_frames} exceeds data.frames={d.frames}")


# ----------------------------------------------------------------------------- sources
class ClipSubset:
    """The clips `indices` of a ClipSource (their order kept)."""

    def __init__(self, clips, indices: list[int]):
        self.clips, self.indices = clips, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def name(self, i: int) -> str:
        return self.clips.name(self.indices[i])

    def load_clip(self, i: int, size: tuple[int, int]):
        return self.clips.load_clip(self.indices[i], size)


def _clip_source(d: DataConfig, source: str):
    from ..video_sources import ClipSource, open_video_source

    videos = open_video_source(source, d.kind, d.split, d.video_column)
    return videos, ClipSource(videos, d.frames, d.fps or None, d.clip_stride or None)


def hold_aside(videos, clips, count: int, source: str) -> tuple[ClipSubset, ClipSubset]:
    """(train, val): the clips of `count` whole videos (chosen by a hash of their names) for validation."""
    every = list(range(len(clips)))
    if count <= 0:
        return ClipSubset(clips, every), ClipSubset(clips, [])
    if count >= len(videos):
        raise MissingInputError(f"data.source={source}: cannot hold aside data.val_count={count} of its "
                                f"{len(videos)} video(s) for validation; set data.val_count lower, or data.val_source")
    order = sorted(range(len(videos)), key=lambda v: hashlib.sha1(videos.name(v).encode()).hexdigest())
    val_videos = set(order[:count])
    return (ClipSubset(clips, [i for i in every if clips.video(i) not in val_videos]),
            ClipSubset(clips, [i for i in every if clips.video(i) in val_videos]))


def clip_sources(d: DataConfig):
    """(train, val) clip sources from the data config."""
    videos, clips = _clip_source(d, d.source)
    if d.val_source:
        _, val = _clip_source(d, d.val_source)
        return ClipSubset(clips, list(range(len(clips)))), ClipSubset(val, list(range(len(val))))
    return hold_aside(videos, clips, d.val_count, d.source)


class ClipStream(PermutedStream):
    """Item k: clip perm_{k // N}[k % N] as (3, T, H, W) float in [-1, 1], flipped at random with data.flip;
    a clip that cannot be read is replaced by the next one of the permutation and listed in "bad"."""
    what = "clips"

    def __init__(self, src: ClipSubset, cfg: DataConfig, seed: int):
        super().__init__(src, cfg, seed)
        self.size = frame_size(cfg)

    def read(self, i: int) -> torch.Tensor:
        return self.src.load_clip(i, self.size)[0]  # uint8 (3, T, H, W)

    def augment(self, clip: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        x = clip.float() / 127.5 - 1
        return x.flip(-1) if self.cfg.flip and bool(torch.rand((), generator=g) < 0.5) else x


def load_val_clips(src: ClipSubset, size: tuple[int, int], count: int) -> tuple[torch.Tensor, list[str]]:
    """The first `count` readable validation clips, uint8 (N, 3, T, H, W), and the skip messages."""
    xs, bad = [], []
    for i in range(len(src)):
        if len(xs) >= count:
            break
        try:
            xs.append(src.load_clip(i, size)[0])
        except BadImage as e:
            bad.append(str(e))
    if not xs:
        return torch.empty(0, 3, 0, *size, dtype=torch.uint8), bad
    return torch.stack(xs), bad


# ----------------------------------------------------------------------------- what one step trains on
def fold(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) clips -> (B*T, C, H, W) frames (frame t of clip b at b*T + t)."""
    return x.transpose(1, 2).flatten(0, 1)


@dataclass(frozen=True)
class Cut:
    """What a micro-batch of clips trains on: a latent window (top, left, height, width; None: all of it) at
    `factor` pixels per latent pixel, and the folded frames LPIPS and the GAN see (None: every frame)."""
    factor: int
    tile: Optional[tuple[int, int, int, int]] = None
    frames: Optional[torch.Tensor] = None

    def latent(self, z: torch.Tensor) -> torch.Tensor:
        if self.tile is None:
            return z
        top, left, h, w = self.tile
        return z[..., top:top + h, left:left + w]

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        if self.tile is None:
            return x
        top, left, h, w = (v * self.factor for v in self.tile)
        return x[..., top:top + h, left:left + w]

    def perceptual(self, frames: torch.Tensor) -> torch.Tensor:
        """The folded frames LPIPS and the GAN see."""
        return frames if self.frames is None else frames[self.frames.to(frames.device)]


def draw_cut(cfg: Config, factor: int, x: torch.Tensor) -> Cut:
    """The latent tile and the perceptual frames of a micro-batch of clips (B, 3, T, H, W), drawn from torch's
    global generator (saved in every checkpoint and restored on resume, so a resumed run draws the same)."""
    b, _, t, h, w = x.shape
    tile, frames, n = None, None, cfg.data.latent_tile
    lh, lw = h // factor, w // factor
    if n and (n < lh or n < lw):
        th, tw = min(n, lh), min(n, lw)
        top, left = (int(torch.randint(0, s - k + 1, (1,))) for s, k in ((lh, th), (lw, tw)))
        tile = (top, left, th, tw)
    k = cfg.loss.lpips_frames
    if k and k < t and (cfg.loss.lpips_weight > 0 or cfg.loss.gan):
        frames = torch.cat([c * t + torch.randperm(t)[:k].sort().values for c in range(b)])
    return Cut(factor, tile, frames)
