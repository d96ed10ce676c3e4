"""`latentvae encode` and `latentvae decode`: the latent cache's options."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from .common import DATA_HELP, PRECISION_HELP, VAE_HELP, DataKind, Precision, _check_tile_size, _positive
from .fields import REQUIRED, OptionError, opt, parse_size


def resolution_hw(value: Union[int, str]) -> tuple[int, int]:
    """--resolution as (H, W): N is N x N, "HxW" (or "H,W") is H x W (fields.parse_size)."""
    return parse_size(value, "--resolution")


@dataclass(frozen=True)
class EncodeOptions:
    """Encode an image or video folder or a `datasets` dataset to a resumable parquet cache of latents
    (`accelerate launch -m latentvae encode ...` for several processes). Video data (video files, or a
    --video-column) is cut into clips of --frames frames at --fps, one row per clip (docs/encode.md, Videos)."""
    vae: str = opt(REQUIRED, VAE_HELP)
    data: str = opt(REQUIRED, DATA_HELP)
    out: str = opt(REQUIRED, "cache folder: new, empty, or an earlier cache of the same settings (resumed)")
    data_kind: DataKind = opt("auto", "what --data is (auto: from the path)")
    split: str = opt("train", "split of a `datasets` input")
    image_column: str = opt("image", "image column of a `datasets` input")
    video_column: str = opt("video", "video column of a `datasets` input (video data)")
    limit: int = opt(0, "only the first N inputs (0: all); rerun with a larger N to encode the next ones")
    preprocess: Literal["center-crop", "buckets", "crops"] = opt(
        "center-crop", "resize and crop mode: center-crop, buckets (aspect-ratio buckets), crops (--crops random "
                       "squares per image)")
    resolution: Union[int, str] = opt(256, "square side, a multiple of the VAE's downsampling factor; aspect buckets "
                                           "hold about its square; video data: N or HxW (e.g. 480x832)")
    max_aspect: float = opt(2.0, "widest bucket aspect ratio")
    crops: int = opt(16, "--preprocess crops: random resolution x resolution crops per image (seeded by --seed)")
    crop_scale: int = opt(0, "--preprocess crops: resize each image's short side to this first (0: native size)")
    flip: bool = opt(False, "also store a horizontally flipped copy of every image (or clip)")
    frames: int = opt(0, "video data: frames per clip, 1 + k times the VAE's frame step (0: 49, which every video "
                         "family takes)")
    fps: float = opt(0.0, "video data: frames per second clips are resampled to (0: each video's own)")
    clip_stride: int = opt(0, "video data: output frames from one clip's start to the next's (0: --frames, clips "
                              "end to end)")
    tiling: bool = opt(False, "video data: encode in the VAE class's own tiles (vae.enable_tiling(); in time too "
                              "where diffusers does: LTX-2 framewise): memory bounded by the tile, not the clip")
    tile_size: int = opt(0, "with --tiling: tile side in pixels (0: the model's own)")
    store: Literal["mean", "moments", "sample"] = opt("mean", "latent columns of each row")
    dtype: Literal["fp16", "bf16", "fp32"] = opt("fp16", "stored dtype of the latents")
    shard_size: int = opt(1000, "rows per parquet shard")
    batch_size: int = opt(0, "images per encoder call; 0: suited to the device (CPU: 1 of 256x256, as many pixels at "
                             "other sizes; GPU: 64 of 256x256 to start, halved on an out-of-memory error)")
    num_workers: int = opt(-1, "DataLoader workers decoding images; -1: none when encoding on the CPU (decoding is "
                                   "a small part of the time there), else one fewer than the CPU cores, at most 4")
    mixed_precision: Precision = opt("auto", PRECISION_HELP)
    channels_last: Optional[bool] = opt(None, "channels-last memory format of the encoder (auto: yes)")
    weights_dtype: Literal["auto", "fp32", "bf16", "fp16"] = opt(
        "auto", "dtype of the encoder's weights; bf16/fp16 run it in pure half precision without autocast (the "
                "moments stay fp32); auto: the half dtype --mixed-precision resolves to (fp16 only for VAEs without "
                "force_upcast), else fp32")
    compile: bool = opt(False, "torch.compile the encoder (pays off only on large datasets: docs/encode.md, Speed)")
    jpeg_draft: bool = opt(True, "decode JPEGs at a reduced DCT scale that still covers the target")
    max_image_pixels: int = opt(100_000_000, "larger images are recorded as failures")
    seed: int = opt(0, "noise of --store sample, rows checked by --verify")
    verify: bool = opt(False, "then decode 8 random rows and report their PSNR (= latentvae decode OUT)")
    progress: bool = opt(True, "progress bar")

    def check(self) -> None:
        _positive(shard_size=self.shard_size)
        _positive(**{"resolution": min(resolution_hw(self.resolution))})
        if self.frames < 0 or self.fps < 0 or self.clip_stride < 0:
            raise OptionError(f"--frames, --fps and --clip-stride must be >= 0 (0: the default), got {self.frames}, "
                              f"{self.fps:g}, {self.clip_stride}")
        _check_tile_size(self.tiling, self.tile_size)
        if self.batch_size < 0:
            raise OptionError(f"--batch-size must be >= 0 (0: suited to the device), got {self.batch_size}")
        if self.limit < 0:
            raise OptionError(f"--limit must be >= 0, got {self.limit}")
        if self.max_aspect < 1:
            raise OptionError(f"--max-aspect must be >= 1, got {self.max_aspect}")
        if self.preprocess == "crops" and self.crops < 1:
            raise OptionError(f"--crops must be >= 1 with --preprocess crops, got {self.crops}")
        if self.crop_scale < 0:
            raise OptionError(f"--crop-scale must be >= 0 (0: native size), got {self.crop_scale}")


@dataclass(frozen=True)
class DecodeOptions:
    """Decode random rows of a latent cache; PSNR against the source images preprocessed the same way."""
    cache: str = opt(REQUIRED, "folder written by `latentvae encode` (with manifest.json)", positional=True,
                     metavar="CACHE")
    vae: Optional[str] = opt(None, "the VAE (default: the one in the manifest; its weights must match)")
    data: Optional[str] = opt(None, "the images the cache was encoded from, where they are now (default: where the "
                                    "manifest says, or beside the cache as they were)")
    limit: int = opt(8, "rows to decode")
    seed: int = opt(0, "which rows")
    out: Optional[str] = opt(None, "write source | decoded PNG pairs into this folder")
    min_psnr: Optional[float] = opt(None, "exit 1 if the mean PSNR is below this")
    tiling: bool = opt(False, "diffusers' tiled decode (vae.enable_tiling()): memory bounded by the tile, for "
                              "latents of large images")
    tile_size: int = opt(0, "with --tiling: tile side in pixels (0: the model's own)")

    def check(self) -> None:
        _positive(limit=self.limit)
        _check_tile_size(self.tiling, self.tile_size)
