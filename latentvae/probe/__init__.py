"""The second number: how easily a small diffusion model learns a VAE's latent space.

    latentvae probe --cache A --cache B --out REPORT [--seeds 3] [--steps N]
    accelerate launch -m latentvae probe --cache A --cache B --out REPORT      # any number of processes

For each latent cache (from `latentvae encode`) and each seed, a diffusers UNet2DModel sized by
`--preset` is trained for the same budget with the same recipe, then scored on a held-out split of
the cache; the report puts the caches side by side. The recipe (docs/probe.md):

- Data: the cache's rows, one latent shape, in the layout its VAE family's diffusion model sees
  (flux2: the 2x2-patchified latent; probe/data.py). Held out: every row of a fixed share of the source
  *images* (`--holdout`, chosen by a hash of the image's key, the same for every seed and every cache
  of the same images), so crops of one photograph never sit on both sides.
- Units: latents normalized per channel by the cache's own measured mean and std (manifest
  latent_statistics, measured on its rows; a cache without them has them measured here, and the
  report says so), so every cache's latents are zero-mean, unit-variance per channel and the losses
  of different VAEs are in the same units. With `--store moments`, every training batch draws a
  fresh posterior sample mean + std * eps; held-out latents are the posterior means.
- Objective: flow matching (`flow`: x_t = (1 - t) x0 + t eps, target eps - x0, t ~ logit-normal(0, 1)
  as in SD3) or v-prediction (`v`: cosine schedule alpha = cos(pi t / 2), sigma = sin(pi t / 2),
  target alpha eps - sigma x0, t ~ U(0, 1)); the UNet sees 1000 t. AdamW, constant learning rate
  after a linear warm-up, gradient clipping at 1, EMA of the weights (train/ema.py).
- Score: the EMA model's MSE on the held-out latents at `--noise-levels` fixed levels
  t_k = (k + 0.5) / K, with noise fixed by a seed that does not depend on the training seed: the
  same noise for every cache and seed. Overall = the mean over levels.
- Samples: `--samples` latents drawn from N(0, I) with the EMA model (Euler on the flow ODE, or DDIM
  with v), de-normalized and decoded by the cache's own VAE, as one grid per cache.

It reuses the training machinery: accelerate for processes and precision, the run folder layout,
checksummed checkpoints and resume of latentvae/runs.py (OUT/runs/LABEL-seedS/checkpoints/...), the
EMA of train/ema.py, the tracker (tensorboard). A rerun of the same command resumes every
(cache, seed) from its newest checkpoint, saying from which step and how many are left, and the
batches of step n are a pure function of (seed, n), so a resumed probe gives the same figures as an
uninterrupted one. A signal (SIGINT, SIGTERM, SIGUSR1) during training finishes the step it is in and
writes a checkpoint first (interrupts.StopRequest; elsewhere it stops at once); its one line says how far
each run got. An earlier summary.json and report.md are removed when a probe starts its work and written
again at its end, summary.json last, so neither is ever beside sample grids of another run.

Caches of different families (different latent shapes) go side by side, but their held-out losses
compare only within one shape: the run says so in one line, and the report which figures compare
across shapes (probe/report.py).

The package: data.py (a cache as the probe learns it, and its latent statistics), model.py (the UNet,
the objective, batches, scoring, sampling), training.py (one (cache, seed) run, checkpoints, resume),
report.py (summary, comparison, report.md), job.py (the command).
"""
from .data import ProbeData, held_out_images, image_key, latent_statistics, read_cache
from .job import REPORT_FILES, cache_label, run, run_probe, stopped_message
from .model import EVAL_NOISE_SEED, PRESETS, batch_for, build_unet, held_out_loss, noisy, sample
from .report import comparison, report_markdown, summarize
from .training import train_one, train_steps

__all__ = ["EVAL_NOISE_SEED", "PRESETS", "REPORT_FILES", "ProbeData", "batch_for", "build_unet", "cache_label",
           "comparison", "held_out_images", "held_out_loss", "image_key", "latent_statistics", "noisy", "read_cache",
           "report_markdown", "run", "run_probe", "sample", "stopped_message", "summarize", "train_one", "train_steps"]
