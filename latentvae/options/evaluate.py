"""`latentvae evaluate`, `latentvae probe` and `latentvae demo ...`: the options of the jobs that compare VAEs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from .common import DATA_HELP, PRECISION_HELP, VAE_HELP, DataKind, Precision, _check_tile_size, _positive
from .fields import REQUIRED, OptionError, opt


@dataclass(frozen=True)
class EvaluateOptions:
    """Evaluate autoencoders side by side: PSNR, SSIM, LPIPS, rFID, sharpness, rate, speed."""
    vae: tuple[str, ...] = opt(REQUIRED, VAE_HELP)
    data: str = opt(REQUIRED, DATA_HELP)
    out: str = opt(REQUIRED, "report folder: new, empty, or an earlier report (replaced whole)")
    data_kind: DataKind = opt("auto", "what --data is (auto: from the path)")
    split: str = opt("train", "split of a `datasets` input")
    image_column: str = opt("image", "image column of a `datasets` input")
    limit: int = opt(0, "only the first N images (0: all)")
    fit: Literal["crop", "pad"] = opt("crop", "center-crop or reflect-pad each image to a multiple of every VAE's downsampling factor")
    max_side: int = opt(0, "downscale images whose long side exceeds this first (0: never)")
    lpips: Literal["alex,vgg", "alex", "vgg", "none"] = opt("alex,vgg", "LPIPS networks: alex,vgg (both), alex, vgg "
                                                                    "or none", metavar="NETS")
    lpips_dir: Optional[str] = opt(None, "folder of the LPIPS backbones (default: $LATENTVAE_LPIPS_DIR)")
    protocol: Literal["full", "imagenet256", "coco256"] = opt(
        "full", "full: each image whole (--max-side, --fit); imagenet256, coco256: short side resized to 256 "
                "(bicubic, antialiased) and the central 256x256 crop, the published tables' protocol "
                "(docs/evaluation.md)")
    latent: Literal["mean", "sample"] = opt("mean", "decode the posterior mean, or a sample of it (seeded by --seed)")
    seed: int = opt(0, "seed of --latent sample's draws")
    tiling: bool = opt(False, "diffusers' tiled encode/decode (vae.enable_tiling()): memory bounded by the tile")
    tile_size: int = opt(0, "with --tiling: tile side in pixels (diffusers' tile_sample_min_size; the latent tile is "
                            "it over the downsampling factor); 0: the model's own")
    inception_weights: Optional[str] = opt(None, "rFID's Inception-v3: a safetensors file of torch-fidelity's "
                                                 "weights (default: $LATENTVAE_INCEPTION_WEIGHTS, else "
                                                 "torch-fidelity's download; none found: no rFID)", metavar="PATH")
    mixed_precision: Precision = opt("no", PRECISION_HELP + "; evaluation's default: no (fp32) on every device")
    device: str = opt("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")

    def check(self) -> None:
        if self.limit < 0 or self.max_side < 0:
            raise OptionError("--limit and --max-side must be >= 0")
        if self.max_side and self.protocol != "full":
            raise OptionError(f"--max-side applies to --protocol full only; --protocol {self.protocol} resizes "
                              "every image to 256 itself")
        _check_tile_size(self.tiling, self.tile_size)


@dataclass(frozen=True)
class ReconGridOptions:
    """One row per image: original | reconstruction | |error| x gain, for each VAE."""
    vae: tuple[str, ...] = opt(REQUIRED, VAE_HELP)
    data: str = opt(REQUIRED, "image folder")
    out: str = opt(REQUIRED, "PNG file to write")
    limit: int = opt(4, "the first N images")
    resolution: int = opt(256, "central square, resized to this (a multiple of each VAE's downsampling factor)")
    gain: float = opt(4.0, "error map amplification")

    def check(self) -> None:
        _positive(limit=self.limit, resolution=self.resolution)


@dataclass(frozen=True)
class PriorOptions:
    """Decode z ~ N(0, I) in one forward pass per VAE; how far such draws fall from the encoder's latents."""
    vae: tuple[str, ...] = opt(REQUIRED, VAE_HELP + "; e.g. an ae-mode run, then a vae run")
    data: str = opt(REQUIRED, "real images: the aggregate posterior")
    out: str = opt(REQUIRED, "folder to write prior.png and prior.json into")
    limit: int = opt(8, "prior samples (and reconstructions) per VAE")
    resolution: int = opt(128, "image side (a multiple of each VAE's downsampling factor)")
    seed: int = opt(0, "seed of the draws")

    def check(self) -> None:
        _positive(limit=self.limit, resolution=self.resolution)


@dataclass(frozen=True)
class InterpolateOptions:
    """Decoded latent interpolation between two images, linear and spherical, as PNG strips and GIFs."""
    vae: str = opt(REQUIRED, VAE_HELP)
    a: str = opt(REQUIRED, "first image file")
    b: str = opt(REQUIRED, "last image file")
    out: str = opt(REQUIRED, "folder to write into")
    steps: int = opt(8, "frames, both ends included")
    resolution: int = opt(256, "image side (a multiple of the VAE's downsampling factor)")

    def check(self) -> None:
        _positive(resolution=self.resolution)
        if self.steps < 2:
            raise OptionError(f"--steps must be >= 2 (both ends), got {self.steps}")


@dataclass(frozen=True)
class ProbeOptions:
    """The second number: train a small diffusion model on each latent cache for the same budget and compare
    their held-out denoising losses (docs/probe.md)."""
    cache: tuple[str, ...] = opt(REQUIRED, "a latent cache from `latentvae encode`; repeat for each VAE to compare",
                                 metavar="CACHE")
    out: str = opt(REQUIRED, "report folder: new, empty, or an earlier probe's (resumed)")
    preset: Literal["tiny", "small", "test"] = opt("tiny", "UNet2DModel size: tiny (~2.8M parameters), small "
                                                           "(~20M), test (a few thousand, for tests)")
    objective: Literal["flow", "v"] = opt("flow", "flow matching (logit-normal t) or v-prediction (cosine schedule)")
    steps: int = opt(1200, "optimizer steps per cache and seed (the budget; tiny: ~0.46 s per step of 32 on 2 AVX2 cores)")
    batch_size: int = opt(32, "latents per process and step")
    lr: float = opt(5e-4, "AdamW learning rate, constant after the warm-up")
    warmup_steps: int = opt(100, "linear learning-rate warm-up")
    ema_decay: float = opt(0.999, "EMA of the weights that are scored and sampled")
    holdout: float = opt(0.15, "share of the source images whose rows are held out (at least one image)")
    noise_levels: int = opt(8, "noise levels t = (k + 0.5) / K of the held-out loss")
    seeds: int = opt(1, "train each cache with this many seeds (seed, seed + 1, ...) for the spread")
    seed: int = opt(0, "first training seed")
    class_column: Optional[str] = opt(None, "condition on this integer column of the caches (class labels)")
    samples: int = opt(16, "latents sampled and decoded per cache, as one grid")
    sample_steps: int = opt(32, "Euler (flow) or DDIM (v) steps of the sampler")
    log_every: int = opt(50, "log the training loss every N steps")
    save_every: int = opt(500, "checkpoint every N steps (a rerun resumes); 0: only at the end")
    mixed_precision: Precision = opt("no", "precision of training (scoring is fp32): no (fp32, the same figures on "
                                           "every machine), bf16, fp16, auto")
    report_to: Literal["tensorboard", "none"] = opt("tensorboard", "tracker of the training curves")

    def check(self) -> None:
        _positive(steps=self.steps, batch_size=self.batch_size, seeds=self.seeds, noise_levels=self.noise_levels,
                  samples=self.samples, sample_steps=self.sample_steps, log_every=self.log_every)
        if not 0 < self.holdout < 1:
            raise OptionError(f"--holdout must be a share in (0, 1), got {self.holdout}")
        if self.lr <= 0 or not 0 <= self.ema_decay < 1:
            raise OptionError(f"--lr must be > 0 and --ema-decay in [0, 1), got {self.lr} and {self.ema_decay}")
        if self.save_every < 0 or self.warmup_steps < 0:
            raise OptionError("--save-every and --warmup-steps must be >= 0")
