"""Diffusers autoencoder folders (config.json + weights) and single weight files, read into a module.

    names -> choose_weights(...)          # which diffusion_pytorch_model[.VARIANT].safetensors to read
    load_diffusers_folder(path, variant)  # the class config.json names (families.py), from_pretrained
    load_single_file(spec, file)          # an LDM / SD weight file (convert.py)

Only safetensors and JSON are read by default; torch files only with `allow_pickle`, then with
`torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from . import convert
from .families import family_for_class
from .spec import INDEX_FILE, WEIGHT_FILE, NotAnAutoencoder, VaeSpec
from ..errors import UserError


def choose_weights(names, variant: Optional[str], allow_pickle: bool, where: str,
                   route=None) -> tuple[Optional[str], list[str]]:
    """(variant, files to read) among the file `names` of a diffusers folder: the plain safetensors file
    wins unless `variant` is asked for; without a plain one, the only variant; torch files only with
    `allow_pickle` (else refused, with `route(name)`: how to convert it). A NotAnAutoencoder says what
    is there otherwise."""
    found: dict[str, dict[Optional[str], list[str]]] = {"safetensors": {}, "bin": {}}
    index: dict[tuple[str, Optional[str]], str] = {}
    for name in sorted(names):
        if m := WEIGHT_FILE.fullmatch(name):
            found[m["ext"]].setdefault(m["variant"], []).append(name)
        elif m := INDEX_FILE.fullmatch(name):
            index[m["ext"], m["variant"]] = name

    def files(ext: str, v: Optional[str]) -> tuple[Optional[str], list[str]]:
        extra = [index[ext, v]] if (ext, v) in index else []
        return v, found[ext][v] + extra

    def listed(ext: str) -> str:
        return ", ".join("plain" if v is None else v for v in sorted(found[ext], key=lambda v: v or ""))

    def refuse(name: str):
        return NotAnAutoencoder(f"{where}: only torch weights ({name}); only safetensors are read by default. "
                                + (route or (lambda n: convert.pickle_route(Path(where) / n)))(name))

    if variant is not None:
        if variant in found["safetensors"]:
            return files("safetensors", variant)
        if variant in found["bin"]:
            if not allow_pickle:
                raise refuse(found["bin"][variant][0])
            return files("bin", variant)
        have = "; ".join(f"{ext}: {listed(ext)}" for ext in found if found[ext]) or "no diffusion_pytorch_model weights"
        raise NotAnAutoencoder(f"{where}: no variant {variant!r} (diffusion_pytorch_model.{variant}.safetensors); "
                               f"found {have}")
    for ext in ("safetensors", "bin"):
        if not found[ext]:
            continue
        if ext == "bin" and not allow_pickle:
            raise refuse(next(iter(found["bin"].values()))[0])
        if None in found[ext]:
            return files(ext, None)
        if len(found[ext]) == 1:
            return files(ext, next(iter(found[ext])))
        raise NotAnAutoencoder(f"{where}: several weight variants and no plain file ({listed(ext)}); choose one "
                               f"with the option [variant=NAME]")
    raise NotAnAutoencoder(f"{where}: no diffusion_pytorch_model[.VARIANT].safetensors weights")


def read_class(path: Path) -> tuple[type, dict]:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise NotAnAutoencoder(f"{path}/config.json: unreadable ({e})") from e
    cls_name = config.get("_class_name") if isinstance(config, dict) else None
    try:
        return family_for_class(cls_name, f"{path}/config.json").cls, config
    except UserError as e:
        raise NotAnAutoencoder(str(e)) from e


def load_diffusers_folder(path: str | Path, variant: Optional[str] = None, allow_pickle: bool = False,
                          names=None):
    """A diffusers autoencoder folder (config.json + weights), the weights chosen by `choose_weights`
    among `names` (default: the folder's files): (module in eval mode, the variant read)."""
    path = Path(path)
    cls, config = read_class(path)
    if names is None:
        names = [p.name for p in path.iterdir() if p.is_file()]
    variant, files = choose_weights(names, variant, allow_pickle, str(path))
    try:
        if files[0].endswith(".safetensors"):
            vae = cls.from_pretrained(str(path), variant=variant, use_safetensors=True)
        else:  # allowed torch file: read by convert.read_state_dict (weights_only=True), not by diffusers
            if len(files) > 1:
                raise NotAnAutoencoder(f"{path}: sharded torch weights ({', '.join(files)}); convert them to "
                                       "safetensors (diffusers: from_pretrained, then save_pretrained)")
            vae = cls.from_config(config)
            vae.load_state_dict(convert.read_state_dict(path / files[0], allow_pickle=True), strict=True)
    except convert.ConversionError as e:
        raise NotAnAutoencoder(str(e)) from e
    except (OSError, ValueError) as e:  # unreadable/truncated weights, a config that does not fit them
        if isinstance(e, NotAnAutoencoder):
            raise
        raise NotAnAutoencoder(f"{path}: diffusers cannot load this {cls.__name__} folder ({type(e).__name__}: "
                               f"{_first_line(e)})") from e
    except RuntimeError as e:
        if "state_dict" not in str(e) and "size mismatch" not in str(e):
            raise
        raise NotAnAutoencoder(f"{path}: the weights do not fit config.json ({_first_line(e)})") from e
    return vae.eval(), variant


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_single_file(spec: VaeSpec, file: Path, norm_num_groups: Optional[int]):
    """An LDM/SD weight file (a torch file refused by convert.read_state_dict without allow_pickle)."""
    try:
        return convert.load_ldm_vae(file, norm_num_groups or 32, allow_pickle=spec.allow_pickle)
    except (convert.ConversionError, FileNotFoundError) as e:
        raise NotAnAutoencoder(str(e)) from e
