"""Export: reload and compare, measured latent factors, safe writes, fp16 check; any VAE as SRC, the LDM
single file read back by diffusers' own from_single_file, and only the exported weights' evaluation figures."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from latentvae.vae import convert
from latentvae import runs as ckpt
from helpers_ckpt import make_run, tiny_config, to_ldm_state_dict
from latentvae.export import job
from latentvae.export.calibrate import CalibrationConfig, calibrate, fp16_check, health
from latentvae.vae.moments import batch_moments, factors, merge_moments
from latentvae.cli import main as cli_main
from latentvae.export import export
from latentvae.options import ExportOptions
from latentvae.errors import BadInputError
from latentvae.vae.loaded import make_record
from latentvae.vae.loading import load_autoencoder, load_from_checkpoint
from latentvae.vae.model import build_vae, decode, encode_moments

FAST = dict(limit=3, resolution=32, fp16_images=1)  # calibration sized for a test


def quiet(*_):
    pass


@pytest.fixture
def run(tmp_path):
    return make_run(tmp_path / "run")


def meta_channel_std(out):
    return json.loads((out / "latentvae_export.json").read_text())["latent_statistics"]["channel_std"]


def test_export_reloads_in_diffusers_and_matches_training_model(run, tmp_path, image_folder):
    out = tmp_path / "vae"
    result = export(ExportOptions(src=str(run), out=str(out), calibrate=str(image_folder), **FAST), log=quiet)
    loaded, info = AutoencoderKL.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    trained = load_from_checkpoint(run, "ema").module
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        m_t, lv_t = encode_moments(trained, x)
        m_l, lv_l = encode_moments(loaded, x)
        assert (m_t - m_l).abs().max() < 1e-5 and (lv_t - lv_l).abs().max() < 1e-5
        assert (decode(trained, m_t) - decode(loaded, m_t)).abs().max() < 1e-5
    assert max(result.max_diff.values()) < 1e-5
    assert loaded.config.scaling_factor == pytest.approx(result.stats.entries["scaling_factor"])
    # the sd convention (4 channels) writes no latents_mean/std: SDXL-family consumers would apply them
    assert result.stats.convention == "sd" and loaded.config.latents_std is None
    assert meta_channel_std(out) == pytest.approx(list(result.stats.channel_std))
    meta = json.loads((out / "latentvae_export.json").read_text())
    assert meta["scaling_measured"] and meta["step"] == 4 and meta["training_config"]["model"]["preset"] == "test"
    card = (out / "README.md").read_text()
    assert "Measured on 3 images" in card and "## Training config" in card and "NOT measured" not in card


def test_ema_and_raw_export_their_own_weights(run, tmp_path):
    ckpt_dir = run / "checkpoints" / "checkpoint-00000004"
    exported = {}
    for weights, file in [("ema", "ema.safetensors"), ("raw", "model.safetensors")]:
        export(ExportOptions(src=str(run), out=str(tmp_path / weights), weights=weights), log=quiet)
        exported[weights] = load_file(tmp_path / weights / "diffusion_pytorch_model.safetensors")
        source = load_file(ckpt_dir / file)
        assert all(torch.equal(exported[weights][k], source[k]) for k in source)
    assert any(not torch.equal(exported["ema"][k], exported["raw"][k]) for k in exported["ema"])


def test_without_calibration_the_factors_are_marked_unmeasured(run, tmp_path, capsys):
    cli_main(["export", str(run), "--out", str(tmp_path / "vae")])
    printed = capsys.readouterr().out
    assert "NOT measured" in printed
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["scaling_factor"] == 1.0 and config["shift_factor"] is None and config["force_upcast"] is True
    assert json.loads((tmp_path / "vae" / "latentvae_export.json").read_text())["scaling_measured"] is False
    assert "NOT measured" in (tmp_path / "vae" / "README.md").read_text()


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_exports_store_that_dtype(run, tmp_path, dtype, torch_dtype):
    export(ExportOptions(src=str(run), out=str(tmp_path / "vae"), dtype=dtype), log=quiet)
    tensors = load_file(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch_dtype}
    AutoencoderKL.from_pretrained(tmp_path / "vae", torch_dtype=torch_dtype)


def test_model_card_holds_the_evaluation_summary(run, tmp_path):
    (run / "eval").mkdir()
    (run / "eval" / "summary.json").write_text(json.dumps({"psnr": 27.5, "lpips": {"vgg": 0.125}}))
    export(ExportOptions(src=str(run), out=str(tmp_path / "vae")), log=quiet)
    card = (tmp_path / "vae" / "README.md").read_text()
    assert "| psnr | 27.5 |" in card and "| lpips.vgg | 0.125 |" in card


# ----------------------------------------------------------------------------- latent statistics
def known_moments(means, stds, n=1000):
    """Posterior N(mean_c, std_c^2) at every position: the moments of its samples are known exactly."""
    c = len(means)
    mu = torch.tensor(means, dtype=torch.float64).view(1, c, 1, 1).expand(n, c, 2, 2)
    logvar = (torch.tensor(stds, dtype=torch.float64) ** 2).log().view(1, c, 1, 1).expand(n, c, 2, 2)
    return batch_moments(mu, logvar)


def expected(means, stds):
    m, s = torch.tensor(means, dtype=torch.float64), torch.tensor(stds, dtype=torch.float64)
    g_mean = m.mean()
    g_std = ((s ** 2 + m ** 2).mean() - g_mean ** 2).sqrt()
    return float(g_mean), float(g_std)


@pytest.mark.parametrize("means,stds", [([0.0, 0.0, 0.0, 0.0], [5.49, 5.49, 5.49, 5.49]),
                                        ([1.0, -2.0, 0.5, 0.0], [0.5, 2.0, 1.0, 3.0])])
def test_factors_of_known_latents(means, stds):
    m = known_moments(means, stds)
    g_mean, g_std = expected(means, stds)
    sd, sd3 = factors(m, "sd"), factors(m, "sd3")
    assert sd["scaling_factor"] == pytest.approx(1 / g_std) and sd["shift_factor"] is None
    assert sd3["scaling_factor"] == pytest.approx(1 / g_std) and sd3["shift_factor"] == pytest.approx(g_mean)
    assert sd["channel_mean"] == pytest.approx(means) and sd["channel_std"] == pytest.approx(stds)
    # the SD convention's published example: latents of std 5.49 -> 0.18215
    if stds[0] == 5.49:
        assert sd["scaling_factor"] == pytest.approx(0.18215, abs=1e-4)


def test_factors_of_sampled_latents_and_batch_merging():
    g = torch.Generator().manual_seed(0)
    means, stds = torch.tensor([0.3, -1.0, 2.0]), torch.tensor([1.5, 0.2, 4.0])
    z = means.view(1, 3, 1, 1) + stds.view(1, 3, 1, 1) * torch.randn(64, 3, 16, 16, generator=g)
    merged = None
    for part in z.split(16):  # batch by batch, as calibrate() accumulates
        merged = merge_moments(merged, batch_moments(part, None))
    f = factors(merged, "sd3")
    assert f["shift_factor"] == pytest.approx(float(z.mean()), abs=1e-5)
    assert f["scaling_factor"] == pytest.approx(1 / float(z.flatten().std()), rel=1e-4)
    assert f["channel_std"] == pytest.approx(stds.tolist(), rel=0.02)
    assert health(merged).kl_per_element is None  # no logvar: KL is not defined


def test_unknown_convention_names_the_choices():
    with pytest.raises(ValueError, match="valid choices: sd, sdxl, sd3"):
        factors(known_moments([0.0], [1.0]), "flux")


def test_health_flags_channels_whose_posterior_is_the_prior():
    h = health(known_moments([0.0, 2.0], [1.0, 0.5]))
    assert h.dead_channels == (0,)
    assert h.channel_kl[0] == pytest.approx(0.0, abs=1e-12)
    assert h.channel_kl[1] == pytest.approx(0.5 * (4 + 0.25 - 1 - torch.tensor(0.25).log().item()))


def constant_posterior_vae(means, logvars, **model):
    """A tiny VAE whose posterior is N(means, exp(logvars)) for every image (quant_conv = bias only), as loaded."""
    vae = build_vae(tiny_config(latent_channels=len(means), **model).model).eval()
    with torch.no_grad():
        vae.quant_conv.weight.zero_()
        vae.quant_conv.bias.copy_(torch.tensor(list(means) + list(logvars)))
    return make_record(vae, {"kind": "folder"})


def as_loaded(vae):
    return make_record(vae, {"kind": "folder"})


def test_calibration_end_to_end_measures_a_known_posterior(image_folder):
    means, stds = [0.5, -1.0, 0.0, 2.0], [2.0, 0.5, 1.0, 1.5]
    vae = constant_posterior_vae(means, [2 * torch.tensor(s).log().item() for s in stds])
    stats = calibrate(vae, CalibrationConfig(str(image_folder), count=5, resolution=32))
    g_mean, g_std = expected(means, stds)
    assert stats.convention == "sd" and stats.images == 5
    assert stats.entries["scaling_factor"] == pytest.approx(1 / g_std, rel=1e-5)
    assert list(stats.channel_mean) == pytest.approx(means, abs=1e-5)
    assert list(stats.channel_std) == pytest.approx(stds, rel=1e-5)
    assert stats.health.dead_channels == (2,)  # N(0, 1) whatever the image: carries nothing


def test_sixteen_channel_models_default_to_the_sd3_convention(image_folder):
    means = [0.1 * i for i in range(16)]
    vae = constant_posterior_vae(means, [0.0] * 16, use_quant_conv=True)
    stats = calibrate(vae, CalibrationConfig(str(image_folder), count=2, resolution=32))
    g_mean, g_std = expected(means, [1.0] * 16)
    assert stats.convention == "sd3"
    assert stats.entries["shift_factor"] == pytest.approx(g_mean, abs=1e-6)
    assert stats.entries["scaling_factor"] == pytest.approx(1 / g_std, rel=1e-5)


# diffusers' own formulas, written out as the pipelines apply them (not through latentvae.vae.conventions)
def sd_pipeline(z, c):  # pipeline_stable_diffusion*.py
    return z * c["scaling_factor"]


def sdxl_pipeline(z, c):  # pipeline_stable_diffusion_xl_img2img.py prepare_latents
    if c.get("latents_mean") is not None and c.get("latents_std") is not None:
        mean = torch.tensor(c["latents_mean"]).view(1, 4, 1, 1)
        std = torch.tensor(c["latents_std"]).view(1, 4, 1, 1)
        return (z - mean) * c["scaling_factor"] / std
    return c["scaling_factor"] * z


def sd3_pipeline(z, c):  # pipeline_stable_diffusion_3.py / pipeline_flux.py (inverse of their decode)
    return (z - c["shift_factor"]) * c["scaling_factor"]


@pytest.mark.parametrize("convention, pipeline, zero_mean", [("sd", sd_pipeline, False), ("sdxl", sdxl_pipeline, True),
                                                             ("sd3", sd3_pipeline, True)])
def test_each_convention_gives_unit_latents_under_its_pipelines_own_formula(convention, pipeline, zero_mean,
                                                                            image_folder):
    from latentvae.vae.conventions import from_diffusion, to_diffusion
    means, stds = [0.5, -1.0, 0.0, 2.0], [2.0, 0.5, 1.0, 1.5]
    vae = constant_posterior_vae(means, [2 * torch.tensor(s).log().item() for s in stds])
    stats = calibrate(vae, CalibrationConfig(str(image_folder), count=5, resolution=32, convention=convention))
    config = stats.entries
    g = torch.Generator().manual_seed(0)
    z = torch.tensor(means).view(1, 4, 1, 1) + torch.tensor(stds).view(1, 4, 1, 1) * torch.randn(256, 4, 8, 8, generator=g)
    x = pipeline(z, config)
    assert float(x.std()) == pytest.approx(1.0, abs=0.02)
    if zero_mean:
        assert float(x.mean()) == pytest.approx(0.0, abs=0.02)
    if convention == "sdxl":  # and per channel
        assert x.transpose(0, 1).flatten(1).std(1).tolist() == pytest.approx([1.0] * 4, abs=0.03)
    # latentvae's own functions agree with the pipeline's, and invert it
    torch.testing.assert_close(to_diffusion(z, config, convention), x)
    torch.testing.assert_close(from_diffusion(x, config, convention), z, rtol=1e-5, atol=1e-5)


def test_the_sdxl_convention_needs_four_channels(image_folder):
    vae = constant_posterior_vae([0.0] * 16, [0.0] * 16, use_quant_conv=True)
    with pytest.raises(ValueError, match="sdxl needs 4 latent channels"):
        calibrate(vae, CalibrationConfig(str(image_folder), count=2, resolution=32, convention="sdxl"))


# ----------------------------------------------------------------------------- fp16
def test_fp16_check_sees_overflow_and_keeps_force_upcast():
    vae = build_vae(tiny_config().model).eval()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    fine = fp16_check(as_loaded(vae), z)
    assert fine.ran and not fine.overflow_modules and fine.output_finite and fine.force_upcast is False
    with torch.no_grad():
        vae.post_quant_conv.weight.mul_(1e6)  # activations far beyond fp16's 65504
    bad = fp16_check(as_loaded(vae), z)
    assert bad.force_upcast is True and "post_quant_conv" in bad.overflow_modules
    assert bad.peak_fp32 > 65504


def test_fp16_that_cannot_run_keeps_force_upcast(monkeypatch):
    vae = build_vae(tiny_config().model).eval()

    def refuse(*_a, **_k):
        raise RuntimeError('"slow_conv2d_cpu" not implemented for \'Half\'')
    import latentvae.export.calibrate as cal
    real = cal.activation_peaks
    monkeypatch.setattr(cal, "activation_peaks",
                        lambda v, z: refuse() if z.dtype == torch.float16 else real(v, z))
    report = fp16_check(as_loaded(vae), torch.zeros(1, 4, 8, 8))
    assert not report.ran and report.force_upcast is True and "does not run" in report.note


# ----------------------------------------------------------------------------- safe writes
def save_half_then_fail(self, folder, **kwargs):
    (Path(folder) / "config.json").write_text("{}")
    raise KeyboardInterrupt("interrupted while writing")


def fail_verify(*_a, **_k):
    raise RuntimeError("verification crashed")


@pytest.mark.parametrize("target,replacement", [("save_pretrained", save_half_then_fail), ("verify", fail_verify)])
def test_an_interrupted_export_leaves_nothing_that_looks_complete(run, tmp_path, monkeypatch, target, replacement):
    exports = tmp_path / "exports"
    if target == "save_pretrained":
        monkeypatch.setattr(AutoencoderKL, "save_pretrained", replacement)
    else:
        monkeypatch.setattr(job, "verify", replacement)
    with pytest.raises((KeyboardInterrupt, RuntimeError)):
        export(ExportOptions(src=str(run), out=str(exports / "vae")), log=quiet)
    assert not (exports / "vae").exists()
    assert list(exports.iterdir()) == []  # not even the hidden staging folder
    monkeypatch.undo()
    export(ExportOptions(src=str(run), out=str(exports / "vae")), log=quiet)
    AutoencoderKL.from_pretrained(exports / "vae")
    assert sorted(p.name for p in exports.iterdir()) == ["vae"]


def test_refuses_a_folder_not_its_own_and_replaces_an_earlier_export_only_with_overwrite(run, tmp_path, capsys):
    out = tmp_path / "vae"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for overwrite in (False, True):  # someone's other folder: never replaced (fsutil.check_output_folder)
        with pytest.raises(BadInputError, match="non-empty folder that is not an earlier export"):
            export(ExportOptions(src=str(run), out=str(out), overwrite=overwrite), log=quiet)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    export(ExportOptions(src=str(run), out=str(out)), log=quiet)  # empty: fine
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(ExportOptions(src=str(run), out=str(out)), log=quiet)
    with pytest.raises(SystemExit) as e:  # the command line: one line on stderr, exit status 2
        cli_main(["export", str(run), "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "pass --overwrite" in err and len(err.strip().splitlines()) == 1
    (out / "stale.txt").write_text("left by hand in an earlier export")
    export(ExportOptions(src=str(run), out=str(out), overwrite=True), log=quiet)
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "vae"]


@pytest.mark.parametrize("source,target", [("run", "run/export"), ("checkpoint", "run"), ("run", ".")])
def test_refuses_a_target_inside_or_holding_its_source(run, tmp_path, source, target):
    from latentvae.errors import BadInputError

    src = run if source == "run" else run / "checkpoints" / "checkpoint-00000004"
    out = tmp_path / target
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(BadInputError, match="export target .* (is|is inside|contains) its source"):
        export(ExportOptions(src=str(src), out=str(out), overwrite=True), log=quiet)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written, the run intact


def test_bad_options_name_the_valid_choices(run, tmp_path):
    with pytest.raises(ValueError, match="valid choices: fp32, fp16, bf16"):
        export(ExportOptions(src=str(run), out=str(tmp_path / "vae"), dtype="fp8"), log=quiet)
    with pytest.raises(ValueError, match="needs --calibrate"):
        export(ExportOptions(src=str(run), out=str(tmp_path / "vae"), convention="sd3"), log=quiet)
    assert not (tmp_path / "vae").exists()


def test_a_plain_autoencoder_exports_a_deterministic_posterior(tmp_path):
    """model.mode ae never trains the log-variance: after export, sample() (img2img, diffusers' training
    scripts) must equal mode(), not add noise larger than the signal."""
    run = make_run(tmp_path / "ae", mode="ae")
    with torch.no_grad():  # the raw weights as trained: an untrained log-variance head
        raw = build_vae(tiny_config(mode="ae").model)
        raw.load_state_dict(ckpt.load_tensors(ckpt.find_checkpoint(run) / "ema.safetensors"))
        x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
        dist = raw.encode(x).latent_dist
        assert (dist.sample() - dist.mode()).abs().max() > 0.1  # the problem this fixes
    export(ExportOptions(src=str(run), out=str(tmp_path / "vae")), log=quiet)
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        torch.testing.assert_close(dist.sample(generator=torch.Generator().manual_seed(0)), dist.mode(),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(dist.mode(), raw.encode(x).latent_dist.mode())  # the mean is untouched
    assert "deterministic" in json.loads((tmp_path / "vae" / "latentvae_export.json").read_text())["posterior"]


def test_exports_tile_sensibly_and_share_their_weight_file(run, tmp_path):
    """diffusers' tiling decodes in tiles of config.sample_size pixels: diffusers' default of 32 gave
    tiles so small that a tiled decode came out ~24 dB from the untiled one (on this tiny VAE; 19 dB
    on the quickstart's); the export writes 512. And the weight file is as readable as the others."""
    import os
    export(ExportOptions(src=str(run), out=str(tmp_path / "vae")), log=quiet)
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    assert vae.config.sample_size >= 512
    z = torch.randn(1, 4, 400, 300, generator=torch.Generator().manual_seed(0))  # 800x600 px: several tiles
    with torch.no_grad():
        whole = vae.decode(z).sample.clamp(-1, 1)
        vae.enable_tiling()
        tiled = vae.decode(z).sample.clamp(-1, 1)
    psnr = float(10 * torch.log10(4 / (whole - tiled).pow(2).mean()))
    assert psnr > 40, psnr
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "vae").iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes


# ----------------------------------------------------------------------------- any VAE as SRC
TAESD_DIR = Path(__file__).resolve().parents[2] / "shared" / "weights" / "taesd"


def diffusers_folder(folder, scaling_factor=0.5, **model):
    """A tiny diffusers AutoencoderKL folder (with mid-block attention, so the 1x1-conv shapes are exercised)."""
    vae = build_vae(tiny_config(**{"mid_block_add_attention": True, **model}).model).eval()
    vae.register_to_config(scaling_factor=scaling_factor)
    vae.save_pretrained(folder)
    return vae


def ldm_file(path, **model):
    """An original-LDM-layout VAE file; 32 GroupNorm groups (not stored in the file), as every SD-family VAE."""
    from safetensors.torch import save_file
    vae = build_vae(tiny_config(block_out_channels=(64, 64), norm_num_groups=32, mid_block_add_attention=True,
                                **model).model).eval()
    save_file(to_ldm_state_dict(vae), path)
    return vae


def probe(vae, x):
    with torch.no_grad():
        mean, _ = encode_moments(vae, x)
        return mean, decode(vae, mean)


def assert_same_model(a, b, tol=1e-6):
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    (mean_a, dec_a), (mean_b, dec_b) = probe(a, x), probe(b, x)
    assert (mean_a - mean_b).abs().max() <= tol and (dec_a - dec_b).abs().max() <= tol


@pytest.mark.parametrize("kind", ["diffusers-folder", "ldm-file"])
def test_any_vae_exports_with_calibration(tmp_path, image_folder, kind):
    src = tmp_path / ("src" if kind == "diffusers-folder" else "sd-vae.safetensors")
    source = diffusers_folder(src) if kind == "diffusers-folder" else ldm_file(src)
    out = tmp_path / "vae"
    fast = FAST if kind == "diffusers-folder" else {**FAST, "fp16_images": 0}  # fp16 convs are slow on a CPU
    result = export(ExportOptions(src=str(src), out=str(out), calibrate=str(image_folder), **fast), log=quiet)
    loaded = AutoencoderKL.from_pretrained(out)
    assert_same_model(source, loaded)
    assert result.checkpoint is None and result.step is None
    assert loaded.config.scaling_factor == pytest.approx(result.stats.entries["scaling_factor"])
    meta = json.loads((out / "latentvae_export.json").read_text())
    assert meta["scaling_measured"] and meta["source"] == str(src) and meta["checkpoint"] is None
    assert meta["training_config"] is None and meta["data"] is None and meta["weights"] is None
    card = (out / "README.md").read_text()
    assert f"Exported from `{src}`" in card and "Measured on 3 images" in card
    assert "## Training config" not in card and "Data seen in training" not in card and "## Source" in card


def test_without_calibration_a_folder_keeps_its_factors_and_a_bare_ldm_file_gets_the_placeholder(tmp_path):
    diffusers_folder(tmp_path / "src", scaling_factor=0.3)
    export(ExportOptions(src=str(tmp_path / "src"), out=str(tmp_path / "a")), log=quiet)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["scaling_factor"] == 0.3 and config["force_upcast"] is True  # the source's, unchanged
    meta = json.loads((tmp_path / "a" / "latentvae_export.json").read_text())
    assert meta["scaling_measured"] is False and meta["scaling_origin"].startswith("the source's config.json")
    assert "Not measured by this export" in (tmp_path / "a" / "README.md").read_text()
    ldm_file(tmp_path / "vae.safetensors")  # LDM weights hold no factors: not passed off as the SD VAE's 0.18215
    export(ExportOptions(src=str(tmp_path / "vae.safetensors"), out=str(tmp_path / "b")), log=quiet)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["scaling_factor"] == 1.0
    assert json.loads((tmp_path / "b" / "latentvae_export.json").read_text())["scaling_origin"] == "placeholder"
    assert "NOT measured" in (tmp_path / "b" / "README.md").read_text()


@pytest.mark.skipif(not (TAESD_DIR / "taesd_encoder.safetensors").is_file(), reason="no TAESD weights in ../shared")
def test_taesd_exports_as_a_diffusers_folder_and_is_refused_as_a_single_file(tmp_path, image_folder):
    from diffusers import AutoencoderTiny
    export(ExportOptions(src="taesd:sd", out=str(tmp_path / "tiny")), log=quiet)
    loaded = AutoencoderTiny.from_pretrained(tmp_path / "tiny")
    assert_same_model(load_autoencoder("taesd:sd"), loaded)
    assert loaded.config.scaling_factor == 1.0  # TAESD's own: its latents are already normalized (docs/export.md)
    assert "AutoencoderTiny exported" in (tmp_path / "tiny" / "README.md").read_text()
    with pytest.raises(BadInputError, match=r"AutoencoderTiny \(tiny family\) cannot be written as one single "
                                            r"file.*--format diffusers"):
        export(ExportOptions(src="taesd:sd", out=str(tmp_path / "tiny.safetensors"), format="single-file"), log=quiet)
    with pytest.raises(BadInputError, match="--convention flux2: AutoencoderTiny .*valid choices for it: sd, sdxl, "
                                            "sd3"):
        export(ExportOptions(src="taesd:sd", out=str(tmp_path / "t2"), calibrate=str(image_folder),
                             convention="flux2", **FAST), log=quiet)
    assert not (tmp_path / "tiny.safetensors").exists() and not (tmp_path / "t2").exists()
    # calibrated, TAESD's factors stay its own (its latents are the SD VAE's, already normalized): measured, not written
    export(ExportOptions(src="taesd:sd", out=str(tmp_path / "t3"), calibrate=str(image_folder), **FAST), log=quiet)
    config = json.loads((tmp_path / "t3" / "config.json").read_text())
    assert config["scaling_factor"] == 1.0 and config["shift_factor"] == 0.0
    assert "Written to: nothing" in (tmp_path / "t3" / "README.md").read_text()


def test_refusals_for_a_vae_that_is_not_a_run(tmp_path, capsys):
    diffusers_folder(tmp_path / "src")
    with pytest.raises(BadInputError, match="--weights raw: .* not a latentvae training run"):
        export(ExportOptions(src=str(tmp_path / "src"), out=str(tmp_path / "vae"), weights="raw"), log=quiet)
    with pytest.raises(BadInputError, match="inside its source"):
        export(ExportOptions(src=str(tmp_path / "src"), out=str(tmp_path / "src" / "export")), log=quiet)
    with pytest.raises(BadInputError, match="contains its source"):
        export(ExportOptions(src=str(tmp_path / "src"), out=str(tmp_path), overwrite=True), log=quiet)
    with pytest.raises(ValueError, match="name it \\*.safetensors"):
        export(ExportOptions(src=str(tmp_path / "src"), out=str(tmp_path / "vae"), format="single-file"), log=quiet)
    with pytest.raises(ValueError, match="--format single-file"):
        export(ExportOptions(src=str(tmp_path / "src"), out=str(tmp_path / "vae.safetensors")), log=quiet)
    (tmp_path / "taken.safetensors").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(ExportOptions(src=str(tmp_path / "src"), out=str(tmp_path / "taken.safetensors"),
                             format="single-file"), log=quiet)
    with pytest.raises(SystemExit) as e:  # the command line: one line, exit status 2
        cli_main(["export", str(tmp_path / "src"), "--out", str(tmp_path / "vae"), "--weights", "raw"])
    assert e.value.code == 2 and "not a latentvae training run" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "taken.safetensors"]
    assert (tmp_path / "taken.safetensors").read_bytes() == b"mine"


# ----------------------------------------------------------------------------- the LDM single file
def test_the_inverse_conversion_is_diffusers_converter_read_backwards():
    """Three levels, two ResNets per level, shortcut convs and attention: diffusers' own converter maps
    the LDM tensors back onto every weight, and an independently written inverse gives the same file."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    vae = AutoencoderKL(block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2, norm_num_groups=4)
    ldm = convert.diffusers_to_ldm_vae(vae.state_dict())
    assert {"encoder.down.0.block.0.norm1.weight", "encoder.down.1.block.0.nin_shortcut.weight",
            "decoder.up.0.block.0.nin_shortcut.weight", "decoder.up.2.block.2.conv2.weight",
            "decoder.up.1.upsample.conv.weight", "encoder.mid.block_2.norm1.weight"} <= ldm.keys()
    assert ldm["decoder.mid.attn_1.proj_out.weight"].shape == (16, 16, 1, 1)
    back = convert_ldm_vae_checkpoint(dict(ldm), dict(vae.config))
    assert back.keys() == vae.state_dict().keys() and len(back) == len(ldm)
    assert all(torch.equal(back[k], v) for k, v in vae.state_dict().items())
    independent = to_ldm_state_dict(vae)
    assert independent.keys() == ldm.keys() and all(torch.equal(independent[k], ldm[k]) for k in ldm)


def folder_source(tmp):
    diffusers_folder(tmp / "src")
    return tmp / "src", True


SINGLE_FILE_SOURCES = {  # name -> make the source in tmp_path: (SRC, calibrate?)
    "run-vae": lambda tmp: (make_run(tmp / "run", mid_block_add_attention=True), True),
    "run-ae": lambda tmp: (make_run(tmp / "run", mode="ae"), False),
    "run-16-channels-no-quant-conv": lambda tmp: (make_run(tmp / "run", latent_channels=16, use_quant_conv=False,
                                                           use_post_quant_conv=False), True),
    "diffusers-folder": folder_source,
}


@pytest.mark.parametrize("name", list(SINGLE_FILE_SOURCES))
def test_single_file_round_trips_through_diffusers_from_single_file(name, tmp_path, image_folder, monkeypatch):
    src, calibrated = SINGLE_FILE_SOURCES[name](tmp_path)
    source = load_autoencoder(src)
    out = tmp_path / "exports" / "vae.safetensors"
    argv = ["export", str(src), "--out", str(out), "--format", "single-file", "--limit", "3", "--resolution", "32",
            "--fp16-images", "1"] + (["--calibrate", str(image_folder)] if calibrated else [])
    cli_main(argv)
    assert sorted(p.name for p in out.parent.iterdir()) == ["vae.safetensors"]  # one file, no leftovers
    from safetensors import safe_open
    tensors = load_file(out)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    # the original LDM layout, without a first_stage_model. prefix, attention as 1x1 convs
    assert "encoder.down.0.block.0.norm1.weight" in tensors and not any(k.startswith("first_stage_model.")
                                                                        for k in tensors)
    assert tensors.keys() == to_ldm_state_dict(source).keys()
    assert all(t.ndim == 4 for k, t in tensors.items() if k.endswith(("attn_1.q.weight", "attn_1.proj_out.weight")))
    assert ("quant_conv.weight" in tensors) == (name != "run-16-channels-no-quant-conv")
    # diffusers' own single-file loading, offline: a local folder with the diffusers config.json
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config_dir = tmp_path / "config"
    source.save_config(config_dir)
    loaded = AutoencoderKL.from_single_file(str(out), config=str(config_dir)).eval()
    assert loaded.state_dict().keys() == source.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())
    assert_same_model(source, loaded, tol=1e-6)
    # latentvae's own loader reads it back identically, with the recorded config (4 GroupNorm groups)
    again = load_autoencoder(out)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in source.state_dict().items())
    assert again.config.norm_num_groups == 4 and again.config.use_quant_conv == source.config.use_quant_conv
    # the latent statistics and provenance, as strings
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["source"] == str(src) and json.loads(meta["scaling_measured"]) is calibrated
    assert json.loads(meta["scaling_factor"]) == again.config.scaling_factor
    record = json.loads(meta[convert.EXPORT_RECORD_KEY])
    assert record["output_format"] == "single-file" and record["max_abs_diff"] == {"encode": 0.0, "decode": 0.0}
    if calibrated:
        stats = record["latent_statistics"]
        assert json.loads(meta["latent_channel_std"]) == stats["channel_std"]
        assert meta["latent_convention"] == ("sd3" if "16" in name else "sd")
        if "16" in name:
            assert again.config.shift_factor == pytest.approx(stats["shift_factor"])
    if name.startswith("run"):
        assert meta["step"] == "4" and meta["weights"] == "ema"
    if name == "run-ae":  # the pinned log-variance travels: sample() equals mode() after from_single_file
        x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
        with torch.no_grad():
            dist = loaded.encode(x).latent_dist
        torch.testing.assert_close(dist.sample(generator=torch.Generator().manual_seed(0)), dist.mode(),
                                   atol=1e-5, rtol=0)


def test_single_file_in_half_precision_and_overwrite(run, tmp_path):
    out = tmp_path / "vae.safetensors"
    export(ExportOptions(src=str(run), out=str(out), format="single-file"), log=quiet)
    export(ExportOptions(src=str(run), out=str(out), format="single-file", dtype="fp16", overwrite=True), log=quiet)
    assert {t.dtype for t in load_file(out).values()} == {torch.float16}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "vae.safetensors"]


# ----------------------------------------------------------------------------- evaluation figures
@pytest.fixture
def evaluated(run, tmp_path, image_folder):
    """`latentvae evaluate` on the run, a diffusers folder and another folder: summary.json with three entries."""
    from latentvae.evaluate import run_evaluation
    from latentvae.options import EvaluateOptions
    diffusers_folder(tmp_path / "folder")
    diffusers_folder(tmp_path / "other", block_out_channels=(8, 8))
    summary = run_evaluation(EvaluateOptions(vae=(str(run), str(tmp_path / "folder"), str(tmp_path / "other")),
                                             data=str(image_folder), out=str(tmp_path / "report"), limit=1,
                                             lpips="none", device="cpu", mixed_precision="no"), log=quiet)
    return tmp_path / "report" / "summary.json", summary["vaes"]


def card_psnrs(out):
    return [line for line in (out / "README.md").read_text().splitlines() if line.startswith("| psnr |")]


def test_the_model_card_holds_only_the_exported_vaes_own_figures(run, tmp_path, evaluated):
    summary, vaes = evaluated
    export(ExportOptions(src=str(tmp_path / "folder"), out=str(tmp_path / "a"), eval_summary=str(summary)), log=quiet)
    assert card_psnrs(tmp_path / "a") == [f"| psnr | {vaes['folder']['psnr']} |"]
    assert json.loads((tmp_path / "a" / "latentvae_export.json").read_text())["evaluation_entry"] == "folder"
    result = export(ExportOptions(src=str(run), out=str(tmp_path / "b"), eval_summary=str(summary)), log=quiet)
    assert result.evaluation == "run" and card_psnrs(tmp_path / "b") == [f"| psnr | {vaes['run']['psnr']} |"]
    # `evaluate` measured the EMA weights: the raw ones have no figures there
    with pytest.raises(BadInputError, match="no evaluation of the exported weights.*ema weights evaluated, raw"):
        export(ExportOptions(src=str(run), out=str(tmp_path / "c"), weights="raw", eval_summary=str(summary)),
               log=quiet)
    diffusers_folder(tmp_path / "unevaluated")
    with pytest.raises(BadInputError, match="--eval-summary .* holds no evaluation"):
        export(ExportOptions(src=str(tmp_path / "unevaluated"), out=str(tmp_path / "d"), eval_summary=str(summary)),
               log=quiet)
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_a_runs_own_summary_without_its_weights_is_skipped_with_a_line(run, tmp_path, evaluated):
    summary, _ = evaluated
    (run / "eval").mkdir()
    (run / "eval" / "summary.json").write_text(summary.read_text())
    export(ExportOptions(src=str(run), out=str(tmp_path / "raw"), weights="raw"), log=quiet)
    card = (tmp_path / "raw" / "README.md").read_text()
    assert card_psnrs(tmp_path / "raw") == [] and "holds no evaluation of the exported weights" in card
    # a checkpoint written after the evaluation is not what `evaluate RUN` measured
    newer = make_run(tmp_path / "elsewhere", step=8)  # the same layout, copied in as the run's newest checkpoint
    shutil.copytree(newer / "checkpoints" / "checkpoint-00000008", run / "checkpoints" / "checkpoint-00000008")
    export(ExportOptions(src=str(run), out=str(tmp_path / "newest")), log=quiet)
    assert "evaluated before checkpoint-00000008 was written" in (tmp_path / "newest" / "README.md").read_text()
