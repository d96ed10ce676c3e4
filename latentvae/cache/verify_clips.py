"""Checking a finished video cache: decode random clip rows (5-D) and compare each frame with its source clip.

    report = verify_cache("latents/")        # verify.py sends a video cache (manifest `video`) here
    latentvae decode latents/ --limit 4 --out strips/

Each sampled row is checked against its source as verify.py checks images (the same key, the same bytes), its
latent (C, T', h, w) decoded by the family's own decode (vae/loaded.LoadedVae.decode) to (3, T, H, W), the source
clip cut and fitted again as the manifest says (video_sources.ClipSource.load_clip at the row's frames and size),
and each frame compared as uint8 (metrics.psnr): per-frame PSNR, and per clip their mean.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import BadInputError
from ..images import BadImage
from .schema import from_storage


def manifest_clips(manifest: dict, data: str):
    """The ClipSource of the manifest's video source (where it is now: `data`) and clip settings."""
    from ..video_sources import ClipSource, open_video_source

    s, p = manifest["source"], manifest["preprocessing"]
    videos = open_video_source(data, s["kind"], s["split"], s.get("video_column", "video"))
    return ClipSource(videos, p["frames"], p["fps"], p["clip_stride"])


def decode_clip(lv, z: torch.Tensor) -> torch.Tensor:
    """One float32 VAE latent (C, T', h, w) -> the decoded clip, uint8 (3, T, H, W) on the CPU."""
    from ..images import to_uint8

    param = next(lv.module.parameters())
    with torch.inference_mode():
        return to_uint8(lv.decode(z[None].to(param.device, param.dtype))[0].float().cpu())


def save_strip(folder: Path, k: int, source_id: str, x: torch.Tensor, x_hat: torch.Tensor, frames: int = 8) -> None:
    """Up to `frames` frames spread over the clip, source above, decoded below, as FOLDER/NNN-NAME.png."""
    from ..fsutil import atomic_save_image
    from ..images import make_grid

    pick = np.unique(np.linspace(0, x.shape[1] - 1, min(frames, x.shape[1])).round().astype(int))
    rows = [c[:, pick].permute(1, 0, 2, 3).float() / 127.5 - 1 for c in (x, x_hat)]
    name = Path(source_id.split("#")[0]).stem + "-" + source_id.rsplit("#", 1)[-1]
    atomic_save_image(make_grid(rows), folder / f"{k:03d}-{name}.png")


def verify_clips(cache: Path, manifest: dict, vae, src, records: list[tuple], column: str,
                 pairs_dir: Optional[str | Path], tiles: Optional[dict]) -> dict:
    """verify_cache for a video cache, of the sampled `records` (verify.read_sampled_rows of the ClipSource `src`:
    manifest_clips): {"samples": [... "psnr" (the clip's mean over frames), "frame_psnr"], "column", "mean_psnr",
    "min_psnr", "tiles", "frames"}."""
    import pyarrow.parquet as pq

    from ..metrics import psnr

    results = []
    for shard, row, rec, i in records:
        size = pq.read_table(cache / "data" / shard, columns=["pixel_size"]).slice(row, 1)["pixel_size"][0].as_py()
        sid = rec["source_id"][0].as_py()
        x_hat = decode_clip(vae, from_storage(rec[column][0].as_py(), manifest["dtype"]))
        try:
            x, _ = src.load_clip(i, tuple(size))
        except BadImage as e:
            raise BadInputError(f"{cache}: the source of row {shard}:{row} cannot be read any more ({e})") from e
        if rec["flipped"][0].as_py():
            x = x.flip(-1)
        frame_psnr = [psnr(x[:, t].permute(1, 2, 0).numpy(), x_hat[:, t].permute(1, 2, 0).numpy())
                      for t in range(x.shape[1])]
        results.append({"shard": shard, "row": row, "source_id": sid, "flipped": rec["flipped"][0].as_py(),
                        "psnr": float(np.mean(frame_psnr)), "frame_psnr": frame_psnr})
        if pairs_dir is not None:
            save_strip(Path(pairs_dir), len(results) - 1, sid, x, x_hat)
    values = [r["psnr"] for r in results]
    return {"samples": results, "column": column, "mean_psnr": float(np.mean(values)) if values else float("nan"),
            "min_psnr": float(np.min(values)) if values else float("nan"), "tiles": tiles,
            "frames": manifest["video"]["frames"]}
