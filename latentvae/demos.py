"""The VAE lecture's demonstrations, as commands that write images.

    python eval/demos.py recon-grid  --vae VAE [--vae VAE ...] --data IMAGES --out grid.png [--size 256]
    python eval/demos.py prior       --vae AE_RUN --vae VAE_RUN --data IMAGES --out DIR [--num 8]
    python eval/demos.py interpolate --vae VAE --a IMG_A --b IMG_B --out DIR [--steps 8]

recon-grid: one row per image: original | reconstruction | |error| x gain, for each VAE.
prior: z ~ N(0, I) decoded in one forward pass for each VAE (an autoencoder and a VAE trained on
  the same data show the point), and how far those draws fall outside the region the encoder
  actually uses: per latent position, the C-vectors of real images' latents are fitted with a
  Gaussian; the draws' mean squared Mahalanobis distance under it (÷ C, ≈ 1 inside) and the
  Fréchet distance between the two Gaussian fits go to `prior.json`.
interpolate: decoded latent interpolation between two images, linear and spherical, as PNG strips
  and animated GIFs, beside a pixel cross-fade.
This module owns those pictures and the pure functions behind them (lerp/slerp, error maps).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from . import metrics
from .images import atomic_save_image, list_images, load_rgb, make_grid, to_pil, to_tensor
from .evaluate import trained_stochastic
from .io import NotAnAutoencoder, load_autoencoder
from .model import decode, downsample_factor, encode_moments, latent_channels


# ----------------------------------------------------------------------------- pure pieces
def load_square(path: str | Path, size: int) -> torch.Tensor:
    """(3, size, size) in [-1, 1]: short side resized to `size`, then the central square."""
    img = ImageOps.fit(load_rgb(path), (size, size), Image.Resampling.LANCZOS)
    return to_tensor(img)


def error_map(x: torch.Tensor, x_hat: torch.Tensor, gain: float = 4.0) -> torch.Tensor:
    """|x - x_hat| per channel, times `gain`, as an image in [-1, 1] (black = no error)."""
    return ((x - x_hat).abs() / 2 * gain).clamp(0, 1) * 2 - 1


def lerp(z0: torch.Tensor, z1: torch.Tensor, t: float) -> torch.Tensor:
    return (1 - t) * z0 + t * z1


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of whole latents seen as vectors (norm follows the great circle);
    falls back to lerp when they are (anti)parallel. t=0 and t=1 give z0 and z1 exactly."""
    a, b = z0.flatten().double(), z1.flatten().double()
    cos = torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-12)
    theta = torch.arccos(cos.clamp(-1, 1))
    if theta.abs() < 1e-4 or (torch.pi - theta).abs() < 1e-4:
        return lerp(z0, z1, t)
    s = torch.sin(theta)
    w0, w1 = torch.sin((1 - t) * theta) / s, torch.sin(t * theta) / s
    return (w0 * z0.double() + w1 * z1.double()).to(z0.dtype)


INTERPOLATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {"linear": lerp, "slerp": slerp}


def get_interpolation(name: str):
    if name not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {name!r}; valid choices: {', '.join(INTERPOLATIONS)}")
    return INTERPOLATIONS[name]


@torch.no_grad()
def reconstruct_batch(vae, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> reconstructions from the posterior mean"""
    return decode(vae, encode_moments(vae, x)[0]).clamp(-1, 1)


@torch.no_grad()
def interpolation_frames(vae, x_a: torch.Tensor, x_b: torch.Tensor, ts: list[float], mode: str) -> torch.Tensor:
    """Decoded interpolations between the posterior means of two (3, H, W) images: (len(ts), 3, H, W)."""
    f = get_interpolation(mode)
    mean = encode_moments(vae, torch.stack([x_a, x_b]))[0]
    z = torch.cat([f(mean[:1], mean[1:], t) for t in ts])
    return decode(vae, z).clamp(-1, 1)


def label_columns(grid: Image.Image, labels: list[str], cell: int, pad: int = 2, height: int = 16) -> Image.Image:
    """The grid with a white band on top naming each column (PIL's default font)."""
    out = Image.new("RGB", (grid.width, grid.height + height), "white")
    out.paste(grid, (0, height))
    draw = ImageDraw.Draw(out)
    for i, text in enumerate(labels):
        draw.text((pad + i * (cell + pad) + 2, 2), text[: max(4, cell // 6)], fill="black")
    return out


def label_rows(grid: Image.Image, labels: list[str], cell: int, pad: int = 2, width: int = 160) -> Image.Image:
    """The grid with a white band on the left naming each row."""
    out = Image.new("RGB", (grid.width + width, grid.height), "white")
    out.paste(grid, (width, 0))
    draw = ImageDraw.Draw(out)
    for i, text in enumerate(labels):
        draw.text((4, pad + i * (cell + pad) + cell // 2 - 6), text[:26], fill="black")
    return out


def save_gif(frames: torch.Tensor, path: Path, ms: int = 120) -> None:
    """Frames (N, 3, H, W) as a looping GIF that plays forward then back."""
    images = [to_pil(f) for f in frames]
    images = images + images[-2:0:-1]
    atomic_save_image(images[0], path, save_all=True, append_images=images[1:], duration=ms, loop=0)


def short_name(spec: str) -> str:
    return spec if spec.startswith("taesd:") else Path(spec).name


# ----------------------------------------------------------------------------- recon-grid
def recon_grid(vaes: dict, paths: list[Path], size: int, gain: float) -> Image.Image:
    """rows: images; columns: original, then reconstruction and error map per VAE."""
    x = torch.stack([load_square(p, size) for p in paths])
    cols = [x]
    for vae in vaes.values():
        x_hat = reconstruct_batch(vae, x)
        cols += [x_hat, error_map(x, x_hat, gain)]
    rows = [torch.stack([c[i] for c in cols]) for i in range(len(paths))]
    labels = ["original"] + [s for name in vaes for s in (name, f"|error| x{gain:g}")]
    return label_columns(make_grid(rows), labels, size)


# ----------------------------------------------------------------------------- prior samples
@torch.no_grad()
def aggregate_posterior(vae, x: torch.Tensor, sample: bool, generator: torch.Generator) -> np.ndarray:
    """Latent C-vectors of real images, one per latent position: (B*h*w, C)."""
    mean, logvar = encode_moments(vae, x)
    z = mean
    if sample and logvar is not None:
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double().numpy()


@torch.no_grad()
def prior_samples(vae, num: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(z ~ N(0, I) raw latents, their decodings in one forward pass)"""
    f = downsample_factor(vae)
    if size % f:
        raise ValueError(f"--size {size} is not a multiple of the downsampling factor {f}")
    z = torch.randn(num, latent_channels(vae), size // f, size // f, generator=generator)
    return z, decode(vae, z).clamp(-1, 1)


def prior_demo(specs: list[str], data: str, size: int, num: int, seed: int, max_real: int = 32):
    """(grid image, {label: distances}) for each VAE: samples next to reconstructions of real images."""
    paths = list_images(data)[:max_real]
    x = torch.stack([load_square(p, size) for p in paths])
    rows, names, numbers = [], [], {}
    for spec in specs:
        vae, name = load_autoencoder(spec).eval(), short_name(spec)
        g = torch.Generator().manual_seed(seed)
        real = aggregate_posterior(vae, x, trained_stochastic(spec, vae), g)
        z, samples = prior_samples(vae, num, size, g)
        draws = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double().numpy()
        numbers[name] = {**metrics.gaussian_fit_distances(real, draws),
                         "real_latent_std": float(real.std()), "aggregate": "sampled" if trained_stochastic(spec, vae) else "mean"}
        recon = reconstruct_batch(vae, x[:num])
        rows += [samples, torch.cat([recon, torch.full((num - len(recon), *recon.shape[1:]), 1.0)])]
        names += [f"{name}: z~N(0,I)", f"{name}: recon"]
    return label_rows(make_grid(rows), names, size), numbers


# ----------------------------------------------------------------------------- command line
def _cmd_recon_grid(args) -> None:
    vaes = {short_name(s): load_autoencoder(s).eval() for s in args.vae}
    paths = list_images(args.data)[: args.num]
    grid = recon_grid(vaes, paths, args.size, args.gain)
    atomic_save_image(grid, args.out)
    print(f"wrote {args.out}: {len(paths)} images x (original + {len(vaes)} VAEs)")


def _cmd_prior(args) -> None:
    out = Path(args.out)
    grid, numbers = prior_demo(args.vae, args.data, args.size, args.num, args.seed)
    atomic_save_image(grid, out / "prior.png")
    (out / "prior.json").write_text(json.dumps(numbers, indent=2) + "\n")
    print("| VAE | Mahalanobis² / C of N(0,I) draws | same for real latents | Fréchet(real fit, N(0,I) fit) | real latent std |")
    print("|---|---:|---:|---:|---:|")
    for name, n in numbers.items():
        print(f"| {name} | {n['mahalanobis_ratio']:.2f} | {n['mahalanobis_ratio_real']:.2f} | {n['frechet']:.2f} | "
              f"{n['real_latent_std']:.2f} |")
    print(f"wrote {out}/prior.png and prior.json")


def _cmd_interpolate(args) -> None:
    vae, out = load_autoencoder(args.vae).eval(), Path(args.out)
    x_a, x_b = load_square(args.a, args.size), load_square(args.b, args.size)
    ts = np.linspace(0, 1, args.steps).tolist()
    rows = [torch.stack([lerp(x_a, x_b, t) for t in ts])]  # pixel cross-fade, for comparison
    for mode in INTERPOLATIONS:
        frames = interpolation_frames(vae, x_a, x_b, ts, mode)
        atomic_save_image(make_grid([frames]), out / f"{mode}.png")
        save_gif(frames, out / f"{mode}.gif")
        rows.append(frames)
    atomic_save_image(label_rows(make_grid(rows), ["pixel cross-fade", *INTERPOLATIONS], args.size), out / "strips.png")
    print(f"wrote {out}/{{linear,slerp}}.{{png,gif}} and strips.png")


SUBCOMMANDS = {"recon-grid": _cmd_recon_grid, "prior": _cmd_prior, "interpolate": _cmd_interpolate}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval/demos.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("recon-grid", help="original | reconstruction | |error|, per VAE")
    g.add_argument("--vae", action="append", required=True)
    g.add_argument("--data", required=True)
    g.add_argument("--out", required=True, help="PNG file")
    g.add_argument("--num", type=int, default=4, help="first N images")
    g.add_argument("--size", type=int, default=256, help="central square, resized to this")
    g.add_argument("--gain", type=float, default=4.0, help="error map amplification")
    pr = sub.add_parser("prior", help="decode z ~ N(0, I); how far it is from the encoder's latents")
    pr.add_argument("--vae", action="append", required=True, help="e.g. an ae-mode run, then a vae run")
    pr.add_argument("--data", required=True, help="real images: the aggregate posterior")
    pr.add_argument("--out", required=True, help="folder")
    pr.add_argument("--num", type=int, default=8)
    pr.add_argument("--size", type=int, default=128)
    pr.add_argument("--seed", type=int, default=0)
    it = sub.add_parser("interpolate", help="linear and spherical latent interpolation, PNG + GIF")
    it.add_argument("--vae", required=True)
    it.add_argument("--a", required=True)
    it.add_argument("--b", required=True)
    it.add_argument("--out", required=True, help="folder")
    it.add_argument("--steps", type=int, default=8)
    it.add_argument("--size", type=int, default=256)
    return p


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    try:
        SUBCOMMANDS[args.command](args)
    except (NotAnAutoencoder, FileNotFoundError, ValueError) as e:
        sys.exit(f"{args.command}: {e}")


if __name__ == "__main__":
    main()
