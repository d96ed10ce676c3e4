"""Image files in, tensors out, and back: decoding any common file to 8-bit RGB, resizing and cropping.

    img = load_rgb("photo.tif")              # PIL RGB, or raises BadImage naming the file and why
    img, (top, left) = cover_crop(img, (W, H))  # resize to cover (W, H), central crop: caches, calibration, demos
    img = resize_short_side(img, 256)        # training crops start here
    img = crop_center(img, 256)              # native scale, central square: preview grids
    img = downscale_long_side(img, 1024)     # evaluation: long side at most 1024 (Lanczos)
    x = to_tensor(img)                       # (3, H, W) float in [-1, 1]
    grid = make_grid([orig, recon])          # rows of [-1, 1] batches side by side

Every resize and crop in latentvae is one of these four, so the latent statistics that export
measures come from the same pixels the cache stores.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from .errors import BadInputError, MissingInputError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".jfif"}


class BadImage(ValueError):
    """An input that cannot be used as an RGB image; the message names the file and the reason.

    Per image, and skipped by design where many images are read; not a UserError."""


def list_files(folder: str | Path, extensions, kind: str = "image") -> list[Path]:
    """Every file below `folder` (recursive) whose suffix is one of `extensions`, sorted for reproducibility.

    MissingInputError for a missing folder or one without such files, BadInputError for a file."""
    folder = Path(folder)
    if folder.is_file():
        raise BadInputError(f"{kind} folder {folder} is a file; expected a folder of {kind}s")
    if not folder.is_dir():
        raise MissingInputError(f"{kind} folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in extensions and p.is_file())
    if not files:
        raise MissingInputError(f"no {kind} files ({', '.join(sorted(extensions))}) found below {folder}")
    return files


def list_images(folder: str | Path) -> list[Path]:
    """Every image file below `folder` (recursive, by extension), sorted: list_files."""
    return list_files(folder, IMAGE_EXTENSIONS, "image")


def _to_8bit_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha composited on white, 16-bit/float scaled, CMYK/palette converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        if img.mode == "F" and a.max() <= 1.0:
            top = 1.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def load_rgb(source, max_pixels: int = 100_000_000, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode a path, bytes or PIL image to an 8-bit RGB PIL image, or raise BadImage.

    `draft_size` lets JPEG decode at a reduced scale when the caller will downscale anyway.
    """
    name = str(source) if isinstance(source, (str, Path)) else f"<{type(source).__name__}>"
    try:
        if isinstance(source, Image.Image):
            img = source
        else:
            if isinstance(source, (bytes, bytearray)):
                import io
                source = io.BytesIO(source)
            elif os.path.getsize(source) == 0:
                raise BadImage(f"{name}: empty file (0 bytes)")
            img = Image.open(source)
        w, h = img.size
        if w * h > max_pixels:
            raise BadImage(f"{name}: {w}x{h} = {w * h} pixels exceeds max_image_pixels={max_pixels}")
        if w < 1 or h < 1:
            raise BadImage(f"{name}: empty image {w}x{h}")
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", draft_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's palette/EXIF chatter
            img.load()  # decode now, so a truncated file fails here and not later
            img = _upright(img)
        return _to_8bit_rgb(img)
    except BadImage:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, MemoryError) as e:
        raise BadImage(f"{name}: cannot decode ({type(e).__name__}: {e})") from e


EXIF_ORIENTATION = 0x0112


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (camera photos: upright, as every viewer shows them); an
    unreadable EXIF block leaves the pixels as stored rather than failing the image."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        return img


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed: swapped when the EXIF orientation turns the image by 90 degrees,
    as `load_rgb` will (read from the header, without decoding pixels)."""
    w, h = img.size
    try:
        turned = img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    except Exception:  # a broken EXIF block: load_rgb's exif_transpose leaves such an image as is
        turned = False
    return (h, w) if turned else (w, h)


# truncated files must raise, not decode half an image silently
ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.MAX_IMAGE_PIXELS = None  # we check max_pixels ourselves, with a message that names the file


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float32 in [-1, 1]"""
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return a.permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 in [0, 255], rounded (what a saved PNG holds)"""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> PIL RGB"""
    return Image.fromarray(to_uint8(x).permute(1, 2, 0).cpu().numpy())


# ----------------------------------------------------------------------------- resize and crop
def resize_short_side(img: Image.Image, short: int) -> Image.Image:
    """Bicubic (antialiased) resize so that the short side is `short`; unchanged if it already is."""
    w, h = img.size
    scale = short / min(w, h)
    if abs(scale - 1) < 1e-6:
        return img
    size = (max(short, round(w * scale)), max(short, round(h * scale)))
    return img.resize(size, Image.BICUBIC, reducing_gap=3.0 if scale < 0.5 else None)


def cover_crop(img: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
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


def downscale_long_side(img: Image.Image, max_side: int) -> Image.Image:
    """Lanczos-downscale so that the long side is at most `max_side` (0, or already small: unchanged);
    the evaluation protocols' resize, which must not change the figures they published."""
    w, h = img.size
    if not max_side or max(w, h) <= max_side:
        return img
    s = max_side / max(w, h)
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)


def crop_center(img: Image.Image, res: int) -> Image.Image:
    """Central res x res crop at native scale (upscaled only where the image is smaller than `res`)."""
    img = resize_short_side(img, max(min(img.size), res))
    w, h = img.size
    left, top = (w - res) // 2, (h - res) // 2
    return img.crop((left, top, left + res, top + res))


def make_grid(rows: Sequence[torch.Tensor], pad: int = 2) -> Image.Image:
    """rows: tensors (N, 3, H, W) in [-1, 1] of equal shape; column i of row r is rows[r][i]."""
    import torchvision.utils as vutils

    n = rows[0].shape[0]
    stacked = torch.stack([r.detach().float().cpu() for r in rows], dim=0)  # (R, N, 3, H, W)
    flat = stacked.reshape(-1, *stacked.shape[2:])
    grid = vutils.make_grid(flat.clamp(-1, 1), nrow=n, padding=pad, normalize=True, value_range=(-1, 1), pad_value=1.0)
    return to_pil(grid * 2 - 1)


def center_crop_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Crop (…, H, W) centrally so that H and W are multiples of `multiple`."""
    h, w = x.shape[-2:]
    nh, nw = h - h % multiple, w - w % multiple
    if nh == 0 or nw == 0:
        raise BadInputError(f"image {w}x{h} is smaller than the downsampling factor {multiple}")
    top, left = (h - nh) // 2, (w - nw) // 2
    return x[..., top:top + nh, left:left + nw]
