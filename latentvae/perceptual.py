"""LPIPS (Zhang et al. 2018, https://arxiv.org/abs/1801.03924) with its ImageNet backbone found offline.

The `lpips` package ships only the linear heads; the AlexNet/VGG16 backbone normally comes from
torchvision's download. Where it comes from, in order:
  1. `lpips_dir` (config `loss.lpips_dir`) or the environment variable LATENTVAE_LPIPS_DIR: a folder
     holding `alexnet_features.safetensors` / `vgg16_features.safetensors` (torchvision key names,
     `features.IDX.weight`), as in ../shared/weights/lpips;
  2. torchvision's own weights (its cache, or its download when online).
If neither works, `LPIPSWeightsError` says how to provide them. A random backbone is only built
when `random_backbone=True` is asked for explicitly (tests of wiring, never real runs).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

ENV_VAR = "LATENTVAE_LPIPS_DIR"
BACKBONE_FILES = {"alex": "alexnet_features.safetensors", "vgg": "vgg16_features.safetensors"}


class LPIPSWeightsError(RuntimeError):
    """The LPIPS backbone weights could not be found."""


def _how_to() -> str:
    return (f"Provide them with loss.lpips_dir=FOLDER or the environment variable {ENV_VAR}=FOLDER, "
            f"a folder holding {', '.join(BACKBONE_FILES.values())} (torchvision key names "
            "features.N.weight/bias, for example ../shared/weights/lpips), or go online once so that "
            "torchvision can download its ImageNet weights into its cache.")


def _load_backbone(model, net: str, folder: Path) -> None:
    path = folder / BACKBONE_FILES[net]
    if not path.is_file():
        raise LPIPSWeightsError(f"LPIPS {net} backbone: {path} does not exist. " + _how_to())
    tensors = load_file(path)
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


def load_lpips(net: str = "vgg", lpips_dir: Optional[str] = None, random_backbone: bool = False) -> torch.nn.Module:
    """A frozen, eval-mode LPIPS module: inputs in [-1, 1], output (B, 1, 1, 1)."""
    if net not in BACKBONE_FILES:
        raise ValueError(f"unknown LPIPS net {net!r}; valid choices: {', '.join(BACKBONE_FILES)}")
    folder = lpips_dir or os.environ.get(ENV_VAR) or None
    if random_backbone:
        model = _build(net, pnet_rand=True)
    elif folder:
        if not Path(folder).is_dir():
            source = "loss.lpips_dir" if lpips_dir else ENV_VAR
            raise LPIPSWeightsError(f"{source}={folder} is not a folder. " + _how_to())
        model = _build(net, pnet_rand=True)
        _load_backbone(model, net, Path(folder))
    else:
        try:
            model = _build(net, pnet_rand=False)
        except Exception as e:  # no cache and no network: urllib/OSError/RuntimeError
            raise LPIPSWeightsError(f"LPIPS {net}: torchvision could not load its ImageNet weights ({e}). " + _how_to()) from e
    model.eval().requires_grad_(False)
    return model


def lpips_distance(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image LPIPS, (B,), computed in fp32 on purpose (bf16 features drift)."""
    with torch.autocast(x.device.type, enabled=False):
        return model(x.float(), y.float(), normalize=False).flatten()
