"""What a run shows while it trains: windowed loss logs (the trackers + progress bar) and preview grids.

The trackers are accelerate's, chosen by `train.report_to` (`log_with`); `tracker_list` builds that
list (wandb writes into RUN/wandb, offline where no API key is set up).
"""
from __future__ import annotations

import copy
import netrc
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import Config, tracker_names
from ..errors import UserError
from ..fsutil import atomic_save_image
from ..images import make_grid
from ..vae.families import family_of
from .step import Parts, TrainState

PROGRESS_KEYS = ("loss", "rec", "lpips", "kl_per_elem", "g_loss", "d_loss")


class LogWindow:
    """Sums the 0-d log tensors of each update over a window; `flush` reads them once (one device
    sync), averages them over processes and writes them to the trackers and the progress bar."""

    def __init__(self, micro_step: int):
        self.sums: dict[str, torch.Tensor] = {}
        self.n, self.t0, self.micro_step0 = 0, time.perf_counter(), micro_step

    def add(self, logs: dict[str, torch.Tensor]) -> None:
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0) + v.float()
        self.n += 1

    def flush(self, p: Parts, st: TrainState, bar) -> None:
        dt = time.perf_counter() - self.t0
        ips = (st.micro_step - self.micro_step0) * p.cfg.train.batch_size * p.acc.num_processes / max(dt, 1e-9)
        if self.sums:
            keys = sorted(self.sums)
            stacked = torch.stack([self.sums[k] / self.n for k in keys]).to(p.acc.device)
            logs = dict(zip(keys, p.acc.reduce(stacked, reduction="mean").tolist()))
            logs.update(lr=p.sched_g.get_last_lr()[0], images_per_s=ips, nonfinite_total=st.nonfinite_total,
                        skipped_images=len(st.bad_images))
            p.acc.log({f"train/{k}": v for k, v in logs.items()}, step=st.step)
            if bar is not None:
                show = {k: f"{logs[k]:.4g}" for k in PROGRESS_KEYS if k in logs}
                show["img/s"] = f"{ips:.1f}"
                bar.set_postfix(show, refresh=False)
        self.__init__(st.micro_step)


def eval_copy(p: Parts):
    """A copy of the VAE holding the EMA weights (or the raw ones without EMA), in eval mode."""
    vae = copy.deepcopy(p.vae).eval()
    if p.ema is not None:
        vae.load_state_dict(p.ema.state_dict(), strict=False)
    return vae


@torch.no_grad()
def save_preview(p: Parts, val: torch.Tensor, run: Path, step: int) -> Optional[Path]:
    """Reconstruction grid of the held-aside images or clips (original | reconstruction | |error| x2), main process
    only."""
    if not p.acc.is_main_process or len(val) == 0:
        return None
    vae = eval_copy(p)
    x = val.to(p.acc.device)
    fam = family_of(vae)
    with p.autocast():
        x_hat = fam.decode(vae, fam.moments(vae, x)[0]).float().clamp(-1, 1)
    err = ((x_hat - x).abs().mean(1, keepdim=True).expand_as(x) * 2).clamp(0, 1) * 2 - 1
    # clips: three rows per clip, its frames along them
    grid = make_grid([x, x_hat, err] if x.dim() == 4 else
                     [r[c].transpose(0, 1) for c in range(len(x)) for r in (x, x_hat, err)])
    path = run / "samples" / f"recon-{step:08d}.png"
    atomic_save_image(grid, path)
    log_image(p.acc, "val/reconstruction", grid, step)
    return path


def log_image(acc, key: str, image, step: int) -> None:
    """A PIL image to every tracker that takes images (TensorBoard, wandb, aim, clearml, swanlab)."""
    import numpy as np

    hwc = np.asarray(image)
    for tracker in acc.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({key: hwc[None]}, step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({key: [hwc]}, step)


WANDB_PROJECT = "latentvae"


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def tracker_list(report_to: Optional[str], run: Path, log=print) -> Optional[list]:
    """accelerate's `log_with` for `train.report_to`: the names, wandb as a tracker object (project
    "latentvae", the run folder's name, files in RUN/wandb, offline without an API key or WANDB_MODE)."""
    from accelerate.tracking import WandBTracker, get_available_trackers

    names = tracker_names(report_to)
    available = {getattr(t, "value", str(t)) for t in get_available_trackers()}
    missing = [n for n in names if n not in available]
    if missing:
        raise UserError(f"train.report_to={report_to}: the {missing[0]} package is not installed "
                        f"(pip install {missing[0].replace('_', '-')}), or choose another tracker or none")
    out: list = []
    for name in names:
        if name == "wandb":
            kwargs = {"dir": str(run), "name": Path(run).resolve().name}
            if "WANDB_MODE" not in os.environ and not wandb_logged_in():
                kwargs["mode"] = "offline"
                log(f"wandb: no API key; logging offline into {run}/wandb (upload later with `wandb sync`)")
            out.append(WandBTracker(WANDB_PROJECT, **kwargs))
        else:
            out.append(name)
    return out or None


def flat_config(cfg: Config) -> dict[str, Any]:
    """section.key -> scalar, for the trackers' hyperparameter tables."""
    out = {}
    for section, values in cfg.to_dict().items():
        for k, v in values.items():
            out[f"{section}.{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
