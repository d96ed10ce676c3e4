"""Training a KL-regularized VAE (or a plain autoencoder): the step, the loop, checkpoints, losses.

    from latentvae.train import Trainer
    Trainer(load_config("configs/quickstart.yaml"), "runs/x").run()

step.py (one step, top to bottom), loop.py (Trainer: build, loop), checkpoint.py (save/resume a
run's full state), report.py (logs, preview grids), ema.py, losses.py, discriminator.py.
"""
from .loop import NonFiniteError, Trainer, run

__all__ = ["NonFiniteError", "Trainer", "run"]
