"""Loading autoencoders from disk, whatever form they come in.

    vae = load_autoencoder("path/to/diffusers-folder")   # AutoencoderKL or AutoencoderTiny
    vae = load_autoencoder("runs/quickstart")            # newest checkpoint of a run (EMA weights)
    vae = load_autoencoder("sd-vae-ft-mse.safetensors")  # original LDM / SD key names (convert.py)
    vae = load_autoencoder("taesd:flux")                 # TAESD reference, AutoencoderTiny (convert.py)

Only safetensors and JSON are read (and torch files only with `weights_only=True`); nothing is
unpickled.
"""
from __future__ import annotations

import json
from pathlib import Path

from diffusers import AutoencoderKL

from . import runs
from . import convert
from .config import config_from_dict
from .errors import BadInputError, MissingInputError, UserError
from .model import AUTOENCODER_CLASSES, diffusers_kwargs, make_posterior_deterministic


class NotAnAutoencoder(UserError, ValueError):
    """A path that holds no autoencoder we can load; the message says what was expected."""


def with_flag(flag: str, spec, e: NotAnAutoencoder) -> NotAnAutoencoder:
    """The same error, its message led by the option that named the path (`--vae PATH ...`)."""
    text = str(e)
    return NotAnAutoencoder(f"{flag} {text}" if text.startswith(str(spec)) else f"{flag} {spec}: {text}")


def load_from_checkpoint(path: str | Path, weights: str = "ema") -> AutoencoderKL:
    """The VAE of a training checkpoint (or a run's newest), with its EMA or raw weights."""
    found = runs.find_checkpoint(path)
    state = runs.read_state(found)
    if "vae_config" in state:  # the architecture actually trained (also with model.init_from)
        vae = AutoencoderKL.from_config(state["vae_config"])
    else:
        vae = AutoencoderKL(**diffusers_kwargs(config_from_dict(state["config"]).model))
    name = {"ema": "ema.safetensors", "raw": "model.safetensors"}.get(weights)
    if name is None:
        raise BadInputError(f"unknown weights {weights!r}; valid choices: ema, raw")
    file = found / name
    if weights == "ema" and not file.is_file():
        raise MissingInputError(f"{found}: no ema.safetensors (EMA was off in this run); use the raw weights "
                                "(--weights raw, weights='raw')")
    vae.load_state_dict(runs.load_tensors(file), strict=True)
    if state.get("config", {}).get("model", {}).get("mode") == "ae":
        make_posterior_deterministic(vae)  # its log-variance never trained: sample() must equal mode()
    return vae.eval()


def load_diffusers_folder(path: str | Path):
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise NotAnAutoencoder(f"{path}/config.json: unreadable ({e})") from e
    cls_name = config.get("_class_name") if isinstance(config, dict) else None
    if cls_name not in AUTOENCODER_CLASSES:
        raise NotAnAutoencoder(f"{path}/config.json: _class_name is {cls_name!r}; expected one of "
                               f"{', '.join(AUTOENCODER_CLASSES)}")
    if not any(path.glob("*.safetensors")):
        raise NotAnAutoencoder(f"{path}: no .safetensors weights (only safetensors are loaded, never pickles)")
    try:
        return AUTOENCODER_CLASSES[cls_name].from_pretrained(str(path), use_safetensors=True).eval()
    except (OSError, ValueError) as e:  # unreadable/truncated weights, a config that does not fit them
        raise NotAnAutoencoder(f"{path}: diffusers cannot load this {cls_name} folder ({type(e).__name__}: "
                               f"{_first_line(e)})") from e
    except RuntimeError as e:
        if "state_dict" not in str(e) and "size mismatch" not in str(e):
            raise
        raise NotAnAutoencoder(f"{path}: the weights do not fit config.json ({_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_autoencoder(path: str | Path, taesd_dir: str | Path | None = None, weights: str = "ema",
                     norm_num_groups: int = 32):
    """Any supported form, as an eval-mode diffusers autoencoder:

    `taesd:sd|sdxl|sd3|flux` (from `taesd_dir`, $LATENTVAE_TAESD_DIR or ../shared/weights/taesd),
    an LDM/SD VAE weight file (`norm_num_groups` is not stored in it; all SD-family VAEs use 32),
    a diffusers folder, or a training run / checkpoint (`weights`: ema or raw).
    """
    if str(path).startswith(convert.TAESD_PREFIX):
        try:
            return convert.load_taesd(str(path), taesd_dir)
        except (ValueError, FileNotFoundError) as e:
            raise NotAnAutoencoder(str(e)) from e
    path = Path(path)
    if not path.exists():
        raise NotAnAutoencoder(f"{path} does not exist (expected a diffusers folder, a training run or checkpoint, "
                               f"an LDM .safetensors file, or one of "
                               f"{', '.join(convert.TAESD_PREFIX + v for v in convert.TAESD_VARIANTS)})")
    if path.is_file():
        try:
            return convert.load_ldm_vae(path, norm_num_groups)
        except convert.ConversionError as e:
            raise NotAnAutoencoder(str(e)) from e
    if path.is_dir() and (path / "config.json").is_file() and not (path / "checkpoints").is_dir():
        return load_diffusers_folder(path)
    if path.is_dir() and ((path / "checkpoints").is_dir() or (path / "state.json").is_file()):
        try:
            return load_from_checkpoint(path, weights)
        except UserError:
            raise
        except (FileNotFoundError, ValueError) as e:  # no complete checkpoint, unreadable state.json / weights
            raise NotAnAutoencoder(str(e)) from e
    raise NotAnAutoencoder(f"{path}: not a diffusers autoencoder folder (config.json + *.safetensors) "
                           "nor a latentvae training run or checkpoint")
