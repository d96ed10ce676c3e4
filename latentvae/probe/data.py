"""One cache as the probe learns it: its rows read whole, split by source image, normalized, in the layout
its family's diffusion model sees; and the latent statistics reported beside the loss.

    data, lv = read_cache(cache, opts, label)     # ProbeData: train/held-out latents, normalized, diffusion layout;
                                                  # the cache's VAE (LoadedVae), refused where it cannot be probed
    data.vae_latent(z)                            # normalized diffusion-layout latents -> what lv.decode takes
    latent_statistics(data, lv)                   # channel moments, spectrum, scale equivariance

Layout: the cache stores the VAE latent (C, h, w) as the class returns it; a family whose pipeline
patchifies (flux2: 2x2, vae/families.py `patch`) has its diffusion model learn the patchified latent
(4C, h/2, w/2), so the probe trains on that (conventions.patchify), normalized per channel of that
layout by the manifest's measured statistics (which `latentvae encode` measures per patchified channel,
as FLUX.2's BatchNorm does; a manifest measured per stored channel has each patchified channel take its
stored channel's mean and std).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import BadInputError
from ..options import ProbeOptions
from ..vae.conventions import patchify, unpatchify
from ..vae.loaded import LoadedVae


@dataclass
class ProbeData:
    """One cache, read whole into memory (a probe's caches are small: 16x16x4 latents), normalized, in the
    layout the family's diffusion model sees."""
    label: str
    cache: Path
    manifest: dict
    train_mean: torch.Tensor  # (N, C', h', w') normalized units, diffusion layout (flux2: patchified)
    train_std: Optional[torch.Tensor]  # posterior std in normalized units (--store moments), else None
    val: torch.Tensor  # (M, C', h', w') held-out posterior means, normalized
    val_keys: list[str]  # the held-out rows' source keys (crops included), in row order
    train_labels: Optional[torch.Tensor]
    val_labels: Optional[torch.Tensor]
    channel_mean: torch.Tensor  # (C',) raw units, per channel of the diffusion layout
    channel_std: torch.Tensor
    statistics: str  # where the normalization came from
    images: int  # source images in the cache
    held_out_images: int
    family: str = "kl"  # the cache's VAE's family (vae/families.py)
    class_name: str = "AutoencoderKL"
    patch: int = 1  # the diffusion layout is the stored latent patchified patch x patch
    factor: int = 8  # the VAE's spatial factor: one stored latent position is factor x factor pixels

    @property
    def shape(self) -> tuple[int, int, int]:
        """The latent the probe's model learns: (C', h', w'), the diffusion layout."""
        return tuple(self.val.shape[1:])

    @property
    def vae_shape(self) -> tuple[int, int, int]:
        """The stored VAE latent: (C, h, w)."""
        c, h, w = self.shape
        p = self.patch
        return c // (p * p), h * p, w * p

    @property
    def tokens_per_image(self) -> int:
        """Positions of the learned latent per row (a DiT's tokens at patch 1)."""
        return self.shape[1] * self.shape[2]

    @property
    def pixels_per_token(self) -> int:
        return (self.factor * self.patch) ** 2

    def vae_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Normalized diffusion-layout latents (B, C', h', w') -> the raw VAE latents (B, C, h, w) they stand for."""
        z = z * self.channel_std.view(1, -1, 1, 1) + self.channel_mean.view(1, -1, 1, 1)
        return unpatchify(z, self.patch) if self.patch > 1 else z

    def describe(self) -> str:
        """One line: what is learned, e.g. `flux2 AutoencoderKLFlux2: 16x4x4 (4x8x8 patchified 2x2), 16 tokens`."""
        shape = "x".join(map(str, self.shape))
        stored = "" if self.patch == 1 else f" ({'x'.join(map(str, self.vae_shape))} patchified {self.patch}x{self.patch})"
        return (f"{self.family} {self.class_name}: {shape}{stored}, {self.tokens_per_image} tokens per row of "
                f"{self.pixels_per_token} pixels each")


def image_key(source_key: str) -> str:
    """The source image of a row: a crop's key without its `#cropK` suffix."""
    return source_key.split("#crop")[0]


def held_out_images(keys: list[str], share: float) -> set[str]:
    """A fixed share of the images (at least one, never all), chosen by a hash of their keys."""
    images = sorted(set(keys), key=lambda k: hashlib.sha1(k.encode()).hexdigest())
    if len(images) < 2:
        raise BadInputError(f"the probe holds out whole source images, but the cache has only {len(images)} image(s); "
                            "encode more images (several crops per image: latentvae encode --preprocess crops)")
    n = min(len(images) - 1, max(1, round(share * len(images))))
    return set(images[:n])


def cache_vae(cache: Path, manifest: dict) -> LoadedVae:
    """The VAE that made the cache (its weights hash checked), refused in one line where its family cannot be
    probed (families.py)."""
    from ..cache.verify import check_same_vae, open_cache_vae

    lv = open_cache_vae(cache, manifest, None)
    check_same_vae(lv, cache, manifest, None)
    return lv.require("probe", str(cache))


def diffusion_layout(x: torch.Tensor, patch: int, cache: str, family: str) -> torch.Tensor:
    """(N, C, h, w) stored latents -> the layout the family's diffusion model sees (patchified where it patchifies)."""
    if patch == 1:
        return x
    h, w = x.shape[-2:]
    if h % patch or w % patch:
        raise BadInputError(f"{cache}: its {family} latents are {h}x{w}, which the pipeline's {patch}x{patch} patchify "
                            f"cannot take; encode at a resolution whose latent sides are multiples of {patch}")
    return patchify(x, patch)


def read_cache(cache: str, opts: ProbeOptions, label: str) -> tuple[ProbeData, LoadedVae]:
    """The rows of one cache, split, normalized, in the diffusion layout of its VAE's family, and that VAE;
    refused where the probe cannot use them."""
    from ..cache import LatentDataset
    from ..cache.reader import latents_from_arrow

    ds = LatentDataset(cache, None)  # raw latents; refuses a missing, unfinished or non-cache folder, naming it
    m = ds.manifest
    shapes = np.unique(ds.latent_shapes(), axis=0)
    if len(shapes) != 1:
        raise BadInputError(f"{cache}: the probe needs one latent shape, the cache has {len(shapes)} "
                            f"({', '.join('x'.join(map(str, s)) for s in shapes)}); encode with --preprocess "
                            "center-crop or crops")
    if opts.class_column and opts.class_column not in ds.data.column_names:
        raise BadInputError(f"{cache}: --class-column {opts.class_column!r} is not a column of the cache; it has "
                            f"{', '.join(c for c in ds.data.column_names if not c.startswith('latent_'))}")
    lv = cache_vae(Path(cache), m)
    table = ds.data.with_format("arrow")[:]
    n = table.num_rows
    mean = latents_from_arrow(table.column("latent_mean" if "latent_mean" in table.column_names else "latent_sample"),
                              m["dtype"], n)
    logvar = latents_from_arrow(table.column("latent_logvar"), m["dtype"], n) if m["store"] == "moments" else None
    row_keys = [k if k is not None else sid for k, sid in
                zip(table.column("source_key").to_pylist(), table.column("source_id").to_pylist())]
    keys = [image_key(k) for k in row_keys]
    labels = None
    if opts.class_column:
        values = table.column(opts.class_column).to_pylist()
        if not all(isinstance(v, int) and v >= 0 for v in values):
            raise BadInputError(f"{cache}: --class-column {opts.class_column!r} must hold integers >= 0")
        labels = torch.tensor(values)
    held = held_out_images(keys, opts.holdout)
    is_val = torch.tensor([k in held for k in keys])
    patch = lv.layout.patch
    mean = diffusion_layout(mean, patch, cache, lv.family.name)
    std = None if logvar is None else diffusion_layout(torch.exp(0.5 * logvar), patch, cache, lv.family.name)
    c_mean, c_std, where = normalization(m, mean, std, ~is_val, patch)
    if bool((c_std <= 0).any()):
        raise BadInputError(f"{cache}: a latent channel has zero variance ({c_std.tolist()}); nothing to learn there")
    cm, cs = c_mean.view(1, -1, 1, 1), c_std.view(1, -1, 1, 1)
    norm = (mean - cm) / cs
    std = None if std is None else std / cs
    tr, va = ~is_val, is_val
    data = ProbeData(label, Path(cache), m, norm[tr].contiguous(), None if std is None else std[tr].contiguous(),
                     norm[va].contiguous(), [k for k, v in zip(row_keys, is_val.tolist()) if v],
                     None if labels is None else labels[tr], None if labels is None else labels[va],
                     c_mean, c_std, where, len(set(keys)), len(held), lv.family.name, lv.class_name, patch,
                     lv.layout.factor)
    return data, lv


def normalization(m: dict, mean: torch.Tensor, std: Optional[torch.Tensor], train: torch.Tensor,
                  patch: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Per-channel (mean, std) of the diffusion-layout latents `mean` (posterior std `std`) and where they came
    from: the manifest's measured latent_statistics (per stored channel, for a patchified layout: each of its
    channels takes its stored channel's), or (an older cache) measured here on the training rows, never
    unmeasured factors."""
    stats = m.get("latent_statistics")
    if stats and stats.get("channel_mean") and stats.get("channel_std"):
        where = f"manifest latent_statistics ({stats.get('measured_on', 'measured on the cache')})"
        c_mean, c_std = torch.tensor(stats["channel_mean"]), torch.tensor(stats["channel_std"])
        if len(c_mean) * patch * patch == mean.shape[1] and patch > 1:  # measured per stored channel
            c_mean, c_std = c_mean.repeat_interleave(patch * patch), c_std.repeat_interleave(patch * patch)
        if len(c_mean) != mean.shape[1]:
            raise BadInputError(f"{m.get('cache', 'the cache')}: manifest latent_statistics has {len(c_mean)} channels, the latents "
                                f"{mean.shape[1]} in the layout the probe learns")
        return c_mean, c_std, where
    from ..vae.moments import batch_moments, channel_mean_std

    logvar = None if std is None else 2 * std[train].log()
    c_mean, c_std = channel_mean_std(batch_moments(mean[train], logvar))
    where = f"measured by the probe on the {int(train.sum())} training rows (the manifest has no latent_statistics)"
    return c_mean.float(), c_std.float(), where


@torch.no_grad()
def latent_statistics(data: ProbeData, lv: LoadedVae, count: int = 32) -> dict:
    """Per-channel statistics of the cache; the spectrum of held-out latents against their source images;
    scale equivariance of the VAE on those images (latent_stats.py). All on the VAE latent as stored (before
    any patchify): properties of the VAE's latent space, as `latentvae evaluate` reports them."""
    from .. import latent_stats
    from ..cache.verify import cache_data, manifest_preprocess
    from ..preprocess import load_preprocessed
    from ..sources import CropSource, open_source
    from ..vae.moments import kl_to_standard_normal

    m = data.manifest
    stats = m.get("latent_statistics") or {}
    out = {"channel_mean": data.channel_mean.tolist(), "channel_std": data.channel_std.tolist(),  # learned layout
           "normalization": data.statistics, "on": "the VAE latent as stored, " + "x".join(map(str, data.vae_shape))}
    if data.train_std is not None:  # KL per element of the posterior, per channel of the VAE latent
        mu = data.vae_latent(data.train_mean)
        std = data.train_std * data.channel_std.view(1, -1, 1, 1)
        std = unpatchify(std, data.patch) if data.patch > 1 else std
        out["kl_per_channel"] = kl_to_standard_normal(mu, 2 * std.log()).mean((0, 2, 3)).tolist()
    out["manifest_std"] = stats.get("std")
    s = m["source"]
    src = open_source(cache_data(data.cache, m), s["kind"], s["split"], s["image_column"], 10**12)
    pre = manifest_preprocess(m)
    if pre.mode == "crops":
        src = CropSource(src, pre.crops, pre.crop_seed)
    index = {src.relative_name(i): i for i in range(len(src))}
    keys = data.val_keys[:count]
    pixels = [load_preprocessed(src, index[k], pre, m["preprocessing"]["jpeg_draft"])["pixels"] for k in keys]
    images = torch.stack(pixels).float() / 127.5 - 1
    out["spectrum"] = latent_stats.spectrum_statistics(data.vae_latent(data.val[:len(keys)]), images)
    if images.shape[-1] % (2 * lv.layout.factor) == 0 and images.shape[-2] % (2 * lv.layout.factor) == 0:
        out["scale_equivariance_psnr"] = latent_stats.scale_equivariance_psnr(lv, images)
    return out
