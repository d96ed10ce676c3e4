"""The latent cache for every VAE family: `latentvae encode` of a tiny random instance of each diffusers class,
read back by LatentDataset / LatentLoader in that family's units, decoded by `latentvae decode` to the PSNR
`latentvae evaluate` reports, and a manifest that records family, layout and formula.

The expected latents are written out here as the diffusers pipelines compute them, from the class's own
`encode` (5-D for Qwen-Image and Wan), never through latentvae's family table or conventions.py.

    python -m pytest tests/test_cache_families.py -q
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from families import FAMILY_NAMES, images, save_folder, tiny_vae
from latentvae import LatentDataset, LatentLoader, cli
from latentvae.cache import verify_cache
from latentvae.cache.normalize import noise_seed
from latentvae.images import to_uint8

SEED = 3  # LatentDataset's: the posterior noise of sampling families
# (channels, factor, patch, five_d) and the formula of each tiny instance (families.py's table, written out)
LAYOUTS = {"kl": (4, 2, 1, False), "flux2": (4, 2, 2, False), "qwenimage": (4, 2, 1, True), "wan": (4, 2, 1, True),
           "dc": (4, 2, 1, False), "hunyuanimage": (8, 4, 1, False), "tiny": (4, 2, 1, False)}
FORMULAS = {"kl": "sd", "flux2": "flux2", "qwenimage": "qwenimage", "wan": "qwenimage", "dc": "sd",
            "hunyuanimage": "sd", "tiny": "sd"}
CONVENTIONS = {"kl": {"sd", "sdxl", "sd3"}, "flux2": {"flux2"}, "qwenimage": {"qwenimage"}, "wan": {"qwenimage"},
               "dc": {"sd"}, "hunyuanimage": {"sd"}, "tiny": {"sd", "sdxl", "sd3"}}
SAMPLES = {"kl", "qwenimage", "hunyuanimage"}  # their training scripts / pipelines take latent_dist.sample()
DETERMINISTIC = {"dc", "tiny"}  # no posterior: the latent itself


@dataclass
class Made:
    name: str
    vae: torch.nn.Module
    folder: Path
    images: Path
    cache: Path
    pixels: dict  # file name -> (3, 32, 32) in [-1, 1], as decoded from the PNG


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def made(request, tmp_path_factory) -> Made:
    """A tiny VAE of the family saved as a folder, 4 smooth 32-px PNGs, and their cache (`latentvae encode`)."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    vae = tiny_vae(name, seed=1)
    folder = save_folder(vae, root / "vae")
    (root / "imgs").mkdir()
    pixels = {}
    for i, x in enumerate(images(4, 32, seed=2)):
        a = to_uint8(x).permute(1, 2, 0).numpy()
        Image.fromarray(a).save(root / "imgs" / f"img{i}.png")
        pixels[f"img{i}.png"] = torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1
    store = "mean" if name in DETERMINISTIC else "moments"
    cli.main(["encode", "--vae", str(folder), "--data", str(root / "imgs"), "--out", str(root / "cache"),
              "--resolution", "32", "--store", store, "--dtype", "fp32", "--batch-size", "1", "--num-workers", "0",
              "--mixed-precision", "no", "--no-progress"])  # fp32 pinned: compared at fp32 tolerances
    return Made(name, vae, folder, root / "imgs", root / "cache", pixels)


@torch.no_grad()
def class_moments(name: str, vae, x: torch.Tensor):
    """(mean, logvar or None) from the class's own encode: Qwen-Image and Wan take (B, C, T=1, H, W)."""
    cls = type(vae)
    if name == "dc":
        return cls.encode(vae, x).latent, None
    if name == "tiny":
        return cls.encode(vae, x).latents, None
    if name in ("qwenimage", "wan"):
        dist = cls.encode(vae, x[:, :, None]).latent_dist
        return dist.mean[:, :, 0], dist.logvar[:, :, 0]
    dist = cls.encode(vae, x).latent_dist
    return dist.mean, dist.logvar


def pipeline_formula(name: str, vae, z: torch.Tensor) -> torch.Tensor:
    """VAE latents -> the diffusion latents, as each family's pipeline writes it (conventions.py cites the lines)."""
    c = vae.config
    if name == "flux2":  # pipeline_flux2.py: _patchify_latents, then (z - bn mean) / sqrt(bn var + eps)
        b, ch, h, w = z.shape
        z = z.view(b, ch, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, ch * 4, h // 2, w // 2)
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + c.batch_norm_eps)
        return (z - mean) / std
    if name in ("qwenimage", "wan"):  # pipeline_qwenimage_img2img.py, pipeline_wan_i2v.py
        mean = torch.tensor(c.latents_mean).view(1, -1, 1, 1)
        return (z - mean) * (1.0 / torch.tensor(c.latents_std).view(1, -1, 1, 1))
    return z * c.scaling_factor  # SD's img2img, SANA, HunyuanImage; TAESD's config says 1.0


def expected(made: Made, ds: LatentDataset, row: int) -> torch.Tensor:
    """What cache row `row` must read as: the consumer's latent of its image through the pipeline's formula;
    a sampling family's draw with the noise LatentDataset documents (seeded by (seed, epoch, row))."""
    x = made.pixels[Path(ds.data[row]["source_id"]).name][None]
    mean, logvar = class_moments(made.name, made.vae, x)
    z = mean
    if made.name in SAMPLES:  # DiagonalGaussianDistribution.sample: mean + std * eps
        g = torch.Generator().manual_seed(noise_seed(SEED, ds.epoch, row))
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape[1:], generator=g)
    return pipeline_formula(made.name, made.vae, z)[0]


def test_the_cache_reads_back_in_the_familys_units(made):
    ds = LatentDataset(made.cache, seed=SEED, cache_dir=str(made.cache.parent / "hf"))
    assert (ds.convention, ds.factors) == (FORMULAS[made.name], "vae")  # the VAE's own formula and factors
    c, f, p, _ = LAYOUTS[made.name]
    shape = (c * p * p, 32 // (f * p), 32 // (f * p))  # flux2: 2x2-patchified, 16 x 8 x 8
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for row in range(len(ds)):
            got = ds[row]["latents"]
            assert tuple(got.shape) == shape and tuple(ds.output_shape(ds[row]["latent_shape"])) == shape
            torch.testing.assert_close(got, expected(made, ds, row), rtol=1e-5, atol=1e-5)
    # LatentLoader's batches are the same rows
    row_of = {s: r for r, s in enumerate(ds.data["source_index"])}
    loader = LatentLoader(ds, batch_size=3, seed=0)
    loader.set_epoch(1)
    seen = 0
    for batch in loader:
        assert batch["latents"].shape[1:] == shape
        for k, s in enumerate(batch["source_index"]):
            torch.testing.assert_close(batch["latents"][k], expected(made, ds, row_of[s]), rtol=1e-5, atol=1e-5)
            seen += 1
    assert seen == 4
    if made.name == "flux2":  # through a DataLoader worker, in float16: the float32 result rounded once
        from latentvae import BucketBatchSampler, collate

        half = LatentDataset(made.cache, seed=SEED, dtype=torch.float16, cache_dir=str(made.cache.parent / "hf"))
        sampler = BucketBatchSampler(half, 3, seed=0)
        worker = torch.utils.data.DataLoader(half, batch_sampler=sampler, collate_fn=collate, num_workers=1)
        for batch, rows in zip(worker, sampler):
            assert batch["latents"].dtype == torch.float16
            assert torch.equal(batch["latents"], torch.stack([ds[r]["latents"] for r in rows]).half())
    # the raw latents are what the class's encode gives (its mean), unpatchified, unscaled
    raw = LatentDataset(made.cache, convention=None, cache_dir=str(made.cache.parent / "hf"))
    x = made.pixels[Path(raw.data[0]["source_id"]).name][None]
    mean = class_moments(made.name, made.vae, x)[0][0]
    if made.name not in SAMPLES:
        torch.testing.assert_close(raw[0]["latents"], mean, rtol=1e-5, atol=1e-5)


def test_decoding_rows_gives_the_psnr_evaluate_reports(made, tmp_path, capsys):
    """`latentvae decode` of the cache and `latentvae evaluate` of the same VAE on the same images (32 px: the
    same preprocessing) report the same PSNR: both decode the posterior mean (or the latent) in fp32."""
    report_dir = tmp_path / "report"
    cli.main(["evaluate", "--vae", str(made.folder), "--data", str(made.images), "--out", str(report_dir),
              "--lpips", "none", "--mixed-precision", "no"])
    summary = json.loads((report_dir / "summary.json").read_text())
    (label,) = summary["vaes"]
    evaluated = {Path(r["image"]).name: float(r["psnr"]) for r in csv.DictReader(open(report_dir / "per_image.csv"))}
    assert len(evaluated) == 4
    capsys.readouterr()
    cli.main(["decode", str(made.cache), "--limit", "4"])
    printed = capsys.readouterr().out
    decoded = float(re.search(r"mean PSNR (\S+) dB", printed).group(1))
    assert decoded == pytest.approx(summary["vaes"][label]["psnr"], abs=0.006)  # the table's 2 decimals
    report = verify_cache(made.cache, limit=4)  # what the command printed, at full precision
    assert sorted(Path(s["source_id"]).name for s in report["samples"]) == sorted(evaluated)
    for s in report["samples"]:
        assert s["psnr"] == pytest.approx(evaluated[Path(s["source_id"]).name], abs=1e-3)


def test_the_manifest_records_family_layout_and_formula(made):
    from latentvae.vae.families import family

    m = json.loads((made.cache / "manifest.json").read_text())
    v, fam, vae = m["vae"], family(made.name), made.vae
    assert (v["family"], v["class"], v["consumer"]) == (made.name, type(vae).__name__, fam.consumer)
    assert v["stochastic"] is (made.name not in DETERMINISTIC)
    c, f, p, five_d = LAYOUTS[made.name]
    assert {k: v["layout"][k] for k in ("channels", "factor", "patch", "five_d")} == \
        {"channels": c, "factor": f, "patch": p, "five_d": five_d}
    assert v["formula"]["convention"] == FORMULAS[made.name]
    assert set(v["formula"]["conventions"]) == CONVENTIONS[made.name]
    entries = v["formula"]["entries"]
    if made.name == "flux2":  # the BatchNorm buffers its encode/decode never apply
        np.testing.assert_allclose(entries["bn_running_mean"], vae.bn.running_mean.tolist(), rtol=1e-6)
        np.testing.assert_allclose(entries["bn_running_var"], vae.bn.running_var.tolist(), rtol=1e-6)
        assert entries["batch_norm_eps"] == vae.config.batch_norm_eps
    elif made.name in ("qwenimage", "wan"):
        assert entries["latents_mean"] == list(vae.config.latents_mean)
        assert entries["latents_std"] == list(vae.config.latents_std)
    else:
        assert entries["scaling_factor"] == vae.config.scaling_factor
    assert m["store"] == ("mean" if made.name in DETERMINISTIC else "moments")
    assert m["preprocessing"]["factor"] == f * p  # image sides: multiples of the factor times the patch
    # statistics measured per channel of what the pipeline normalizes (flux2: the 16 patchified channels), and
    # factors for the family's own conventions only
    stats = m["latent_statistics"]
    assert len(stats["channel_mean"]) == c * p * p
    assert set(stats["factors"]) == CONVENTIONS[made.name] - ({"sdxl"} if c != 4 else set())
    ds = LatentDataset(made.cache, factors="cache", seed=SEED, cache_dir=str(made.cache.parent / "hf"))
    x = torch.stack([ds[i]["latents"] for i in range(len(ds))]).double()
    per_channel = x.transpose(0, 1).flatten(1)
    if made.name not in SAMPLES and FORMULAS[made.name] in ("flux2", "qwenimage"):  # the measured rows themselves
        np.testing.assert_allclose(per_channel.mean(1), 0.0, atol=1e-4)
        np.testing.assert_allclose(per_channel.std(1, unbiased=False), 1.0, rtol=1e-4)
    elif made.name not in SAMPLES:  # sd: one factor, 1 / the std over every channel and position
        assert float(x.std(unbiased=False)) == pytest.approx(1.0, rel=1e-4)


def test_a_convention_the_familys_pipelines_do_not_apply_is_refused(made):
    from latentvae.errors import UserError

    other = "qwenimage" if FORMULAS[made.name] != "qwenimage" else "sd"
    with pytest.raises(UserError, match=rf"convention '{other}' is not one the pipelines of its VAE apply "
                                        rf"\({type(made.vae).__name__}, {made.name} family\)"):
        LatentDataset(made.cache, convention=other, cache_dir=str(made.cache.parent / "hf"))


def test_a_family_that_cannot_decode_says_so_in_one_line(made, monkeypatch, capsys):
    """The family table says which jobs a family does: a cache of one that cannot decode is refused before
    its VAE is loaded (exit status 2, one line naming the class, the family and the job)."""
    from latentvae.vae import families

    fam = families.FAMILIES[made.name]
    monkeypatch.setitem(families.FAMILIES, made.name, replace(
        fam, jobs=tuple(j for j in fam.jobs if j != "decode"), refusals={**fam.refusals, "decode": "no decoder"}))
    with pytest.raises(SystemExit) as e:
        cli.main(["decode", str(made.cache), "--limit", "1"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert f"{fam.class_name} ({made.name} family) cannot decode latents: no decoder" in err


@pytest.mark.parametrize("name,store,says", [
    ("flux2", "sample", "pipelines take the posterior mode, not a sample"),
    ("dc", "moments", "needs a log-variance"),
])
def test_what_a_family_cannot_store_is_refused(name, store, says, tmp_path, capsys):
    folder = save_folder(tiny_vae(name), tmp_path / "vae")
    (tmp_path / "imgs").mkdir()
    Image.fromarray(to_uint8(images(1, 32)[0]).permute(1, 2, 0).numpy()).save(tmp_path / "imgs" / "a.png")
    with pytest.raises(SystemExit) as e:
        cli.main(["encode", "--vae", str(folder), "--data", str(tmp_path / "imgs"), "--out", str(tmp_path / "c"),
                  "--resolution", "32", "--store", store, "--no-progress"])
    assert e.value.code == 2 and says in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_a_flux2_resolution_must_be_a_multiple_of_the_factor_times_the_patch(tmp_path, capsys):
    folder = save_folder(tiny_vae("flux2"), tmp_path / "vae")
    (tmp_path / "imgs").mkdir()
    Image.fromarray(to_uint8(images(1, 32)[0]).permute(1, 2, 0).numpy()).save(tmp_path / "imgs" / "a.png")
    with pytest.raises(SystemExit) as e:
        cli.main(["encode", "--vae", str(folder), "--data", str(tmp_path / "imgs"), "--out", str(tmp_path / "c"),
                  "--resolution", "30", "--no-progress"])  # a multiple of the factor 2, not of 2 x 2
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--resolution 30 is not a multiple of 4 (the downsampling factor 2 times the 2x2 " \
                                 "patch" in err and "use 28 or 32" in err
