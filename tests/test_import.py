"""Importing pretrained autoencoders: LDM/SD checkpoints via diffusers' converter, TAESD references."""
import os
import pickle
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from safetensors.torch import save_file

from helpers_ckpt import make_run, tiny_config, to_ldm_state_dict
from latentvae.vae.convert import TAESD_VARIANTS, load_taesd, raw_to_taesd, taesd_to_raw
from PIL import Image, ImageOps

from latentvae.images import load_rgb, to_tensor
from latentvae.vae.loading import NotAnAutoencoder, load_autoencoder
from latentvae.vae.model import build_vae, decode, encode_moments

SHARED = Path(__file__).resolve().parents[2] / "shared"
TAESD_DIR = SHARED / "weights" / "taesd"
ASTRONAUT = SHARED / "data" / "dev-images" / "skimage_astronaut.png"


def outputs(vae, x):
    with torch.no_grad():
        mean, logvar = encode_moments(vae, x)
        return mean, logvar, decode(vae, mean)


def images(n=2, size=16):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


# ----------------------------------------------------------------------------- LDM checkpoints
@pytest.mark.parametrize("prefix", ["", "first_stage_model."])
@pytest.mark.parametrize("attention", [False, True])
def test_ldm_checkpoint_converts_and_reproduces_the_model(tmp_path, prefix, attention):
    vae = build_vae(tiny_config(mid_block_add_attention=attention).model).eval()
    state = to_ldm_state_dict(vae, prefix)
    assert "encoder.down.0.block.0.norm1.weight" in {k[len(prefix):] for k in state}
    if prefix:  # a full SD checkpoint also holds the UNet and text encoder: ignored
        state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)
    path = tmp_path / "sd-vae.safetensors"
    save_file(state, path)
    loaded = load_autoencoder(path, norm_num_groups=4)
    assert isinstance(loaded, AutoencoderKL)
    assert loaded.config.block_out_channels == (8, 16) and loaded.config.mid_block_add_attention == attention
    for a, b in zip(outputs(vae, images()), outputs(loaded, images())):
        assert torch.allclose(a, b, atol=1e-6)


def test_training_can_start_from_an_ldm_checkpoint(tmp_path):
    # SD-family VAEs use 32 groups; the default of load_autoencoder / model.init_from
    cfg = tiny_config(block_out_channels=(64, 64), norm_num_groups=32)
    vae = build_vae(cfg.model).eval()
    save_file(to_ldm_state_dict(vae), tmp_path / "vae.safetensors")
    from dataclasses import replace
    from latentvae.train.loop import initial_vae
    started = initial_vae(replace(cfg.model, init_from=str(tmp_path / "vae.safetensors"))).eval()
    assert torch.allclose(outputs(vae, images())[2], outputs(started, images())[2], atol=1e-6)


def test_torch_files_are_refused_by_default_and_read_only_with_weights_only(tmp_path):
    vae = build_vae(tiny_config().model).eval()
    torch.save(to_ldm_state_dict(vae), tmp_path / "vae.ckpt")  # plain tensors: weights_only accepts them
    with pytest.raises(NotAnAutoencoder, match=r"vae.ckpt: a pickle-based torch file.*allow_pickle=yes"):
        load_autoencoder(tmp_path / "vae.ckpt", norm_num_groups=4)
    assert torch.allclose(outputs(vae, images())[2],
                          outputs(load_autoencoder(f"{tmp_path}/vae.ckpt[allow_pickle=yes]", norm_num_groups=4),
                                  images())[2])
    marker = tmp_path / "code-ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": Evil()}, f, protocol=2)
    with pytest.raises(NotAnAutoencoder, match="evil.ckpt: a pickle-based torch file"):
        load_autoencoder(tmp_path / "evil.ckpt")
    with pytest.raises(NotAnAutoencoder, match=r"evil.ckpt: torch.load\(weights_only=True\) refused it"):
        load_autoencoder(f"{tmp_path}/evil.ckpt[allow_pickle=yes]")
    assert not marker.exists()


def test_not_an_autoencoder_is_a_user_error_and_still_a_value_error():
    from latentvae.errors import UserError

    assert issubclass(NotAnAutoencoder, UserError) and issubclass(NotAnAutoencoder, ValueError)


def test_bad_inputs_name_the_file_and_what_was_expected(tmp_path):
    save_file({"weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(NotAnAutoencoder, match=r"other.safetensors: not an LDM VAE.*encoder.down.0.block.0"):
        load_autoencoder(tmp_path / "other.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(NotAnAutoencoder, match="broken.safetensors: not a readable safetensors"):
        load_autoencoder(tmp_path / "broken.safetensors")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(NotAnAutoencoder, match=r"notes.txt: unknown weight file type '.txt'; expected .safetensors"):
        load_autoencoder(tmp_path / "notes.txt")
    with pytest.raises(NotAnAutoencoder, match="does not exist.*taesd:sd"):
        load_autoencoder(tmp_path / "missing")
    with pytest.raises(NotAnAutoencoder, match="valid choices: taesd:sd, taesd:sdxl, taesd:sd3, taesd:flux"):
        load_autoencoder("taesd:sd2")
    with pytest.raises(NotAnAutoencoder, match="taesd_encoder.safetensors does not exist"):
        load_autoencoder("taesd:sd", taesd_dir=tmp_path)


def test_load_autoencoder_still_reads_runs_and_diffusers_folders(tmp_path):
    run = make_run(tmp_path / "run")
    ema, raw = load_autoencoder(run), load_autoencoder(run, weights="raw")
    assert not torch.equal(ema.decoder.conv_out.weight, raw.decoder.conv_out.weight)
    ema.save_pretrained(tmp_path / "folder")
    again = load_autoencoder(tmp_path / "folder")
    assert torch.equal(outputs(ema, images())[2], outputs(again, images())[2])


# ----------------------------------------------------------------------------- TAESD
needs_shared = pytest.mark.skipif(not TAESD_DIR.is_dir() or not ASTRONAUT.is_file(),
                                  reason=f"no TAESD weights / dev images at {SHARED} (../shared beside the repo)")

# skimage astronaut, short side -> 128, centre crop: (latent mean, latent std, recon L1, recon pixel (64, 64))
GOLDEN = {
    "sd": (-0.00773, 0.83468, 0.13553, (-0.55362, -0.61850, -0.63796)),
    "sdxl": (-0.04239, 0.95768, 0.13043, (-0.59388, -0.66268, -0.70724)),
    "sd3": (0.00283, 1.04127, 0.06852, (-0.86502, -0.84979, -0.88559)),
    "flux": (-0.10978, 0.86763, 0.08957, (-0.65852, -0.65944, -0.61217)),
}


@needs_shared
@pytest.mark.parametrize("variant", list(TAESD_VARIANTS))
def test_taesd_reproduces_a_fixed_reconstruction(variant):
    vae = load_autoencoder(f"taesd:{variant}", taesd_dir=TAESD_DIR)
    assert isinstance(vae, AutoencoderTiny) and vae.config.latent_channels == TAESD_VARIANTS[variant].channels
    x = to_tensor(ImageOps.fit(load_rgb(ASTRONAUT), (128, 128), Image.BICUBIC))[None]  # as when recorded
    z, logvar, x_hat = outputs(vae, x)
    assert logvar is None and z.shape == (1, TAESD_VARIANTS[variant].channels, 16, 16)
    mean, std, l1, pixel = GOLDEN[variant]
    assert float(z.mean()) == pytest.approx(mean, abs=1e-3)
    assert float(z.std()) == pytest.approx(std, abs=1e-3)
    assert float((x_hat - x).abs().mean()) == pytest.approx(l1, abs=1e-3)
    assert x_hat[0, :, 64, 64].tolist() == pytest.approx(pixel, abs=2e-3)


@needs_shared
def test_taesd_dir_from_the_environment(monkeypatch):
    monkeypatch.setenv("LATENTVAE_TAESD_DIR", str(TAESD_DIR))
    assert isinstance(load_taesd("taesd:flux"), AutoencoderTiny)


def test_taesd_latents_map_to_the_raw_latent_space_and_back():
    vae = AutoencoderTiny(latent_channels=16)
    vae.taesd_variant = "flux"
    z = torch.randn(1, 16, 4, 4)
    raw = taesd_to_raw(vae, z)
    assert torch.allclose(raw, z / 0.3611 + 0.1159) and torch.allclose(raw_to_taesd(vae, raw), z, atol=1e-6)
