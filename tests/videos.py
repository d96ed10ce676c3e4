"""Short synthetic videos for the tests, written with PyAV (latentvae.videos.write_video): real files, real codecs.

    frames = moving_shapes(tmp / "a.mp4", 24, size=(32, 48), fps=24)   # the uint8 (T, H, W, 3) frames written
    square_x(decoded_frame)                                           # where the red square is: which frame it is
    frames = camera_pan(tmp / "pan.webm", make_photo((96, 40)), 16)    # a window sliding across a photograph
    broken_video(tmp / "bad.mp4", "garbage" | "truncated" | "cut")     # files that must be listed, not crash a run

Sizes are (H, W), as in latentvae.videos. Each frame of `moving_shapes` is told apart by its black square's column
(frame k: column k % (W - side + 1)), so a test can see which source frame a decoded frame is.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from latentvae.videos import write_video

SQUARE = (0, 0, 0)  # the moving square: black on a background no darker than 60 (luma is stored at full
# resolution by every codec here, colour at half: a colour edge would blur by a pixel)


def square_side(width: int) -> int:
    return max(4, width // 6)


def moving_shapes(path, frames: int, size=(32, 32), fps: float = 8, seed: int = 0, codec=None,
                  keyframe_every=None) -> np.ndarray:
    """A black square moving right one pixel a frame (wrapping) and a white disc moving diagonally across a
    seeded two-colour gradient; writes `path`, returns the frames written, uint8 (T, H, W, 3)."""
    rng = np.random.default_rng(seed)
    H, W = size
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    a, b = rng.uniform(60, 200, size=(2, 3))
    t = (xx / W * np.cos(rng.uniform(0, np.pi)) + yy / H * np.sin(rng.uniform(0, np.pi)))[..., None]
    background = a * (1 - t / 2) + b * (t / 2)
    side, r = square_side(W), max(3, min(H, W) // 8)
    out = np.empty((frames, H, W, 3), np.uint8)
    for k in range(frames):
        f = background.copy()
        cy, cx = H - r - 1 - (k * 0.7) % (H - 2 * r), r + (k * 1.3) % (W - 2 * r)
        f[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 255
        x = k % (W - side + 1)
        f[1:1 + side, x:x + side] = SQUARE
        out[k] = np.clip(f, 0, 255).astype(np.uint8)
    write_video(path, out, fps, codec=codec, keyframe_every=keyframe_every)
    return out


def square_x(frame: np.ndarray) -> int:
    """The column of the square's left edge in a (decoded) moving_shapes frame, uint8 (H, W, 3): where a
    window of its width is darkest (robust to the codec's blurring of its edges)."""
    luma = frame.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    dark = np.clip(50 - luma, 0, None).sum(0)  # per column
    return int(np.argmax(np.convolve(dark, np.ones(square_side(frame.shape[1])), mode="valid")))


def camera_pan(path, photo, frames: int, size=(32, 32), fps: float = 8, step: int = 2, codec=None) -> np.ndarray:
    """A window of `size` = (H, W) panning right `step` pixels a frame over `photo` (a PIL image or a path),
    which is first downscaled (bicubic) to the window's height; writes `path`, returns the frames written."""
    H, W = size
    img = Image.open(photo) if isinstance(photo, (str, Path)) else photo
    img = img.convert("RGB")
    need = W + step * (frames - 1)
    scale = max(H / img.height, need / img.width)
    img = img.resize((max(need, round(img.width * scale)), max(H, round(img.height * scale))), Image.BICUBIC)
    a = np.asarray(img)
    top = (a.shape[0] - H) // 2
    out = np.stack([a[top:top + H, k * step:k * step + W] for k in range(frames)])
    write_video(path, out, fps, codec=codec)
    return out


def broken_video(path, kind: str = "truncated") -> Path:
    """A video file that cannot give a clip: `garbage` (random bytes), `truncated` (the first half of an mp4,
    whose index sits at its end: cannot be opened), `cut` (an mp4 indexed at its start, 24 frames stated,
    its data cut after a third: opens, then ends early)."""
    import av

    path = Path(path)
    if kind == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
        return path
    tmp = path.with_name(f".whole-{path.name}")
    frames = moving_shapes(tmp, 24, size=(32, 32), fps=8)
    if kind == "cut":  # rewrite with the index (moov) first: what streaming uploads produce
        with av.open(str(tmp), "w", format="mp4", options={"movflags": "faststart"}) as c:
            s = c.add_stream("mpeg4", rate=8)
            s.width, s.height, s.pix_fmt, s.bit_rate = 32, 32, "yuv420p", 400_000
            for f in frames:
                c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
            c.mux(s.encode())
    elif kind != "truncated":
        raise ValueError(f"unknown broken video kind {kind!r}; valid: garbage, truncated, cut")
    data = tmp.read_bytes()
    tmp.unlink()
    path.write_bytes(data[: len(data) // (3 if kind == "cut" else 2)])
    return path
