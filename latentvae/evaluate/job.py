"""`latentvae evaluate`: every input checked, every VAE scored, the report written at the end.

    summary = run_evaluation(opts)       # the library call: summary.json's contents
    run(opts)                            # the command: progress on stderr, the table on stdout

Video --data (video_sources.is_video_data) goes to video.py: clips, per-frame figures, FVD, strips.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from .. import fid
from ..errors import BadInputError
from ..fsutil import check_output_folder
from ..options import EvaluateOptions
from ..perceptual import load_lpips
from ..precision import cpu_capability, resolve_mixed_precision
from ..vae.loaded import LoadedVae
from ..vae.loading import NotAnAutoencoder, load_vae, with_flag
from ..vae.model import configure_tiling
from ..video_sources import is_video_data
from .inputs import PROTOCOLS, common_multiple, open_images
from .report import finite_or_none, is_report, markdown_table, vaes_table, write_report
from .scoring import SPECTRUM_BINS, Rfid, evaluate_vae, summarize


def vae_label(spec: str, taken: set[str]) -> str:
    """A short unique column name: `taesd:sd` as is, a path by its folder/file name."""
    base = spec if ":" in spec and not Path(spec).exists() else (Path(spec).name or spec)
    label, i = base, 2
    while label in taken:
        label, i = f"{base}#{i}", i + 1
    taken.add(label)
    return label


def load_for(spec: str, job: str, flag: str = "--vae") -> LoadedVae:
    """load_vae, with `flag` leading the message of a NotAnAutoencoder, refused in one line (FamilyCannot)
    where the VAE's family cannot do `job` (families.py)."""
    try:
        lv = load_vae(spec)
    except NotAnAutoencoder as e:
        raise with_flag(flag, spec, e) from e
    return lv.require(job, f"{flag} {spec}")


def load_all(specs: tuple[str, ...], device: torch.device, flag: str = "--vae",
             job: str = "evaluate") -> dict[str, tuple[str, LoadedVae]]:
    """label -> (spec, LoadedVae), all loaded before any work so that a bad path fails at once."""
    taken: set[str] = set()
    return {vae_label(s, taken): (s, load_for(s, job, flag).to(device)) for s in specs}


def resolve_device(device: str) -> torch.device:
    """--device: `auto` is cuda where a GPU is available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise BadInputError(f"--device {device}: not a device ({e})") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    return dev


def settings_record(opts: EvaluateOptions, images: int, dev: torch.device, multiple: int,
                    tiles: Optional[dict] = None, rfid: Optional[Rfid] = None) -> dict:
    """summary.json's "settings": every option, `device` and precision as resolved, and what else fixes the
    numbers (the protocol's resolution, the multiple images are fitted to, each VAE's tiles, where rFID's
    Inception weights came from)."""
    return {**asdict(opts), "vae": list(opts.vae), "device": str(dev), "images": images,
            "precision_resolved": resolve_mixed_precision(opts.mixed_precision, dev.type),
            "protocol_resolution": PROTOCOLS[opts.protocol].resolution or None, "fit_multiple": multiple,
            "tiles": tiles or None, "inception": rfid.weights if rfid else None,
            "spectrum_bins": SPECTRUM_BINS, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_capability": cpu_capability() if dev.type == "cpu" else None}


def load_rfid(opts: EvaluateOptions, dev: torch.device, log=print) -> Optional[Rfid]:
    """rFID's Inception. Weights named (--inception-weights, $LATENTVAE_INCEPTION_WEIGHTS) must load, or
    InceptionUnavailable (exit 2) names them; none named and torch-fidelity's download failing: no rFID,
    one line saying how to provide them."""
    named = opts.inception_weights or os.environ.get(fid.INCEPTION_ENV) or None
    if named:
        return Rfid(fid.load_inception(opts.inception_weights, dev), str(Path(named).resolve()))
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # torch.hub's "Downloading: ..." of a failing download
            extractor = fid.load_inception(None, dev)
    except fid.InceptionUnavailable as e:
        log(f"rFID left out of the report: {e}")
        return None
    return Rfid(extractor, "torch-fidelity download (torch.hub cache)")


def run_evaluation(opts: EvaluateOptions, log=print, vae_flag: str = "--vae") -> dict:
    """The whole evaluation; returns summary.json's contents. Raises NotAnAutoencoder for a bad VAE path
    (its message led by `vae_flag`), other UserErrors for other bad inputs, all before any work; --out is
    written only at the end."""
    out = Path(opts.out)
    check_output_folder(out, "--out", is_report, "an evaluation report (summary.json)")
    dev = resolve_device(opts.device)
    if is_video_data(opts.data, opts.data_kind, opts.video_column, opts.split):
        from .video import check_image_only_options, run_video_evaluation

        check_image_only_options(opts)
        return run_video_evaluation(opts, dev, load_all(opts.vae, dev, vae_flag, job="evaluate-video"), log)
    if opts.video_options():
        raise BadInputError(f"{', '.join(opts.video_options())}: video options; --data {opts.data} holds images "
                            "(clips take a folder of video files or a dataset with a --video-column)")
    vaes = load_all(opts.vae, dev, vae_flag)
    multiple = common_multiple(lv for _, lv in vaes.values())
    src = open_images(opts)
    # the tiles checked against each VAE before the LPIPS networks load (a bad --tile-size fails at once)
    tiles = {label: configure_tiling(label, lv.module, opts.tiling, opts.tile_size) for label, (_, lv) in vaes.items()}
    nets = () if opts.lpips == "none" else tuple(opts.lpips.split(","))
    lpips_models = {net: load_lpips(net, opts.lpips_dir, option="--lpips-dir") for net in nets}
    rfid = load_rfid(opts, dev, log)
    results, summary = [], {}
    for label, (spec, lv) in vaes.items():
        log(f"{label}: {lv.describe()}")
        result = evaluate_vae(label, spec, lv, src, opts, lpips_models, multiple, log, rfid)
        results.append(result)
        summary[label] = summarize(result, lv)
    settings = settings_record(opts, len(src), dev, multiple, tiles if opts.tiling else None, rfid)
    write_report(out, results, summary, settings)
    return finite_or_none({"settings": settings, "vaes": summary})


def run(opts: EvaluateOptions) -> dict:
    """`latentvae evaluate`: the evaluation, progress on stderr, the tables on stdout. A signal: one line
    saying whether REPORT was written (interrupts.says_if_published)."""
    from ..interrupts import says_if_published

    with says_if_published(opts.out, "report"):
        summary = run_evaluation(opts, log=lambda m: print(m, file=sys.stderr))
    if summary["settings"].get("data_type") == "video":
        from .video_report import VIDEO_COLUMNS
        print(markdown_table(summary["vaes"], VIDEO_COLUMNS))
    else:
        print(markdown_table(summary["vaes"]))
    print()
    print(vaes_table(summary["vaes"]))
    print(f"report: {opts.out}/report.md")
    return summary
