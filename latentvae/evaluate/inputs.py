"""What every VAE is scored on: the images of --data, the protocol, and the fit to the VAEs' factors.

    src = open_images(opts)                        # --data as an ImageSource, cut to --limit
    multiple = common_multiple(vaes.values())      # lcm of every VAE's spatial factor
    x, size = load_eval_image(src, i, max_side, resolution)
    x_in, ref = FITS[opts.fit](x, multiple)        # network input, reference pixels

Every VAE of one report sees the same pixels: images are fitted (cropped or padded) to a multiple of
every VAE's downsampling factor at once (their least common multiple), not each to its own, so a /8
and a /16 VAE are scored on the same crop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from ..errors import BadInputError
from ..images import BadImage, center_crop_to_multiple, cover_crop, downscale_long_side, load_rgb, to_tensor
from ..options import EvaluateOptions
from ..preprocess import peek_size
from ..sources import ImageSource, open_source


@dataclass(frozen=True)
class Protocol:
    resolution: int  # 0: each image whole; else short side resized to it (bicubic, antialiased), central square
    description: str


PROTOCOLS = {  # --protocol; docs/evaluation.md says which published figures used which
    "full": Protocol(0, "each image whole (after the optional --max-side downscale), fitted to the factor by --fit"),
    "imagenet256": Protocol(256, "short side resized to 256 (bicubic, antialiased), central 256x256 crop: the "
                                 "ImageNet-val protocol of LightningDiT / VA-VAE and EQ-VAE tables"),
    "coco256": Protocol(256, "short side resized to 256 (bicubic, antialiased), central 256x256 crop: the COCO 2017 "
                             "val protocol of the sd-vae-ft-mse / ft-ema model card"),
}


def fit_crop(x: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(network input, reference): both the central crop to a multiple of `factor`."""
    x = center_crop_to_multiple(x, factor)
    return x, x


def fit_pad(x: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(network input, reference): the image reflect-padded right/bottom; the reference is the original."""
    h, w = x.shape[-2:]
    ph, pw = -h % factor, -w % factor
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), x


FITS: dict[str, Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]] = {"crop": fit_crop, "pad": fit_pad}


def common_multiple(vaes: Iterable) -> int:
    """The least common multiple of the LoadedVaes' spatial factors: image sides every one of them takes."""
    return math.lcm(*(lv.layout.factor for lv in vaes))


def open_images(opts: EvaluateOptions) -> ImageSource:
    """--data (a folder or a `datasets` dataset) as a source, cut to its first --limit images."""
    src = open_source(opts.data, opts.data_kind, opts.split, opts.image_column)
    return src.subset(list(range(min(opts.limit, len(src))))) if opts.limit else src


def image_name(src: ImageSource, i: int, data: str) -> str:
    """per_image.csv's name of image i: a file by its path below --data, a dataset row as `DATA:SPLIT[ROW]`."""
    name = src.name(i)
    try:
        return Path(name).relative_to(data).as_posix()
    except ValueError:
        return name


def load_eval_image(src: ImageSource, i: int, max_side: int = 0,
                    resolution: int = 0) -> tuple[torch.Tensor, tuple[int, int]]:
    """(1, 3, H, W) in [-1, 1] after the optional downscale (or, with `resolution`, the central square of that
    side after a bicubic short-side resize: images.cover_crop), and the image's own (width, height) as displayed.

    An image that cannot be decoded is a BadInputError: every VAE must see the same images."""
    try:
        item = src.raw(i)
        size = peek_size(item)  # from the header, EXIF orientation applied, as load_rgb does
        # a fixed-resolution protocol decodes at full scale, as the published tables' loaders did
        img = load_rgb(item, src.max_pixels, draft_size=(max_side, max_side) if max_side else None)
    except BadImage as e:
        where = "" if str(e).startswith(src.name(i)) else f"{src.name(i)}: "
        raise BadInputError(f"{where}{e}; every VAE is scored on the same images: remove or fix it in --data") from e
    img = cover_crop(img, (resolution, resolution))[0] if resolution else downscale_long_side(img, max_side)
    return to_tensor(img)[None], size or img.size
