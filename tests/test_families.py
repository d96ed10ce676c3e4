"""Every VAE family through every door: one loaded record, the same latents, the class's own encode/decode.

The family table (latentvae/vae/families.py) and the record (loaded.py) are what every job stands on:
these tests pin what they say about each diffusers class, with tiny random instances (tests/families.py)
saved the ways users have them, all offline.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from families import FAMILY_NAMES, images, save_folder, save_hub, save_pipeline, tiny_vae

from latentvae.vae import conventions
from latentvae.vae.families import FAMILIES, FamilyCannot, family
from latentvae.vae.loading import NotAnAutoencoder, load_vae

# name: (stochastic, channels, factor, patch, five_d, default convention, what its consumers take)
EXPECTED = {
    "kl": (True, 4, 2, 1, False, "sd", "sample"),
    "flux2": (True, 4, 2, 2, False, "flux2", "mode"),
    "qwenimage": (True, 4, 2, 1, True, "qwenimage", "sample"),
    "wan": (True, 4, 2, 1, True, "qwenimage", "mode"),
    "dc": (False, 4, 2, 1, False, "sd", "latent"),
    "hunyuanimage": (True, 8, 4, 1, False, "sd", "sample"),
    "tiny": (False, 4, 2, 1, False, "sd", "latent"),
}


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    hub = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    return hub


def own_encode(vae, name: str, x: torch.Tensor) -> torch.Tensor:
    """The class's own encode, called as its pipelines call it: 5-D (T=1) for Qwen-Image and Wan."""
    out = vae.encode(x.unsqueeze(2) if name in ("qwenimage", "wan") else x)
    z = out.latent_dist.mean if hasattr(out, "latent_dist") else (out.latents if name == "tiny" else out.latent)
    return z[:, :, 0] if name in ("qwenimage", "wan") else z


def own_decode(vae, name: str, z: torch.Tensor) -> torch.Tensor:
    five = name in ("qwenimage", "wan")
    x = vae.decode(z.unsqueeze(2) if five else z).sample
    return x[:, :, 0] if five else x


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_door_gives_the_same_record_and_identical_latents(name, tmp_path, offline_hub):
    vae = tiny_vae(name)
    save_folder(vae, tmp_path / "folder")
    save_pipeline(vae, tmp_path / "pipe")
    save_hub(vae, offline_hub, f"org/{name}-vae")
    save_pipeline(vae, tmp_path / "hub-pipe-src")
    x = images(2, 32)
    doors = {"folder": str(tmp_path / "folder"), "pipeline": str(tmp_path / "pipe"),
             "subfolder": f"{tmp_path / 'pipe'}[subfolder=vae]", "hub": f"org/{name}-vae"}
    records = {door: load_vae(spec) for door, spec in doors.items()}
    half = copy.deepcopy(vae).half()
    half.save_pretrained(str(tmp_path / "fp16"), variant="fp16", safe_serialization=True)
    variant = load_vae(f"{tmp_path / 'fp16'}[variant=fp16]")  # the only variant there: also found without the option
    with torch.no_grad():
        ref = own_encode(vae, name, x)
        for door, lv in records.items():
            assert type(lv.module) is type(vae) and lv.family.name == name, door
            assert torch.equal(lv.moments(x)[0], ref), door
            assert lv.weights_sha256() == records["folder"].weights_sha256()
        # a half-precision variant loads as fp32 (what every job runs), holding exactly the stored values
        assert next(variant.module.parameters()).dtype == torch.float32 and variant.origin["variant"] == "fp16"
        assert torch.equal(variant.moments(x)[0], own_encode(half.float(), name, x))
        assert torch.equal(load_vae(tmp_path / "fp16").moments(x)[0], variant.moments(x)[0])
    assert {d: lv.origin["kind"] for d, lv in records.items()} == {
        "folder": "folder", "pipeline": "pipeline", "subfolder": "pipeline", "hub": "hub"}
    assert records["hub"].origin["repo_id"] == f"org/{name}-vae"
    assert all(lv.factors == records["folder"].factors for lv in records.values())


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_the_record_says_what_the_family_table_knows(name, tmp_path):
    lv = load_vae(save_folder(tiny_vae(name), tmp_path / name))
    stochastic, channels, factor, patch, five_d, convention, consumer = EXPECTED[name]
    assert (lv.stochastic, lv.layout.channels, lv.layout.factor, lv.layout.patch, lv.layout.five_d) == (
        stochastic, channels, factor, patch, five_d)
    assert lv.convention == convention and lv.family.consumer == consumer
    assert convention in lv.family.conventions
    assert lv.factors_origin == ("taesd" if name == "tiny" else "published") and not lv.factors_measured
    x = images(1, 32)
    with torch.no_grad():
        mean, logvar = lv.moments(x)
    assert mean.shape == (1, channels, 32 // factor, 32 // factor) and (logvar is not None) == stochastic
    # what the record reports is what the pipeline's formula reads from the module itself
    c = lv.module.config
    expected_factors = {"flux2": lambda: {"bn_running_mean": lv.module.bn.running_mean.tolist(),
                                          "bn_running_var": lv.module.bn.running_var.tolist(),
                                          "batch_norm_eps": c.batch_norm_eps},
                        "qwenimage": lambda: {"latents_mean": list(c.latents_mean), "latents_std": list(c.latents_std)},
                        "dc": lambda: {"scaling_factor": c.scaling_factor},
                        "hunyuanimage": lambda: {"scaling_factor": c.scaling_factor}}
    expected_factors["wan"] = expected_factors["qwenimage"]
    if name in expected_factors:
        assert lv.factors == expected_factors[name]()


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_encode_then_decode_through_latentvae_is_the_class_own(name, tmp_path):
    vae = tiny_vae(name, seed=1)
    lv = load_vae(save_folder(vae, tmp_path / name))
    x = images(2, 32, seed=3)
    with torch.no_grad():
        mean, _ = lv.moments(x)
        assert torch.equal(mean, own_encode(vae, name, x))
        assert torch.equal(lv.decode(mean), own_decode(vae, name, mean))
        z = lv.latent(x, torch.Generator().manual_seed(0))
    if lv.family.consumer == "sample":  # a posterior sample, as the training scripts draw it
        dist = vae.encode(x.unsqueeze(2) if lv.layout.five_d else x).latent_dist
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
        std = dist.std[:, :, 0] if lv.layout.five_d else dist.std
        assert torch.allclose(z, mean + std * noise, atol=1e-6) and not torch.equal(z, mean)
    else:  # mode (FLUX.2, Wan: argmax) or a deterministic latent
        assert torch.equal(z, mean)


@pytest.mark.parametrize("convention", sorted(conventions.CONVENTIONS))
def test_each_formula_inverts_and_matches_its_per_channel_affine(convention):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=g) * 3 + 1
    chans = 16 if convention == "flux2" else 4
    m, s = (torch.rand(chans, generator=g) - 0.5).tolist(), (torch.rand(chans, generator=g) + 0.5).tolist()
    view = conventions.patchify(z) if convention == "flux2" else z
    entries = conventions.diffusers_config(convention, channel_mean=m, channel_std=s, mean=0.7, std=2.5)
    x = conventions.to_diffusion(z, entries, convention)
    assert x.shape == view.shape
    assert torch.allclose(conventions.from_diffusion(x, entries, convention), z, atol=1e-5)
    scale, bias = conventions.affine(entries, convention, chans)
    assert torch.allclose((view.double() * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)).float(), x, atol=1e-5)


def test_flux2_patchify_is_the_pipeline_layout():
    """pipeline_flux2.py `_patchify_latents`: channel c*4 + 2*dy + dx holds latent pixel (2i+dy, 2j+dx) of c."""
    z = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    p = conventions.patchify(z)
    assert p.shape == (2, 12, 2, 3)
    for c, dy, dx, i, j in [(0, 0, 0, 0, 0), (1, 0, 1, 1, 2), (2, 1, 0, 0, 1), (2, 1, 1, 1, 1)]:
        assert p[1, c * 4 + 2 * dy + dx, i, j] == z[1, c, 2 * i + dy, 2 * j + dx]
    assert torch.equal(conventions.unpatchify(p), z)


def test_a_family_that_cannot_do_a_job_says_so_in_one_line():
    with pytest.raises(FamilyCannot, match=r"^AutoencoderDC \(dc family\) cannot be fine-tuned in full: it has no "
                                           r"posterior.*train_decoder_only=true$"):
        family("dc").require("train")
    with pytest.raises(FamilyCannot, match=r"^out/f2: AutoencoderKLFlux2 \(flux2 family\) cannot be written as one "
                                           r"single file.*no single-file loader"):
        family("flux2").require("single-file", "out/f2")
    family("kl").require("single-file")
    for f in FAMILIES.values():  # every family does the image jobs; refusals name their reason
        for job in ("evaluate", "encode", "decode", "export", "demo", "probe", "train-decoder"):
            f.require(job)
        assert all("\n" not in why and why for why in f.refusals.values())


def test_a_video_or_unknown_class_is_refused_in_one_line_naming_the_file(tmp_path):
    for cls, words in [("AutoencoderKLLTXVideo", "a video VAE"), ("UNet2DModel", "expected one of AutoencoderKL, ")]:
        folder = tmp_path / cls
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"_class_name": cls}))
        with pytest.raises(NotAnAutoencoder, match=rf"{folder}/config.json: _class_name is '{cls}'.*{words}"):
            load_vae(folder)
    proc = subprocess.run([sys.executable, "-m", "latentvae", "evaluate", "--vae", str(tmp_path / "AutoencoderKLLTXVideo"),
                           "--data", str(tmp_path), "--out", str(tmp_path / "report")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "a video VAE" in proc.stderr, proc.stderr


def test_an_original_layout_wan_or_dc_file_says_how_to_convert_it(tmp_path):
    """diffusers converts these single files itself (from_single_file); latentvae says so in one line."""
    from safetensors.torch import save_file

    for key, cls in [("decoder.middle.0.residual.0.gamma", "AutoencoderKLWan"),
                     ("encoder.project_in.conv.bias", "AutoencoderDC")]:
        file = tmp_path / f"{cls}.safetensors"
        save_file({key: torch.zeros(4), "encoder.conv1.weight": torch.zeros(4, 3, 3, 3)}, str(file))
        with pytest.raises(NotAnAutoencoder, match=rf"^{file}: an original-layout {cls} file .*{cls}.from_single_file"):
            load_vae(file)
