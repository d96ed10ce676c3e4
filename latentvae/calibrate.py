"""Latent statistics measured on images: scaling factors, latent health, and fp16 safety.

A diffusion model trains on `scaling_factor * (z - shift_factor)` (or per channel,
`(z - latents_mean) / latents_std`), so these factors belong to the VAE and are measured here,
never copied from another model (SD's 0.18215 is 1 / std of *its* latents; docs/export.md).

    stats = calibrate(vae, CalibrationConfig(source="data/samples/train", count=64, resolution=256))
    print(format_stats(stats))
    report = fp16_check(vae, stats.sample_latents)   # decoder in fp16: overflow? -> force_upcast

Latents are posterior samples z = mu + sigma * eps, as in latent diffusion; their moments are
accumulated exactly, without drawing noise (moments.py, shared with the cache's manifest).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch

from .vae.conventions import CONVENTIONS, check_convention, default_convention
from .errors import BadInputError
from .images import BadImage
from .preprocess import Preprocess, load_preprocessed
from .sources import open_source
from .vae.model import decode, downsample_factor, encode_moments
from .vae.moments import LatentMoments, batch_moments, channel_mean_std, factors, merge_moments

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
FP16_HEADROOM = 0.5  # fp32 peaks above half the fp16 range: other images may overflow -> upcast
DEAD_KL = 0.01  # nats per latent element: below this a channel's posterior is the prior (no information)


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
    convention: Optional[str] = None  # a key of conventions.CONVENTIONS; None: sd3 for 16 channels, else sd
    batch_size: int = 4
    kind: str = "auto"
    split: str = "train"
    column: str = "image"
    keep_latents: int = 4  # posterior means kept for the fp16 decoder check
    use_mean: bool = False  # latents are the posterior mean (model.mode "ae"), not samples


@dataclass(frozen=True)
class LatentStats:
    convention: str  # a key of conventions.CONVENTIONS
    config: dict  # the diffusers config entries of that convention (scaling/shift factor, latents_mean/std)
    channel_mean: tuple[float, ...]  # measured, per latent channel
    channel_std: tuple[float, ...]
    health: LatentHealth
    images: int
    resolution: int
    source: str
    skipped: tuple[str, ...]  # images that could not be decoded
    sample_latents: Optional[torch.Tensor] = None  # (k, C, h, w) posterior means, for fp16_check

    def config_entries(self) -> dict:
        """What goes into the diffusers config.json."""
        return dict(self.config)

    def to_dict(self) -> dict:
        h = self.health
        return {**self.config_entries(), "convention": self.convention, "channel_mean": list(self.channel_mean),
                "channel_std": list(self.channel_std), "images": self.images,
                "resolution": self.resolution, "source": self.source, "skipped": list(self.skipped),
                "health": {"channel_std": list(h.channel_std), "channel_kl": h.channel_kl and list(h.channel_kl),
                           "kl_per_element": h.kl_per_element, "dead_channels": list(h.dead_channels),
                           "constant_channels": list(h.constant_channels)}}


def calibration_images(cfg: CalibrationConfig, factor: int):
    """Yield (batch in [-1, 1], skipped names) of the first `count` decodable images, preprocessed
    exactly as `latentvae encode --preprocess center-crop --resolution R` stores them."""
    src = open_source(cfg.source, cfg.kind, cfg.split, cfg.column)
    pre = Preprocess("center-crop", cfg.resolution, factor)
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


@torch.no_grad()
def calibrate(vae, cfg: CalibrationConfig) -> LatentStats:
    """Encode `cfg.count` images and measure the factors of `cfg.convention` and the latent health."""
    factor = downsample_factor(vae)
    if cfg.resolution % factor:
        raise BadInputError(f"calibration resolution {cfg.resolution} (--resolution) is not a multiple of the VAE's "
                         f"downsampling factor {factor}")
    convention = check_convention(cfg.convention or default_convention(vae.config.latent_channels),
                              vae.config.latent_channels)
    dtype = next(vae.parameters()).dtype
    moments, skipped, kept, n = None, [], [], 0
    for x, bad in calibration_images(cfg, factor):
        skipped += bad
        if x is None:
            continue
        mean, logvar = encode_moments(vae, x.to(dtype))
        logvar = None if cfg.use_mean else logvar
        moments = merge_moments(moments, batch_moments(mean.float(), None if logvar is None else logvar.float()))
        n += x.shape[0]
        if sum(k.shape[0] for k in kept) < cfg.keep_latents:
            kept.append(mean.float())
    if moments is None:
        raise BadInputError(f"{cfg.source}: no decodable image to calibrate on (skipped: {len(skipped)})")
    f = factors(moments, convention)
    sample = torch.cat(kept)[:cfg.keep_latents] if kept else None
    config = {k: f[k] for k in ("scaling_factor", "shift_factor", "latents_mean", "latents_std")}
    return LatentStats(convention, config, tuple(f["channel_mean"]), tuple(f["channel_std"]), health(moments), n,
                       cfg.resolution, cfg.source, tuple(skipped), sample)


def format_stats(s: LatentStats) -> str:
    h = s.health
    c = s.config
    shift = "" if c["shift_factor"] is None else f"  shift_factor={c['shift_factor']:.6g}"
    stats = "" if c["latents_mean"] is None else "  latents_mean/latents_std per channel (below)"
    lines = [f"latent statistics ({s.convention} convention: {CONVENTIONS[s.convention]}; {s.images} images at "
             f"{s.resolution}px from {s.source}):",
             f"  config: scaling_factor={c['scaling_factor']:.6g}{shift}{stats}",
             "  measured channel mean = [" + ", ".join(f"{v:.4g}" for v in s.channel_mean) + "]",
             "  measured channel std  = [" + ", ".join(f"{v:.4g}" for v in s.channel_std) + "]"]
    if h.kl_per_element is None:
        lines.append("  KL: n/a (deterministic encoder)")
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
    force_upcast: bool

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def activation_peaks(vae, z: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
    """Decode z with a forward hook on every decoder module: {module name: max |output|} (inf if non-finite)."""
    peaks: dict[str, float] = {}

    def hook(name):
        def record(_module, _inputs, output):
            t = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
            if torch.is_tensor(t) and t.is_floating_point():
                a = t.detach().float().abs()
                peaks[name] = max(peaks.get(name, 0.0), float("inf") if not torch.isfinite(a).all() else float(a.max()))
        return record

    modules = [("post_quant_conv", vae.post_quant_conv)] if getattr(vae, "post_quant_conv", None) is not None else []
    modules += [(f"decoder.{n}" if n else "decoder", m) for n, m in vae.decoder.named_modules()]
    handles = [m.register_forward_hook(hook(n)) for n, m in modules]
    try:
        with torch.no_grad():
            out = decode(vae, z)
    finally:
        for h in handles:
            h.remove()
    return peaks, out


def fp16_check(vae, z: torch.Tensor) -> Fp16Report:
    """Run the decoder in fp32 and in fp16 (`.half()`) on latents z; set force_upcast from what is seen.

    force_upcast stays True unless fp16 ran here, nothing overflowed, the output is finite, and the
    fp32 peak leaves FP16_HEADROOM of the fp16 range.
    """
    ref = copy.deepcopy(vae).float().eval()
    peaks32, out32 = activation_peaks(ref, z.float())
    name32 = max(peaks32, key=peaks32.get)
    half = copy.deepcopy(vae).half().eval()
    try:
        peaks16, out16 = activation_peaks(half, z.half())
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
