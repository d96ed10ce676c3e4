"""The second number: how easily a small diffusion model learns a VAE's latent space.

    latentvae probe --cache A --cache B --out REPORT [--seeds 3] [--steps N]
    accelerate launch -m latentvae probe --cache A --cache B --out REPORT      # any number of processes

For each latent cache (from `latentvae encode`) and each seed, a diffusers UNet2DModel sized by
`--preset` is trained for the same budget with the same recipe, then scored on a held-out split of
the cache; the report puts the caches side by side. The recipe (docs/probe.md):

- Data: the cache's rows, one latent shape. Held out: every row of a fixed share of the source
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
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import runs
from .errors import BadInputError
from .fsutil import atomic_save_image, atomic_write_bytes, atomic_write_json
from .options import ProbeOptions, validated
from .train.ema import EMA

PRESETS = {
    # ~2.8M parameters: 16x16x4 latents, a few hundred ms per batch of 32 on 2 CPU cores
    "tiny": dict(block_out_channels=(64, 128), layers_per_block=1, norm_num_groups=16, attention_head_dim=32,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")),
    # ~20M parameters
    "small": dict(block_out_channels=(96, 192, 384), layers_per_block=2, norm_num_groups=32, attention_head_dim=32,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    # for tests: a few thousand parameters
    "test": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D")),
}
REPORT_FILES = ("summary.json", "report.md")  # removed when a (re)run starts, written when it ends
EVAL_NOISE_SEED = 20_250_101  # the held-out noise: the same for every cache and every training seed


# ----------------------------------------------------------------------------- data
@dataclass
class ProbeData:
    """One cache, read whole into memory (a probe's caches are small: 16x16x4 latents), normalized."""
    label: str
    cache: Path
    manifest: dict
    train_mean: torch.Tensor  # (N, C, h, w) normalized units
    train_std: Optional[torch.Tensor]  # posterior std in normalized units (--store moments), else None
    val: torch.Tensor  # (M, C, h, w) held-out posterior means, normalized
    val_keys: list[str]  # the held-out rows' source keys (crops included), in row order
    train_labels: Optional[torch.Tensor]
    val_labels: Optional[torch.Tensor]
    channel_mean: torch.Tensor  # (C,) raw units
    channel_std: torch.Tensor
    statistics: str  # where the normalization came from
    images: int  # source images in the cache
    held_out_images: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.val.shape[1:])


def image_key(source_key: str) -> str:
    """The source image of a row: a crop's key without its `#cropK` suffix."""
    return source_key.split("#crop")[0]


def held_out_images(keys: list[str], share: float) -> set[str]:
    """A fixed share of the images (at least one, never all), chosen by a hash of their keys."""
    images = sorted(set(keys), key=lambda k: hashlib.sha1(k.encode()).hexdigest())
    if len(images) < 2:
        raise BadInputError(f"the probe holds out whole source images, but the cache has only {len(images)} image(s); "
                            "encode more images (several crops per image: latentvae encode --preprocess crops)")
    n = min(len(images) - 1, max(1, round(share * len(images))))
    return set(images[:n])


def read_cache(cache: str, opts: ProbeOptions, label: str) -> ProbeData:
    """The rows of one cache, split, normalized; refused where the probe cannot use it."""
    from .cache import LatentDataset
    from .cache.reader import latents_from_arrow

    ds = LatentDataset(cache, family=None)  # refuses a missing, unfinished or non-cache folder, naming it
    m = ds.manifest
    shapes = np.unique(ds.latent_shapes(), axis=0)
    if len(shapes) != 1:
        raise BadInputError(f"{cache}: the probe needs one latent shape, the cache has {len(shapes)} "
                            f"({', '.join('x'.join(map(str, s)) for s in shapes)}); encode with --preprocess "
                            "center-crop or crops")
    if opts.class_column and opts.class_column not in ds.data.column_names:
        raise BadInputError(f"{cache}: --class-column {opts.class_column!r} is not a column of the cache; it has "
                            f"{', '.join(c for c in ds.data.column_names if not c.startswith('latent_'))}")
    table = ds.data.with_format("arrow")[:]
    n = table.num_rows
    mean = latents_from_arrow(table.column("latent_mean" if "latent_mean" in table.column_names else "latent_sample"),
                              m["dtype"], n)
    logvar = latents_from_arrow(table.column("latent_logvar"), m["dtype"], n) if m["store"] == "moments" else None
    row_keys = [k if k is not None else sid for k, sid in
                zip(table.column("source_key").to_pylist(), table.column("source_id").to_pylist())]
    keys = [image_key(k) for k in row_keys]
    labels = None
    if opts.class_column:
        values = table.column(opts.class_column).to_pylist()
        if not all(isinstance(v, int) and v >= 0 for v in values):
            raise BadInputError(f"{cache}: --class-column {opts.class_column!r} must hold integers >= 0")
        labels = torch.tensor(values)
    held = held_out_images(keys, opts.holdout)
    is_val = torch.tensor([k in held for k in keys])
    stats = m.get("latent_statistics")
    if stats and stats.get("channel_mean") and stats.get("channel_std"):
        c_mean, c_std = torch.tensor(stats["channel_mean"]), torch.tensor(stats["channel_std"])
        where = f"manifest latent_statistics ({stats.get('measured_on', 'measured on the cache')})"
    else:  # an older cache: measure on the training rows here, never use unmeasured factors
        from .vae.moments import batch_moments, channel_mean_std

        tr = ~is_val
        c_mean, c_std = channel_mean_std(batch_moments(mean[tr], None if logvar is None else logvar[tr]))
        c_mean, c_std = c_mean.float(), c_std.float()
        where = f"measured by the probe on the {int(tr.sum())} training rows (the manifest has no latent_statistics)"
    if bool((c_std <= 0).any()):
        raise BadInputError(f"{cache}: a latent channel has zero variance ({c_std.tolist()}); nothing to learn there")
    cm, cs = c_mean.view(1, -1, 1, 1), c_std.view(1, -1, 1, 1)
    norm = (mean - cm) / cs
    std = None if logvar is None else torch.exp(0.5 * logvar) / cs
    tr, va = ~is_val, is_val
    return ProbeData(label, Path(cache), m, norm[tr].contiguous(), None if std is None else std[tr].contiguous(),
                     norm[va].contiguous(), [k for k, v in zip(row_keys, is_val.tolist()) if v],
                     None if labels is None else labels[tr], None if labels is None else labels[va],
                     c_mean, c_std, where, len(set(keys)), len(held))


# ----------------------------------------------------------------------------- model and objective
def build_unet(preset: str, shape: tuple[int, int, int], num_classes: int = 0):
    from diffusers import UNet2DModel

    c, h, w = shape
    if h != w:
        raise BadInputError(f"the probe's UNet takes square latents, got {h}x{w}")
    cfg = PRESETS[preset]
    factor = 2 ** (len(cfg["block_out_channels"]) - 1)
    if h % factor:
        raise BadInputError(f"--preset {preset} halves the latent {len(cfg['block_out_channels']) - 1} time(s): "
                            f"the side must be a multiple of {factor}, got {h}")
    return UNet2DModel(sample_size=h, in_channels=c, out_channels=c, num_class_embeds=num_classes or None, **cfg)


def noisy(objective: str, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, the regression target) at times t (B,) in [0, 1]."""
    tt = t.view(-1, 1, 1, 1)
    if objective == "flow":
        return (1 - tt) * x0 + tt * eps, eps - x0
    a, s = torch.cos(0.5 * math.pi * tt), torch.sin(0.5 * math.pi * tt)
    return a * x0 + s * eps, a * eps - s * x0


def draw_times(objective: str, n: int, g: torch.Generator) -> torch.Tensor:
    if objective == "flow":  # logit-normal(0, 1), SD3's choice
        return torch.sigmoid(torch.randn(n, generator=g))
    return torch.rand(n, generator=g)


def predict(model, x_t: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
    return model(x_t, t * 1000, class_labels=labels).sample


def batch_for(data: ProbeData, objective: str, seed: int, step: int, batch: int, rank: int, world: int):
    """The training batch of step `step` on process `rank`: a pure function of (seed, step, rank)."""
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(f"{seed}|{step}".encode(), digest_size=7).digest(),
                                                     "little"))
    n = len(data.train_mean)
    idx = torch.randint(0, n, (batch * world,), generator=g)[rank * batch:(rank + 1) * batch]
    x0 = data.train_mean[idx]
    post = torch.randn(x0.shape, generator=g)  # drawn always, so the stream does not depend on --store
    eps = torch.randn((batch * world, *x0.shape[1:]), generator=g)[rank * batch:(rank + 1) * batch]
    t = draw_times(objective, batch * world, g)[rank * batch:(rank + 1) * batch]
    if data.train_std is not None:
        x0 = x0 + data.train_std[idx] * post
    labels = None if data.train_labels is None else data.train_labels[idx]
    return x0, eps, t, labels


@torch.no_grad()
def held_out_loss(model, data: ProbeData, objective: str, levels: int, device, batch: int = 256) -> dict:
    """The held-out MSE at each of `levels` fixed noise levels, and their mean."""
    g = torch.Generator().manual_seed(EVAL_NOISE_SEED)
    eps_all = torch.randn((levels, *data.val.shape), generator=g)
    per_level = []
    for k in range(levels):
        t_k = (k + 0.5) / levels
        total = 0.0
        for i in range(0, len(data.val), batch):
            x0, eps = data.val[i:i + batch].to(device), eps_all[k, i:i + batch].to(device)
            t = torch.full((len(x0),), t_k, device=device)
            x_t, target = noisy(objective, x0, eps, t)
            labels = None if data.val_labels is None else data.val_labels[i:i + batch].to(device)
            total += float(F.mse_loss(predict(model, x_t, t, labels).float(), target, reduction="sum"))
        per_level.append(total / data.val.numel())
    return {"loss": float(np.mean(per_level)), "per_level": per_level,
            "levels": [(k + 0.5) / levels for k in range(levels)]}


@torch.no_grad()
def sample(model, objective: str, shape, n: int, steps: int, seed: int, device,
           labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """n latents (normalized units) from N(0, I): Euler on the flow ODE, or DDIM with v-prediction."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g).to(device)
    ts = torch.linspace(1.0, 0.0, steps + 1)
    for k in range(steps):
        t, t_next = float(ts[k]), float(ts[k + 1])
        tt = torch.full((n,), t, device=device)
        out = predict(model, x, tt, labels).float()
        if objective == "flow":
            x = x + (t_next - t) * out
        else:
            a, s = math.cos(0.5 * math.pi * t), math.sin(0.5 * math.pi * t)
            x0, eps = a * x - s * out, s * x + a * out
            a2, s2 = math.cos(0.5 * math.pi * t_next), math.sin(0.5 * math.pi * t_next)
            x = a2 * x0 + s2 * eps
    return x.cpu()


# ----------------------------------------------------------------------------- one (cache, seed) run
def save_probe_checkpoint(run: Path, step: int, model, ema: EMA, opt, acc, extra: dict) -> None:
    """A complete checkpoint in runs.py's layout (staging folder, checksums, one rename); main process."""
    tmp = runs.begin(run, step)
    runs.save_tensors(tmp / "model.safetensors", acc.unwrap_model(model).state_dict())
    runs.save_tensors(tmp / "ema.safetensors", ema.state_dict())
    tensors, meta = runs.optimizer_to_files(opt.state_dict())
    runs.save_tensors(tmp / "optim-g.safetensors", tensors)
    runs.write_json(tmp / "optim-g.json", meta)
    runs.write_json(tmp / "state.json", {"format": runs.STATE_FORMAT, "kind": "probe", "step": step,
                                         "ema_updates": ema.updates, **extra, "files": runs.checksums(tmp)})
    runs.commit(run, step, keep_last=1)


def resume_from(run: Path, recipe: dict, model, ema: EMA, opt, steps: int, what: str, log=print) -> tuple[int, float]:
    """Load the run's newest checkpoint that verifies into model, EMA and optimizer, saying so with the
    steps done and to do; (its step, its training seconds), or (0, 0.0) for a new run."""
    runs.clean_staging(run)  # the hidden staging folder of a checkpoint a signal or kill cut short
    for ckpt in runs.resume_candidates(run, log):
        state = runs.read_state(ckpt)
        if state.get("recipe") != recipe:
            raise BadInputError(f"{run}: holds a probe run with another recipe or cache ({ckpt.name}); use a new --out")
        model.load_state_dict(runs.load_tensors(ckpt / "model.safetensors"))
        ema.load_state_dict(runs.load_tensors(ckpt / "ema.safetensors"), state["ema_updates"])
        runs.restore_optimizer(opt, runs.load_tensors(ckpt / "optim-g.safetensors"),
                               json.loads((ckpt / "optim-g.json").read_text()))
        start = state["step"]
        log(f"{what}: trained to step {start} already, reusing {ckpt}" if start >= steps else
            f"{what}: resuming from step {start} of {steps}, {steps - start} to do ({ckpt})")
        return start, state.get("train_seconds", 0.0)
    return 0, 0.0


def train_one(data: ProbeData, opts: ProbeOptions, seed: int, run: Path, acc, log=print) -> dict:
    """Train (or resume) the probe model on one cache with one seed; the held-out scores of its EMA.
    A signal during training stops it after the current step, with a checkpoint (interrupts.StopRequest)."""
    from accelerate.utils import set_seed

    set_seed(seed)
    num_classes = 0 if data.train_labels is None else int(max(data.train_labels.max(), data.val_labels.max()
                                                               if len(data.val_labels) else 0)) + 1
    model = build_unet(opts.preset, data.shape, num_classes)
    ema = EMA(model, opts.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=0.0)
    recipe = {"preset": opts.preset, "objective": opts.objective, "lr": opts.lr, "batch_size": opts.batch_size,
              "processes": acc.num_processes, "ema_decay": opts.ema_decay, "seed": seed,
              "cache": str(data.cache), "weights_sha256": data.manifest["vae"]["weights_sha256"]}
    start, seconds = resume_from(run, recipe, model, ema, opt, opts.steps, f"{data.label} seed {seed}", log)
    model, opt = acc.prepare(model, opt)
    ema.shadow = [s.to(acc.device) for s in ema.shadow]
    t0 = time.perf_counter()

    def save(step: int) -> None:
        if acc.is_main_process:
            save_probe_checkpoint(run, step, model, ema, opt, acc,
                                  {"recipe": recipe, "train_seconds": seconds + time.perf_counter() - t0})
        acc.wait_for_everyone()

    curve = train_steps(model, ema, opt, data, opts, seed, start, acc, save, log)
    seconds += time.perf_counter() - t0
    scorer = build_unet(opts.preset, data.shape, num_classes).to(acc.device).eval()
    scorer.load_state_dict({**scorer.state_dict(), **{k: v.to(acc.device) for k, v in ema.state_dict().items()}})
    scores = held_out_loss(scorer, data, opts.objective, opts.noise_levels, acc.device)
    acc.log({f"probe/{data.label}/seed{seed}/heldout_loss": scores["loss"]}, step=opts.steps)
    return {**scores, "seed": seed, "train_seconds": seconds, "steps": opts.steps,
            "images_seen": opts.steps * opts.batch_size * acc.num_processes, "train_curve": curve, "model": scorer}


def train_steps(model, ema: EMA, opt, data: ProbeData, opts: ProbeOptions, seed: int, start: int, acc, save,
                log=print) -> list:
    """Steps `start` to --steps; `save(step)` checkpoints (every --save-every, at the end, and when a signal
    asks to stop: then after the step it is in, and Interrupted). The logged training curve."""
    from .interrupts import StopRequest

    warmup = max(1, min(opts.warmup_steps, opts.steps))
    curve = []
    model.train()
    with StopRequest(log, "the current step") as stop:
        for step in range(start, opts.steps):
            for group in opt.param_groups:
                group["lr"] = opts.lr * min(1.0, (step + 1) / warmup)
            x0, eps, t, labels = batch_for(data, opts.objective, seed, step, opts.batch_size, acc.process_index,
                                           acc.num_processes)
            x0, eps, t = x0.to(acc.device), eps.to(acc.device), t.to(acc.device)
            labels = None if labels is None else labels.to(acc.device)
            x_t, target = noisy(opts.objective, x0, eps, t)
            with acc.autocast():
                loss = F.mse_loss(predict(model, x_t, t, labels).float(), target)
            acc.backward(loss)
            acc.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(acc.unwrap_model(model))
            if (step + 1) % opts.log_every == 0:
                value = float(loss.detach())
                curve.append([step + 1, value])
                acc.log({f"probe/{data.label}/seed{seed}/train_loss": value}, step=step + 1)
            if stop.agreed(acc):
                save(step + 1)
                raise stop.interrupted("")  # run() says which runs are where
            if (opts.save_every and (step + 1) % opts.save_every == 0) or step + 1 == opts.steps:
                save(step + 1)
    return curve


def stopped_message(opts: ProbeOptions) -> str:
    """The interrupt's line: how far the checkpoints of OUT/runs/LABEL-seedS got."""
    taken: set = set()
    labels = [cache_label(c, taken) for c in opts.cache]
    where = {(label, opts.seed + k): runs.list_checkpoints(Path(opts.out) / "runs" / f"{label}-seed{opts.seed + k}")
             for label in labels for k in range(opts.seeds)}
    steps = {key: int(runs.CKPT_RE.match(found[-1].name).group(1)) if found else 0 for key, found in where.items()}
    done = sum(1 for n in steps.values() if n >= opts.steps)
    partial = [f"{label} seed {seed} at step {n}" for (label, seed), n in steps.items() if 0 < n < opts.steps]
    return (f"{opts.out}: {done} of {len(steps)} probe run(s) trained to step {opts.steps}"
            + (f", checkpoints of {', '.join(partial)}" if partial else "") + "; rerun the same command to resume")


# ----------------------------------------------------------------------------- latent statistics
@torch.no_grad()
def latent_statistics(data: ProbeData, vae, count: int = 32) -> dict:
    """Per-channel statistics of the cache; the spectrum of held-out latents against their source images;
    scale equivariance of the VAE on those images (latent_stats.py)."""
    from . import latent_stats
    from .cache.verify import cache_data, manifest_preprocess
    from .vae.model import downsample_factor
    from .preprocess import load_preprocessed
    from .sources import CropSource, open_source
    from .vae.moments import kl_to_standard_normal

    m = data.manifest
    stats = m.get("latent_statistics") or {}
    out = {"channel_mean": data.channel_mean.tolist(), "channel_std": data.channel_std.tolist(),
           "normalization": data.statistics}
    if data.train_std is not None:  # KL per element of the posterior, from the stored moments
        mu = data.train_mean * data.channel_std.view(1, -1, 1, 1) + data.channel_mean.view(1, -1, 1, 1)
        var = (data.train_std * data.channel_std.view(1, -1, 1, 1)).pow(2)
        out["kl_per_channel"] = kl_to_standard_normal(mu, var.log()).mean((0, 2, 3)).tolist()
    out["manifest_std"] = stats.get("std")
    s = m["source"]
    src = open_source(cache_data(data.cache, m), s["kind"], s["split"], s["image_column"], 10**12)
    pre = manifest_preprocess(m)
    if pre.mode == "crops":
        src = CropSource(src, pre.crops, pre.crop_seed)
    index = {src.relative_name(i): i for i in range(len(src))}
    keys = data.val_keys[:count]
    rows = list(range(len(keys)))
    pixels = [load_preprocessed(src, index[k], pre, m["preprocessing"]["jpeg_draft"])["pixels"] for k in keys]
    images = torch.stack(pixels).float() / 127.5 - 1
    z = data.val[rows] * data.channel_std.view(1, -1, 1, 1) + data.channel_mean.view(1, -1, 1, 1)
    out["spectrum"] = latent_stats.spectrum_statistics(z, images)
    if images.shape[-1] % (2 * downsample_factor(vae)) == 0:
        out["scale_equivariance_psnr"] = latent_stats.scale_equivariance_psnr(vae, images)
    return out


# ----------------------------------------------------------------------------- the whole probe
def cache_label(cache: str, taken: set) -> str:
    base = Path(cache).resolve().name or "cache"
    label, n = base, 2
    while label in taken:
        label, n = f"{base}-{n}", n + 1
    taken.add(label)
    return label


def check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise BadInputError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "runs").is_dir():
        raise BadInputError(f"--out {out} is a non-empty folder that is not a probe report (no runs/); choose a new "
                            "or empty folder, or the folder of an earlier probe to resume it")


def run_probe(opts: ProbeOptions, log=print) -> dict:
    """Train and score every (cache, seed); the report on the first process. Returns the summary."""
    from accelerate import Accelerator
    from accelerate.utils import parse_flag_from_env

    from .cache.verify import check_same_vae, load_cache_vae
    from .images import make_grid
    from .vae.model import decode
    from .precision import resolve_mixed_precision

    opts = validated(opts)
    out = Path(opts.out)
    check_out(out)
    taken: set = set()
    datas = [read_cache(c, opts, cache_label(c, taken)) for c in opts.cache]  # every check before any work
    shapes = {d.shape for d in datas}
    if len(shapes) > 1:
        log(f"note: the caches' latent shapes differ ({', '.join('x'.join(map(str, s)) for s in shapes)}); the "
            "losses are per element in normalized units, but a different shape is a different task")
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU")
    device_type = "cpu" if cpu or not torch.cuda.is_available() else "cuda"
    precision = resolve_mixed_precision(opts.mixed_precision, device_type)
    acc = Accelerator(mixed_precision=precision, log_with=None if opts.report_to == "none" else opts.report_to,
                      project_dir=str(out), cpu=cpu)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for name in REPORT_FILES:  # an earlier report goes before new sample grids could sit beside it
            (out / name).unlink(missing_ok=True)
        acc.init_trackers("probe", config={k: str(v) for k, v in vars(opts).items()})
    acc.wait_for_everyone()
    seeds = [opts.seed + k for k in range(opts.seeds)]
    results: dict[str, list[dict]] = {}
    grids = {}
    for data in datas:
        results[data.label] = []
        for seed in seeds:
            r = train_one(data, opts, seed, out / "runs" / f"{data.label}-seed{seed}", acc, log if acc.is_main_process
                          else (lambda *a: None))
            model = r.pop("model")
            results[data.label].append(r)
            if acc.is_main_process:
                log(f"{data.label} seed {seed}: held-out loss {r['loss']:.4f} after {r['steps']} steps "
                    f"({r['train_seconds']:.0f} s)")
            if seed == seeds[0] and acc.is_main_process:
                vae = load_cache_vae(data.cache, data.manifest, None)
                check_same_vae(vae, data.cache, data.manifest, None)
                labels = None
                if data.train_labels is not None:
                    labels = torch.arange(opts.samples) % (int(data.train_labels.max()) + 1)
                z = sample(model, opts.objective, data.shape, opts.samples, opts.sample_steps, seed, acc.device, labels)
                z = z * data.channel_std.view(1, -1, 1, 1) + data.channel_mean.view(1, -1, 1, 1)
                imgs = decode(vae, z.to(next(vae.parameters()).dtype)).float().clamp(-1, 1)
                cols = int(math.ceil(math.sqrt(opts.samples)))
                rows_ = [imgs[i:i + cols] for i in range(0, len(imgs), cols)]
                while len(rows_[-1]) < cols:
                    rows_[-1] = torch.cat([rows_[-1], torch.ones_like(imgs[:1])])
                path = out / f"samples-{data.label}.png"
                atomic_save_image(make_grid(rows_), path)
                grids[data.label] = path.name
                results[data.label][-1]["latent_statistics"] = latent_statistics(data, vae)
    summary = summarize(datas, results, opts, precision, acc.num_processes)
    summary["sample_grids"] = grids
    if acc.is_main_process:  # summary.json last: where it is, the report and grids beside it are this run's
        atomic_write_bytes(out / "report.md", report_markdown(summary).encode())
        atomic_write_json(out / "summary.json", summary)
    acc.wait_for_everyone()
    acc.end_training()  # last: it ends the process group that wait_for_everyone needs
    return summary


def summarize(datas: list[ProbeData], results: dict, opts: ProbeOptions, precision: str, processes: int) -> dict:
    caches = {}
    for d in datas:
        rs = results[d.label]
        losses = [r["loss"] for r in rs]
        caches[d.label] = {
            "cache": str(d.cache), "vae": d.manifest["vae"].get("path"), "latent_shape": list(d.shape),
            "train_rows": len(d.train_mean), "held_out_rows": len(d.val), "images": d.images,
            "held_out_images": d.held_out_images, "normalization": d.statistics,
            "heldout_loss_mean": float(np.mean(losses)), "heldout_loss_std": float(np.std(losses, ddof=1)) if len(rs) > 1 else None,
            "per_level_mean": np.mean([r["per_level"] for r in rs], axis=0).tolist(),
            "levels": rs[0]["levels"], "seeds": [{k: v for k, v in r.items() if k != "latent_statistics"} for r in rs],
            "train_seconds_mean": float(np.mean([r["train_seconds"] for r in rs])),
            "latent_statistics": next((r["latent_statistics"] for r in rs if "latent_statistics" in r), None),
        }
    labels = list(caches)
    base = labels[0]
    diffs = {}
    for other in labels[1:]:  # paired by seed: the same seed gives the same batches and noise
        d = [a["loss"] - b["loss"] for a, b in zip(results[other], results[base])]
        spread = float(np.std(d, ddof=1)) if len(d) > 1 else None
        diffs[f"{other} - {base}"] = {"mean": float(np.mean(d)), "per_seed": d, "std_over_seeds": spread,
                                      "resolved": None if spread is None else bool(abs(np.mean(d)) > 2 * spread)}
    return {"recipe": {"preset": opts.preset, "objective": opts.objective, "steps": opts.steps,
                       "batch_size": opts.batch_size, "processes": processes, "lr": opts.lr,
                       "warmup_steps": opts.warmup_steps, "ema_decay": opts.ema_decay, "holdout": opts.holdout,
                       "noise_levels": opts.noise_levels, "seeds": opts.seeds, "precision": precision,
                       "units": "MSE per latent element, latents normalized per channel by each cache's measured "
                                "mean and std"},
            "caches": caches, "differences": diffs}


def report_markdown(s: dict) -> str:
    r = s["recipe"]
    lines = ["# Diffusion probe", "",
             f"UNet2DModel preset `{r['preset']}`, {r['objective']} objective, {r['steps']} steps x batch "
             f"{r['batch_size']} x {r['processes']} process(es), lr {r['lr']}, EMA {r['ema_decay']}, precision "
             f"{r['precision']}, {r['seeds']} seed(s). Held-out loss: {r['units']}; mean over "
             f"{r['noise_levels']} noise levels (lower: easier to learn).", "",
             "| cache | latent | held-out loss | std over seeds | train rows | held-out rows (images) | latent HF share "
             "| image HF share | scale-equivariance PSNR | train s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, c in s["caches"].items():
        ls = c.get("latent_statistics") or {}
        spec = ls.get("spectrum") or {}
        std = "-" if c["heldout_loss_std"] is None else f"{c['heldout_loss_std']:.4f}"
        eq = ls.get("scale_equivariance_psnr")
        lines.append(f"| {label} | {'x'.join(map(str, c['latent_shape']))} | {c['heldout_loss_mean']:.4f} | {std} | "
                     f"{c['train_rows']} | {c['held_out_rows']} ({c['held_out_images']}) | "
                     f"{spec.get('latent_hf_share', float('nan')):.3f} | {spec.get('image_hf_share', float('nan')):.3f} | "
                     f"{'-' if eq is None else f'{eq:.2f}'} | {c['train_seconds_mean']:.0f} |")
    if s["differences"]:
        lines += ["", "| difference (paired by seed) | mean | std over seeds | beyond 2 std |", "|---|---:|---:|---|"]
        for name, d in s["differences"].items():
            sd = "-" if d["std_over_seeds"] is None else f"{d['std_over_seeds']:.4f}"
            lines.append(f"| {name} | {d['mean']:+.4f} | {sd} | {'-' if d['resolved'] is None else d['resolved']} |")
    lines += ["", "Per noise level (t: 0 clean, 1 pure noise):", "",
              "| cache | " + " | ".join(f"t={t:.2f}" for t in next(iter(s["caches"].values()))["levels"]) + " |",
              "|---|" + "---:|" * len(next(iter(s["caches"].values()))["levels"])]
    for label, c in s["caches"].items():
        lines.append(f"| {label} | " + " | ".join(f"{v:.4f}" for v in c["per_level_mean"]) + " |")
    lines += ["", "Samples: " + ", ".join(f"`{g}`" for g in s.get("sample_grids", {}).values()), ""]
    return "\n".join(lines)


def run(opts: ProbeOptions) -> dict:
    """`latentvae probe`: the report, and its table on stdout; a signal's line says how far each run got."""
    from .interrupts import Interrupted

    try:
        summary = run_probe(opts)
    except Interrupted as e:
        from .cli import is_first_process
        raise Interrupted(e.signum, stopped_message(validated(opts)) if is_first_process() else "") from None
    print(report_markdown(summary))
    return summary
