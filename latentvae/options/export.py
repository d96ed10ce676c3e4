"""`latentvae export`'s options."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from .common import DATA_HELP, VAE_HELP, _positive
from .fields import REQUIRED, OptionError, opt


@dataclass(frozen=True)
class ExportOptions:
    """Export any VAE to a diffusers folder, or to one .safetensors file in the original LDM layout
    (ComfyUI / A1111 / kohya), with latent statistics measured on your images."""
    src: str = opt(REQUIRED, VAE_HELP + " (a training run: its newest checkpoint)", positional=True, metavar="SRC")
    out: str = opt(REQUIRED, "diffusers folder (--format diffusers) or .safetensors file (--format single-file) to "
                             "write, outside SRC")
    format: Literal["diffusers", "single-file"] = opt(
        "diffusers", "diffusers: a folder for the class's own from_pretrained (any family); single-file: one .safetensors in "
                     "the original LDM key layout (encoder.down.0.block.0...; AutoencoderKL only), latent statistics in "
                     "its metadata")
    weights: Literal["ema", "raw"] = opt("ema", "a training run's EMA or raw weights (other VAEs: the weights they "
                                                "hold; raw is refused)")
    dtype: Literal["fp32", "fp16", "bf16"] = opt("fp32", "stored dtype of the weights")
    calibrate: Optional[str] = opt(None, "images to measure the latent statistics on (" + DATA_HELP + ")",
                                   metavar="DATA")
    convention: Optional[Literal["sd", "sdxl", "sd3", "flux2", "qwenimage", "ltx2"]] = opt(
        None, "the pipeline formula that must give unit latents, one of the VAE family's: sd (SD 1.x/2.x, SANA, "
              "HunyuanImage: z * scaling_factor), sdxl (SDXL family: (z - latents_mean) * scaling_factor / "
              "latents_std, 4 channels), sd3 (SD3/FLUX.1: (z - shift_factor) * scaling_factor), flux2 (FLUX.2: "
              "2x2 patchify, BatchNorm statistics), qwenimage (Qwen-Image, Wan: (z - latents_mean) / latents_std), ltx2 (LTX-2: "
              "(z - latents_mean) * scaling_factor / latents_std, the VAE's buffers); "
              "default: the one the VAE's own factors are for (AutoencoderKL: sd3 for 16 channels, else sd)")
    limit: int = opt(64, "calibration images (of videos: clips)")
    frames: int = opt(17, "--calibrate on videos (a video VAE): frames per clip, on the VAE's clip rule (1 + 4k; "
                          "LTX-2 and CogVideoX 1 + 8k)")
    fps: Optional[float] = opt(None, "--calibrate on videos: clips resampled to this frame rate (default: each "
                                     "video's own)")
    resolution: int = opt(256, "calibration crop size")
    fp16_images: int = opt(2, "calibration images decoded in fp16 to check for overflow (0: skip the check, "
                              "keep force_upcast)")
    eval_summary: Optional[str] = opt(None, "summary.json of `latentvae evaluate`: its entry for SRC (these weights) "
                                            "goes into the model card; none matching is an error (default: "
                                            "RUN/eval/summary.json of a training run, skipped if none matches)")
    overwrite: bool = opt(False, "replace an existing --out")

    def check(self) -> None:
        _positive(limit=self.limit, resolution=self.resolution)
        if self.fp16_images < 0:
            raise OptionError(f"--fp16-images must be >= 0, got {self.fp16_images}")
        if self.convention is not None and self.calibrate is None:
            raise OptionError("--convention chooses how measured factors are written; it needs --calibrate DATA")
        if self.format == "single-file" and not self.out.endswith(".safetensors"):
            raise OptionError(f"--out {self.out}: --format single-file writes one file; name it *.safetensors")
        if self.format == "diffusers" and self.out.endswith(".safetensors"):
            raise OptionError(f"--out {self.out} names a .safetensors file, but --format diffusers writes a folder; "
                              "add --format single-file for one LDM-layout file")
