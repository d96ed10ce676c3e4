"""Encoding speed: `latentvae.cache.encode` against a naive caching loop, and against the machine's peak.

    python benchmarks/encode_speed.py                                   # sd preset, 256x256, 9 dev images x 2
    python benchmarks/encode_speed.py --images 6 --batch-size 2 --out benchmarks/results/encode-cpu.json

Same images (../shared/data/dev-images), same randomly initialised `sd`-preset AutoencoderKL, same
256x256 center crop, in one run:
  naive      for each batch: PIL full decode, torchvision Resize + CenterCrop + ToTensor + Normalize,
             `vae.encode(x).latent_dist.mean` in fp32 under no_grad, one torch.save file per image;
  latentvae  encode(EncodeOptions(...)) end to end: loading the VAE and hashing its weights, DataLoader
             worker decoding (JPEG draft mode) overlapped with encoder-only inference, parquet shards,
             manifest. Reported over the whole call and over its encoding loop alone.
  latentvae, other format   the same call with the memory format "auto" did not pick forced
             (channels_last on or off): the lever, measured both ways in the same run.
It also times the input pipelines alone (decode + preprocess, no encoder), measures bf16 and fp32
2048^2 matmul FLOP/s here, counts the encoder's FLOPs per image with
torch.utils.flop_counter, and prints the achieved FLOP/s as a fraction of each.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from _common import matmul_flops

REPO = Path(__file__).resolve().parents[1]
DEV_IMAGES = REPO.parent / "shared" / "data" / "dev-images"


def encoder_flops(vae, res: int) -> float:
    """FLOPs of vae.encode on one res x res image (convs, matmuls, attention; as flop_counter counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        vae.encode(torch.randn(1, 3, res, res))
    return float(fc.get_total_flops())


def naive_loop(vae, files: list[Path], res: int, batch_size: int, out: Path) -> float:
    """The obvious script; returns seconds."""
    import torchvision.transforms as T

    tf = T.Compose([T.Resize(res), T.CenterCrop(res), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for s in range(0, len(files), batch_size):
        chunk = files[s:s + batch_size]
        x = torch.stack([tf(Image.open(f).convert("RGB")) for f in chunk])
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        for f, zi in zip(chunk, z):
            torch.save(zi.clone(), out / f"{f.stem}.pt")
    return time.perf_counter() - t0


def naive_inputs(files: list[Path], res: int) -> float:
    """Seconds for the naive loop's decoding + transforms alone (no encoder)."""
    import torchvision.transforms as T

    tf = T.Compose([T.Resize(res), T.CenterCrop(res), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    t0 = time.perf_counter()
    for f in files:
        tf(Image.open(f).convert("RGB"))
    return time.perf_counter() - t0


def library_inputs(data: Path, res: int, factor: int) -> float:
    """Seconds for encode's per-image decoding + preprocessing alone, in this process (no worker)."""
    from latentvae.preprocess import Preprocess
    from latentvae.sources import open_source
    from latentvae.preprocess import load_preprocessed

    src, pre = open_source(str(data)), Preprocess("center-crop", res, factor)
    t0 = time.perf_counter()
    for i in range(len(src)):
        load_preprocessed(src, i, pre, draft=True)
    return time.perf_counter() - t0


def library(vae_dir: Path, data: Path, res: int, batch_size: int, out: Path,
            channels_last: bool | None = None) -> tuple[float, dict]:
    from latentvae.cache import encode
    from latentvae.options import EncodeOptions

    t0 = time.perf_counter()
    manifest = encode(EncodeOptions(vae=str(vae_dir), data=str(data), out=str(out), resolution=res,
                                    batch_size=batch_size, dtype="fp16", progress=False,
                                    channels_last=channels_last))
    return time.perf_counter() - t0, manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="sd")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=6)
    p.add_argument("--images", type=int, default=9, help="use the first N dev images, sorted (0: all 18)")
    p.add_argument("--rounds", type=int, default=2, help="passes per method, in ABBA order")
    p.add_argument("--out", help="also write the results here as JSON")
    args = p.parse_args()

    from latentvae.config import load_config
    from latentvae.cache.encode import resolve_workers
    from latentvae.images import list_images
    from latentvae.model import build_vae

    files = list_images(DEV_IMAGES)[: args.images or None]
    torch.manual_seed(0)
    vae = build_vae(load_config(None, [f"model.preset={args.preset}"]).model).eval()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "images"
        data.mkdir()
        for f in files:
            (data / f.name).symlink_to(f)
        vae.save_pretrained(tmp / "vae")
        fp32, bf16 = matmul_flops(torch.float32), matmul_flops(torch.bfloat16)
        t_in_naive, t_in_lib = naive_inputs(files, args.resolution), library_inputs(data, args.resolution, 8)
        flops = encoder_flops(vae, args.resolution)
        # ABBA order (naive, lib, alt, alt, lib, naive, ...): this shared CPU's speed drifts by up to 2x over minutes
        times = {"naive": [], "whole": [], "loop": [], "alt_whole": [], "alt_loop": []}
        runs = {}
        for r in range(args.rounds):
            for method in (("naive", "lib", "alt") if r % 2 == 0 else ("alt", "lib", "naive")):
                if method == "naive":
                    times["naive"].append(naive_loop(vae, files, args.resolution, args.batch_size, tmp / f"naive{r}"))
                    continue
                # "lib" runs first in round 0, so the format auto picked is known before "alt" runs
                cl = None if method == "lib" else not runs["lib"]["channels_last"]
                t, m = library(tmp / "vae", data, args.resolution, args.batch_size, tmp / f"{method}{r}", cl)
                assert m["counts"]["rows"] == len(files), m["counts"]
                prefix = "alt_" if method == "alt" else ""
                times[prefix + "whole"].append(t)
                times[prefix + "loop"].append(m["this_run"]["encode_seconds"])
                runs[method] = m["this_run"]
        fp32_after = matmul_flops(torch.float32)
    n = len(files)
    run = runs["lib"]
    fp32 = (fp32 + fp32_after) / 2
    names = {"naive": "naive loop (fp32, per-image torch.save)", "whole": "latentvae encode, whole call",
             "loop": "latentvae encode, encoding loop only",
             "alt_whole": f"latentvae, channels_last={not run['channels_last']}, whole",
             "alt_loop": f"latentvae, channels_last={not run['channels_last']}, loop"}
    rows = [(names[k], n * len(v) / sum(v), [n / t for t in v]) for k, v in times.items()]
    print(f"\n{args.preset} encoder at {args.resolution}x{args.resolution}, {n} dev images x {args.rounds} rounds "
          f"(ABBA), batch {args.batch_size}, torch threads {torch.get_num_threads()}, "
          f"encoder {flops / 1e9:.1f} GFLOP/image")
    print(f"matmul 2048^2 here: fp32 {fp32 / 1e9:.1f} GFLOP/s (mean of before {(2 * fp32 - fp32_after) / 1e9:.1f}, "
          f"and after {fp32_after / 1e9:.1f}), bf16 {bf16 / 1e9:.2f} GFLOP/s; encode ran in {run['mixed_precision']!r} "
          f"precision, channels_last={run['channels_last']}, {resolve_workers(-1)} DataLoader worker(s)")
    print(f"{'method':<42} {'img/s':>7} {'per round':>15} {'x naive':>8} {'GFLOP/s':>8} {'/ fp32 mm':>9} {'/ bf16 mm':>9}")
    for name, ips, per in rows:
        achieved = ips * flops
        spread = "/".join(f"{x:.3f}" for x in per)
        print(f"{name:<42} {ips:7.3f} {spread:>15} {ips / rows[0][1]:8.2f} {achieved / 1e9:8.1f} {achieved / fp32:9.1%} "
              f"{achieved / bf16:9.1%}")
    t_naive = sum(times["naive"]) / len(times["naive"])
    print(f"input pipeline alone (decode + resize + crop, one core): naive {n / t_in_naive:.1f} img/s, "
          f"latentvae (JPEG draft) {n / t_in_lib:.1f} img/s; as a share of the naive loop's time: naive's "
          f"{t_in_naive / t_naive:.1%}, latentvae's {t_in_lib / t_naive:.1%} (and overlapped in a worker); "
          "the rest is the encoder")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"preset": args.preset, "resolution": args.resolution, "images": n,
                                              "auto_channels_last": run["channels_last"],
                                              "encoder_flops": flops, "matmul_fp32": fp32, "matmul_bf16": bf16,
                                              "images_per_second": {k: v for k, v, _ in rows},
                                              "input_pipeline_images_per_second": {"naive": n / t_in_naive,
                                                                                   "latentvae": n / t_in_lib}}, indent=2))


if __name__ == "__main__":
    main()
