"""SRC and OUT of an export: the source opened as one LoadedVae (plus a run's state), OUT checked against it.

    src = open_source(options, out)    # refuses before any work: OUT inside/holding SRC, an OUT not ours, ...
    src.lv                              # the loaded record: family, stochastic, factors and their origin, origin
    src.is_run, src.state, src.cfg      # a training run or checkpoint: its state.json and training config

Everything about the VAE comes from the record (vae/loaded.py); a run's state.json is read only for
what the model card tells of the training (step, config, data).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .. import runs
from ..config import config_from_dict
from ..errors import BadInputError, UserError
from ..fsutil import check_output_folder
from ..vae import convert
from ..vae.loaded import LoadedVae
from ..vae.loading import load_vae
from ..vae.spec import exists, parse_spec
from .card import METADATA_FILE, SOURCE_KINDS


class ExportError(RuntimeError):
    """The export could not be completed or did not verify; OUT was left untouched."""


class ExportTargetExists(UserError, FileExistsError):
    """OUT exists and holds something that --overwrite was not given to replace."""


@dataclass(frozen=True)
class Source:
    """What is exported: the loaded VAE (fp32, eval mode) and, for a training run, its state."""
    spec: str  # SRC as given
    lv: LoadedVae
    state: Optional[dict] = None  # a run's state.json
    cfg: Any = None  # a run's training config

    @property
    def vae(self):
        return self.lv.module

    @property
    def is_run(self) -> bool:
        return self.lv.kind == "run"

    @property
    def checkpoint(self) -> Optional[Path]:
        return Path(self.lv.path) if self.is_run else None

    @property
    def weights(self) -> Optional[str]:
        """A run's ema|raw; None for any other VAE (the weights it holds)."""
        return self.lv.origin.get("weights") if self.is_run else None

    @property
    def step(self) -> Optional[int]:
        return int(self.state["step"]) if self.is_run else None


def run_folder(checkpoint: Path) -> Path:
    """RUN of RUN/checkpoints/checkpoint-XXXXXXXX."""
    return checkpoint.parent.parent


def check_apart(paths: list, out: Path, hint: str) -> None:
    """OUT must not be a source path, lie inside one, or hold one: writing (or --overwrite replacing)
    OUT would change or delete what is being exported. `paths` as the user wrote them, first wins."""
    sources: dict[Path, str] = {}
    for p in paths:
        sources.setdefault(Path(p).resolve(), str(p))  # resolved -> as the user wrote it
    target = out.resolve()
    for src, shown in sorted(sources.items(), key=lambda kv: len(kv[0].parts)):
        if target == src:
            raise BadInputError(f"export target {out} is its source {shown}; {hint}")
        if src in target.parents:
            raise BadInputError(f"export target {out} is inside its source {shown}; {hint}")
        if target in src.parents:
            raise BadInputError(f"export target {out} contains its source {shown}; {hint}")


def check_out(out: Path, overwrite: bool, single_file: bool) -> None:
    """A folder OUT: new, empty, or an earlier export (fsutil.check_output_folder), which only --overwrite
    replaces; a single file OUT: not a folder, and an existing file only with --overwrite."""
    if single_file:
        if out.is_dir():
            raise ExportTargetExists(f"{out} is a folder; --format single-file writes one .safetensors file")
        if out.exists() and not overwrite:
            raise ExportTargetExists(f"{out} exists; pass --overwrite to replace it")
        return
    check_output_folder(out, "--out", is_ours=lambda p: (p / METADATA_FILE).is_file(),
                        what=f"an earlier export (with {METADATA_FILE})")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportTargetExists(f"--out {out} holds an earlier export and is not empty; pass --overwrite to "
                                 "replace it")


def _not_a_run(src: str) -> BadInputError:
    return BadInputError(f"--weights raw: {src} is not a latentvae training run or checkpoint; --weights chooses "
                         "between a run's EMA and raw weights, any other VAE is exported with the weights it holds "
                         "(leave --weights out)")


def open_source(options, out: Path) -> Source:
    """SRC, loaded, after OUT was checked against it (nothing is written before)."""
    spec = parse_spec(options.src)
    single = options.format == "single-file"
    hint = f"choose a {'path' if single else 'folder'} outside it"
    if options.weights == "raw":
        named = spec.get("weights")
        if named not in (None, "raw"):
            raise BadInputError(f"--weights raw contradicts {options.src} (weights={named}); give the weights once")
        if not Path(spec.target).is_dir():  # a run is a folder: refused before any loading (a hub id, a file)
            raise _not_a_run(options.src)
    local = [spec.target] if exists(spec.target) else []
    if local and Path(spec.target).parent.name == "checkpoints":  # RUN/checkpoints/NAME: the run is a source too
        local.append(Path(spec.target).parent.parent)
    taesd = convert.TAESD_VARIANTS.get(spec.target.removeprefix(convert.TAESD_PREFIX))
    if spec.target.startswith(convert.TAESD_PREFIX) and taesd and convert.default_taesd_dir():  # its two files
        local = [convert.default_taesd_dir() / f"{taesd.stem}_{part}.safetensors" for part in ("encoder", "decoder")]
    check_apart(local, out, hint)
    check_out(out, options.overwrite, single)
    lv = load_vae(options.src, weights="raw" if options.weights == "raw" else None)
    lv.module.float().eval()
    if options.weights == "raw" and lv.kind != "run":
        raise _not_a_run(options.src)
    if lv.kind != "run":
        if lv.path and lv.kind != "taesd":
            check_apart([lv.path], out, hint)  # what was read: a pipeline's vae/, a hub snapshot
        return Source(options.src, lv)
    found = Path(lv.path)
    check_apart([spec.target, found, *([run_folder(found)] if found.parent.name == "checkpoints" else [])], out,
                f"choose a {'path' if single else 'folder'} outside the training run")
    try:
        state = runs.read_state(found)
    except ValueError as e:
        raise BadInputError(str(e)) from e
    return Source(options.src, lv, state, config_from_dict(state["config"]))


def describe(src: Source) -> str:
    if src.is_run:
        return f"{src.checkpoint} (step {src.step}, {src.weights} weights)"
    o = src.lv.origin
    extra = [f"{k} {o[k][:12] if k == 'revision' else o[k]}" for k in ("repo_id", "revision", "subfolder", "variant")
             if o.get(k)]
    kind = SOURCE_KINDS.get(src.lv.kind, src.lv.kind)
    return f"{src.spec} ({kind}{'; ' + ', '.join(extra) if extra else ''})"
