"""Preprocessing for latent caches and calibration: one image -> the exact pixels a diffusion trainer sees.

Three modes (keys of PREPROCESS_MODES):
  center-crop  resize so the short side is `resolution`, central resolution x resolution crop;
  buckets      aspect-ratio buckets: several (width, height) of about resolution^2 pixels, sides
               multiples of the VAE factor; each image goes to the bucket nearest its aspect ratio
               (in log space), is resized to cover it and centrally cropped (NovelAI / SDXL style);
  crops        `crops` seeded random resolution x resolution crops of each image, after resizing
               its short side to `crop_scale` (0: native size); many small training examples from
               few large photographs (the diffusion probe's data). The source is a
               sources.CropSource: one input per crop, keyed `PATH#cropK`.

    pre = Preprocess("buckets", resolution=256, factor=8)
    size = pre.target_size(img.size)           # (W, H) of the bucket, before decoding the pixels
    row = load_preprocessed(src, i, pre, draft=True)   # uint8 (3, H, W) + SDXL size/crop metadata

`target_size` needs only the image size, so JPEGs can be decoded in draft mode at a reduced
scale that still covers the target (images.load_rgb(..., draft_size=size)).
"""
from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch
from PIL import Image

from .errors import BadInputError
from .images import BadImage, cover_crop, load_rgb, oriented_size

PREPROCESS_MODES = {
    "center-crop": "resize the short side to resolution, central square crop",
    "buckets": "aspect-ratio buckets of about resolution^2 pixels, nearest aspect, resize to cover + center crop",
    "crops": "N seeded random resolution^2 crops per image after resizing its short side to crop_scale (0: native)",
}


def make_buckets(resolution: int, factor: int, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(W, H) pairs with W*H <= resolution^2, sides multiples of `factor`, aspect within
    [1/max_aspect, max_aspect]; for each width the tallest height that fits, sorted by aspect."""
    if resolution % factor:
        raise BadInputError(f"resolution {resolution} is not a multiple of the VAE factor {factor}")
    if max_aspect < 1:
        raise BadInputError(f"max_aspect must be >= 1, got {max_aspect}")
    area = resolution * resolution
    out = set()
    for w in range(factor, int(resolution * math.sqrt(max_aspect)) + factor, factor):
        h = (area // w) // factor * factor
        if h < factor:
            continue
        for bw, bh in ((w, h), (h, w)):  # symmetric: portrait and landscape
            if 1 / max_aspect <= bw / bh <= max_aspect:
                out.add((bw, bh))
    return sorted(out, key=lambda s: s[0] / s[1])


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log space) to that of `size` = (w, h);
    ties go to the larger area, then the wider bucket."""
    w, h = size
    r = math.log(w / h)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - r), -b[0] * b[1], -b[0]))


@dataclass(frozen=True)
class Preprocess:
    """What happens to every image before encoding; recorded in the manifest as asdict(self)."""
    mode: str = "center-crop"
    resolution: int = 256
    factor: int = 8  # the VAE's downsampling factor; every side is a multiple of it
    max_aspect: float = 2.0  # buckets only
    flip: bool = False  # also store a horizontally flipped copy of every image
    buckets: tuple[tuple[int, int], ...] = field(default=())  # filled in from the above
    crops: int = 0  # crops only: crops per image
    crop_scale: int = 0  # crops only: short side the image is resized to before cropping (0: native)
    crop_seed: int = 0  # crops only: where the crops lie (sources.CropSource)

    def __post_init__(self):
        if self.mode not in PREPROCESS_MODES:
            raise BadInputError(f"unknown preprocessing mode {self.mode!r}; valid choices: {', '.join(PREPROCESS_MODES)}")
        if self.resolution % self.factor:
            raise BadInputError(f"resolution {self.resolution} must be a multiple of the VAE factor {self.factor}")
        if self.mode == "crops" and self.crops < 1:
            raise BadInputError(f"preprocessing mode crops needs crops >= 1 per image, got {self.crops}")
        if self.mode != "crops" and (self.crops or self.crop_scale or self.crop_seed):
            raise BadInputError(f"crops={self.crops}, crop_scale={self.crop_scale} and crop_seed={self.crop_seed} "
                                f"apply to the crops mode only, not {self.mode}")
        if self.crop_scale < 0:
            raise BadInputError(f"crop_scale must be >= 0 (0: native size), got {self.crop_scale}")
        if not self.buckets:
            b = make_buckets(self.resolution, self.factor, self.max_aspect) if self.mode == "buckets" \
                else [(self.resolution, self.resolution)]
            object.__setattr__(self, "buckets", tuple(b))

    def target_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(w, h) of the source -> (W, H) it is stored at."""
        if self.mode in ("center-crop", "crops"):
            return self.resolution, self.resolution
        return nearest_bucket(size, list(self.buckets))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["buckets"] = [list(b) for b in self.buckets]
        return d


def peek_size(item) -> Optional[tuple[int, int]]:
    """(w, h) from the file header without decoding pixels; None if it cannot be read."""
    if isinstance(item, Image.Image):
        return oriented_size(item)
    try:
        with Image.open(io.BytesIO(item) if isinstance(item, (bytes, bytearray)) else item) as img:
            return oriented_size(img)
    except Exception:  # load_rgb will say why, with the file name
        return None


def crop_resize_size(size: tuple[int, int], pre: Preprocess) -> tuple[int, int]:
    """(w, h) an image of `size` is resized to before the crops are cut: short side crop_scale (at least
    the resolution; 0: the native size, upscaled only if smaller than the resolution)."""
    w, h = size
    short = max(pre.crop_scale or min(w, h), pre.resolution)
    scale = short / min(w, h)
    return max(short, round(w * scale)), max(short, round(h * scale))


def random_crop(img: Image.Image, src, i: int, pre: Preprocess) -> tuple[Image.Image, tuple[int, int]]:
    """Input i of a sources.CropSource: its crop of the resized image, and the crop's (top, left)."""
    from .images import resize_short_side

    w, h = crop_resize_size(img.size, pre)
    img = resize_short_side(img, min(w, h))
    top, left = src.crop_origin(i, img.size, pre.resolution)
    return img.crop((left, top, left + pre.resolution, top + pre.resolution)), (top, left)


def load_preprocessed(src, i: int, pre: Preprocess, draft: bool = True, identify: bool = False) -> dict:
    """Image i -> uint8 pixels (3, H, W) as stored, with SDXL-style size/crop metadata; raises BadImage.
    `identify`: also `identity`, what identifies the bytes that were decoded (ImageSource.fetch: size,
    modification time, sha256), read once for both."""
    identity = None
    if identify:
        item, identity = src.fetch(i)
        if isinstance(item, (bytes, bytearray)) and not item:
            raise BadImage(f"{src.name(i)}: empty file (0 bytes)")
    else:
        item = src.raw(i)
    size = peek_size(item)
    target = pre.target_size(size) if size else (pre.resolution, pre.resolution)
    if pre.mode == "crops":  # the draft must cover the resized image, not only the crop
        target = crop_resize_size(size, pre) if size and pre.crop_scale else None
    try:
        img = load_rgb(item, src.max_pixels, draft_size=target if draft and target else None)
    except BadImage as e:
        msg = str(e)  # "<bytes>: why" (decoded from memory) -> "NAME: why"
        raise BadImage(f"{src.name(i)}{msg[msg.index('>') + 1:]}" if msg.startswith("<") else msg) from e
    if size is None:  # header unreadable but the decoder coped: the target from the decoded shape
        size = img.size
        target = pre.target_size(size)
    original = (size[1], size[0])  # (h, w) of the file, even when JPEG draft decoded it smaller
    if pre.mode == "crops":
        img, crop = random_crop(img, src, i, pre)
    else:
        img, crop = cover_crop(img, target)
    pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    out = {"pixels": pixels, "original_size": original, "crop_top_left": crop}
    if identify:
        out["identity"] = identity
    return out
