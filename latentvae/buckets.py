"""Preprocessing for latent caches: one PIL image -> the exact pixels a diffusion trainer sees.

Two modes (keys of PREPROCESS_MODES):
  center-crop  resize so the short side is `resolution`, central resolution x resolution crop;
  buckets      aspect-ratio buckets: several (width, height) of about resolution^2 pixels, sides
               multiples of the VAE factor; each image goes to the bucket nearest its aspect ratio
               (in log space), is resized to cover it and centrally cropped (NovelAI / SDXL style).

    pre = Preprocess("buckets", resolution=256, factor=8)
    size = pre.target_size(img.size)           # (W, H) of the bucket, before decoding the pixels
    img, crop = resize_crop(img, size)         # PIL (W, H) and the crop's top-left in resized coords

`target_size` needs only the image size, so JPEGs can be decoded in draft mode at a reduced
scale that still covers the target (images.load_rgb(..., draft_size=size)).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from PIL import Image

from .errors import BadInputError

PREPROCESS_MODES = {
    "center-crop": "resize the short side to resolution, central square crop",
    "buckets": "aspect-ratio buckets of about resolution^2 pixels, nearest aspect, resize to cover + center crop",
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


def resize_crop(img: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """Resize (bicubic, antialiased) to cover `size` = (W, H), then crop its centre.

    Returns the (W, H) image and the crop's (top, left) in the resized image (SDXL's crop
    conditioning)."""
    W, H = size
    w, h = img.size
    scale = max(W / w, H / h)
    rw, rh = max(W, round(w * scale)), max(H, round(h * scale))
    if (rw, rh) != (w, h):
        img = img.resize((rw, rh), Image.BICUBIC)
    top, left = (rh - H) // 2, (rw - W) // 2
    return img.crop((left, top, left + W, top + H)), (top, left)


@dataclass(frozen=True)
class Preprocess:
    """What happens to every image before encoding; recorded in the manifest as asdict(self)."""
    mode: str = "center-crop"
    resolution: int = 256
    factor: int = 8  # the VAE's downsampling factor; every side is a multiple of it
    max_aspect: float = 2.0  # buckets only
    flip: bool = False  # also store a horizontally flipped copy of every image
    buckets: tuple[tuple[int, int], ...] = field(default=())  # filled in from the above

    def __post_init__(self):
        if self.mode not in PREPROCESS_MODES:
            raise BadInputError(f"unknown preprocessing mode {self.mode!r}; valid choices: {', '.join(PREPROCESS_MODES)}")
        if self.resolution % self.factor:
            raise BadInputError(f"resolution {self.resolution} must be a multiple of the VAE factor {self.factor}")
        if not self.buckets:
            b = make_buckets(self.resolution, self.factor, self.max_aspect) if self.mode == "buckets" \
                else [(self.resolution, self.resolution)]
            object.__setattr__(self, "buckets", tuple(b))

    def target_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(w, h) of the source -> (W, H) it is stored at."""
        if self.mode == "center-crop":
            return self.resolution, self.resolution
        return nearest_bucket(size, list(self.buckets))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["buckets"] = [list(b) for b in self.buckets]
        return d
