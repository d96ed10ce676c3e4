"""LPIPS (Zhang et al. 2018, https://arxiv.org/abs/1801.03924) with its ImageNet backbone found offline.

The `lpips` package ships only the linear heads; the AlexNet/VGG16 backbone normally comes from
torchvision's download. Where it comes from, in order:
  1. `lpips_dir` (config `loss.lpips_dir`, `latentvae evaluate --lpips-dir`) or the environment
     variable LATENTVAE_LPIPS_DIR: a folder holding `alexnet_features.safetensors` /
     `vgg16_features.safetensors` (torchvision key names, `features.IDX.weight`), as in
     ../shared/weights/lpips;
  2. torchvision's own weights (its cache, or its download when online).
If neither works, `LPIPSWeightsError` (one exception, no chain) says how to provide them, naming
the option the caller passes as `option` (default `loss.lpips_dir`, the trainer's key). A random
backbone is only built when `random_backbone=True` is asked for explicitly (tests of wiring,
never real runs).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from .errors import BadInputError, UserError
from .precision import autocast

ENV_VAR = "LATENTVAE_LPIPS_DIR"
BACKBONE_FILES = {"alex": "alexnet_features.safetensors", "vgg": "vgg16_features.safetensors"}


class LPIPSWeightsError(UserError, RuntimeError):
    """The LPIPS backbone weights could not be found."""


DEFAULT_OPTION = "loss.lpips_dir"


def _assign(option: str, value) -> str:
    """How a user writes `option` with a value: `--flag VALUE` or `key=VALUE`."""
    return f"{option} {value}" if option.startswith("-") else f"{option}={value}"


def _how_to(option: str = DEFAULT_OPTION) -> str:
    return (f"Provide them with {_assign(option, 'FOLDER')} or the environment variable {ENV_VAR}=FOLDER, "
            f"a folder holding {', '.join(BACKBONE_FILES.values())} (torchvision key names "
            "features.N.weight/bias, for example ../shared/weights/lpips), or go online once so that "
            "torchvision can download its ImageNet weights into its cache.")


def _load_backbone(model, net: str, folder: Path, option: str = DEFAULT_OPTION) -> None:
    path = folder / BACKBONE_FILES[net]
    if not path.is_file():
        raise LPIPSWeightsError(f"LPIPS {net} backbone: {path} does not exist. " + _how_to(option))
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error types
        raise LPIPSWeightsError(f"{path}: not a readable safetensors file ({e}). " + _how_to(option)) from None
    target = model.net.state_dict()
    # slice modules keep torchvision's indices as child names: sliceK.IDX.w <- features.IDX.w
    mapped = {}
    for name in target:
        _, idx, kind = name.split(".")
        src = f"features.{idx}.{kind}"
        if src not in tensors:
            raise LPIPSWeightsError(f"{path}: missing tensor {src} (expected torchvision key names)")
        if tensors[src].shape != target[name].shape:
            raise LPIPSWeightsError(f"{path}: {src} has shape {tuple(tensors[src].shape)}, expected {tuple(target[name].shape)}")
        mapped[name] = tensors[src].float()
    model.net.load_state_dict(mapped, strict=True)


def _build(net: str, pnet_rand: bool):
    """lpips.LPIPS without the torchvision deprecation warnings its `pretrained=` call triggers."""
    import lpips  # imports torchvision; kept local so the rest of the package imports without it

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.models\._utils")
        return lpips.LPIPS(net=net, pnet_rand=pnet_rand, verbose=False)


def load_lpips(net: str = "vgg", lpips_dir: Optional[str] = None, random_backbone: bool = False,
               option: str = DEFAULT_OPTION) -> torch.nn.Module:
    """A frozen, eval-mode LPIPS module: inputs in [-1, 1], output (B, 1, 1, 1).

    `option` is how the caller's user sets `lpips_dir` (`loss.lpips_dir`, `--lpips-dir`): the
    error messages name it."""
    if net not in BACKBONE_FILES:
        raise BadInputError(f"unknown LPIPS net {net!r}; valid choices: {', '.join(BACKBONE_FILES)}")
    folder = lpips_dir or os.environ.get(ENV_VAR) or None
    if random_backbone:
        model = _build(net, pnet_rand=True)
    elif folder:
        if not Path(folder).is_dir():
            source = _assign(option, folder) if lpips_dir else f"{ENV_VAR}={folder}"
            raise LPIPSWeightsError(f"{source} is not a folder. " + _how_to(option))
        model = _build(net, pnet_rand=True)
        _load_backbone(model, net, Path(folder), option)
    else:
        try:
            model = _build(net, pnet_rand=False)
        except Exception as e:  # no cache and no network: urllib/OSError/RuntimeError
            # one exception (from None): the download's own chain of tracebacks says nothing more
            cause = " ".join(str(e).split()) or type(e).__name__
            raise LPIPSWeightsError(f"LPIPS {net}: torchvision could not load its ImageNet "
                                    f"weights ({type(e).__name__}: {cause}). " + _how_to(option)) from None
    model.eval().requires_grad_(False)
    return model


def lpips_distance(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image LPIPS, (B,), computed in fp32 on purpose (bf16 features drift)."""
    with autocast(x.device.type, None):
        return model(x.float(), y.float(), normalize=False).flatten()
