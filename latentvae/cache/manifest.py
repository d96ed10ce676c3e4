"""What a cache says about itself: encode-settings.json, manifest.json and the dataset card.

    encode-settings.json  written first: what must not change on a resume (check_settings refuses
                          a rerun with other settings, listing what differs)
    manifest.json         written last, once every input is accounted for (build_manifest checks
                          that): the VAE (class, family, consumer rule, latent layout, formula and the
                          entries it reads), preprocessing, dtype, counts, failures, measured statistics
    README.md             the dataset card that points `datasets.load_dataset(OUT)` at data/*.parquet

Also whether a folder may become a cache (check_out_folder), and the identities recorded in both
files: the VAE's (vae_identity, from the loaded record: family, layout, formula, weights hash) and
the inputs' fingerprint.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..errors import BadInputError, MissingInputError
from ..fsutil import check_output_folder, flatten, sha256_file
from ..options import EncodeOptions
from ..preprocess import Preprocess
from .schema import DTYPE_STORAGE, FORMAT_VERSION, STORES
from .writer import list_shards

SETTINGS_FILE = "encode-settings.json"
MANIFEST_FILE = "manifest.json"
README_FILE = "README.md"


# ----------------------------------------------------------------------------- identities
def vae_identity(lv, given: str) -> dict:
    """The manifest's `vae`, all from the loaded record (vae/loaded.py): where it was, its class and family,
    what its consumers take, its latent layout, its pipeline's formula and the entries that formula reads,
    where those come from, its weights hash and files."""
    from ..vae.conventions import CONVENTIONS

    fam, layout = lv.family, lv.layout
    where = Path(lv.path or given)  # the folder loading.py read (a pipeline's vae/, a hub snapshot)
    files = {p.name: sha256_file(p) for p in sorted(where.glob("*.safetensors"))} if where.is_dir() else {}
    return {"path": str(given), "class": lv.class_name, "family": fam.name, "stochastic": lv.stochastic,
            "consumer": fam.consumer, "consumer_cite": fam.consumer_cite,
            "layout": {"channels": layout.channels, "factor": layout.factor, "patch": layout.patch,
                       "five_d": layout.five_d, "diffusion_channels": layout.diffusion_channels,
                       "multiple": layout.multiple, "video": layout.video, "temporal": layout.temporal,
                       "frame_step": layout.frame_step},
            "formula": {"convention": lv.convention, "conventions": list(fam.conventions),
                        "applies": CONVENTIONS[lv.convention], "entries": lv.factors},
            "factors": lv.provenance, "factors_origin": lv.factors_origin,
            "weights_sha256": lv.weights_sha256(), "files_sha256": files,
            "scaling_factor": lv.factors.get("scaling_factor"), "shift_factor": lv.factors.get("shift_factor"),
            "latent_channels": layout.channels, "downsample_factor": layout.factor, "source": dict(lv.origin)}


def inputs_fingerprint(src, n: int) -> str:
    """sha256 of the first `n` inputs of `src`: their names (and a dataset's own fingerprint)."""
    h = hashlib.sha256()
    fp = getattr(getattr(src, "dataset", None), "_fingerprint", None)
    h.update(f"{fp}|{n}|".encode())
    for i in range(n):
        h.update(src.name(i).encode() + b"\0")
    return h.hexdigest()


# ----------------------------------------------------------------------------- locations
def vae_location(given: str, source: Optional[dict], out: Path) -> dict:
    """Where the VAE was, for a `latentvae decode` from anywhere: as given, as an absolute path and
    relative to the cache folder (`options`: the spec's `[key=value,...]` part, kept apart), or a hub
    repo id and the commit it resolved to."""
    from ..vae.loading import parse_spec

    source = source or {}
    rec: dict[str, Any] = {"given": given, "kind": source.get("kind")}
    if source.get("kind") == "hub":
        return {**rec, "repo_id": source.get("repo_id"), "revision": source.get("revision")}
    if source.get("kind") == "taesd":
        return rec
    target = parse_spec(given).target
    absolute = os.path.abspath(target)
    return {**rec, "absolute": absolute, "relative_to_cache": os.path.relpath(absolute, os.path.abspath(out)),
            "options": given[len(target):]}


def hub_dataset_revision(src) -> Optional[str]:
    """The commit a hub dataset was read at, where `datasets` recorded it (its download URLs); else None."""
    ds = getattr(src, "dataset", None)
    if ds is None:
        return None
    try:
        texts = list((ds.info.download_checksums or {}).keys()) + [c.get("filename", "") for c in ds.cache_files]
    except (AttributeError, TypeError):
        return None
    for text in texts:
        m = re.search(r"@([0-9a-f]{40})", str(text))
        if m:
            return m.group(1)
    return None


def data_location(given: str, src, out: Path) -> dict:
    """Where the data was: as given, as an absolute path and relative to the cache folder; or a hub
    dataset's name (and revision, when known)."""
    if Path(given).exists():
        absolute = os.path.abspath(given)
        return {"given": given, "absolute": absolute,
                "relative_to_cache": os.path.relpath(absolute, os.path.abspath(out))}
    return {"given": given, "hub": given, "revision": hub_dataset_revision(src)}


# ----------------------------------------------------------------------------- encode-settings.json
def run_settings(opts: EncodeOptions, vae_id: dict, pre: Preprocess) -> dict:
    """What must be the same for the rows of one cache: the VAE's weights, the preprocessing (a video cache's:
    clip length, rate, stride and size: clips.ClipPreprocess), the storage. Which inputs (--data's contents,
    --limit) may change: a rerun then updates the cache (update.py)."""
    video = getattr(pre, "video", False)
    column = {"video_column": opts.video_column} if video else {"image_column": opts.image_column}
    return {"format_version": FORMAT_VERSION, "vae_weights_sha256": vae_id["weights_sha256"],
            "source": {"data": opts.data, "kind": opts.data_kind, "split": opts.split, **column},
            "preprocessing": pre.to_dict(), "jpeg_draft": opts.jpeg_draft, "max_image_pixels": opts.max_image_pixels,
            "store": opts.store, "dtype": opts.dtype, "seed": opts.seed if opts.store == "sample" else None}


def is_cache_folder(out: Path) -> bool:
    """A folder `latentvae encode` may write into again: one with encode-settings.json, or holding only an
    empty data/ (what a killed earlier version left before writing its settings: resumable)."""
    if (out / SETTINGS_FILE).is_file():
        return True
    return all(p.name == "data" and p.is_dir() for p in out.iterdir()) and not list_shards(out)


def check_out_folder(out: Path) -> None:
    """OUT must be new, empty, or a cache (is_cache_folder): never someone's other folder."""
    check_output_folder(out, "--out", is_cache_folder, f"a latent cache (with {SETTINGS_FILE})")


def shorten(value: Any, width: int = 40) -> str:
    """A setting's value for a message: JSON, a sha256 cut to 12 digits, anything long cut to `width`."""
    text = json.dumps(value)
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
        return value[:12] + "…"
    return text if len(text) <= width else text[:width - 1] + "…"


# settings a rerun may change: where the data is now (a moved folder; the rows' keys are relative to it)
FREE_KEYS = ("source.data",)


def settings_diff(old: dict, new: dict) -> list[str]:
    """'key: OLD there, NEW now' for each setting that differs (derived bucket lists left out when
    the settings they derive from are listed)."""
    a, b = flatten(old), flatten(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in FREE_KEYS)
    if any(k.startswith("preprocessing.") and k != "preprocessing.buckets" for k in keys):
        keys = [k for k in keys if k != "preprocessing.buckets"]
    return [f"{k}: {shorten(a.get(k))} there, {shorten(b.get(k))} now" for k in keys]


def read_settings(out: Path) -> Optional[dict]:
    """The cache's encode-settings.json (None if it has none yet)."""
    path = out / SETTINGS_FILE
    if not path.exists():
        return None
    try:
        settings = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BadInputError(f"{path}: unreadable ({e}); use a new --out") from e
    if not isinstance(settings, dict):
        raise BadInputError(f"{path}: not a settings object; use a new --out")
    return settings


def check_settings(out: Path, settings: dict) -> None:
    """Refuse to mix latents of another VAE, preprocessing or storage into a cache, saying what differs."""
    old = read_settings(out)
    diff = [] if old is None else settings_diff(old, settings)
    if not diff:
        return
    why = ("it was made by an older latentvae, whose rows do not record their sources"
           if old.get("format_version") != settings["format_version"] else
           "one cache holds the latents of one VAE, preprocessing and storage")
    raise BadInputError(f"--out {out} holds a cache made with other settings ({'; '.join(diff)}): {why}. To start "
                        f"a new cache, pass a new --out (or delete {out}); to update this one, use the settings it "
                        f"was made with (its {SETTINGS_FILE})")


def dataset_card(manifest_hint: str) -> str:
    return ("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/*.parquet\n---\n"
            f"# Latent cache\n\nMade by `latentvae encode`. {manifest_hint}\n"
            "Latents are the VAE's raw latents (unscaled, not patchified); manifest.json's vae.formula is the formula "
            "its pipelines apply (with the entries it reads), and latent_statistics.factors give, per convention, "
            "the factors under which the latents a trainer draws are unit-scale.\n")


# ----------------------------------------------------------------------------- latent statistics
def measured_statistics(shards: list[dict], channels: int, conventions: tuple[str, ...]) -> Optional[dict]:
    """Per-channel and global mean/std of the latents a trainer draws from this cache (per channel of the
    patchified latent where the family's pipeline patchifies: `channels` = layout.diffusion_channels),
    summed from the shards' moments, and the factors each of `conventions` (the formulas the family's
    pipelines apply) would need for unit-scale latents."""
    from ..vae.moments import LatentMoments, channel_mean_std, factors, global_mean_std

    parts = [s["moments"] for s in shards if s.get("moments")]
    if not parts or len(parts) < len(shards):
        return None  # a cache written before shards carried their moments
    m = LatentMoments(sum(p["count"] for p in parts), torch.tensor(np.sum([p["sum"] for p in parts], axis=0)),
                      torch.tensor(np.sum([p["sumsq"] for p in parts], axis=0)), None)
    mean, std = channel_mean_std(m)
    g_mean, g_std = global_mean_std(m)
    per_convention = {c: {k: v for k, v in factors(m, c).items() if k not in ("channel_mean", "channel_std")}
                      for c in conventions if not (c == "sdxl" and channels != 4)}
    rows = sum(s["rows"] for s in shards)
    return {"measured_on": f"all {rows} rows of this cache ({m.count} latent positions per channel, "
                           f"{m.channels} channels)",
            "channel_mean": mean.tolist(), "channel_std": std.tolist(), "mean": g_mean, "std": g_std,
            "factors": per_convention}


# ----------------------------------------------------------------------------- manifest.json
def build_manifest(out: Path, settings: dict, vae_id: dict, opts: EncodeOptions, pre: Preprocess, inputs,
                   shards: list[dict], failures: list[dict], generation: int, changes: dict) -> dict:
    """Check that each of the inputs now (`inputs`: update.Inputs) is in the shards `shards` (writer.scan_shards
    records) exactly once, as rows or as a failure; the manifest of that generation.

    The VAE's and the source's `location` (vae_location, data_location) are the manifest's only: the
    settings a rerun compares (encode-settings.json) stay what they were."""
    flips = (False, True) if pre.flip else (False,)
    seen = Counter((k, f) for s in shards for k, f in zip(s["identity"]["source_key"], s["flipped"]))
    failed = {rec["source_key"] for rec in failures}
    dup = [k for k, c in seen.items() if c > 1]
    missing = [(k, f) for k in inputs.keys if k not in failed for f in flips if (k, f) not in seen]
    both = sorted({k for k, _ in seen} & failed)
    extra = sorted({k for k, _ in seen} - set(inputs.index))
    if dup or missing or both or extra:
        raise RuntimeError(f"{out}: cache inconsistent: {len(dup)} duplicated rows {dup[:5]}, {len(missing)} missing "
                           f"{missing[:5]}, {len(both)} inputs both encoded and failed {both[:5]}, {len(extra)} rows "
                           f"of inputs that are gone {extra[:5]}")
    buckets = Counter(f"{w}x{h}" for s in shards for h, w in s["pixel_size"])
    video = {}
    if getattr(pre, "video", False):  # clips.ClipPreprocess: the clip rule, length, rate, size, temporal factor
        from ..vae.families import family

        video = {"video": {**pre.manifest_entry(family(vae_id["family"])), "videos": len(inputs.src.videos)}}
    return {
        "format_version": FORMAT_VERSION,
        "generation": generation,
        "vae": {**vae_id, "location": vae_location(opts.vae, vae_id.get("source"), out)},
        "source": {**settings["source"], "location": data_location(opts.data, inputs.src, out)},
        "cache": os.path.abspath(out),
        "limit": opts.limit,
        "preprocessing": {**pre.to_dict(), "jpeg_draft": opts.jpeg_draft,
                          "resize": "bicubic, antialiased, cover + center crop" + (" (each frame alike)" if video else ""),
                          "pixel_range": "[-1, 1] = uint8 / 127.5 - 1"},
        "store": opts.store, "columns": list(STORES[opts.store]), "dtype": opts.dtype,
        "dtype_storage": DTYPE_STORAGE[opts.dtype],
        "sample_seed": settings["seed"],
        "counts": {"inputs": inputs.n, "encoded_inputs": len({k for k, _ in seen}), "rows": sum(seen.values()),
                   "failures": len(failures), "shards": len(shards), "rows_per_bucket": dict(sorted(buckets.items()))},
        "last_update": changes,
        "shards": [{"file": f"data/{s['name']}", "rows": s["rows"]} for s in shards],
        "failures": failures,
        "inputs_sha256": inputs_fingerprint(inputs.src, inputs.n),
        "latent_statistics": measured_statistics(shards, vae_id["layout"]["diffusion_channels"],
                                                 tuple(vae_id["formula"]["conventions"])),
        **video,
    }


def cache_family(cache: Path, manifest: dict):
    """The family table's entry (vae/families.py) of the VAE that made the cache: the one the manifest records
    (a cache written before families were recorded: by its class, AutoencoderKL or AutoencoderTiny)."""
    from ..vae.families import family, family_for_class

    vae = manifest["vae"]
    if vae.get("family"):
        return family(vae["family"])
    return family_for_class(vae.get("class", "AutoencoderKL"), f"{cache}/{MANIFEST_FILE} vae.class")


def read_manifest(out: Path) -> dict:
    """A finished cache's manifest, or a MissingInputError/BadInputError saying what `out` is instead."""
    path = out / MANIFEST_FILE
    if not out.is_dir():
        raise MissingInputError(f"cache folder {out} does not exist" if not out.exists() else
                                f"{out} is not a folder; expected a latent cache written by `latentvae encode`")
    if not path.is_file():
        if (out / SETTINGS_FILE).is_file():
            raise MissingInputError(f"{path} not found: the cache is unfinished; rerun the same `latentvae encode` "
                                    "command to complete it")
        raise MissingInputError(f"{out} is not a latent cache (no {MANIFEST_FILE}); expected a folder written by "
                                "`latentvae encode`")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BadInputError(f"{path}: unreadable ({e})") from e
