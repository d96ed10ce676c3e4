"""Encoding speed: `latentvae.cache.encode` against a naive caching loop, and against this machine's peaks.

    python benchmarks/encode_speed.py                                   # sd preset, 256x256, 8 dev images x 2
    python benchmarks/encode_speed.py --rows naive,naive@1,latentvae    # the naive loop at batch 4 and at batch 1
    python benchmarks/encode_speed.py --rows naive,latentvae,latentvae+autocast,latentvae+fp32,latentvae+compile
    python benchmarks/encode_speed.py --resolution 512 --out benchmarks/results/encode-gpu.json   # on a GPU

Runs on CUDA where there is a GPU, else on the CPU, unchanged. Same images (../shared/data/dev-images),
same randomly initialised `sd`-preset AutoencoderKL, same center crop, in one run, in ABBA order:
  naive      for each batch: PIL full decode, torchvision Resize + CenterCrop + ToTensor + Normalize,
             `vae.encode(x).latent_dist.mean` in fp32 under no_grad, one torch.save file per image;
             batches of --batch-size images (`naive@K`: of K; the ratios are against the row `naive`);
  latentvae  encode(EncodeOptions(...)) end to end with its defaults: loading the VAE and hashing its
             weights, image decoding (JPEG draft mode; in the main process on a CPU, in DataLoader workers on a
             GPU: the row says how many workers, "(0w)") and encoder-only inference
             (`auto`: bf16 weights where bf16 is fast, fp32 elsewhere; channels_last), parquet shards,
             manifest, at its default batch size (`--batch-size 0`: suited to the device; the row says
             what it resolved to; --library-batch-size N pins it). Reported over the whole call and over
             its encoding loop alone;
  latentvae+LEVER[+LEVER]  the same with EncodeOptions changed (LEVERS): compile (torch.compile of the
             encoder: its compile time and break-even number of images are reported separately), nocl,
             autocast (fp32 weights under bf16 autocast), fp32, bf16 / fp16 (weights), w0 / w1 (images decoded in
             the main process / in one DataLoader worker: --num-workers 0 / 1; the default is 0 on a CPU).
The header names the hardware (CPU capability as torch reports it, or the GPU) and the peaks measured
here: bf16 and fp32 matmul, and the encoder's own convolutions (every Conv2d shape it runs, forward,
channels_last, timed alone). Each row names the precision it actually ran in and its achieved FLOP/s
(torch.utils.flop_counter's count of the encoder) as a fraction of the peak of that precision.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from _common import conv_shapes, hardware, hardware_line, peak_key, peaks, peaks_line, pick_device, preset_vae

REPO = Path(__file__).resolve().parents[1]
DEV_IMAGES = REPO.parent / "shared" / "data" / "dev-images"


def encoder_flops(vae, res: int, device: str) -> float:
    """FLOPs of vae.encode on one res x res image (convs, matmuls, attention; as flop_counter counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        vae.encode(torch.randn(1, 3, res, res, device=device))
    return float(fc.get_total_flops())


def naive_loop(vae, files: list[Path], res: int, batch_size: int, out: Path, device: str) -> float:
    """The obvious script; returns seconds."""
    import torchvision.transforms as T

    tf = T.Compose([T.Resize(res), T.CenterCrop(res), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for s in range(0, len(files), batch_size):
        chunk = files[s:s + batch_size]
        x = torch.stack([tf(Image.open(f).convert("RGB")) for f in chunk]).to(device)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean.cpu()
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


# a row's levers: EncodeOptions over latentvae's defaults ("latentvae+compile+nocl": both)
LEVERS = {"compile": {"compile": True}, "nocl": {"channels_last": False},
          "autocast": {"weights_dtype": "fp32"},  # fp32 weights under --mixed-precision's autocast (bf16 where auto is)
          "fp32": {"mixed_precision": "no", "weights_dtype": "fp32"},
          "bf16": {"weights_dtype": "bf16"}, "fp16": {"weights_dtype": "fp16"},
          "w0": {"num_workers": 0}, "w1": {"num_workers": 1}}  # images decoded in the main process / one worker


def row_options(row: str) -> dict:
    opts = {}
    if row.split("@")[0] == "naive":
        return opts
    for lever in row.split("+")[1:]:
        if lever not in LEVERS:
            raise SystemExit(f"unknown lever {lever!r} in --rows {row}; valid levers: {', '.join(LEVERS)}")
        opts.update(LEVERS[lever])
    return opts


def naive_batch(row: str, default: int) -> int:
    """`naive` -> --batch-size; `naive@K` -> K."""
    if "@" not in row:
        return default
    try:
        k = int(row.split("@", 1)[1])
    except ValueError:
        k = 0
    if k < 1:
        raise SystemExit(f"--rows {row}: naive@K needs a batch size K >= 1")
    return k


def library(vae_dir: Path, data: Path, res: int, batch_size: int, out: Path, overrides: dict) -> tuple[float, dict]:
    from latentvae.cache import encode
    from latentvae.options import EncodeOptions

    t0 = time.perf_counter()
    manifest = encode(EncodeOptions(vae=str(vae_dir), data=str(data), out=str(out), resolution=res,
                                    batch_size=batch_size, dtype="fp16", progress=False, **overrides))
    return time.perf_counter() - t0, manifest


def row_precision(this_run: dict | None) -> str:
    """What a row's encoder computed in: fp32 | bf16 | fp16 weights, or a dtype's autocast over fp32 weights."""
    if this_run is None:
        return "fp32"
    if this_run["autocast"]:
        return f"{this_run['mixed_precision']} autocast"
    return this_run["weights_dtype"]


def steady(run: dict) -> float:
    """img/s of the encoder calls after the first batch (the first holds torch.compile's compilation)."""
    n, t = run["rows_encoded"] - run["first_batch_rows"], run["encoder_seconds"] - run["first_batch_seconds"]
    return n / t if n and t > 0 else float("nan")


def compile_report(runs: dict, rows: list[str]) -> list[dict]:
    """Per +compile row and round: compile seconds, steady img/s both ways, images after which it pays."""
    out = []
    for row in rows:
        base = "+".join(lv for lv in row.split("+") if lv != "compile")
        if "compile" not in row.split("+") or base not in runs:
            continue
        for r, (c, b) in enumerate(zip(runs[row], runs[base])):
            sc, sb = steady(c), steady(b)
            compile_s = c["first_batch_seconds"] - c["first_batch_rows"] / sc
            gain = 1 / sb - 1 / sc  # seconds saved per image once compiled
            out.append({"row": row, "base": base, "round": r, "compile_seconds": compile_s, "steady_compiled": sc,
                        "steady_eager": sb, "break_even_images": compile_s / gain if gain > 0 else None})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="sd")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4, help="the naive loop's batch")
    p.add_argument("--library-batch-size", type=int, default=0,
                   help="latentvae's --batch-size (0: its default, suited to the device)")
    p.add_argument("--images", type=int, default=8, help="use the first N dev images, sorted (0: all 18); a multiple "
                                                         "of --batch-size keeps one batch shape (one compilation)")
    p.add_argument("--images-dir", default=str(DEV_IMAGES), help="where the images are (default: the dev images)")
    p.add_argument("--repeat", type=int, default=1, help="each image this many times (under other names): a dataset "
                                                         "large enough for a GPU")
    p.add_argument("--rounds", type=int, default=2, help="passes per method, in ABBA order")
    p.add_argument("--rows", default="naive,latentvae,latentvae+compile",
                   help=f"naive, naive@K, latentvae, latentvae+LEVER[+LEVER]; levers: {', '.join(LEVERS)}")
    p.add_argument("--out", help="also write the results here as JSON")
    args = p.parse_args()
    rows = args.rows.split(",")
    for row in rows:
        row_options(row)  # a misspelled lever fails before anything runs
        if row.startswith("naive"):
            naive_batch(row, args.batch_size)

    from latentvae.cache.encode import resolve_workers
    from latentvae.images import list_images

    device = pick_device()
    hw = hardware(device)
    files = list_images(Path(args.images_dir))[: args.images or None] * args.repeat
    n = len(files)
    vae = preset_vae(args.preset, device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "images"
        data.mkdir()
        for k, f in enumerate(files):
            (data / f"{k:05d}-{f.name}").symlink_to(f)
        vae.save_pretrained(tmp / "vae")
        shapes = conv_shapes(vae.encoder, torch.randn(1, 3, args.resolution, args.resolution, device=device))
        peak = peaks(shapes, device, args.batch_size)
        t_in_naive, t_in_lib = naive_inputs(files, args.resolution), library_inputs(data, args.resolution, 8)
        files = sorted(data.iterdir())  # the naive loop reads the same names (its .pt files must not collide)
        flops = encoder_flops(vae, args.resolution, device)
        # ABBA order (rows forward, then backward, ...): a shared CPU's speed drifts by up to 2x over minutes
        whole, loop, runs = {r: [] for r in rows}, {r: [] for r in rows}, {r: [] for r in rows}
        for r in range(args.rounds):
            for row in (rows if r % 2 == 0 else rows[::-1]):
                dst = tmp / f"{row}-{r}"
                if row.startswith("naive"):
                    whole[row].append(naive_loop(vae, files, args.resolution, naive_batch(row, args.batch_size),
                                                 dst, device))
                    continue
                t, m = library(tmp / "vae", data, args.resolution, args.library_batch_size, dst, row_options(row))
                assert m["counts"]["rows"] == n, m["counts"]
                whole[row].append(t)
                loop[row].append(m["this_run"]["encode_seconds"])
                runs[row].append(m["this_run"])
        conv_fp32_after = peaks(shapes, device, args.batch_size)["conv"]["fp32"] if device == "cpu" else None
    print(f"\n{hardware_line(hw)}")
    print(peaks_line(peak) + (f" (fp32 conv again after the rows: {conv_fp32_after / 1e9:.1f})" if conv_fp32_after else ""))
    print(f"{args.preset} encoder at {args.resolution}x{args.resolution}, {n} dev images x {args.rounds} rounds (ABBA), "
          f"naive batch {args.batch_size}, {flops / 1e9:.1f} GFLOP/image, latentvae's DataLoader workers by default: "
          f"{resolve_workers(-1, device)}, "
          f"device {device}")
    mm = "of matmul" if device == "cuda" else "(of matmul)"
    print(f"{'method':<44} {'precision':<14} {'batch':>5} {'img/s':>7} {'per round':>15} {'x naive':>8} {'GFLOP/s':>8} "
          f"{'of conv':>8} {mm:>11}")
    table = []
    naive_ips = n * len(whole["naive"]) / sum(whole["naive"]) if whole.get("naive") else None
    for row in rows:
        for part, times in (("whole call", whole[row]), ("encoding loop", loop[row])):
            if not times:
                continue
            ips = n * len(times) / sum(times)
            prec = row_precision(runs[row][0] if runs[row] else None)
            batch = runs[row][0]["batch_size"] if runs[row] else naive_batch(row, args.batch_size)
            key = peak_key(prec.split()[0])
            achieved = ips * flops
            name = row if row.startswith("naive") else f"{row}, {part}"
            if runs[row] and "num_workers" in runs[row][0]:
                name += f" ({runs[row][0]['num_workers']}w)"
            table.append({"row": row, "part": part, "precision": prec, "batch_size": batch, "images_per_second": ips,
                          "per_round": [n / t for t in times], "gflops": achieved / 1e9,
                          "of_conv_peak": achieved / peak["conv"][key], "of_matmul_peak": achieved / peak["matmul"][key]})
            print(f"{name:<44} {prec:<14} {batch:5d} {ips:7.3f} {'/'.join(f'{n / t:.3f}' for t in times):>15} "
                  f"{ips / naive_ips if naive_ips else float('nan'):8.2f} {achieved / 1e9:8.1f} "
                  f"{achieved / peak['conv'][key]:8.1%} {achieved / peak['matmul'][key]:11.1%}")
    compiled = compile_report(runs, rows)
    for c in compiled:
        be = (f"pays off after {c['break_even_images']:.0f} images" if c["break_even_images"]
              else "never pays off (not faster once compiled)")
        print(f"{c['row']} round {c['round']}: compile {c['compile_seconds']:.1f} s; encoder alone after the first batch "
              f"{c['steady_compiled']:.3f} img/s against {c['steady_eager']:.3f} eager; {be}")
    print(f"input pipeline alone (decode + resize + crop, one core): naive {n / t_in_naive:.1f} img/s, "
          f"latentvae (JPEG draft) {n / t_in_lib:.1f} img/s; the encoder's img/s above is what it must keep up with")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "args": vars(args), "hardware": hw, "peaks": peak, "conv_fp32_after": conv_fp32_after,
            "encoder_flops": flops, "rows": table, "this_run": runs, "compile": compiled,
            "input_pipeline_images_per_second": {"naive": n / t_in_naive, "latentvae": n / t_in_lib}}, indent=2))


if __name__ == "__main__":
    main()
