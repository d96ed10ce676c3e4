"""Validation during training: PSNR, SSIM, LPIPS (and rFID) of the EMA weights on the validation images.

    images, bad = load_val_images(val_src, cfg.data.val_resolution, cfg.train.eval_count)
    v = Validator(cfg, images, device, log, lpips_loss)   # main process only
    record = v.evaluate(eval_copy(parts), step)           # {"step", "images", "psnr", "ssim", "lpips_vgg", ...}
    append_record(run, record)                            # one line of RUN/eval.jsonl, fsynced

The numbers are those of `latentvae evaluate`: per image `metrics.image_metrics` (PSNR, SSIM and the
sharpness ratios on the uint8 reconstruction), LPIPS on the same uint8 images mapped back to [-1, 1]
(batched on the device: `metrics.image_metrics` would run it image by image on the CPU), rFID from
`fid.py`; the record holds their means over the images. The VAE runs in fp32 on the posterior mean.
Clips (N, 3, T, H, W) are scored per frame: "images" counts frames, "clips" clips.
RUN/eval.jsonl is appended to, one JSON object per evaluation; a line cut by a crash is skipped when
read, and at start the lines after the step the run resumes from are dropped (`prune_log`).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .. import metrics
from ..config import Config
from ..fsutil import atomic_write_bytes
from ..images import to_uint8
from ..perceptual import LPIPSWeightsError, load_lpips, lpips_distance
from ..precision import autocast
from ..sources import ImageSource
from ..vae.families import family_of
from .clips import fold
from .data import load_val_batch

EVAL_LOG = "eval.jsonl"
# train.best_metric -> whether a higher value is better ("none" keeps no best checkpoint)
HIGHER_IS_BETTER = {"lpips_vgg": False, "lpips_alex": False, "psnr": True, "ssim": True, "rfid": False}


def best_metric(cfg: Config) -> str:
    """train.best_metric as a record key: "lpips" is the LPIPS of loss.lpips_net."""
    metric = cfg.train.best_metric
    return f"lpips_{cfg.loss.lpips_net}" if metric == "lpips" else metric


def load_val_images(src: ImageSource, res: int, count: int) -> tuple[torch.Tensor, list[str]]:
    """Center crops of the first `count` validation images, (N, 3, res, res) uint8, and the skip messages."""
    x, bad = load_val_batch(src.subset(list(range(min(count, len(src))))), res)
    return to_uint8(x), bad  # exact: the crops came from uint8 pixels


def better(metric: str, value: Optional[float], than: Optional[float]) -> bool:
    """Whether `value` of `metric` improves on `than` (None: nothing yet)."""
    if value is None or not math.isfinite(value):
        return False
    if than is None:
        return True
    return value > than if HIGHER_IS_BETTER[metric] else value < than


def finite_or_none(value: float) -> Optional[float]:
    """JSON has no inf/nan (the PSNR of an exact copy is inf): written as null, as evaluate.py does."""
    return value if math.isfinite(value) else None


@torch.inference_mode()
def reconstruct(vae, x_u8: torch.Tensor, device) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> reconstruction from the posterior mean (the latent, for a family without a
    posterior), fp32 in [-1, 1], on `device`."""
    x = x_u8.to(device).float() / 127.5 - 1
    fam = family_of(vae)
    with autocast(torch.device(device).type, None):  # fp32, whatever the run's precision
        return fam.decode(vae, fam.moments(vae, x)[0]).float().clamp(-1, 1)


class Validator:
    """Scores a VAE on fixed validation images; main process only (no collective operation inside)."""

    def __init__(self, cfg: Config, images: torch.Tensor, device, log: Callable[[str], None] = print,
                 lpips_loss: Optional[torch.nn.Module] = None):
        self.cfg, self.images, self.device, self.log = cfg, images, torch.device(device), log
        self.notes: list[str] = []  # said once, at the first evaluation
        self.first = True
        self.lpips = self._lpips_models(lpips_loss)
        self.fid, self.inception = self._fid_setup()  # fid.py and its extractor, or None, None
        self.real_stats = None  # Inception statistics of the originals, computed once

    def _lpips_models(self, lpips_loss) -> dict[str, torch.nn.Module]:
        """The loss's LPIPS net (reused when the loss loaded it) and the one train.best_metric names."""
        lo, best = self.cfg.loss, best_metric(self.cfg)
        nets = [lo.lpips_net]
        if best.startswith("lpips_") and best.removeprefix("lpips_") not in nets:
            nets.append(best.removeprefix("lpips_"))
        models = {}
        for net in nets:
            if net == lo.lpips_net and lpips_loss is not None:
                models[net] = lpips_loss
                continue
            try:
                models[net] = load_lpips(net, lo.lpips_dir).to(self.device)
            except LPIPSWeightsError as e:
                self.notes.append(f"validation: LPIPS-{net} not computed ({e})")
        return models

    def _fid_setup(self) -> tuple:
        t = self.cfg.train
        clips = self.images.dim() == 5
        n = len(self.images) * (self.images.shape[2] if clips else 1)  # clips: their frames
        if n < t.eval_fid_min:
            what = f"{n} validation frame(s) of {len(self.images)} clip(s)" if clips else f"{n} validation image(s)"
            self.notes.append(f"validation: rFID not computed: {what}, "
                              f"fewer than train.eval_fid_min={t.eval_fid_min}")
            return None, None
        try:
            from .. import fid
        except ImportError as e:
            self.notes.append(f"validation: rFID not computed (latentvae.fid cannot be imported: {e})")
            return None, None
        try:
            return fid, fid.load_inception(t.inception_weights, self.device, option="train.inception_weights")
        except fid.InceptionUnavailable as e:
            self.notes.append(f"validation: rFID not computed ({e})")
            return None, None

    def evaluate(self, vae, step: int) -> dict:
        """Mean PSNR, pooled PSNR, SSIM, LPIPS, sharpness ratios (and rFID) of `vae` on the images."""
        best = best_metric(self.cfg)
        if self.first:
            for note in self.notes:
                self.log(note)
            if best != "none" and best not in self.available():
                self.log(f"validation: train.best_metric={best} is not computed; no best checkpoint is kept")
            self.first = False
        t0 = time.perf_counter()
        rows, sq_err, values = [], 0.0, 0
        fid_rec = self.fid.FeatureStats() if self.fid else None
        fid_real = self.fid.FeatureStats() if self.fid and self.real_stats is None else None
        for i in range(0, len(self.images), self.cfg.train.batch_size):
            ref_u8 = self.images[i:i + self.cfg.train.batch_size]
            x_hat = reconstruct(vae, ref_u8, self.device)
            if x_hat.dim() == 5:  # clips: scored per frame
                ref_u8, x_hat = fold(ref_u8), fold(x_hat)
            out_u8 = to_uint8(x_hat).cpu()
            out_float = ((x_hat.double() + 1) / 2).cpu()  # unquantized, for the sharpness ratios
            batch_rows = []
            for ref, out, fl in zip(ref_u8, out_u8, out_float):
                ref_hwc, out_hwc = ref.permute(1, 2, 0).numpy(), out.permute(1, 2, 0).numpy()
                batch_rows.append(metrics.image_metrics(ref_hwc, out_hwc, fl.permute(1, 2, 0).numpy(), {}))
                sq_err += metrics.squared_error_sum(ref_hwc, out_hwc)
                values += ref_hwc.size
            for net, value in self.lpips_batch(ref_u8, out_u8).items():
                for row, v in zip(batch_rows, value):
                    row[f"lpips_{net}"] = v
            rows += batch_rows
            if fid_rec is not None:
                fid_rec.add(self.inception, out_u8)
                if fid_real is not None:
                    fid_real.add(self.inception, ref_u8)
        record = {"step": step, "images": len(rows)}  # clips: frames
        if self.images.dim() == 5:
            record["clips"] = len(self.images)
        for key in rows[0] if rows else ():
            record[key] = finite_or_none(float(np.mean([r[key] for r in rows])))
        record["psnr_pooled"] = finite_or_none(metrics.pooled_psnr(sq_err, values)) if values else None
        if fid_rec is not None:
            if fid_real is not None:
                self.real_stats = fid_real
            record["rfid"] = self.fid.frechet_distance(self.real_stats, fid_rec)
        record["seconds"] = round(time.perf_counter() - t0, 3)
        return record

    def available(self) -> set[str]:
        """The metrics every record holds."""
        return {"psnr", "ssim"} | {f"lpips_{n}" for n in self.lpips} | ({"rfid"} if self.fid else set())

    @torch.inference_mode()
    def lpips_batch(self, ref_u8: torch.Tensor, out_u8: torch.Tensor) -> dict[str, list[float]]:
        """Per-image LPIPS of the uint8 images mapped back to [-1, 1], as metrics.image_metrics computes it."""
        a = ref_u8.to(self.device).float() / 127.5 - 1
        b = out_u8.to(self.device).float() / 127.5 - 1
        return {net: lpips_distance(model, a, b).float().cpu().tolist() for net, model in self.lpips.items()}


# ----------------------------------------------------------------------------- RUN/eval.jsonl
def read_records(run: Path) -> list[dict]:
    """The records of RUN/eval.jsonl, in order; a line that does not parse (cut by a crash) is skipped."""
    path = Path(run) / EVAL_LOG
    if not path.is_file():
        return []
    records = []
    for line in path.read_bytes().split(b"\n"):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def append_record(run: Path, record: dict) -> None:
    """One line appended to RUN/eval.jsonl and fsynced (after a cut line, on a line of its own)."""
    path = Path(run) / EVAL_LOG
    line = json.dumps(record, sort_keys=True).encode() + b"\n"
    with open(path, "ab+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def prune_log(run: Path, step: int) -> list[dict]:
    """Keep the records up to `step` (the step a run starts or resumes at) and drop cut lines; the
    records of a killed run's steps beyond its last checkpoint are retrained and evaluated again."""
    path = Path(run) / EVAL_LOG
    records = read_records(run)
    kept = [r for r in records if r["step"] <= step]
    if path.is_file():
        text = b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in kept)
        if text != path.read_bytes():
            atomic_write_bytes(path, text)
    return kept


def best_record(records: list[dict], metric: str) -> Optional[dict]:
    """The record with the best value of `metric` (the earliest of equal ones), or None."""
    best = None
    for r in records:
        if better(metric, r.get(metric), None if best is None else best[metric]):
            best = r
    return best
