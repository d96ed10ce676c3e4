"""Which pipeline formula sees unit-scale latents under which export: the table behind README's advice.

    latentvae export runs/quickstart --out out/qs-sd --calibrate data/samples/train --convention sd   # and sdxl, sd3
    latentvae encode --vae out/qs-sd --data IMAGES --out out/qs-cache --store moments --dtype fp32
    python eval/conventions.py --cache out/qs-cache --export out/qs-sd --export out/qs-sdxl --export out/qs-sd3

For every export (rows) and every formula its family's pipelines apply (columns: latentvae/vae/conventions.py,
which cites the diffusers code; the family table says which apply to which class), the mean and std of
what that pipeline's diffusion model would see on the cache's latents: what the family's consumers take
(posterior samples, drawn with a fixed seed, or the posterior mean), with the factors the export holds
(config.json, or FLUX.2's BatchNorm buffers), read through `load_vae`. The formula an export was written
for should read about 0 / 1 (exactly so on the calibration images; on other images, close); "-" marks a
formula the export's family does not apply.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from latentvae.cache.schema import from_storage
from latentvae.vae.conventions import CONVENTIONS, to_diffusion
from latentvae.vae.loading import load_vae


def cache_latents(cache: Path, consumer: str, seed: int = 0) -> list[torch.Tensor]:
    """What a `consumer` ("sample" | "mode" | "latent") takes from every row: (1, C, h, w) each."""
    import pyarrow.parquet as pq

    m = json.loads((cache / "manifest.json").read_text())
    g = torch.Generator().manual_seed(seed)
    out = []
    for shard in sorted((cache / "data").glob("*.parquet")):
        for r in pq.read_table(shard).to_pylist():
            if "latent_sample" in r:
                out.append(from_storage(r["latent_sample"], m["dtype"])[None])
                continue
            z = from_storage(r["latent_mean"], m["dtype"])
            if consumer == "sample" and "latent_logvar" in r:
                std = torch.exp(0.5 * from_storage(r["latent_logvar"], m["dtype"]))
                z = z + std * torch.randn(z.shape, generator=g)
            out.append(z[None])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True, type=Path)
    p.add_argument("--export", action="append", required=True, type=Path, help="exported diffusers folders")
    args = p.parse_args()
    exports = [load_vae(folder) for folder in args.export]
    columns = [c for c in CONVENTIONS if any(c in lv.family.conventions for lv in exports)]
    print(f"{args.cache}; mean / std of what each pipeline formula's diffusion model sees")
    print("| export (family, convention) | " + " | ".join(f"{c} formula" for c in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for folder, lv in zip(args.export, exports):
        record = json.loads((folder / "latentvae_export.json").read_text())
        written = (record.get("formula") or record.get("latent_statistics") or {}).get("convention", "?")
        zs = cache_latents(args.cache, lv.family.consumer)
        cells = []
        for c in columns:
            if c not in lv.family.conventions:
                cells.append("-")
                continue
            x = torch.cat([to_diffusion(z, lv.factors, c).flatten() for z in zs])
            cells.append(f"{float(x.mean()):+.3f} / {float(x.std()):.3f}")
        print(f"| {folder.name} ({lv.family.name}, {written}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
