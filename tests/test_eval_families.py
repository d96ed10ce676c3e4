"""Every VAE family through `latentvae evaluate`, `latentvae demo ...` and `latentvae probe`: the latents and
reconstructions are the class's own, a report holds any mix of families, and the probe says what compares.

    python -m pytest tests/test_eval_families.py -q      # tiny random instances (tests/families.py), 32-px images

The class's own encode/decode is written out here by hand (diffusers' API: `latent_dist`, `.latent`,
`.latents`, `.sample`, the 5-D (B, C, T=1, H, W) input of Qwen-Image and Wan), not through latentvae, so
the comparisons check latentvae's family table against diffusers itself. Everything runs in fp32.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from families import FAMILY_NAMES, images, save_folder, tiny_vae
from latentvae import cli
from latentvae.vae.families import BY_CLASS, family

FIVE_D = ("AutoencoderKLQwenImage", "AutoencoderKLWan")


@torch.no_grad()
def own_encode_decode(vae, x: torch.Tensor):
    """(mean, logvar or None, reconstruction) from the class's own encode/decode, 4-D in and out."""
    cls = type(vae).__name__
    five = cls in FIVE_D
    enc = vae.encode(x[:, :, None] if five else x)
    if cls == "AutoencoderDC":
        mean, logvar = enc.latent, None
    elif cls == "AutoencoderTiny":
        mean, logvar = enc.latents, None
    else:
        mean, logvar = enc.latent_dist.mode(), enc.latent_dist.logvar  # mode() is the mean
    out = vae.decode(mean).sample
    if five:
        mean, out = mean[:, :, 0], out[:, :, 0]
        logvar = None if logvar is None else logvar[:, :, 0]
    return mean, logvar, out


def as_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] -> uint8 as a PNG holds it (round half to even, as torch.round)"""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def hand_psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255.0 ** 2 / mse)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Every family saved as a diffusers folder (vae-NAME), and 4 smooth 32-px PNGs (imgs/)."""
    root = tmp_path_factory.mktemp("families")
    for name in FAMILY_NAMES:
        save_folder(tiny_vae(name), root / f"vae-{name}")
    (root / "imgs").mkdir()
    for i, x in enumerate(images(4, 32, seed=3)):
        Image.fromarray(as_uint8(x).transpose(1, 2, 0)).save(root / "imgs" / f"img{i}.png")
    return root


def png_tensors(folder: Path) -> list[torch.Tensor]:
    """The PNGs as (1, 3, H, W) in [-1, 1], by hand."""
    return [torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
            .float().div(127.5).sub(1.0)[None] for p in sorted(folder.glob("*.png"))]


# ----------------------------------------------------------------------------- the latents are the class's own
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_moments_decode_and_the_scored_reconstruction_are_the_class_own(name, root):
    from latentvae.evaluate import reconstruct
    from latentvae.vae.loading import load_vae

    lv = load_vae(str(root / f"vae-{name}"))
    vae = tiny_vae(name)  # the same weights, never through latentvae
    x = images(2, 32, seed=5)
    mean, logvar, own = own_encode_decode(vae, x)
    with torch.no_grad():
        got_mean, got_logvar = lv.moments(x)
        got = lv.decode(got_mean)
    assert got_mean.dim() == 4 and got_mean.dtype == torch.float32
    assert torch.equal(got_mean, mean) and torch.equal(got, own)
    assert (got_logvar is None) == (not family(name).stochastic)
    if got_logvar is not None:
        assert torch.equal(got_logvar, logvar)
    rec = reconstruct(lv, x[:1], (32, 32))  # what `latentvae evaluate` scores (fp32: no autocast)
    mean_one, _, own_one = own_encode_decode(vae, x[:1])  # batch 1, as evaluate runs
    assert torch.equal(rec.x_hat, own_one) and torch.equal(rec.mean, mean_one)


# ----------------------------------------------------------------------------- one report, every family
def test_one_report_holds_every_family_side_by_side(root, tmp_path, capsys):
    out = tmp_path / "report"
    vaes = [str(root / f"vae-{name}") for name in FAMILY_NAMES]
    cli.main(["evaluate", *[a for v in vaes for a in ("--vae", v)], "--data", str(root / "imgs"), "--out", str(out),
              "--lpips", "none", "--mixed-precision", "no", "--device", "cpu"])
    assert "| vae-flux2 | flux2 | AutoencoderKLFlux2 |" in capsys.readouterr().out  # the VAEs table on stdout too
    summary = json.loads((out / "summary.json").read_text())
    s = summary["vaes"]
    assert list(s) == [f"vae-{name}" for name in FAMILY_NAMES]
    for name in FAMILY_NAMES:
        assert s[f"vae-{name}"]["family"] == name and s[f"vae-{name}"]["class"] == family(name).class_name
        assert (s[f"vae-{name}"]["kl_per_element"] is None) == (not family(name).stochastic)
    assert s["vae-flux2"]["latent_layout"] == "4 x H/2 x W/2 (patchified 2x2: 16 x H/4 x W/4)"
    assert s["vae-flux2"]["diffusion_latent_shape"] == "16 x H/4 x W/4" and s["vae-flux2"]["latent_patch"] == 2
    assert s["vae-qwenimage"]["latent_layout"] == "4 x H/2 x W/2, 5-D (T=1)" and s["vae-wan"]["five_d"]
    assert s["vae-hunyuanimage"]["latent_shape"] == "8 x H/4 x W/4"
    assert summary["settings"]["fit_multiple"] == 4  # lcm of the factors 2 and 4: every VAE sees the same pixels
    md = (out / "report.md").read_text()
    for name in FAMILY_NAMES:
        assert f"| vae-{name} | {name} | {family(name).class_name} | {s[f'vae-{name}']['latent_layout']} |" in md
    assert "to a multiple of 4" in md and "pipeline patchify" in md
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert len(rows) == 4 * len(FAMILY_NAMES)
    # PSNR by hand from the class's own encode/decode: a patchifying family and the two 5-D ones
    xs = png_tensors(root / "imgs")
    for name in ("flux2", "qwenimage", "wan"):
        vae = tiny_vae(name)
        psnrs = [hand_psnr(as_uint8(x[0]), as_uint8(own_encode_decode(vae, x)[2][0])) for x in xs]
        assert s[f"vae-{name}"]["psnr"] == pytest.approx(float(np.mean(psnrs)), rel=1e-9, abs=1e-9), name
        per_image = [float(r["psnr"]) for r in rows if r["vae"] == f"vae-{name}"]
        assert per_image == pytest.approx(psnrs, rel=1e-9, abs=1e-9)


def test_images_are_fitted_to_every_vae_factor_at_once(root, tmp_path):
    """A 34x30 image: the /2 and /4 VAEs are both scored on its central 32x28 (a multiple of 4), not each on
    its own crop."""
    data = tmp_path / "odd"
    data.mkdir()
    Image.open(root / "imgs" / "img0.png").resize((34, 30)).save(data / "odd.png")
    out = tmp_path / "report"
    cli.main(["evaluate", "--vae", str(root / "vae-kl"), "--vae", str(root / "vae-hunyuanimage"), "--data", str(data),
              "--out", str(out), "--lpips", "none"])
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert {(r["eval_width"], r["eval_height"]) for r in rows} == {("32", "28")}
    assert [r["latent_shape"] for r in rows] == ["4x14x16", "8x7x8"]


# ----------------------------------------------------------------------------- the demos
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_prior_and_interpolate_run_for_every_family(name, root, tmp_path):
    vae = str(root / f"vae-{name}")
    a, b = sorted((root / "imgs").glob("*.png"))[:2]
    cli.main(["demo", "interpolate", "--vae", vae, "--a", str(a), "--b", str(b), "--out", str(tmp_path / "i"),
              "--steps", "3", "--resolution", "32"])
    strips = Image.open(tmp_path / "i" / "strips.png")
    assert strips.size[1] >= 3 * 32 and (tmp_path / "i" / "slerp.gif").is_file()
    cli.main(["demo", "prior", "--vae", vae, "--data", str(root / "imgs"), "--out", str(tmp_path / "p"),
              "--limit", "2", "--resolution", "32"])
    n = json.loads((tmp_path / "p" / "prior.json").read_text())[f"vae-{name}"]
    lv_channels, factor = (8, 4) if name == "hunyuanimage" else (4, 2)
    assert n["family"] == name and n["drawn"].startswith(f"N(0, I) of shape {lv_channels}x{32 // factor}x{32 // factor}")
    assert n["aggregate"] == ("sampled" if family(name).stochastic else "mean")
    assert n["mahalanobis_ratio_real"] == pytest.approx(1.0, abs=0.05)  # the fit of the real latents, to themselves


def test_interpolation_ends_are_the_class_own_reconstructions(root):
    from latentvae import demos
    from latentvae.vae.loading import load_vae

    for name in ("flux2", "qwenimage"):
        xs = images(2, 32, seed=7)
        frames = demos.interpolation_frames(load_vae(str(root / f"vae-{name}")), xs[0], xs[1], [0.0, 1.0], "slerp")
        _, _, own = own_encode_decode(tiny_vae(name), xs)
        torch.testing.assert_close(frames, own.clamp(-1, 1), atol=1e-5, rtol=0)


def test_recon_grid_takes_every_family_at_once(root, tmp_path):
    args = [a for name in FAMILY_NAMES for a in ("--vae", str(root / f"vae-{name}"))]
    cli.main(["demo", "recon-grid", *args, "--data", str(root / "imgs"), "--out", str(tmp_path / "g.png"),
              "--limit", "2", "--resolution", "32"])
    w, h = Image.open(tmp_path / "g.png").size
    assert w >= (1 + 2 * len(FAMILY_NAMES)) * 32 and h >= 2 * 32


def test_a_family_that_cannot_run_a_job_is_refused_in_one_line(root, tmp_path, monkeypatch, capsys):
    """The family table decides: with `demo`, `evaluate` and `probe` taken out of kl's jobs, each command says so
    in one line (exit 2) and writes nothing."""
    kl = BY_CLASS["AutoencoderKL"]
    jobs = tuple(j for j in kl.jobs if j not in ("demo", "evaluate", "probe"))
    monkeypatch.setitem(BY_CLASS, "AutoencoderKL", dataclasses.replace(kl, jobs=jobs))
    vae, data = str(root / "vae-kl"), str(root / "imgs")
    for argv, words in [(["evaluate", "--vae", vae, "--data", data, "--out", str(tmp_path / "r"), "--lpips", "none"],
                         "cannot be evaluated"),
                        (["demo", "prior", "--vae", vae, "--data", data, "--out", str(tmp_path / "p"),
                          "--resolution", "32"], "cannot run the demos"),
                        (["demo", "recon-grid", "--vae", str(root / "vae-flux2"), "--vae", vae, "--data", data,
                          "--out", str(tmp_path / "g.png"), "--resolution", "32"], "cannot run the demos")]:
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1, err
        assert "AutoencoderKL (kl family)" in err and words in err and vae in err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the probe across shapes
@pytest.fixture(scope="module")
def caches(root, tmp_path_factory) -> dict[str, Path]:
    """A kl and a flux2 cache of the same 16-px crops (`latentvae encode`): 4x8x8 latents both, which FLUX.2's
    pipeline patchifies to 16x4x4."""
    out = {}
    for name in ("kl", "flux2"):
        out[name] = tmp_path_factory.mktemp("caches") / f"cache-{name}"
        cli.main(["encode", "--vae", str(root / f"vae-{name}"), "--data", str(root / "imgs"), "--out", str(out[name]),
                  "--resolution", "16", "--preprocess", "crops", "--crops", "4", "--store", "moments",
                  "--num-workers", "0", "--mixed-precision", "no", "--no-progress"])
    return out


def test_the_probe_learns_each_family_layout_and_says_what_compares(caches, tmp_path):
    from latentvae.options import ProbeOptions
    from latentvae.probe import run_probe

    said = []
    opts = ProbeOptions(cache=(str(caches["kl"]), str(caches["flux2"])), out=str(tmp_path / "probe"), preset="test",
                        steps=4, batch_size=4, warmup_steps=1, log_every=2, save_every=0, samples=2, sample_steps=2,
                        report_to="none")
    s = run_probe(opts, log=said.append)
    kl, flux2 = s["caches"]["cache-kl"], s["caches"]["cache-flux2"]
    assert (kl["family"], kl["latent_shape"], kl["tokens_per_image"]) == ("kl", [4, 8, 8], 64)
    assert (flux2["family"], flux2["latent_shape"], flux2["tokens_per_image"]) == ("flux2", [16, 4, 4], 16)
    assert flux2["vae_latent_shape"] == [4, 8, 8] and flux2["pixels_per_token"] == 16 and kl["pixels_per_token"] == 4
    warnings = [line for line in said if line.startswith("note: the caches' latents differ in shape")]
    assert len(warnings) == 1 and "16x4x4 (4x8x8 patchified 2x2)" in warnings[0]
    c = s["comparison"]
    assert not c["one_shape"] and c["groups"] == [["cache-kl"], ["cache-flux2"]]
    assert "heldout_loss_mean" in c["within_shape_only"] and "scale_equivariance_psnr" in c["across_shapes"]
    d = s["differences"]["cache-flux2 - cache-kl"]
    assert d["comparable"] is False and d["resolved"] is None
    md = (tmp_path / "probe" / "report.md").read_text()
    assert "not comparable: other latent shape" in md and "compare only between caches of one latent shape" in md
    assert "| cache-flux2 | flux2 | 16x4x4 (4x8x8, patchified 2x2) | 16 |" in md
    assert flux2["latent_statistics"]["scale_equivariance_psnr"] > 0
    assert len(flux2["latent_statistics"]["kl_per_channel"]) == 4  # per channel of the VAE latent


def test_the_probe_data_is_the_patchified_cache_and_maps_back_exactly(caches):
    """What the probe trains on for flux2 is conventions.patchify of the stored latents, normalized per patchified
    channel by the manifest's statistics; vae_latent maps it back to what the VAE decodes."""
    from latentvae.cache import LatentDataset
    from latentvae.options import ProbeOptions
    from latentvae.probe import read_cache
    from latentvae.vae.conventions import patchify

    data, lv = read_cache(str(caches["flux2"]), ProbeOptions(cache=(str(caches["flux2"]),), out="unused"), "f")
    assert lv.family.name == "flux2" and data.shape == (16, 4, 4) and data.patch == 2
    stats = json.loads((caches["flux2"] / "manifest.json").read_text())["latent_statistics"]
    assert data.channel_mean.tolist() == pytest.approx(stats["channel_mean"])
    ds = LatentDataset(str(caches["flux2"]), None)  # the raw VAE latents, unpatchified
    raw = {ds[i]["source_key"]: ds[i]["latents"] for i in range(len(ds))}
    stored = torch.stack([raw[k] for k in data.val_keys])
    back = data.vae_latent(data.val)
    assert back.shape == stored.shape and back.shape[1:] == (4, 8, 8)
    torch.testing.assert_close(back, stored, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(data.val, patchify(stored), atol=1e-2)  # normalized: not the raw values
    mean = torch.tensor(stats["channel_mean"]).view(1, -1, 1, 1)
    std = torch.tensor(stats["channel_std"]).view(1, -1, 1, 1)
    torch.testing.assert_close(data.val, (patchify(stored) - mean) / std, atol=1e-5, rtol=1e-5)
