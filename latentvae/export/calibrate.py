"""Latent statistics measured on images, for any VAE family: its pipeline's factors, latent health, fp16 safety.

A diffusion model trains on the latents its pipeline's formula makes (vae/conventions.py), so the
factors that formula reads belong to the VAE and are measured here, never copied from another model
(SD's 0.18215 is 1 / std of *its* latents; docs/export.md).

    stats = calibrate(lv, CalibrationConfig(source="data/samples/train", count=64, resolution=256))
    print(format_stats(stats))
    report = fp16_check(lv, stats.sample_latents)   # decoder in fp16: overflow? -> force_upcast

What is measured is what the family's consumers take (families.py `consumer`): posterior samples
z = mu + sigma * eps for "sample" families (their moments accumulated exactly, without drawing
noise: vae/moments.py), the mean alone for "mode" families and deterministic latents; on the
pipeline's view of the latent (flux2: 2x2-patchified first, so the statistics are per 4C channels,
as its BatchNorm buffers are). The health figures (KL, dead channels) are of the posterior, per VAE
latent channel.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import BadInputError
from ..images import BadImage
from ..preprocess import Preprocess, load_preprocessed
from ..sources import open_source
from ..vae.conventions import CONVENTIONS, check_convention, diffusers_config, patchify
from ..vae.loaded import LoadedVae
from ..vae.moments import LatentMoments, batch_moments, channel_mean_std, global_mean_std, merge_moments

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
FP16_HEADROOM = 0.5  # fp32 peaks above half the fp16 range: other images may overflow -> upcast
DEAD_KL = 0.01  # nats per latent element: below this a channel's posterior is the prior (no information)
CONSUMER_WORDS = {"sample": "posterior samples z = mean + std * noise (their exact moments; no noise drawn)",
                  "mode": "the posterior mean (mode)", "latent": "the latent itself (no posterior)"}


def choose_convention(lv: LoadedVae, convention: Optional[str]) -> str:
    """`--convention` if the family's pipelines apply it (one line naming the family's otherwise), else the
    formula the record says its pipeline applies (loaded.py: from the source's own factors)."""
    fam = lv.family
    if convention is None:
        convention = lv.convention
    elif convention not in fam.conventions:
        raise BadInputError(f"--convention {convention}: {lv.class_name} ({fam.name} family) pipelines apply "
                            f"{' or '.join(fam.conventions)}; valid choices for it: {', '.join(fam.conventions)}")
    return check_convention(convention, lv.layout.channels)


def check_resolution(lv: LoadedVae, resolution: int) -> None:
    """Calibration images are square crops whose latents the pipeline can patchify (flux2: even sides)."""
    fam, layout = lv.family, lv.layout
    if resolution % layout.multiple:
        patch = f" times its {fam.patch}x{fam.patch} patchify" if fam.patch > 1 else ""
        raise BadInputError(f"--resolution {resolution} is not a multiple of {layout.multiple}: the {fam.name} "
                            f"family's latent factor {layout.factor}{patch}")


# ----------------------------------------------------------------------------- health (pure)
@dataclass(frozen=True)
class LatentHealth:
    channel_std: tuple[float, ...]
    channel_kl: Optional[tuple[float, ...]]  # mean KL per element of each channel, nats
    kl_per_element: Optional[float]
    dead_channels: tuple[int, ...]  # KL < DEAD_KL: the posterior is the prior, no information
    constant_channels: tuple[int, ...]  # std < 1e-3 of the largest: the same value for every input


def health(m: LatentMoments, dead_kl: float = DEAD_KL) -> LatentHealth:
    _, std = channel_mean_std(m)
    constant = tuple(i for i, s in enumerate(std.tolist()) if s < 1e-3 * max(float(std.max()), 1e-12))
    if m.kl_sum is None:
        return LatentHealth(tuple(std.tolist()), None, None, (), constant)
    kl = m.kl_sum / m.count
    dead = tuple(i for i, k in enumerate(kl.tolist()) if k < dead_kl)
    return LatentHealth(tuple(std.tolist()), tuple(kl.tolist()), float(kl.mean()), dead, constant)


# ----------------------------------------------------------------------------- calibration
@dataclass(frozen=True)
class CalibrationConfig:
    source: str  # image folder or `datasets` dataset (as data.source)
    count: int = 64  # images (the first `count` of the sorted source)
    resolution: int = 256  # as the cache's center-crop: resized to cover, central square
    convention: Optional[str] = None  # one of the family's conventions; None: the record's (LoadedVae.convention)
    batch_size: int = 4
    kind: str = "auto"
    split: str = "train"
    column: str = "image"
    keep_latents: int = 4  # posterior means kept for the fp16 decoder check
    frames: int = 17  # a video source: clips of this many frames (the VAE's clip rule), `count` of them
    fps: Optional[float] = None  # a video source: clips resampled to this rate (None: the video's own)


@dataclass(frozen=True)
class LatentStats:
    convention: str  # a key of conventions.CONVENTIONS, one of the family's
    entries: dict  # conventions.diffusers_config of that convention: what its formula reads
    channel_mean: tuple[float, ...]  # measured per channel of the pipeline's view (flux2: 4C patchified channels)
    channel_std: tuple[float, ...]
    mean: float  # over all channels and positions
    std: float
    consumer: str  # what was measured: families.Family.consumer ("sample" | "mode" | "latent")
    patch: int  # the pipeline's patchify before its formula (1: none)
    health: LatentHealth  # of the posterior, per VAE latent channel
    images: int
    resolution: int
    source: str
    skipped: tuple[str, ...]  # images that could not be decoded
    sample_latents: Optional[torch.Tensor] = None  # (k, C, h, w) VAE latents (posterior means), for fp16_check
    frames: int = 0  # a video source: `images` counts clips of this many frames (0: images)

    @property
    def inputs(self) -> str:
        """What was measured on, in words: "6 images" or "3 clips of 17 frames"."""
        return f"{self.images} clips of {self.frames} frames" if self.frames else f"{self.images} images"

    def to_dict(self) -> dict:
        h = self.health
        return {**self.entries, "convention": self.convention, "formula": CONVENTIONS[self.convention],
                "measured": CONSUMER_WORDS[self.consumer], "patchified": self.patch > 1,
                "channel_mean": list(self.channel_mean), "channel_std": list(self.channel_std),
                "mean": self.mean, "std": self.std, "images": self.images, "frames": self.frames or None,
                "inputs": self.inputs, "resolution": self.resolution,
                "source": self.source, "skipped": list(self.skipped),
                "health": {"channel_std": list(h.channel_std), "channel_kl": h.channel_kl and list(h.channel_kl),
                           "kl_per_element": h.kl_per_element, "dead_channels": list(h.dead_channels),
                           "constant_channels": list(h.constant_channels)}}


def calibration_images(cfg: CalibrationConfig, multiple: int):
    """Yield (batch in [-1, 1], skipped names) of the first `count` decodable images, preprocessed
    exactly as `latentvae encode --preprocess center-crop --resolution R` stores them."""
    src = open_source(cfg.source, cfg.kind, cfg.split, cfg.column)
    pre = Preprocess("center-crop", cfg.resolution, multiple)
    batch, skipped, used = [], [], 0
    for i in range(len(src)):
        if used >= cfg.count:
            break
        try:
            batch.append(load_preprocessed(src, i, pre)["pixels"].float().div(127.5).sub(1.0))
            used += 1
        except BadImage as e:
            skipped.append(f"{src.name(i)} ({e})")
        if len(batch) == cfg.batch_size:
            yield torch.stack(batch), skipped
            batch, skipped = [], []
    if batch or skipped:
        yield (torch.stack(batch) if batch else None), skipped


def calibration_clips(cfg: CalibrationConfig, lv: LoadedVae):
    """As calibration_images for a video source: the first `count` clips of `frames` frames at `fps`,
    (resolution x resolution), each one batch (clips are large); undecodable videos skipped with their reason."""
    from ..video_sources import ClipSource, open_video_source

    lo, hi = lv.layout.nearest_frames(cfg.frames)
    if not lv.video:
        lv.require("encode-video", f"--calibrate {cfg.source}")
    if not lv.layout.frames_ok(cfg.frames):
        raise BadInputError(f"--frames {cfg.frames}: {lv.class_name} takes clips of 1 + {lv.layout.frame_step}k "
                            f"frames ({lv.family.frames_cite}); use {lo} or {hi}")
    clips = ClipSource(open_video_source(cfg.source, cfg.kind, cfg.split, cfg.column if cfg.column != "image"
                                         else "video"), cfg.frames, cfg.fps)
    used = 0
    for i in range(len(clips)):
        if used >= cfg.count:
            break
        try:
            pixels, _ = clips.load_clip(i, (cfg.resolution, cfg.resolution))
        except BadImage as e:
            yield None, [f"{clips.name(i)} ({e})"]
            continue
        used += 1
        yield pixels.unsqueeze(0).float().div(127.5).sub(1.0), []


def pipeline_view(mean: torch.Tensor, logvar: Optional[torch.Tensor], patch: int):
    """The posterior as the pipeline's formula sees it: 4-D VAE latents, p x p-patchified (flux2) or as they are."""
    if patch == 1:
        return mean, logvar
    return patchify(mean, patch), None if logvar is None else patchify(logvar, patch)


@torch.no_grad()
def calibrate(lv: LoadedVae, cfg: CalibrationConfig) -> LatentStats:
    """Encode `cfg.count` images (or clips of a video source: their 5-D latents, per channel over time and
    space); measure what the family's consumers take, on its pipeline's view, and the
    entries of `cfg.convention` under which that formula gives zero-mean (sd: only unit-) variance latents."""
    fam, layout = lv.family, lv.layout
    check_resolution(lv, cfg.resolution)
    convention = choose_convention(lv, cfg.convention)
    dtype = next(lv.module.parameters()).dtype
    posterior = consumed = None
    skipped, kept, n = [], [], 0
    from ..video_sources import is_video_data

    video = is_video_data(cfg.source, cfg.kind, "video", cfg.split)
    for x, bad in (calibration_clips(cfg, lv) if video else calibration_images(cfg, layout.multiple)):
        skipped += bad
        if x is None:
            continue
        mean, logvar = lv.moments(x.to(dtype))
        mean, logvar = mean.float(), None if logvar is None else logvar.float()
        posterior = merge_moments(posterior, batch_moments(mean, logvar))
        taken = logvar if fam.consumer == "sample" else None  # "mode" and "latent" consumers take the mean
        consumed = merge_moments(consumed, batch_moments(*pipeline_view(mean, taken, fam.patch)))
        n += x.shape[0]
        if sum(k.shape[0] for k in kept) < cfg.keep_latents:
            kept.append(mean)
    if consumed is None:
        raise BadInputError(f"{cfg.source}: no decodable {'clip' if video else 'image'} to calibrate on (skipped: "
                            f"{len(skipped)}{': ' + skipped[0] if skipped else ''})")
    channel_mean, channel_std = channel_mean_std(consumed)
    g_mean, g_std = global_mean_std(consumed)
    entries = diffusers_config(convention, channel_mean=channel_mean.tolist(), channel_std=channel_std.tolist(),
                               mean=g_mean, std=g_std, **_eps(lv))
    consumer = fam.consumer if lv.stochastic or fam.consumer == "latent" else "mode"
    return LatentStats(convention, entries, tuple(channel_mean.tolist()), tuple(channel_std.tolist()), g_mean, g_std,
                       consumer, fam.patch, health(posterior), n, cfg.resolution, cfg.source, tuple(skipped),
                       torch.cat(kept)[:cfg.keep_latents] if kept else None, cfg.frames if video else 0)


def _eps(lv: LoadedVae) -> dict:
    """flux2: the VAE's own BatchNorm eps, which its pipeline adds to running_var."""
    return {"batch_norm_eps": lv.factors["batch_norm_eps"]} if "batch_norm_eps" in lv.factors else {}


def _values(v) -> str:
    return ", ".join(f"{x:.4g}" for x in v)


def format_stats(s: LatentStats) -> str:
    h = s.health
    written = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k} per channel" for k, v in s.entries.items()
                        if v is not None and k != "batch_norm_eps")
    view = f"{s.patch}x{s.patch}-patchified latent, " if s.patch > 1 else ""
    lines = [f"latent statistics ({s.convention} convention: {CONVENTIONS[s.convention]}; {s.inputs} at "
             f"{s.resolution}px from {s.source}; measured on {view}{CONSUMER_WORDS[s.consumer]}, as its pipelines "
             "take it):",
             f"  entries: {written}",
             f"  measured channel mean = [{_values(s.channel_mean)}]",
             f"  measured channel std  = [{_values(s.channel_std)}]"]
    if h.kl_per_element is None:
        lines.append("  KL: n/a (deterministic latent)")
    else:
        lines.append(f"  KL per latent element: {h.kl_per_element:.4g} nats; per channel: ["
                     + ", ".join(f"{v:.3g}" for v in h.channel_kl) + "]")
        lines.append(f"  channels carrying no information (KL < {DEAD_KL}): "
                     + (", ".join(map(str, h.dead_channels)) or "none"))
    if h.constant_channels:
        lines.append("  constant channels (std < 1e-3 of the largest): " + ", ".join(map(str, h.constant_channels)))
    if s.skipped:
        lines.append(f"  skipped {len(s.skipped)} undecodable image(s): " + "; ".join(s.skipped[:3]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- fp16 safety
@dataclass(frozen=True)
class Fp16Report:
    ran: bool  # the fp16 decoder ran on this device
    note: str
    peak_fp32: float  # largest |activation| of any decoder module, fp32 run
    peak_module_fp32: str
    peak_fp16: Optional[float]  # inf when something overflowed
    overflow_modules: tuple[str, ...]  # modules whose fp16 output held inf/NaN
    output_finite: Optional[bool]
    max_diff: Optional[float]  # |decode_fp16 - decode_fp32| max, [-1, 1] pixel units
    force_upcast: bool  # what the finding asks for (written only where the class has the config entry)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def activation_peaks(lv: LoadedVae, z: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
    """Decode z with a forward hook on every decoder module: {module name: max |output|} (inf if non-finite)."""
    peaks: dict[str, float] = {}

    def hook(name):
        def record(_module, _inputs, output):
            t = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
            if torch.is_tensor(t) and t.is_floating_point():
                a = t.detach().float().abs()
                peaks[name] = max(peaks.get(name, 0.0), float("inf") if not torch.isfinite(a).all() else float(a.max()))
        return record

    vae = lv.module
    modules = [("post_quant_conv", vae.post_quant_conv)] if getattr(vae, "post_quant_conv", None) is not None else []
    modules += [(f"decoder.{n}" if n else "decoder", m) for n, m in vae.decoder.named_modules()]
    handles = [m.register_forward_hook(hook(n)) for n, m in modules]
    try:
        with torch.no_grad():
            out = lv.decode(z)
    finally:
        for h in handles:
            h.remove()
    return peaks, out


def _copy(lv: LoadedVae, half: bool) -> LoadedVae:
    """The record with a copy of its module in fp16 or fp32 (`.half()`: diffusers' `.to(dtype)` warns each time)."""
    from dataclasses import replace
    module = copy.deepcopy(lv.module)
    return replace(lv, module=(module.half() if half else module.float()).eval(), _memo={})


def fp16_check(lv: LoadedVae, z: torch.Tensor) -> Fp16Report:
    """Run the decoder in fp32 and in fp16 (`.half()`) on VAE latents z; say whether fp16 is safe.

    `force_upcast` (the finding) stays True unless fp16 ran here, nothing overflowed, the output is
    finite, and the fp32 peak leaves FP16_HEADROOM of the fp16 range.
    """
    peaks32, out32 = activation_peaks(_copy(lv, half=False), z.float())
    name32 = max(peaks32, key=peaks32.get)
    try:
        peaks16, out16 = activation_peaks(_copy(lv, half=True), z.half())
    except (RuntimeError, NotImplementedError) as e:
        return Fp16Report(False, f"fp16 decoding does not run on this device ({type(e).__name__}: {e}); "
                          "force_upcast kept True", peaks32[name32], name32, None, (), None, None, True)
    overflow = tuple(n for n, v in peaks16.items() if v > FP16_MAX)
    finite = bool(torch.isfinite(out16).all())
    diff = float((out16.float() - out32).abs().max()) if finite else None
    tight = peaks32[name32] > FP16_HEADROOM * FP16_MAX
    upcast = bool(overflow) or not finite or tight
    if overflow or not finite:
        note = f"fp16 decoder overflows (inf/NaN in {len(overflow)} module(s), first {overflow[:1]}): force_upcast=True"
    elif tight:
        note = (f"fp16 decoder ran without overflow, but the fp32 peak {peaks32[name32]:.4g} exceeds "
                f"{FP16_HEADROOM:.0%} of the fp16 range: force_upcast=True")
    else:
        note = (f"fp16 decoder ran on {z.shape[0]} image(s) without overflow (peak {max(peaks16.values()):.4g} "
                f"< {FP16_MAX:.0f}): force_upcast=False")
    return Fp16Report(True, note, peaks32[name32], name32, max(peaks16.values()), overflow, finite, diff, upcast)


def format_fp16(r: Fp16Report) -> str:
    lines = [f"fp16 check: {r.note}",
             f"  fp32 peak |activation| {r.peak_fp32:.4g} in {r.peak_module_fp32} (fp16 max {FP16_MAX:.0f})"]
    if r.ran and r.max_diff is not None:
        lines.append(f"  fp16 vs fp32 decode: max abs difference {r.max_diff:.3g}")
    return "\n".join(lines)
