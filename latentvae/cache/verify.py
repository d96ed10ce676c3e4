"""Checking a finished cache: decode random rows and compare them with their sources; `latentvae decode`.

    report = verify_cache("latents/", limit=8, seed=0)   # {"samples": [...], "mean_psnr": ..., ...}
    latentvae decode latents/ --limit 16 --out pairs/ --min-psnr 30

The VAE is the manifest's (or `--vae`, another copy of it: its weights hash must match), of any family
(decoded by the family's own decode: vae/loaded.LoadedVae.decode; one line for a family that cannot), the images
the manifest's source (or `--data`, where they are now). The manifest's locations make a cache decode
from any working folder: each absolute path where it still exists, else the path relative to the
cache folder (the cache moved together with its VAE and images), a hub VAE at its recorded commit. Each
sampled row is checked against its source (the same name at the same index) before anything is
decoded or written; the source is then preprocessed as the manifest says and compared with the
decoded latent as uint8 images (metrics.psnr, what a saved PNG holds).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.parquet as pq
import torch

from ..errors import BadInputError, MissingInputError
from ..images import BadImage
from ..options import DecodeOptions
from ..preprocess import Preprocess, load_preprocessed
from .manifest import cache_family, read_manifest
from .schema import from_storage


def _located(cache: Path, loc: dict) -> Optional[str]:
    """The recorded absolute path if it is still there, else the recorded relative one resolved against
    the cache folder (the cache and its inputs moved together), else None."""
    if loc.get("absolute") and os.path.exists(loc["absolute"]):
        return loc["absolute"]
    if loc.get("relative_to_cache"):
        moved = os.path.normpath(os.path.join(os.path.abspath(cache), loc["relative_to_cache"]))
        if os.path.exists(moved):
            return moved
    return None


def cache_vae_spec(cache: Path, manifest: dict) -> str:
    """The VAE the manifest names, found from any working folder: a hub VAE at its recorded commit, a
    local one where it was or beside the moved cache; a manifest without locations: its path as given."""
    from ..vae.loading import parse_spec

    loc = manifest["vae"].get("location")
    if not loc:
        return manifest["vae"]["path"]
    if loc.get("repo_id"):
        options = dict(parse_spec(loc["given"]).options)
        if loc.get("revision"):
            options["revision"] = loc["revision"]
        return loc["repo_id"] + (f"[{','.join(f'{k}={v}' for k, v in options.items())}]" if options else "")
    if "absolute" not in loc:  # taesd:NAME
        return loc["given"]
    found = _located(cache, loc)
    if found is None:
        moved = os.path.normpath(os.path.join(os.path.abspath(cache), loc["relative_to_cache"]))
        raise MissingInputError(f"{cache}: the VAE it was encoded with ({loc['given']!r}) is neither at {loc['absolute']} "
                                f"nor at {moved} (beside the cache); pass --vae with a copy of that VAE")
    return found + loc.get("options", "")


def cache_data(cache: Path, manifest: dict) -> str:
    """The source the manifest names, found from any working folder (see cache_vae_spec)."""
    s = manifest["source"]
    loc = s.get("location")
    if not loc or "absolute" not in loc:  # an older manifest, or a hub dataset
        return s["data"]
    found = _located(cache, loc)
    if found is None:
        moved = os.path.normpath(os.path.join(os.path.abspath(cache), loc["relative_to_cache"]))
        raise MissingInputError(f"{cache}: the data it was encoded from ({loc['given']!r}) is neither at "
                                f"{loc['absolute']} nor at {moved} (beside the cache); pass --data with where the "
                                "images are now")
    return found


def open_cache_vae(cache: Path, manifest: dict, vae_path: Optional[str]):
    """`vae_path`, or the VAE the manifest names, as the loaded record (vae/loaded.LoadedVae), eval mode on
    the CPU; a family that cannot decode says so in one line, before anything is loaded."""
    from ..vae.loading import NotAnAutoencoder, load_vae, with_flag

    cache_family(cache, manifest).require("decode", str(cache))
    try:
        lv = load_vae(vae_path or cache_vae_spec(cache, manifest))
    except NotAnAutoencoder as e:
        if vae_path:
            raise with_flag("--vae", vae_path, e) from e
        raise NotAnAutoencoder(f"{e} (the VAE path in {cache}/manifest.json; pass --vae to use another copy "
                               "of that VAE)") from e
    lv.module.requires_grad_(False)
    return lv.require("decode", f"--vae {vae_path}" if vae_path else str(cache))


def check_same_vae(vae, cache: Path, manifest: dict, vae_path: Optional[str]) -> None:
    """`vae` (a loaded record, or a module) must be the one that made the cache: the same weights hash."""
    from ..vae.loaded import LoadedVae, weights_sha256

    sha = vae.weights_sha256() if isinstance(vae, LoadedVae) else weights_sha256(vae)
    if sha != manifest["vae"]["weights_sha256"]:
        which = f"--vae {vae_path}" if vae_path else f"the VAE at {manifest['vae']['path']} (from the manifest)"
        raise BadInputError(f"{which} is not the VAE that made {cache}: its weights sha256 differs from the "
                            f"manifest's {manifest['vae']['weights_sha256'][:12]}…; pass the VAE it was encoded with")


def manifest_preprocess(manifest: dict) -> Preprocess:
    """The preprocessing the cache was made with."""
    p = manifest["preprocessing"]
    return Preprocess(**{k: p[k] for k in ("mode", "resolution", "factor", "max_aspect", "flip")},
                      buckets=tuple(tuple(b) for b in p["buckets"]),
                      **{k: p[k] for k in ("crops", "crop_scale", "crop_seed") if k in p})


def sample_rows(cache: Path, limit: int, seed: int, manifest: Optional[dict] = None) -> list[tuple[str, int]]:
    """`limit` random (shard file, row) pairs of the manifest's shards, the same for the same seed."""
    manifest = manifest or read_manifest(cache)
    pairs = [(Path(s["file"]).name, r) for s in manifest["shards"] for r in range(s["rows"])]
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(pairs), generator=g)[:limit].tolist()
    return [pairs[k] for k in sorted(pick)]


def read_sampled_rows(cache: Path, src, source_data: str, column: str, limit: int, seed: int,
                      source: Optional[dict] = None, manifest: Optional[dict] = None) -> list[tuple]:
    """(shard, row, one-row table, index of its source in `src`) for each sampled row, each checked to
    still match its source: found by its key (the path relative to the folder, wherever the folder is
    now), with the bytes it was encoded from (sha256)."""
    keys = None
    records = []
    for shard, row in sample_rows(cache, limit, seed, manifest):
        rec = pq.read_table(cache / "data" / shard, columns=["source_index", "source_id", "source_key",
                                                             "source_sha256", "flipped", column]).slice(row, 1)
        sid, key, sha = rec["source_id"][0].as_py(), rec["source_key"][0].as_py(), rec["source_sha256"][0].as_py()
        if keys is None:
            keys = {src.relative_name(i): i for i in range(len(src))}
        i = keys.get(key)
        if i is None:
            raise BadInputError(f"{cache}: row {shard}:{row} is {sid!r}, which is no longer in its source {source_data}; "
                                "rerun the `latentvae encode` command that made the cache to update it")
        try:
            now = src.fetch(i)[1]["sha256"]
        except BadImage as e:
            raise BadInputError(f"{cache}: the source of row {shard}:{row} cannot be read any more ({e})") from e
        if now != sha:
            raise BadInputError(f"{cache}: row {shard}:{row} was encoded from other bytes than {src.name(i)} holds now: "
                                "the source changed since it was encoded; rerun the `latentvae encode` command that made "
                                "the cache to update it")
        records.append((shard, row, rec, i))
    return records


def decode_to_uint8(lv, z: torch.Tensor) -> torch.Tensor:
    """One float32 VAE latent (C, h, w) -> the decoded image (LoadedVae.decode: the family's own decode, 5-D
    classes given T=1), uint8 (3, H, W) on the CPU."""
    from ..images import to_uint8

    param = next(lv.module.parameters())
    with torch.inference_mode():
        return to_uint8(lv.decode(z[None].to(param.device, param.dtype))[0].float().cpu())


def save_pair(folder: Path, k: int, source_id: str, x: torch.Tensor, x_hat: torch.Tensor) -> None:
    """source | decoded, side by side, as FOLDER/NNN-NAME.png."""
    from ..fsutil import atomic_save_image
    from ..images import make_grid

    grid = make_grid([x[None].float() / 127.5 - 1, x_hat[None].float() / 127.5 - 1])
    atomic_save_image(grid, folder / f"{k:03d}-{Path(source_id).stem}.png")


def verify_cache(cache: str | Path, limit: int = 8, seed: int = 0, *, vae=None, vae_path: Optional[str] = None,
                 pairs_dir: Optional[str | Path] = None, data_path: Optional[str] = None, tiling: bool = False,
                 tile_size: int = 0) -> dict:
    """Decode `limit` random stored latents; PSNR against the source images preprocessed the same way.

    `vae`: the loaded record, vae/loaded.LoadedVae (else `vae_path`, else the manifest's: cache_vae_spec);
    any family's cache decodes through its family's decode (a family that cannot: one line); `data_path`: where the
    source is now (else the manifest's: cache_data); `pairs_dir`: also write each
    source | decoded pair there as a PNG; `tiling`, `tile_size`: decode in diffusers' tiles (model.configure_tiling).
    Returns {"samples": [...], "column", "mean_psnr", "min_psnr", "tiles"}."""
    from ..metrics import psnr
    from ..vae.model import configure_tiling
    from ..sources import open_source

    cache = Path(cache)
    manifest = read_manifest(cache)
    if pairs_dir is not None and Path(pairs_dir).exists() and not Path(pairs_dir).is_dir():
        raise BadInputError(f"--out {pairs_dir} exists and is not a folder")
    if vae is None:
        vae = open_cache_vae(cache, manifest, vae_path)
    vae.require("decode", str(cache))
    check_same_vae(vae, cache, manifest, vae_path)
    tiles = configure_tiling("the cache's VAE", vae.module, tiling, tile_size, encode=False)
    s = manifest["source"]
    data = data_path or cache_data(cache, manifest)
    column = "latent_mean" if "latent_mean" in manifest["columns"] else "latent_sample"
    if manifest.get("video"):  # clips: decoded 5-D, PSNR per frame (verify_clips.py)
        from .verify_clips import manifest_clips, verify_clips

        clips = manifest_clips(manifest, data)
        records = read_sampled_rows(cache, clips, data, column, limit, seed, s, manifest)
        return verify_clips(cache, manifest, vae, clips, records, column, pairs_dir, tiles)
    src = open_source(data, s["kind"], s["split"], s["image_column"], 10**12)
    pre, draft = manifest_preprocess(manifest), manifest["preprocessing"]["jpeg_draft"]
    if pre.mode == "crops":
        from ..sources import CropSource

        src = CropSource(src, pre.crops, pre.crop_seed)
    results = []
    for shard, row, rec, i in read_sampled_rows(cache, src, data, column, limit, seed, s, manifest):
        sid, flipped = rec["source_id"][0].as_py(), rec["flipped"][0].as_py()
        x_hat = decode_to_uint8(vae, from_storage(rec[column][0].as_py(), manifest["dtype"]))
        try:
            x = load_preprocessed(src, i, pre, draft)["pixels"]
        except BadImage as e:
            raise BadInputError(f"{cache}: the source of row {shard}:{row} cannot be read any more ({e})") from e
        x = x.flip(-1) if flipped else x
        value = psnr(x.permute(1, 2, 0).numpy(), x_hat.permute(1, 2, 0).numpy())
        results.append({"shard": shard, "row": row, "source_id": sid, "flipped": flipped, "psnr": value})
        if pairs_dir is not None:
            save_pair(Path(pairs_dir), len(results) - 1, sid, x, x_hat)
    values = [r["psnr"] for r in results]
    return {"samples": results, "column": column, "mean_psnr": float(np.mean(values)) if values else float("nan"),
            "min_psnr": float(np.min(values)) if values else float("nan"), "tiles": tiles}


def print_report(report: dict) -> None:
    """The per-row table and the mean/min line."""
    print(f"{'shard:row':<28} {'flip':<5} {'PSNR dB':>8}  source")
    for r in report["samples"]:
        print(f"{r['shard'] + ':' + str(r['row']):<28} {str(r['flipped']):<5} {r['psnr']:8.2f}  {r['source_id']}")
        if "frame_psnr" in r:  # a clip: its mean above, each frame's here
            print(f"{'':<34}   per frame: {' '.join(f'{v:.1f}' for v in r['frame_psnr'])}")
    t = report.get("tiles")
    tiled = (f", decoded in tiles of {t['tile_sample_min_size']} px ({t['tile_latent_min_size']} latent, overlap "
             f"{t['tile_overlap_factor']:g})") if t else ""
    print(f"mean PSNR {report['mean_psnr']:.2f} dB, min {report['min_psnr']:.2f} dB over {len(report['samples'])} "
          f"rows of {report['column']}{tiled}" + (f" (clips of {report['frames']} frames: each the mean of its frames' "
                                                 "PSNR)" if "frames" in report else ""))


def run(opts: DecodeOptions) -> dict:
    """`latentvae decode CACHE`: the report as a table; exit status 1 if the mean PSNR is below --min-psnr."""
    report = verify_cache(opts.cache, limit=opts.limit, seed=opts.seed, vae_path=opts.vae, pairs_dir=opts.out,
                          data_path=opts.data, tiling=opts.tiling, tile_size=opts.tile_size)
    print_report(report)
    if opts.min_psnr is not None and report["mean_psnr"] < opts.min_psnr:
        sys.exit(f"mean PSNR {report['mean_psnr']:.2f} dB is below --min-psnr {opts.min_psnr:g}")
    return report
