"""Which pipeline family sees unit-scale latents under which export: the table behind README's advice.

    latentvae export runs/quickstart --out out/qs-sd --calibrate data/samples/train --convention sd   # and sdxl, sd3
    latentvae encode --vae out/qs-sd --data IMAGES --out out/qs-cache --store moments --dtype fp32
    python eval/conventions.py --cache out/qs-cache --export out/qs-sd --export out/qs-sdxl --export out/qs-sd3

For every export (rows) and every family's own formula (columns, latentvae/conventions.py, which
cites the diffusers code), the mean and std of what that family's diffusion model would see on the
cache's latents (posterior samples, drawn with a fixed seed). The family an export was written for
should read about 0 / 1 (exactly so on the calibration images; on other images, close).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from latentvae.cache.schema import from_storage
from latentvae.vae.conventions import CONVENTIONS, to_diffusion


def cache_latents(cache: Path, seed: int = 0) -> list[torch.Tensor]:
    """Posterior samples (or the stored sample / mean) of every row, (1, C, h, w) each."""
    import pyarrow.parquet as pq

    m = json.loads((cache / "manifest.json").read_text())
    g = torch.Generator().manual_seed(seed)
    out = []
    for shard in sorted((cache / "data").glob("*.parquet")):
        t = pq.read_table(shard).to_pylist()
        for r in t:
            if "latent_sample" in r:
                out.append(from_storage(r["latent_sample"], m["dtype"])[None])
                continue
            z = from_storage(r["latent_mean"], m["dtype"])
            if "latent_logvar" in r:
                z = z + torch.exp(0.5 * from_storage(r["latent_logvar"], m["dtype"])) * torch.randn(z.shape, generator=g)
            out.append(z[None])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True, type=Path)
    p.add_argument("--export", action="append", required=True, type=Path, help="exported diffusers folders")
    args = p.parse_args()
    zs = cache_latents(args.cache)
    print(f"{len(zs)} rows of {args.cache}; mean / std of what each family's diffusion model sees")
    print("| export (convention) | " + " | ".join(f"{f} formula" for f in ("sd", "sdxl", "sd3")) + " |")
    print("|---|" + "---:|" * 3)
    for folder in args.export:
        config = json.loads((folder / "config.json").read_text())
        conv = json.loads((folder / "latentvae_export.json").read_text())["latent_statistics"]["convention"]
        cells = []
        for family in ("sd", "sdxl", "sd3"):
            x = torch.cat([to_diffusion(z, config, family).flatten() for z in zs])
            cells.append(f"{float(x.mean()):+.3f} / {float(x.std()):.3f}")
        print(f"| {folder.name} ({conv}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
