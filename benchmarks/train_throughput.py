"""Training throughput: train/train.py's step against a naive loop, and against the machine's peak.

    python benchmarks/train_throughput.py                       # sd preset, 128x128, batch 2, CPU
    python benchmarks/train_throughput.py --preset small --steps 8 --out benchmarks/results/train-cpu.json

Each row runs in a fresh subprocess so its peak memory (max RSS on the CPU, max allocated on
CUDA) is its own. Rows, for the same recipe (L1 + LPIPS-vgg + KL; then with the GAN on):
  naive    fp32, default memory format, AdamW(foreach=False), no compile, LPIPS on the whole image,
           `vae.encode(x).latent_dist.sample()` / `vae.decode(z)` called the obvious way;
  latentvae  train.step.train_step with the default TrainConfig (what train/train.py runs);
  latentvae+LEVER[+LEVER]  the same with levers switched on, one row each, to measure what each gives:
           ckpt (model.gradient_checkpointing), bf16 (bf16 autocast), cl (channels_last),
           compile (torch.compile of the model), compile-lpips (of the loss's LPIPS network), crop64 (LPIPS on one 64x64 crop per image).
A `-gan` suffix on the base name (naive-gan, latentvae-gan+cl) turns the PatchGAN on.
Runs on CUDA where there is a GPU (else, or with --cpu, on the CPU), unchanged. The header names the
hardware (CPU capability as torch reports it, or the GPU) and the peaks measured here: bf16 and fp32
matmul, and the VAE's own convolutions (every Conv2d shape of its encode + decode at this resolution
and batch, forward, channels_last, timed alone). It counts one step's FLOPs with
torch.utils.flop_counter and prints, per row, the precision the step actually ran in and its
achieved FLOP/s as a fraction of that precision's conv and matmul peaks (fp32 rows: fp32 peaks;
bf16 and fp16 rows: bf16 peaks).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from _common import conv_shapes, hardware, hardware_line, peak_key, peaks, peaks_line, preset_vae, sync as _sync

REPO = Path(__file__).resolve().parents[1]


def _peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _overrides(args, gan: bool, extra: list[str]) -> list[str]:
    return [f"model.preset={args.preset}", f"data.resolution={args.resolution}", f"train.batch_size={args.batch}",
            "loss.lpips_net=vgg", "loss.recon=l1", f"loss.gan={'true' if gan else 'false'}", "loss.gan_start=0",
            f"data.source={args.data}", "data.val_count=0", "data.num_workers=0", f"train.steps={10 ** 6}",
            "train.log_every=1000000", "train.image_every=1000000", "train.save_every=1000000"] + extra


def _batches(args, device):
    """Fixed real crops, so both rows see identical data without timing the loader."""
    from latentvae.config import load_config
    from latentvae.sources import open_source
    from latentvae.train.data import CropStream
    cfg = load_config(None, [f"data.source={args.data}", f"data.resolution={args.resolution}"])
    stream = CropStream(open_source(cfg.data.source), cfg.data, seed=0)
    return [torch.stack([stream[i * args.batch + j]["pixels"] for j in range(args.batch)]).to(device)
            for i in range(args.steps + args.warmup)]


LEVERS = {"ckpt": ["model.gradient_checkpointing=true"], "bf16": ["train.mixed_precision=bf16"],
          "cl": ["train.channels_last=true"], "compile": ["train.compile=true"],
          "compile-lpips": ["train.compile_lpips=true"], "crop64": ["loss.lpips_crop=64"]}


def lever_overrides(lever: str) -> list[str]:
    if lever not in LEVERS:
        raise SystemExit(f"unknown lever {lever!r} in a --rows entry; valid levers: {', '.join(LEVERS)}")
    return LEVERS[lever]


def base_row(row: str) -> str:
    """The row a lever row is compared with: its name without the levers."""
    return row.split("+")[0]


def run_row(args) -> dict:
    """Runs inside the subprocess: time one configuration."""
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    from latentvae.config import load_config
    torch.manual_seed(0)
    batches = _batches(args, device)
    gan = args.row.split("+")[0].endswith("-gan")
    if args.row.startswith("naive"):
        (step, params), precision = _naive_step(args, gan, device), "fp32"
    else:
        extra = [o for lever in args.row.split("+")[1:] for o in lever_overrides(lever)]
        step, params, precision = _latentvae_step(args, load_config(None, _overrides(args, gan, extra)))
    flops = None
    if args.count_flops:
        from torch.utils.flop_counter import FlopCounterMode
        counter = FlopCounterMode(display=False)
        with counter:
            step(batches[0])
        flops = counter.get_total_flops()
    else:
        step(batches[0])  # every row takes the same steps, so their timed losses are comparable
    for x in batches[:args.warmup]:
        step(x)
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, t0 = [], time.perf_counter()
    for x in batches[args.warmup:]:
        losses.append(step(x))
    _sync(device)
    dt = time.perf_counter() - t0
    return {"row": args.row, "device": device, "steps_per_s": args.steps / dt, "images_per_s": args.steps * args.batch / dt,
            "peak_mb": _peak_memory_mb(device), "step_flops": flops, "params": params, "precision": precision,
            "losses": [float(v) for v in losses]}


def _naive_step(args, gan: bool, device: str):
    from latentvae.config import load_config
    from latentvae.train.discriminator import PatchDiscriminator
    from latentvae.vae.model import build_vae
    from latentvae.perceptual import load_lpips
    cfg = load_config(None, _overrides(args, gan, []))
    vae = build_vae(cfg.model).to(device)
    lpips = load_lpips("vgg").to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-4, betas=(0.5, 0.9), foreach=False)
    disc = opt_d = None
    if gan:
        disc = PatchDiscriminator().to(device)
        opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-4, betas=(0.5, 0.9), foreach=False)
    last = vae.decoder.conv_out.weight

    def step(x):
        posterior = vae.encode(x).latent_dist
        x_hat = vae.decode(posterior.sample()).sample
        rec = (x_hat - x).abs().mean() + lpips(x_hat, x).mean()
        loss = rec + cfg.loss.kl_weight * posterior.kl().mean() / x[0].numel()
        if disc is not None:
            for p in disc.parameters():
                p.requires_grad_(False)
            g = -disc(x_hat).mean()
            gr = torch.autograd.grad(rec, last, retain_graph=True)[0]
            gg = torch.autograd.grad(g, last, retain_graph=True)[0]
            loss = loss + 0.5 * (gr.norm() / (gg.norm() + 1e-4)).clamp(0, 1e4).detach() * g
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if disc is not None:
            for p in disc.parameters():
                p.requires_grad_(True)
            d = 0.5 * (torch.relu(1 - disc(x)).mean() + torch.relu(1 + disc(x_hat.detach())).mean())
            opt_d.zero_grad()
            d.backward()
            opt_d.step()
        return loss.item()

    return step, sum(p.numel() for p in vae.parameters())


def _latentvae_step(args, cfg):
    import tempfile
    from latentvae.train import Trainer
    from latentvae.train.step import train_step
    trainer = Trainer(cfg, tempfile.mkdtemp(prefix="bench-"), show_progress=False)

    def step(x):
        logs = train_step(trainer.parts, trainer.state, x)
        return logs["loss"] if logs else float("nan")

    precision = {"no": "fp32"}.get(trainer.parts.precision, trainer.parts.precision)  # what autocast ran in
    return step, sum(p.numel() for p in trainer.vae.parameters()), precision


def vae_conv_shapes(args, device: str) -> list[dict]:
    """The VAE's Conv2d shapes in one encode + decode at the benchmark's resolution (batch 1; timed at --batch)."""
    vae = preset_vae(args.preset, device)
    return conv_shapes(vae, torch.randn(1, 3, args.resolution, args.resolution, device=device))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--data", default=str(REPO / "data" / "samples" / "train"))
    p.add_argument("--rows", default="naive,latentvae,latentvae+ckpt,naive-gan,latentvae-gan")
    p.add_argument("--cpu", action="store_true", help="benchmark the CPU even where CUDA exists")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--count-flops", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.row:
        print("RESULT " + json.dumps(run_row(args)))
        return

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if device == "cpu":
        from latentvae.train.loop import cpu_threads_per_process
        torch.set_num_threads(cpu_threads_per_process(1))
    hw, peak = hardware(device), peaks(vae_conv_shapes(args, device), device, args.batch)
    print(f"{hardware_line(hw)}\n{peaks_line(peak)}", flush=True)
    results = []
    for lever in (lv for row in args.rows.split(",") for lv in row.split("+")[1:]):
        lever_overrides(lever)  # a misspelled lever fails before any row runs
    for row in args.rows.split(","):
        cmd = [sys.executable, __file__, "--row", row, "--preset", args.preset, "--resolution", str(args.resolution),
               "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--data", args.data] + (["--cpu"] if args.cpu else []) + (["--count-flops"] if "+" not in row else [])
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"row {row} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(line[0][7:]))
        r = results[-1]
        print(f"  {row:16s} {r['images_per_s']:7.3f} img/s  peak {r['peak_mb']:8.0f} MB", flush=True)

    by = {r["row"]: r for r in results}
    print(f"\n{args.preset} preset, {args.resolution}x{args.resolution}, batch {args.batch}, {args.steps} timed steps, "
          f"{by[results[0]['row']]['params'] / 1e6:.1f}M parameters")
    print("| row | precision | img/s | steps/s | vs naive | vs its base | loss vs base (max rel) | peak MB | GFLOP/step | "
          "achieved GFLOP/s | of conv peak | of matmul peak |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        base = by.get("naive-gan" if base_row(r["row"]).endswith("-gan") else "naive") or results[0]
        # levers change how, not what, the step computes: the FLOPs are the base row's
        flops = r["step_flops"] or (by.get(base_row(r["row"])) or {}).get("step_flops")
        achieved = flops * r["steps_per_s"] if flops else None
        own = by.get(base_row(r["row"]))
        vs_own, drift = "", ""
        if own is not None and own is not r:
            vs_own = f"{r['images_per_s'] / own['images_per_s']:.2f}x"
            # same seed, same batches: a lever that keeps the math keeps the loss curve (to fp noise)
            drift = f"{max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(r['losses'], own['losses'])):.1e}"
        key = peak_key(r["precision"])
        print(f"| {r['row']} | {r['precision']} | {r['images_per_s']:.3f} | {r['steps_per_s']:.3f} | "
              f"{r['images_per_s'] / base['images_per_s']:.2f}x | {vs_own} | {drift} | {r['peak_mb']:.0f} | "
              f"{flops / 1e9 if flops else float('nan'):.1f} | {achieved / 1e9 if achieved else float('nan'):.1f} | "
              f"{achieved / peak['conv'][key] if achieved else float('nan'):.0%} | "
              f"{achieved / peak['matmul'][key] if achieved else float('nan'):.0%} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "hardware": hw, "peaks": peak, "rows": results}, indent=2))


if __name__ == "__main__":
    main()
