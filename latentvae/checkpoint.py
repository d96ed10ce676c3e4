"""Training checkpoints: safetensors and JSON only, written atomically, rotated.

Accelerate's `save_state` pickles RNG states and custom objects and `load_state` unpickles them
with `weights_only=False`; we never unpickle a file a user may hand us, so the state goes here:

    RUN/checkpoints/checkpoint-00001000/
        model.safetensors      raw VAE weights (fp32, diffusers key names)
        ema.safetensors        EMA VAE weights (same keys), when EMA is on
        disc.safetensors       discriminator, when the GAN is on
        optim-{name}.safetensors + .json   optimizer tensors / param groups
        rng-rank{r}.safetensors + .json    every process's RNG states
        state.json             step, data position, counters, scheduler, scaler, config

A checkpoint is written into a hidden `.checkpoint-XXXX.tmp-*` folder and renamed into place, so
a folder named `checkpoint-*` is always complete; `state.json` is written last inside it.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CKPT_RE = re.compile(r"^checkpoint-(\d{8})$")


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
        raise FileNotFoundError(f"{path} does not exist (expected a training run folder or a checkpoint in it)")
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path}: no complete checkpoint (expected {path}/checkpoints/checkpoint-XXXXXXXX/"
                                "with state.json and model.safetensors)")
    return found[-1]


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(ckpt) / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{ckpt}/state.json: unreadable ({e})") from e


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


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
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)


def staging_dir(run: Path, step: int) -> Path:
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
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    for stale in list_checkpoints(run)[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def clean_staging(run: Path) -> None:
    """Remove leftovers of a checkpoint write that was interrupted."""
    root = checkpoints_root(run)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".checkpoint-"):
                shutil.rmtree(p, ignore_errors=True)
