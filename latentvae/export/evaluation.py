"""The evaluation figures of the exported weights: their own entry of a `latentvae evaluate` summary.json.

    evaluation = pick_evaluation(src, options.eval_summary)   # the entry, or why there is none

`latentvae evaluate` writes one summary.json for several VAEs, each entry recording the VAE name it
was given; the export takes the entry that measured the weights being exported (docs/export.md,
Evaluation figures), so the model card never shows another model's figures.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .. import runs
from ..errors import BadInputError, MissingInputError
from ..vae.spec import NotAnAutoencoder, parse_spec
from .source import Source, describe, run_folder


@dataclass(frozen=True)
class Evaluation:
    """The figures of the exported weights in an evaluation summary, or why there are none."""
    file: Optional[Path] = None
    figures: Optional[dict] = None  # the exported VAE's own entry
    label: Optional[str] = None  # its name in summary.json's "vaes"
    settings: Optional[dict] = None  # summary.json's "settings": images, data, fit, ...
    note: str = ""


def find_eval_summary(src: Source, explicit: Optional[str]) -> Optional[Path]:
    if explicit is not None:
        if not Path(explicit).is_file():
            raise MissingInputError(f"--eval-summary {explicit} does not exist" if not Path(explicit).exists()
                                    else f"--eval-summary {explicit} is not a file")
        return Path(explicit)
    if not src.is_run:
        return None
    default = run_folder(src.checkpoint) / "eval" / "summary.json"
    return default if default.is_file() else None


def mismatch(entry: Any, src: Source, summary_file: Path) -> Optional[str]:
    """Why an evaluation entry did not measure the weights being exported; None if it did.

    An entry records the VAE name given to `latentvae evaluate` (relative paths are read from here).
    A run named by its folder was evaluated at its newest checkpoint of the time: that is the exported
    checkpoint only if it is still the newest and was written before the summary. `evaluate` reads a
    run's EMA weights unless the name says [weights=raw]."""
    name = entry.get("source") if isinstance(entry, dict) else None
    if not isinstance(name, str):
        return "records no source"
    try:
        spec, own = parse_spec(name), parse_spec(src.spec)
    except NotAnAutoencoder:
        return f"{name} is not a VAE name latentvae reads"
    if src.is_run:
        try:
            evaluated = runs.find_checkpoint(spec.target)
        except (FileNotFoundError, ValueError):
            return f"{name} is not a run with a complete checkpoint now"
        if evaluated.resolve() != src.checkpoint.resolve():
            return f"{name} is {evaluated.name}, not the exported {src.checkpoint.name}"
        if Path(spec.target).resolve() != evaluated.resolve() \
                and (src.checkpoint / "state.json").stat().st_mtime_ns > summary_file.stat().st_mtime_ns:
            return f"{name} was evaluated before {src.checkpoint.name} was written"
        weights = spec.get("weights", entry.get("weights", "ema"))
        return None if weights == src.weights else f"{weights} weights evaluated, {src.weights} exported"
    if spec.options != own.options:
        return f"{name} is not {src.spec}"
    if spec.target == own.target:
        return None
    a, b = Path(spec.target), Path(own.target)
    return None if a.exists() and b.exists() and a.resolve() == b.resolve() else f"{name} is not {src.spec}"


def pick_evaluation(src: Source, explicit: Optional[str]) -> Evaluation:
    """The exported weights' own entry of the evaluation summary. None matching: an error for an explicit
    --eval-summary, a line in the model card for a run's default RUN/eval/summary.json."""
    file = find_eval_summary(src, explicit)
    if file is None:
        where = "RUN/eval/summary.json or --eval-summary" if src.is_run else "no --eval-summary given"
        return Evaluation(note=f"No evaluation summary was found ({where}).")
    flag = "--eval-summary " if explicit is not None else ""
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputError(f"{flag}{file}: not a readable JSON file ({e})") from e
    vaes = data.get("vaes") if isinstance(data, dict) else None
    if not isinstance(vaes, dict):  # one record naming no VAE (not written by `latentvae evaluate`)
        return Evaluation(file, data if isinstance(data, dict) else {"value": data}, None, None,
                          "a record naming no VAE (not a `latentvae evaluate` summary.json): these figures could not "
                          "be checked against the exported weights")
    reasons = {}
    for label, entry in vaes.items():
        why = mismatch(entry, src, file)
        if why is None:
            return Evaluation(file, entry, label, data.get("settings"), f"entry `{label}` (source `{entry['source']}`)")
        reasons[label] = why
    text = (f"{file} holds no evaluation of the exported weights ({describe(src)}): "
            + ("; ".join(f"{label}: {why}" for label, why in reasons.items()) or "it has no entries"))
    if explicit is not None:
        raise BadInputError(f"--eval-summary {text}")
    return Evaluation(file, None, None, data.get("settings"), text + ". Its figures are left out.")
