"""Tiny random instances of every VAE family diffusers ships, saved as the doors users have them in.

    vae = tiny_vae("flux2", seed=0)              # diffusers' own class, random weights, a few thousand parameters
    folder = save_folder(vae, tmp / "flux2")     # config.json + diffusion_pytorch_model.safetensors
    pipe = save_pipeline(vae, tmp / "pipe")      # model_index.json + vae/
    snapshot = save_hub(vae, hub, "org/flux2")   # the hub cache layout huggingface_hub writes (offline)

Sizes follow diffusers' own model tests (a couple of levels, 8-16 channels, 4 latent channels); every
class downsamples by 2 except where noted (HunyuanImage by 4, its smallest), so 32-px images give
16x16 latents. Non-trivial factors (latents_mean/std, scaling_factor, BatchNorm statistics) are set so
that a formula applied the wrong way round shows.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

FAMILY_NAMES = ("kl", "flux2", "qwenimage", "wan", "dc", "hunyuanimage", "tiny")
VIDEO_FAMILY_NAMES = ("wan", "ltx2", "hunyuanvideo15", "cogvideox")  # tiny_video_vae: clips, f8 spatially
VIDEO_STEP = {"wan": 4, "ltx2": 8, "hunyuanvideo15": 4, "cogvideox": 8}  # clips of 1 + step*k frames
TRAINABLE_FULL = ("kl", "flux2", "qwenimage", "wan", "hunyuanimage")  # a posterior: full fine-tune too
SHA = "0123456789abcdef0123456789abcdef01234567"


def _kwargs(name: str) -> dict:
    two = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)
    if name == "kl":
        return dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                    scaling_factor=0.5, **two)
    if name == "flux2":
        return dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                    mid_block_add_attention=False, sample_size=32, **two)
    if name in ("qwenimage", "wan"):
        return dict(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                    latents_mean=[0.1, -0.2, 0.3, -0.4], latents_std=[1.5, 0.5, 2.0, 1.0])
    if name == "dc":
        return dict(in_channels=3, latent_channels=4, attention_head_dim=2,
                    encoder_block_types=("ResBlock", "EfficientViTBlock"),
                    decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                    decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)),
                    decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
                    decoder_layers_per_block=(1, 1), upsample_block_type="interpolate",
                    downsample_block_type="stride_conv", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                    scaling_factor=0.41407)
    if name == "hunyuanimage":  # its ResNet blocks hard-code 32 GroupNorm groups
        return dict(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(32, 32, 32),
                    layers_per_block=1, spatial_compression_ratio=4, sample_size=32, scaling_factor=0.75)
    if name == "tiny":
        return dict(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=4)
    raise KeyError(name)


def tiny_vae(name: str, seed: int = 0):
    """A random diffusers instance of family `name`, eval mode, fp32; flux2 gets non-trivial BN statistics."""
    import diffusers
    from latentvae.vae.families import family

    torch.manual_seed(seed)
    vae = getattr(diffusers, family(name).class_name)(**_kwargs(name)).eval()
    if name == "flux2":
        with torch.no_grad():
            n = vae.bn.running_mean.numel()
            vae.bn.running_mean.copy_(torch.linspace(-0.3, 0.3, n))
            vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, n))
    return vae


def _video_kwargs(name: str) -> dict:
    """The video classes at diffusers' test sizes, each downsampling 32-px frames to 4x4 latents (/8) and time
    by its published factor (4; LTX-2 8), with non-trivial latent factors."""
    if name == "wan":
        return dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
                    latents_mean=[0.1, -0.2, 0.3, -0.4], latents_std=[1.5, 0.5, 2.0, 1.0])
    if name == "ltx2":  # spatial_compression_ratio given: diffusers' formula assumes every level downsamples space
        return dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 32, 64),
                    decoder_block_out_channels=(8, 16, 32), layers_per_block=(1, 1, 1, 1, 1),
                    decoder_layers_per_block=(1, 1, 1, 1), spatio_temporal_scaling=(True, True, True, True),
                    decoder_spatio_temporal_scaling=(True, True, True), decoder_inject_noise=(False,) * 4,
                    downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
                    upsample_type=("spatiotemporal",) * 3, upsample_residual=(True,) * 3, upsample_factor=(2, 2, 2),
                    timestep_conditioning=False, patch_size=1, patch_size_t=1, encoder_causal=True,
                    decoder_causal=False, spatial_compression_ratio=8, temporal_compression_ratio=8, scaling_factor=0.8)
    if name == "hunyuanvideo15":
        return dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                    spatial_compression_ratio=8, temporal_compression_ratio=4, scaling_factor=0.75)
    if name == "cogvideox":
        return dict(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=4,
                    temporal_compression_ratio=4, scaling_factor=0.7)
    raise KeyError(name)


def tiny_video_vae(name: str, seed: int = 0):
    """A random diffusers video VAE of family `name` (VIDEO_FAMILY_NAMES), eval mode, fp32; LTX-2 gets
    non-trivial latents_mean/latents_std buffers."""
    import diffusers
    from latentvae.vae.families import family

    torch.manual_seed(seed)
    vae = getattr(diffusers, family(name).class_name)(**_video_kwargs(name)).eval()
    if name == "ltx2":
        with torch.no_grad():
            vae.latents_mean.copy_(torch.tensor([0.1, -0.2, 0.3, -0.4]))
            vae.latents_std.copy_(torch.tensor([1.5, 0.5, 2.0, 1.0]))
    return vae


def clips(n: int = 1, frames: int = 9, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random clips (n, 3, frames, size, size) in [-1, 1] whose content drifts from frame to frame."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 4, size // 4 + frames, generator=g) * 2 - 1
    wide = torch.nn.functional.interpolate(low, size=(size, size + 4 * frames), mode="bilinear", align_corners=False)
    return torch.stack([wide[..., 4 * t:4 * t + size] for t in range(frames)], dim=2)  # a pan, 4 px a frame


def save_folder(vae, folder: Path) -> Path:
    vae.save_pretrained(str(folder), safe_serialization=True)
    return folder


def save_pipeline(vae, folder: Path) -> Path:
    """A pipeline folder: model_index.json naming the vae component, and vae/."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "DiffusionPipeline", "_diffusers_version": "0.42.1", "vae": ["diffusers", type(vae).__name__]}))
    save_folder(vae, folder / "vae")
    return folder


def save_hub(vae, hub: Path, repo_id: str, commit: str = SHA) -> Path:
    """A VAE repo in the hub cache as huggingface_hub writes it (blobs + snapshot links + refs/main)."""
    staging = hub.parent / f".staging-{repo_id.replace('/', '--')}"
    save_folder(vae, staging)
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    for f in sorted(staging.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / f.name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.rmtree(staging)
    return repo / "snapshots" / commit


def images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [-1, 1] (random noise would make every VAE look alike)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 8, size // 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
