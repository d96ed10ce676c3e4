"""Evaluate any set of autoencoders side by side, of any family: PSNR, SSIM, LPIPS, rFID, sharpness, rate, speed.

    latentvae evaluate --vae runs/quickstart --vae taesd:sd --data IMAGES --out REPORT [--max-side 1024]
    latentvae evaluate --vae flux2-vae/ --vae qwen-image/vae --vae sd-vae-ft-mse/ --data IMAGES --out REPORT
    latentvae evaluate --vae VAE --data user/dataset --split validation --image-column img --limit 100 --out REPORT
    latentvae evaluate --vae taesd:sd --data IMAGES --protocol imagenet256 --inception-weights W.safetensors --out R
    python eval/evaluate.py --vae VAE [--vae VAE ...] --data IMAGES --out REPORT      # the same command

Each VAE is anything `vae.loading.load_vae` accepts (a diffusers folder of any family in vae/families.py,
a pipeline folder, a hub id, a training run or checkpoint, an LDM .safetensors file, `taesd:*`), and
every family goes through the same lines: its LoadedVae gives the moments, the decode and the layout.
`--data` is an image folder or a `datasets` dataset (`--limit N`: its first N images). Under `--protocol
full` (default) every image is reconstructed whole (or downscaled to --max-side first), center-cropped
(--fit crop) or reflect-padded (--fit pad) to a multiple of every VAE's downsampling factor, so all see
the same pixels; `imagenet256`/`coco256` take the central 256x256 after a bicubic short-side resize.
z is the posterior mean (`--latent sample`: a seeded draw); fp32 unless --mixed-precision says
otherwise; `--tiling` uses diffusers' tiled encode/decode. REPORT gets `per_image.csv`,
`summary.json`, `report.md` (the figures side by side, and each VAE's family, class and latent
layout) and `spectrum.png`, staged beside REPORT and renamed into place whole (fsutil.staged_folder).
docs/evaluation.md states the conventions.

Videos (`--data` a folder of video files or a dataset with a --video-column; video VAEs only):

    latentvae evaluate --vae WAN --vae LTX2 --data videos/ --frames 17 --fps 8 --resolution 64x64 --out REPORT
    latentvae evaluate --vae WAN --data videos/ --frames 49 --resolution 480x832 --tiling --i3d I3D.safetensors --out R

per-frame PSNR/SSIM/LPIPS, temporal PSNR, FVD with --i3d, a strip PNG per clip (video.py, video_report.py).

The package: inputs.py (the images, protocols and fit), scoring.py (one VAE over the images: rows,
latent statistics, its summary), report.py (the files), job.py (the command), video.py (clips through every
VAE: the clip rule, the scores, FVD), video_report.py (its files and strips).
"""
from ..vae.model import configure_tiling
from .inputs import FITS, PROTOCOLS, fit_crop, fit_pad
from .job import load_all, load_for, resolve_device, run, run_evaluation, vae_label
from .report import markdown_table, vaes_table
from .scoring import CSV_COLUMNS, Reconstruction, as_loaded, hwc_float, hwc_uint8, reconstruct

__all__ = ["CSV_COLUMNS", "FITS", "PROTOCOLS", "Reconstruction", "as_loaded", "configure_tiling", "fit_crop", "fit_pad",
           "hwc_float", "hwc_uint8", "load_all", "load_for", "markdown_table", "reconstruct", "resolve_device", "run",
           "run_evaluation", "vae_label", "vaes_table"]
