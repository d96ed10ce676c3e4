"""Tiny training checkpoints and LDM-keyed weights for tests, written without running the trainer.

    run = make_run(tmp_path / "run")   # RUN/checkpoints/checkpoint-00000004/{model,ema}.safetensors + state.json

The layout is the one latentvae/checkpoint.py reads (`find_checkpoint`, `read_state`); the EMA
weights are a perturbed copy of the raw ones so the two can be told apart.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from latentvae import runs as ckpt
from latentvae.config import Config, merge
from latentvae.vae.model import build_vae


def tiny_config(**model: object) -> Config:
    """Config() with the `test` model preset (block_out_channels (8, 16), 4 norm groups) and `model` overrides."""
    return merge(Config(), {"model": {"preset": "test", **model}, "data": {"resolution": 32, "val_resolution": 32}})


def make_run(run: Path, step: int = 4, seed: int = 0, ema: bool = True, **model: object) -> Path:
    """Write one complete checkpoint of a tiny random VAE; returns the run folder."""
    cfg = tiny_config(**model)
    torch.manual_seed(seed)
    vae = build_vae(cfg.model)
    folder = ckpt.final_dir(run, step)
    folder.mkdir(parents=True)
    raw = vae.state_dict()
    ckpt.save_tensors(folder / "model.safetensors", raw)
    if ema:
        g = torch.Generator().manual_seed(seed + 1)
        ckpt.save_tensors(folder / "ema.safetensors",
                          {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in raw.items()})
    ckpt.write_json(folder / "state.json", {"format": "latentvae-checkpoint-1", "step": step, "num_processes": 1,
                                            "bad_images": [], "config": cfg.to_dict()})
    return run


# diffusers -> LDM renames, the inverse of diffusers' convert_ldm_vae_checkpoint, written independently
# so that the import test checks diffusers' conversion against it
def _ldm_key(k: str, n_up: int) -> str:
    k = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    k = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m.group(1)) + 1}", k)
    k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
    k = (k.replace("group_norm", "norm").replace("to_q", "q").replace("to_k", "k").replace("to_v", "v")
         .replace("to_out.0", "proj_out"))
    k = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", k)
    k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", k)
    k = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{n_up - 1 - int(m.group(1))}.block.", k)
    k = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{n_up - 1 - int(m.group(1))}.upsample.", k)
    return k


def to_ldm_state_dict(vae, prefix: str = "") -> dict[str, torch.Tensor]:
    """An AutoencoderKL's weights under original latent-diffusion key names (attention as 1x1 convs)."""
    n_up = len(vae.config.block_out_channels)
    out = {}
    for k, v in vae.state_dict().items():
        lk = _ldm_key(k, n_up)
        if ".attn_1." in lk and lk.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]  # LDM's AttnBlock uses Conv2d(1x1)
        out[prefix + lk] = v.clone()
    return out


def assert_same_checkpoint(a: Path, b: Path, required: set[str]) -> None:
    """Two checkpoints hold the same safetensors files (`required` among them) with equal tensors, bit for bit,
    and the same data position."""
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names == sorted(p.name for p in b.glob("*.safetensors"))
    assert required <= set(names)
    for name in names:
        ta, tb = ckpt.load_tensors(a / name), ckpt.load_tensors(b / name)
        assert ta.keys() == tb.keys(), name
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (name, k)
    assert ckpt.read_state(a)["micro_step"] == ckpt.read_state(b)["micro_step"]
