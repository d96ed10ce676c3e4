"""The VAE lecture's demonstrations, as commands that write images.

    latentvae demo recon-grid  --vae VAE [--vae VAE ...] --data IMAGES --out grid.png [--resolution 256] [--limit 4]
    latentvae demo prior       --vae AE_RUN --vae VAE_RUN --data IMAGES --out DIR [--limit 8]
    latentvae demo interpolate --vae VAE --a IMG_A --b IMG_B --out DIR [--steps 8]
    python eval/demos.py recon-grid ...       # the same commands

recon-grid: one row per image: original | reconstruction | |error| x gain, for each VAE.
prior: z ~ N(0, I) decoded in one forward pass for each VAE (an autoencoder and a VAE trained on
  the same data show the point), and how far those draws fall outside the region the encoder
  actually uses: per latent position, the C-vectors of real images' latents are fitted with a
  Gaussian; the draws' mean squared Mahalanobis distance under it (÷ C, ≈ 1 inside) and the
  Fréchet distance between the two Gaussian fits go to `prior.json`.
interpolate: decoded latent interpolation between two images, linear and spherical, as PNG strips
  and animated GIFs, beside a pixel cross-fade.
Any family (vae/families.py) runs them through its LoadedVae (`lv.moments`, `lv.decode`); a family
the table says cannot run the demos is refused in one line. z ~ N(0, I) is drawn in the VAE's own
latent units (C x H/f x W/f, 4-D whatever the class): the prior its KL term pulls the posterior
toward, not the diffusion units its pipeline's formula makes (for flux2 the 2x2 patchify is a
permutation of the same values, so a draw of N(0, I) is one either way).
Every input (VAEs, images, --resolution against each VAE's downsampling factor, --out) is checked
and every picture computed before the first file is written: a mistake leaves nothing behind, and
prior's and interpolate's folders are staged and renamed into place whole (fsutil.staged_folder).
Images are the central square of each file, resized to --resolution (images.cover_crop).
This module owns those pictures and the pure functions behind them (lerp/slerp, error maps).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import metrics
from .errors import BadInputError, MissingInputError
from .evaluate import as_loaded, load_for, vae_label
from .fsutil import atomic_save_image, check_output_folder, staged_folder, write_durable
from .images import BadImage, cover_crop, list_images, load_rgb, make_grid, to_pil, to_tensor
from .options import InterpolateOptions, PriorOptions, ReconGridOptions
from .vae.loaded import LoadedVae


# ----------------------------------------------------------------------------- pure pieces
def load_square(path: str | Path, size: int, flag: str = "") -> torch.Tensor:
    """(3, size, size) in [-1, 1]: short side resized to `size`, then the central square.

    A missing or undecodable file is a UserError naming it (and `flag`, the option that named it)."""
    what = f"{flag} {path}" if flag else str(path)
    if not Path(path).is_file():
        raise MissingInputError(f"{what} does not exist" if not Path(path).exists() else f"{what} is not a file")
    try:
        img = load_rgb(path)
    except BadImage as e:
        raise BadInputError(f"{flag + ' ' if flag else ''}{e}") from e
    return to_tensor(cover_crop(img, (size, size))[0])


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
        raise BadInputError(f"unknown interpolation {name!r}; valid choices: {', '.join(INTERPOLATIONS)}")
    return INTERPOLATIONS[name]


@torch.no_grad()
def reconstruct_batch(vae, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> reconstructions from the posterior mean (`vae`: a LoadedVae, or a module)"""
    lv = as_loaded(vae)
    return lv.decode(lv.moments(x)[0]).clamp(-1, 1)


@torch.no_grad()
def interpolation_frames(vae, x_a: torch.Tensor, x_b: torch.Tensor, ts: list[float], mode: str) -> torch.Tensor:
    """Decoded interpolations between the posterior means of two (3, H, W) images: (len(ts), 3, H, W)."""
    lv = as_loaded(vae)
    f = get_interpolation(mode)
    mean = lv.moments(torch.stack([x_a, x_b]))[0]
    z = torch.cat([f(mean[:1], mean[1:], t) for t in ts])
    return lv.decode(z).clamp(-1, 1)


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


def save_image(img: Image.Image, path: Path, **kwargs) -> None:
    """A PIL image into a staging folder (written and fsynced; the folder's rename publishes it)."""
    write_durable(path, lambda f: img.save(f, format=Image.registered_extensions()[path.suffix.lower()], **kwargs))


def save_gif(frames: torch.Tensor, path: Path, ms: int = 120) -> None:
    """Frames (N, 3, H, W) as a looping GIF that plays forward then back."""
    images = [to_pil(f) for f in frames]
    images = images + images[-2:0:-1]
    save_image(images[0], path, save_all=True, append_images=images[1:], duration=ms, loop=0)


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
def aggregate_posterior(lv: LoadedVae, x: torch.Tensor, generator: torch.Generator) -> np.ndarray:
    """Latent C-vectors of real images, one per latent position: (B*h*w, C); posterior samples where the
    posterior is a trained Gaussian, the means otherwise."""
    mean, logvar = lv.moments(x)
    z = mean
    if logvar is not None:
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double().numpy()


@torch.no_grad()
def prior_samples(vae, num: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(z ~ N(0, I) in the VAE's latent units, (num, C, size/f, size/f); their decodings in one forward pass)"""
    lv = as_loaded(vae)
    f = lv.layout.factor
    if size % f:
        raise BadInputError(f"--resolution {size} is not a multiple of the downsampling factor {f}")
    z = torch.randn(num, lv.layout.channels, size // f, size // f, generator=generator)
    return z, lv.decode(z).clamp(-1, 1)


def load_vaes(specs: tuple[str, ...], size: int) -> dict[str, LoadedVae]:
    """label -> LoadedVae, every one loaded, its family able to run the demos, and checked against
    --resolution, before any work."""
    vaes: dict[str, LoadedVae] = {}
    for spec in specs:
        lv = load_for(spec, "demo")
        f = lv.layout.factor
        if size % f:
            lo = size - size % f
            hint = f"; use {lo} or {lo + f}" if lo else f"; use {f} or a multiple of it"
            raise BadInputError(f"--resolution {size} is not a multiple of the downsampling factor {f} of --vae "
                                f"{spec}{hint}")
        vaes[vae_label(spec, set(vaes))] = lv
    return vaes


def load_images(data: str, size: int, limit: int) -> tuple[list[Path], torch.Tensor]:
    """The first `limit` images of --data as (N, 3, size, size); a bad one is a UserError naming it."""
    paths = list_images(data)[:limit]
    return paths, torch.stack([load_square(p, size, "--data") for p in paths])


def prior_demo(specs: tuple[str, ...], data: str, size: int, num: int, seed: int, max_real: int = 32):
    """(grid image, {label: distances}) for each VAE: samples next to reconstructions of real images."""
    vaes = load_vaes(specs, size)
    _, x = load_images(data, size, max_real)
    rows, names, numbers = [], [], {}
    for name, lv in vaes.items():
        g = torch.Generator().manual_seed(seed)
        real = aggregate_posterior(lv, x, g)
        z, samples = prior_samples(lv, num, size, g)
        draws = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double().numpy()
        numbers[name] = {**metrics.gaussian_fit_distances(real, draws),
                         "real_latent_std": float(real.std()), "aggregate": "sampled" if lv.stochastic else "mean",
                         "family": lv.family.name, "class": lv.class_name, "latent_layout": lv.layout.describe(),
                         "drawn": f"N(0, I) of shape {'x'.join(map(str, z.shape[1:]))}: the VAE latent"}
        recon = reconstruct_batch(lv, x[:num])
        rows += [samples, torch.cat([recon, torch.full((num - len(recon), *recon.shape[1:]), 1.0)])]
        names += [f"{name}: z~N(0,I)", f"{name}: recon"]
    return label_rows(make_grid(rows), names, size), numbers


# ----------------------------------------------------------------------------- the commands
def check_out_file(out: str) -> None:
    """--out of recon-grid: an image file path that PIL can write (not a folder)."""
    path = Path(out)
    if path.is_dir():
        raise BadInputError(f"--out {out} is a folder; expected an image file such as grid.png")
    Image.init()
    if path.suffix.lower() not in Image.EXTENSION:
        raise BadInputError(f"--out {out}: unknown image file extension {path.suffix!r}; use .png or .jpg")


PRIOR_FILES = ("prior.png", "prior.json")
INTERPOLATE_FILES = ("linear.png", "linear.gif", "slerp.png", "slerp.gif", "strips.png")


def check_out_folder(out: str, ours: tuple[str, ...], what: str) -> None:
    """--out of prior/interpolate: new, empty, or an earlier output of the same demo (it holds `ours`), which
    is replaced whole; never a file or someone's other folder (fsutil.check_output_folder)."""
    check_output_folder(out, "--out", lambda p: all((p / f).is_file() for f in ours), what)


def run_recon_grid(opts: ReconGridOptions) -> None:
    """`latentvae demo recon-grid`: --out, a PNG of the first --limit images of --data through every --vae."""
    check_out_file(opts.out)
    vaes = load_vaes(opts.vae, opts.resolution)
    paths = list_images(opts.data)[: opts.limit]
    for p in paths:  # every image decodable before any work (recon_grid loads them again)
        load_square(p, opts.resolution, "--data")
    grid = recon_grid(vaes, paths, opts.resolution, opts.gain)
    atomic_save_image(grid, opts.out)
    print(f"wrote {opts.out}: {len(paths)} images x (original + {len(vaes)} VAEs)")


def run_prior(opts: PriorOptions) -> None:
    """`latentvae demo prior`: --out/prior.png and prior.json, and their numbers as a table on stdout."""
    out = Path(opts.out)
    check_out_folder(opts.out, PRIOR_FILES, "an earlier prior demo (prior.png, prior.json)")
    grid, numbers = prior_demo(opts.vae, opts.data, opts.resolution, opts.limit, opts.seed)
    with staged_folder(out) as tmp:
        save_image(grid, tmp / "prior.png")
        write_durable(tmp / "prior.json", lambda f: f.write((json.dumps(numbers, indent=2) + "\n").encode()))
    print("| VAE | Mahalanobis² / C of N(0,I) draws | same for real latents | Fréchet(real fit, N(0,I) fit) | real latent std |")
    print("|---|---:|---:|---:|---:|")
    for name, n in numbers.items():
        print(f"| {name} | {n['mahalanobis_ratio']:.2f} | {n['mahalanobis_ratio_real']:.2f} | {n['frechet']:.2f} | "
              f"{n['real_latent_std']:.2f} |")
    print(f"wrote {out}/prior.png and prior.json")


def run_interpolate(opts: InterpolateOptions) -> None:
    """`latentvae demo interpolate`: --out/{linear,slerp}.{png,gif} and strips.png, every one computed
    before the first is written."""
    out, size = Path(opts.out), opts.resolution
    check_out_folder(opts.out, INTERPOLATE_FILES, "an earlier interpolate demo (" + ", ".join(INTERPOLATE_FILES) + ")")
    x_a, x_b = load_square(opts.a, size, "--a"), load_square(opts.b, size, "--b")
    vae, = load_vaes((opts.vae,), size).values()
    ts = np.linspace(0, 1, opts.steps).tolist()
    rows = [torch.stack([lerp(x_a, x_b, t) for t in ts])]  # pixel cross-fade, for comparison
    frames = {mode: interpolation_frames(vae, x_a, x_b, ts, mode) for mode in INTERPOLATIONS}
    rows += list(frames.values())
    strips = label_rows(make_grid(rows), ["pixel cross-fade", *INTERPOLATIONS], size)
    with staged_folder(out) as tmp:  # every picture computed: only now are files written
        for mode, f in frames.items():
            save_image(make_grid([f]), tmp / f"{mode}.png")
            save_gif(f, tmp / f"{mode}.gif")
        save_image(strips, tmp / "strips.png")
    print(f"wrote {out}/{{linear,slerp}}.{{png,gif}} and strips.png")
