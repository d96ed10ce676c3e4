"""`--format single-file`: one .safetensors in the original LDM key layout (ComfyUI, A1111, kohya).

    diff = write_single_file(src, options, out, record, log)

Only the kl family (AutoencoderKL) has that layout; every other family is refused before any work
(`LoadedVae.require("single-file")`, families.py). The tensors are converted (vae/convert.py), checked
against diffusers itself (its converter must map every tensor back onto the source weights, and
`AutoencoderKL.from_single_file` must load them and reproduce the source's outputs), serialized,
read back, and only then written atomically to OUT. The record and the diffusers config travel in
the file's metadata (string values), where latentvae's loader reads them.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..fsutil import atomic_write_bytes
from ..vae import convert
from .source import ExportError, Source
from .verify import DTYPES, check_outputs, same_weights, stored_weights

LATENT_KEYS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast")


def single_file_metadata(meta: dict[str, Any], vae) -> dict[str, str]:
    """safetensors metadata (string values): the latent config entries as in config.json, the measured
    statistics and provenance, the whole record and the VAE's diffusers config (loading.py reads it)."""
    lc, stats = meta["latent_config"], meta["latent_statistics"]
    out = {"format": "pt", convert.EXPORT_RECORD_KEY: json.dumps(meta, sort_keys=True),
           convert.CONFIG_KEY: vae.to_json_string(), "exported_by": "latentvae export",
           "source": meta["source"], "source_kind": meta["source_kind"], "dtype": meta["dtype"],
           "scaling_measured": json.dumps(meta["scaling_measured"]), "scaling_origin": meta["scaling_origin"],
           **{k: json.dumps(lc.get(k)) for k in LATENT_KEYS}}
    if stats:
        out.update(latent_convention=stats["convention"], latent_channel_mean=json.dumps(stats["channel_mean"]),
                   latent_channel_std=json.dumps(stats["channel_std"]), calibration_images=str(stats["images"]),
                   calibration_source=stats["source"])
    if meta["checkpoint"] is not None:
        out.update(checkpoint=meta["checkpoint"], step=str(meta["step"]), weights=meta["weights"])
    return out


def serialized_back(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of safetensors bytes, as a reader sees them."""
    from safetensors.torch import load
    n = int.from_bytes(data[:8], "little")
    return load(data), json.loads(data[8:8 + n]).get("__metadata__", {})


def verify_ldm(ldm: dict[str, torch.Tensor], src: Source, dtype: str, out: Path) -> dict[str, float]:
    """The LDM-layout tensors, read back by diffusers: its converter must use every tensor and give the
    source weights exactly; `AutoencoderKL.from_single_file` (with the VAE's config, offline) must
    hold them and reproduce the source's outputs."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae = src.vae
    want = stored_weights(vae, dtype)
    converted = convert_ldm_vae_checkpoint(dict(ldm), json.loads(vae.to_json_string()))
    if converted.keys() != want.keys() or len(converted) != len(ldm):
        raise ExportError(f"{out}: diffusers' convert_ldm_vae_checkpoint maps the {len(ldm)} LDM tensors to "
                          f"{len(converted)}; missing {sorted(want.keys() - converted.keys())[:3]}, unexpected "
                          f"{sorted(converted.keys() - want.keys())[:3]}")
    if not same_weights(want, converted):
        raise ExportError(f"{out}: diffusers' convert_ldm_vae_checkpoint gives weights other than the source's")
    with tempfile.TemporaryDirectory() as config_dir:
        vae.save_config(config_dir)
        loaded = AutoencoderKL.from_single_file(dict(ldm), config=config_dir,
                                                torch_dtype=None if dtype == "fp32" else DTYPES[dtype])
    got = loaded.state_dict()
    if any(t.is_meta for t in got.values()) or not same_weights(want, got):
        raise ExportError(f"{out}: AutoencoderKL.from_single_file does not load the source weights from it")
    return check_outputs(loaded, src.lv, dtype, str(out))


def write_single_file(src: Source, options, out: Path, record, log) -> dict[str, float]:
    """One .safetensors in the LDM layout: converted, checked with diffusers, serialized, read back, then
    written atomically to OUT. `record(diff)` gives the export record."""
    from safetensors.torch import save

    vae = src.vae
    ldm = {k: v.detach().contiguous() for k, v in
           convert.diffusers_to_ldm_vae(stored_weights(vae, options.dtype)).items()}
    diff = verify_ldm(ldm, src, options.dtype, out)
    metadata = single_file_metadata(record(diff), vae)
    data = save(ldm, metadata=metadata)
    tensors, got = serialized_back(data)
    if tensors.keys() != ldm.keys() or not all(torch.equal(tensors[k], ldm[k]) for k in ldm) or got != metadata:
        raise ExportError(f"{out}: the serialized file does not read back as written")
    if vae.config.norm_num_groups != 32:
        log(f"note: norm_num_groups={vae.config.norm_num_groups} is not stored in LDM weights; latentvae and diffusers "
            "(with a config) read it from the file's metadata, ComfyUI/A1111/kohya assume 32")
    atomic_write_bytes(out, data)
    return diff
