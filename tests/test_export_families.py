"""`latentvae export` for every VAE family: calibrated factors checked with each pipeline's own formula.

After `export --calibrate IMAGES`, the exported folder is read with the class's own `from_pretrained`
(no latentvae), the images are encoded with the class's own `encode` (5-D for Qwen-Image and Wan),
the latent the family's pipelines take is formed (a posterior sample, or the mode), and the formula is
applied as the diffusers pipeline writes it (copied below, with its file): the result must be
zero-mean (except SD's formula, which never shifts) and unit-variance on those images, and the
pipeline's inverse must give the VAE latent back. Tiny random instances (tests/families.py), offline.
"""
from __future__ import annotations

import json

import diffusers
import numpy as np
import pytest
import torch
from conftest import make_photo
from families import FAMILY_NAMES, save_folder, tiny_vae
from PIL import Image

from latentvae import runs
from latentvae.cli import main as cli_main
from helpers_ckpt import tiny_config

CLASSES = {"kl": "AutoencoderKL", "flux2": "AutoencoderKLFlux2", "qwenimage": "AutoencoderKLQwenImage",
           "wan": "AutoencoderKLWan", "dc": "AutoencoderDC", "hunyuanimage": "AutoencoderKLHunyuanImage",
           "tiny": "AutoencoderTiny"}
FIVE_D = ("qwenimage", "wan")
TAKES = {"kl": "sample", "flux2": "mode", "qwenimage": "sample", "wan": "mode", "dc": "latent",
         "hunyuanimage": "sample", "tiny": "latent"}  # what each family's pipelines / training scripts take
CALIBRATED = [("kl", "sd"), ("kl", "sdxl"), ("kl", "sd3"), ("flux2", None), ("qwenimage", None), ("wan", None),
              ("dc", None), ("hunyuanimage", None)]
DRAWS = 16  # posterior samples per image for "sample" families: the statistics are of samples, as training sees
FAST = ["--limit", "6", "--resolution", "32", "--fp16-images", "1"]


@pytest.fixture
def photos(tmp_path):
    """Six smooth 32-px images (the calibration set) and the same images as a [-1, 1] tensor."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        make_photo(size=(32, 32), seed=10 + i).save(folder / f"p{i}.png")
    x = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))])
    return folder, torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def export_cli(*argv) -> None:
    cli_main(["export", *map(str, argv)])


def own(name: str, out):
    """The exported folder, read by diffusers alone."""
    return getattr(diffusers, CLASSES[name]).from_pretrained(out).eval()


@torch.no_grad()
def taken_latent(vae, name: str, x: torch.Tensor) -> torch.Tensor:
    """What the family's pipelines take from the class's own encode (5-D kept for Qwen-Image and Wan)."""
    out = vae.encode(x.unsqueeze(2) if name in FIVE_D else x)
    if TAKES[name] == "latent":
        return out.latents if name == "tiny" else out.latent
    if TAKES[name] == "mode":
        return out.latent_dist.mode()
    g = torch.Generator().manual_seed(0)
    return torch.cat([out.latent_dist.sample(generator=g) for _ in range(DRAWS)])


# ----------------------------------------------------------------------------- the pipelines' formulas, copied
def flux2_patchify(latents):  # pipelines/flux2/pipeline_flux2.py `_patchify_latents`
    batch_size, num_channels_latents, height, width = latents.shape
    latents = latents.view(batch_size, num_channels_latents, height // 2, 2, width // 2, 2)
    latents = latents.permute(0, 1, 3, 5, 2, 4)
    return latents.reshape(batch_size, num_channels_latents * 4, height // 2, width // 2)


def flux2_unpatchify(latents):  # pipelines/flux2/pipeline_flux2.py `_unpatchify_latents`
    batch_size, num_channels_latents, height, width = latents.shape
    latents = latents.reshape(batch_size, num_channels_latents // (2 * 2), 2, 2, height, width)
    latents = latents.permute(0, 1, 4, 2, 5, 3)
    return latents.reshape(batch_size, num_channels_latents // (2 * 2), height * 2, width * 2)


def to_pipeline(vae, name: str, convention, z):
    """VAE latent -> what the family's diffusion model sees, as its diffusers pipeline computes it."""
    c = vae.config
    if name == "flux2":  # pipeline_flux2.py `_encode_vae_image`
        z = flux2_patchify(z)
        latents_bn_mean = vae.bn.running_mean.view(1, -1, 1, 1)
        latents_bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + c.batch_norm_eps)
        return (z - latents_bn_mean) / latents_bn_std
    if name in FIVE_D:  # qwenimage/pipeline_qwenimage_img2img.py `_encode_vae_image`, wan/pipeline_wan_i2v.py
        latents_mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1, 1)
        latents_std = 1.0 / torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1, 1)
        return (z - latents_mean) * latents_std
    if name in ("dc", "hunyuanimage") or convention == "sd":  # sana, hunyuan_image, stable_diffusion img2img
        return z * c.scaling_factor
    if convention == "sdxl":  # stable_diffusion_xl/pipeline_stable_diffusion_xl_img2img.py `prepare_latents`
        latents_mean = torch.tensor(c.latents_mean).view(1, 4, 1, 1)
        latents_std = torch.tensor(c.latents_std).view(1, 4, 1, 1)
        return (z - latents_mean) * c.scaling_factor / latents_std
    return (z - c.shift_factor) * c.scaling_factor  # sd3: pipeline_stable_diffusion_3_img2img.py `prepare_latents`


def from_pipeline(vae, name: str, convention, x):
    """The pipelines' inverse, before their vae.decode (the same files, `__call__`)."""
    c = vae.config
    if name == "flux2":
        latents_bn_mean = vae.bn.running_mean.view(1, -1, 1, 1)
        latents_bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + c.batch_norm_eps)
        return flux2_unpatchify(x * latents_bn_std + latents_bn_mean)
    if name in FIVE_D:
        latents_mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1, 1)
        latents_std = 1.0 / torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1, 1)
        return x / latents_std + latents_mean
    if name in ("dc", "hunyuanimage") or convention == "sd":
        return x / c.scaling_factor
    if convention == "sdxl":
        latents_mean = torch.tensor(c.latents_mean).view(1, 4, 1, 1)
        latents_std = torch.tensor(c.latents_std).view(1, 4, 1, 1)
        return x * latents_std / c.scaling_factor + latents_mean
    return x / c.scaling_factor + c.shift_factor


def per_channel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(1), flat.std(1, correction=0)


# ----------------------------------------------------------------------------- calibrated factors
@pytest.mark.parametrize("name, convention", CALIBRATED, ids=[f"{n}-{c or 'default'}" for n, c in CALIBRATED])
def test_calibrated_export_gives_unit_latents_under_the_pipelines_own_formula(name, convention, photos, tmp_path):
    folder, x = photos
    src = save_folder(tiny_vae(name), tmp_path / "src")
    out = tmp_path / "out"
    export_cli(src, "--out", out, "--calibrate", folder, *FAST, *(["--convention", convention] if convention else []))
    vae = own(name, out)
    z = taken_latent(vae, name, x)  # fp32 throughout
    d = to_pipeline(vae, name, convention, z)
    exact = TAKES[name] != "sample"  # the mode / the latent: the measured values themselves
    tol = 1e-3 if exact else 0.03
    if name in ("kl", "dc", "hunyuanimage"):  # one scalar (and shift): the whole latent's std is 1
        if convention != "sdxl":
            assert float(d.double().std(correction=0)) == pytest.approx(1.0, abs=tol)
            if convention == "sd3":
                assert float(d.double().mean()) == pytest.approx(0.0, abs=tol)
        else:
            mean, std = per_channel(d)
            assert mean.abs().max() < tol and (std - 1).abs().max() < tol
    else:  # per channel: of the patchified latent (flux2: 16 = 4 x 2 x 2 channels), of (B, C, 1, H, W)
        mean, std = per_channel(d)
        assert d.shape[1] == (16 if name == "flux2" else 4)
        assert mean.abs().max() < tol and (std - 1).abs().max() < tol, (mean, std)
    torch.testing.assert_close(from_pipeline(vae, name, convention, d), z, rtol=1e-5, atol=1e-5)
    meta = json.loads((out / "latentvae_export.json").read_text())
    assert meta["scaling_measured"] and meta["family"] == name
    assert meta["formula"]["convention"] == (convention or {"flux2": "flux2", "qwenimage": "qwenimage",
                                                            "wan": "qwenimage"}.get(name, "sd"))
    assert ("BatchNorm" in meta["factors_written_to"]) == (name == "flux2")
    card = (out / "README.md").read_text()
    assert "Measured on 6 images" in card and meta["formula"]["diffusers"] in card


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_the_export_reloads_with_its_own_class_and_encodes_and_decodes_as_the_source(name, photos, tmp_path):
    _, x = photos
    source = tiny_vae(name)
    src = save_folder(source, tmp_path / "src")
    export_cli(src, "--out", tmp_path / "out")  # uncalibrated: the source's own factors, kept
    vae = own(name, tmp_path / "out")
    with torch.no_grad():
        five = name in FIVE_D
        enc = lambda m: m.encode(x.unsqueeze(2) if five else x)  # noqa: E731
        a, b = enc(source), enc(vae)
        za = a.latent_dist.mean if hasattr(a, "latent_dist") else (a.latents if name == "tiny" else a.latent)
        zb = b.latent_dist.mean if hasattr(b, "latent_dist") else (b.latents if name == "tiny" else b.latent)
        assert torch.equal(za, zb)
        if hasattr(a, "latent_dist"):
            assert torch.equal(a.latent_dist.logvar, b.latent_dist.logvar)
        assert torch.equal(source.decode(za).sample, vae.decode(za).sample)
    kept = {k: source.config.get(k) for k in ("scaling_factor", "shift_factor", "latents_mean", "latents_std")}
    assert {k: vae.config.get(k) for k in kept} == kept
    if name == "flux2":  # its factors are BatchNorm buffers: the source's, in the weights file
        assert torch.equal(vae.bn.running_mean, source.bn.running_mean)
        assert torch.equal(vae.bn.running_var, source.bn.running_var)
    meta = json.loads((tmp_path / "out" / "latentvae_export.json").read_text())
    assert not meta["scaling_measured"] and meta["max_abs_diff"] == {"encode": 0.0, "decode": 0.0}
    assert "Not measured by this export" in (tmp_path / "out" / "README.md").read_text()


def test_the_tiny_family_is_measured_but_nothing_is_written(photos, tmp_path):
    """TAESD latents are the target VAE's latents, already normalized: calibration reports, writes nothing."""
    folder, _ = photos
    source = tiny_vae("tiny")
    src = save_folder(source, tmp_path / "src")
    export_cli(src, "--out", tmp_path / "out", "--calibrate", folder, *FAST)
    vae = own("tiny", tmp_path / "out")
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (source.config.scaling_factor,
                                                                    source.config.shift_factor)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in vae.state_dict().items())
    meta = json.loads((tmp_path / "out" / "latentvae_export.json").read_text())
    assert meta["factors_written_to"].startswith("nothing") and meta["latent_statistics"]["images"] == 6
    assert "Written to: nothing" in (tmp_path / "out" / "README.md").read_text()


# ----------------------------------------------------------------------------- a run: the placeholder
def family_run(run, name: str):
    """A training checkpoint of family `name` (state.json's vae_config names the class), written directly."""
    vae = tiny_vae(name, seed=1)
    folder = runs.final_dir(run, 4)
    folder.mkdir(parents=True)
    runs.save_tensors(folder / "model.safetensors", vae.state_dict())
    runs.save_tensors(folder / "ema.safetensors", vae.state_dict())
    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    runs.write_json(folder / "state.json", {"format": "latentvae-checkpoint-1", "step": 4, "num_processes": 1,
                                            "bad_images": [], "config": tiny_config().to_dict(),
                                            "vae_config": {"_class_name": CLASSES[name], **config}})
    return vae


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_an_uncalibrated_run_gets_the_identity_of_its_familys_formula(name, photos, tmp_path):
    """A run's factors were never measured: its export holds the placeholder, under which the pipeline's
    formula changes nothing (never the non-trivial factors the architecture was built with)."""
    _, x = photos
    family_run(tmp_path / "run", name)
    export_cli(tmp_path / "run", "--out", tmp_path / "out")
    vae = own(name, tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "latentvae_export.json").read_text())
    assert meta["scaling_origin"] == "placeholder" and "NOT measured" in (tmp_path / "out" / "README.md").read_text()
    if name == "tiny":
        assert meta["factors_written_to"].startswith("nothing")
        return
    with torch.no_grad():
        out = vae.encode(x[:2].unsqueeze(2) if name in FIVE_D else x[:2])
    z = out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latent
    identity = flux2_patchify(z) if name == "flux2" else z
    placeholder = to_pipeline(vae, name, "sd" if name == "kl" else None, z)
    torch.testing.assert_close(placeholder, identity, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- what a family cannot do
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_single_file_is_refused_in_one_line_for_a_family_without_it(name, tmp_path, capsys):
    src = save_folder(tiny_vae(name), tmp_path / "src")
    out = tmp_path / "exports" / "vae.safetensors"
    if name == "kl":  # the LDM layout: diffusers' own single-file loader reads it back
        export_cli(src, "--out", out, "--format", "single-file")
        loaded = diffusers.AutoencoderKL.from_single_file(str(out), config=str(src))
        source = diffusers.AutoencoderKL.from_pretrained(src)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())
        return
    with pytest.raises(SystemExit) as e:
        export_cli(src, "--out", out, "--format", "single-file", "--calibrate", tmp_path / "no-images-needed")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"{CLASSES[name]} ({name} family) cannot be written as one single file" in err
    assert not (tmp_path / "exports").exists() or not any((tmp_path / "exports").iterdir())


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_a_convention_the_familys_pipelines_do_not_apply_is_refused_naming_its_own(name, tmp_path, capsys):
    from latentvae.vae.families import family
    src = save_folder(tiny_vae(name), tmp_path / "src")
    wrong = next(c for c in ("flux2", "sd3") if c not in family(name).conventions)
    with pytest.raises(SystemExit) as e:
        export_cli(src, "--out", tmp_path / "out", "--calibrate", tmp_path / "no-images-needed", "--convention", wrong)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"({name} family)" in err and "valid choices for it: " + ", ".join(family(name).conventions) in err
    assert not (tmp_path / "out").exists()
