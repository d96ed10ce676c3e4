"""Training a KL-regularized VAE (or a plain autoencoder) of any family: the step, the loop, checkpoints, losses.

    from latentvae.train import Trainer
    Trainer(load_config("configs/quickstart.yaml"), "runs/x").run()

build.py (the VAE a run starts from, any family, checked against the config; the parts around it),
step.py (one step, top to bottom), loop.py (Trainer: set up, loop), checkpoint.py (save/resume a
run's full state), report.py (logs, preview grids), validation.py, data.py, clips.py (a video VAE's
decoder on clips: the clip stream, latent tiles), ema.py, losses.py, discriminator.py, equivariance.py.
"""
from .loop import NonFiniteError, Trainer, run

__all__ = ["NonFiniteError", "Trainer", "run"]
