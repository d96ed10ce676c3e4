"""Training checkpoints: safetensors and JSON only, fsynced, checksummed, published by one rename.

    RUN/checkpoints/checkpoint-00001000/
        model.safetensors      raw VAE weights (fp32, diffusers key names)
        ema.safetensors        EMA VAE weights (same keys), when EMA is on
        disc.safetensors       discriminator, when the GAN is on
        optim-{name}.safetensors + .json   optimizer tensors / param groups
        rng-rank{r}.safetensors + .json    every process's RNG states
        state.json             step, data position, counters, scheduler, scaler, config, and the
                               sha256 of every other file in the folder

A checkpoint is written into a hidden `.checkpoint-XXXX.tmp` folder, every file fsynced,
`state.json` last; the folder is then renamed into place and its parent fsynced. So a folder
named `checkpoint-*` is complete even after a SIGKILL or a power cut, and a file damaged later
(truncated copy, bad disk) is caught by its checksum: `resume_candidates` skips such a folder and
`--resume latest` falls back to the previous one, saying so.

Why not accelerate's `save_state`/`load_state`: they write into the target folder in place (a
crash leaves a half-written folder that looks like a checkpoint), record no checksums, restore a
failed RNG state with only a log line, and have no place for the data position of our seeded
stream. (accelerate 1.15 loads with `weights_only=True` except for custom registered objects, so
unpickling is not the reason.)
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from .errors import UserError
from .fsutil import fsync_dir, publish_folder, sha256_file, write_durable

CKPT_RE = re.compile(r"^checkpoint-(\d{8})$")
STATE_FORMAT = "latentvae-checkpoint-1"


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, incomplete or damaged; the message names the file."""


def checkpoints_root(run: Path) -> Path:
    return Path(run) / "checkpoints"


def list_checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_root(run)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CKPT_RE.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)))


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the newest complete checkpoint of a run folder."""
    path = Path(path)
    if (path / "state.json").is_file() and (path / "model.safetensors").is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (expected a training run folder or a checkpoint in it)")
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"{path}: no complete checkpoint (expected {path}/checkpoints/checkpoint-XXXXXXXX/"
                              "with state.json and model.safetensors)")
    return found[-1]


def verify(ckpt: Path) -> None:
    """Raise CheckpointError if a file listed in state.json is missing or its sha256 differs.

    Checkpoints written before checksums were recorded (no "files" in state.json) pass unchecked."""
    ckpt = Path(ckpt)
    state = read_state(ckpt)
    for name, digest in sorted(state.get("files", {}).items()):
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (listed in state.json)")
        if sha256_file(path) != digest:
            raise CheckpointError(f"{path}: sha256 differs from the one recorded in state.json (truncated or altered)")


def resume_candidates(run: Path, log=print) -> Iterator[Path]:
    """The run's complete checkpoints that pass `verify`, newest first; a damaged one is named and skipped."""
    for path in reversed(list_checkpoints(run)):
        try:
            verify(path)
        except CheckpointError as e:
            log(f"skipping damaged checkpoint {path.name}: {e}")
            continue
        yield path


def checksums(folder: Path, skip: str = "state.json") -> dict[str, str]:
    """sha256 of every file in a staging folder (all processes' files are in it by now)."""
    return {p.name: sha256_file(p) for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name != skip}


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(ckpt) / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt}/state.json: unreadable ({e})") from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


# ----------------------------------------------------------------------------- optimizer state
def optimizer_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch optimizer state_dict -> (flat tensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for idx, pstate in state["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def restore_optimizer(opt, tensors: dict, meta: dict) -> None:
    """Load an optimizer's saved state, each per-parameter tensor in its parameter's memory layout.

    safetensors stores tensors contiguous (NCHW), and torch's `load_state_dict` keeps them so. The fused
    AdamW kernels (CPU and CUDA) walk param, grad, exp_avg and exp_avg_sq as flat memory, element i of
    each with element i of the others, without comparing strides: with channels_last parameters (the
    `auto` choice on CUDA and on CPUs with bf16 kernels) an NCHW exp_avg pairs each weight with another
    weight's moments, and the resumed run silently diverges. So every state tensor of the parameter's
    shape is copied into `empty_like(param)`, which also takes it out of the file's memory map."""
    opt.load_state_dict(optimizer_from_files(tensors, meta))
    inner = getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps the torch one
    for group in inner.param_groups:
        for param in group["params"]:
            state = inner.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == param.shape:
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


# ----------------------------------------------------------------------------- RNG state
def rng_to_files() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    py = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [py[0], list(py[1]), py[2]]}
    return tensors, meta


def rng_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


# ----------------------------------------------------------------------------- writing
def write_json(path: Path, data: Any) -> None:
    """A JSON file inside a staging folder, fsynced (the folder's rename is what publishes it)."""
    text = json.dumps(data, indent=2, sort_keys=True).encode()
    write_durable(path, lambda f: f.write(text))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    """A safetensors file, fsynced (inside a staging folder, so no temporary of its own is needed)."""
    data = safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    write_durable(path, lambda f: f.write(data))


def staging_dir(run: Path, step: int) -> Path:
    """The staging folder of step's checkpoint. A fixed name, not fsutil.staging_name's per-process one: every
    process writes its RNG state into it, so they must all find it; so fsutil.staged_folder does not fit, and
    begin/commit are its two halves (the rename is fsutil.publish_folder)."""
    return checkpoints_root(run) / f".checkpoint-{step:08d}.tmp"


def final_dir(run: Path, step: int) -> Path:
    return checkpoints_root(run) / f"checkpoint-{step:08d}"


def begin(run: Path, step: int) -> Path:
    """Create (afresh) the staging folder for step's checkpoint; main process only."""
    tmp = staging_dir(run, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(run: Path, step: int, keep_last: int) -> Path:
    """Rename the finished staging folder into place, then drop all but the newest `keep_last`."""
    tmp, final = staging_dir(run, step), final_dir(run, step)
    if not (tmp / "state.json").is_file():
        raise RuntimeError(f"{tmp}: incomplete checkpoint (no state.json); not committing it")
    fsync_dir(tmp)  # the files' entries, before the rename publishes the folder
    publish_folder(tmp, final)  # one rename (an old final set aside until it worked), then the parent fsynced
    for stale in list_checkpoints(run)[:-keep_last]:
        hidden = stale.with_name(f".{stale.name}.old")  # hidden first: a kill mid-delete leaves no half folder
        os.replace(stale, hidden)
        shutil.rmtree(hidden, ignore_errors=True)
    return final


def clean_staging(run: Path) -> None:
    """Remove leftovers of a checkpoint write that was interrupted."""
    root = checkpoints_root(run)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".checkpoint-"):
                shutil.rmtree(p, ignore_errors=True)
