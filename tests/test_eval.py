"""Evaluation: metric conventions, blur measures, the report's schema, datasets as --data, the tradeoff
sweep's report, interpolation, bad inputs.

    pytest tests/test_eval.py            # tiny diffusers models in tmp folders (its time: benchmarks/RESULTS.md)
"""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from skimage.filters import gaussian

from conftest import REPO, make_photo
from latentvae import cli, demos, metrics
from latentvae.evaluate import CSV_COLUMNS, fit_pad
from latentvae.loading import NotAnAutoencoder
from latentvae.perceptual import load_lpips, lpips_distance

SUMMARY_KEYS = {"psnr", "psnr_pooled", "ssim", "lpips_alex", "lpips_vgg", "hf_energy_ratio", "laplacian_var_ratio",
                "latent_shape", "compression_ratio", "kl_per_element", "encode_s_per_megapixel",
                "decode_s_per_megapixel", "latent_channels", "downsample_factor"}


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4,
                         layers_per_block=1).eval()


@pytest.fixture
def vae_folder(tmp_path):
    folder = tmp_path / "tiny-vae"
    tiny_vae().save_pretrained(folder)
    return folder


def evaluate_main(argv: list[str]) -> None:
    """`latentvae evaluate ARGV` (= python eval/evaluate.py ARGV)"""
    cli.main(["evaluate", *argv])


def demo_main(argv: list[str]) -> None:
    """`latentvae demo ARGV` (= python eval/demos.py ARGV)"""
    cli.main(["demo", *argv])


def photo(size=(96, 80), seed=0) -> np.ndarray:
    return np.asarray(make_photo(size, seed))


# ----------------------------------------------------------------------------- metric conventions
@pytest.mark.parametrize("d", [1, 5, 20])
def test_psnr_of_a_known_error(d):
    x = np.full((32, 48, 3), 128, np.uint8)
    signs = np.where(np.indices(x.shape).sum(0) % 2 == 0, 1, -1)  # ±d everywhere: MSE = d²
    y = (x.astype(int) + d * signs).astype(np.uint8)
    assert metrics.psnr(x, y) == pytest.approx(20 * np.log10(255 / d), abs=1e-9)
    assert metrics.pooled_psnr(metrics.squared_error_sum(x, y), x.size) == pytest.approx(20 * np.log10(255 / d))


def test_psnr_of_gaussian_noise():
    rng = np.random.default_rng(0)
    x = np.full((128, 128, 3), 128, np.uint8)
    y = np.clip(np.round(x + rng.normal(0, 10, x.shape)), 0, 255).astype(np.uint8)
    expected = 10 * np.log10(255 ** 2 / (100 + 1 / 12))  # rounding adds 1/12 of variance
    assert metrics.psnr(x, y) == pytest.approx(expected, abs=0.1)


def test_identity_is_perfect_on_every_metric(lpips_dir):
    x = photo()
    assert metrics.psnr(x, x) == float("inf")
    assert metrics.ssim(x, x) == pytest.approx(1.0)
    assert metrics.hf_energy_ratio(x, x) == pytest.approx(1.0)
    assert metrics.laplacian_var_ratio(x, x) == pytest.approx(1.0)
    t = torch.from_numpy(x.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    for net in ("alex", "vgg"):
        assert float(lpips_distance(load_lpips(net, lpips_dir), t, t)[0]) == pytest.approx(0.0, abs=1e-6)


def test_ssim_drops_with_noise():
    x = photo()
    y = np.clip(x + np.random.default_rng(0).normal(0, 20, x.shape), 0, 255).astype(np.uint8)
    assert metrics.ssim(x, y) < 0.9


@pytest.mark.parametrize("measure", [metrics.hf_energy_ratio, metrics.laplacian_var_ratio])
def test_sharpness_falls_monotonically_with_blur(measure):
    x = photo((128, 112))
    values = [measure(x, x), measure(x, x / 255.0)]  # uint8 or float [0, 1] outputs alike
    for sigma in (0.5, 1.0, 1.5, 2.0, 3.0, 5.0):  # unquantized, as evaluate.py passes outputs
        values.append(measure(x, gaussian(x / 255.0, sigma=sigma, channel_axis=-1)))
    assert values[0] == pytest.approx(1.0) and values[1] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(values[1:], values[2:])), values


def test_gaussian_fit_distance_separates_outside_draws():
    rng = np.random.default_rng(0)
    real = rng.normal(0, 5, (4000, 4))  # an encoder whose latents spread wide (like an autoencoder's)
    inside = metrics.gaussian_fit_distances(real, rng.normal(0, 5, (4000, 4)))
    outside = metrics.gaussian_fit_distances(real, rng.normal(10, 1, (4000, 4)))
    assert inside["mahalanobis_ratio"] == pytest.approx(1.0, abs=0.1) and inside["frechet"] < 1.0
    assert outside["mahalanobis_ratio"] > 3 and outside["frechet"] > 100


def test_pad_fit_scores_the_original_pixels():
    x = torch.zeros(1, 3, 13, 10)
    x_in, ref = fit_pad(x, 4)
    assert x_in.shape[-2:] == (16, 12) and ref.shape[-2:] == (13, 10)


# ----------------------------------------------------------------------------- the evaluator
def test_report_schema(vae_folder, image_folder, lpips_dir, tmp_path):
    out = tmp_path / "report"
    evaluate_main(["--vae", str(vae_folder), "--vae", str(vae_folder), "--data", str(image_folder),
                   "--out", str(out), "--lpips-dir", lpips_dir, "--fit", "crop", "--limit", "3",
                   "--mixed-precision", "no"])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["vaes"]) == {"tiny-vae", "tiny-vae#2"}
    s = summary["vaes"]["tiny-vae"]
    assert SUMMARY_KEYS <= set(s)
    assert s["latent_shape"] == "4 x H/2 x W/2" and s["compression_ratio"] == 3.0
    assert s["kl_per_element"] > 0 and 0 < s["ssim"] < 1 and s["lpips_vgg"] > 0
    assert summary["settings"]["fit"] == "crop" and summary["settings"]["images"] == 3
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 6
    first = rows[0]
    assert (int(first["eval_width"]), int(first["eval_height"])) == (48, 40)  # already multiples of 2
    assert first["latent_shape"] == "4x20x24"
    assert np.mean([float(r["psnr"]) for r in rows[:3]]) == pytest.approx(s["psnr"])
    assert "| tiny-vae |" in (out / "report.md").read_text() and (out / "spectrum.png").is_file()


def test_a_deterministic_encoder_has_null_kl(image_folder, lpips_dir, tmp_path):
    from diffusers import AutoencoderTiny

    folder = tmp_path / "tiny-taesd"
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=4).save_pretrained(folder)
    out = tmp_path / "report"
    evaluate_main(["--vae", str(folder), "--data", str(image_folder), "--out", str(out), "--lpips", "none", "--limit",
                   "2"])
    s = json.loads((out / "summary.json").read_text())["vaes"]["tiny-taesd"]
    assert s["kl_per_element"] is None and s["lpips_alex"] is None


def test_refuses_a_folder_that_is_not_a_vae(image_folder, tmp_path, capsys):
    bad = tmp_path / "not-a-vae"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(SystemExit) as e:
        evaluate_main(["--vae", str(bad), "--data", str(image_folder), "--out", str(tmp_path / "r"), "--lpips", "none"])
    err = capsys.readouterr().err  # the message goes to stderr, as one line; exit status 2
    assert e.value.code == 2 and str(bad) in err and "AutoencoderKL" in err
    with pytest.raises(SystemExit) as e:
        evaluate_main(["--vae", str(tmp_path / "missing"), "--data", str(image_folder), "--out", str(tmp_path / "r")])
    assert e.value.code == 2 and str(tmp_path / "missing") in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing written


def test_an_earlier_report_is_replaced_whole_and_survives_a_failed_run(vae_folder, image_folder, tmp_path,
                                                                       monkeypatch):
    import latentvae.evaluate as ev

    out = tmp_path / "report"
    args = ["--vae", str(vae_folder), "--data", str(image_folder), "--out", str(out), "--lpips", "none"]
    evaluate_main(args + ["--limit", "2"])
    first = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(*_a, **_k):
        raise RuntimeError("plotting crashed")
    monkeypatch.setattr(ev, "plot_spectra", crash)  # fails after the CSV and summary.json are written
    with pytest.raises(RuntimeError, match="plotting crashed"):
        evaluate_main(args + ["--limit", "1"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # the earlier report, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "report", "tiny-vae"]  # no staging left
    monkeypatch.undo()
    evaluate_main(args + ["--limit", "1"])
    assert json.loads((out / "summary.json").read_text())["settings"]["images"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "report", "tiny-vae"]


def test_library_raises_not_an_autoencoder(tmp_path, image_folder):
    from latentvae.evaluate import run_evaluation
    from latentvae.options import EvaluateOptions, make_options

    opts = make_options(EvaluateOptions, {"vae": [str(tmp_path)], "data": str(image_folder),
                                          "out": str(tmp_path / "r")})
    with pytest.raises(NotAnAutoencoder, match=str(tmp_path)):
        run_evaluation(opts)


def test_a_saved_dataset_is_data_too(vae_folder, tmp_path):
    """--data: a `datasets` dataset saved with save_to_disk; --limit takes its first rows, named DATA:SPLIT[ROW]."""
    import datasets

    ds = tmp_path / "ds"
    datasets.Dataset.from_dict({"image": [make_photo(seed=i) for i in range(4)]}).save_to_disk(str(ds))
    out = tmp_path / "report"
    evaluate_main(["--vae", str(vae_folder), "--data", str(ds), "--out", str(out), "--lpips", "none",
                   "--limit", "3", "--mixed-precision", "no"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["images"] == 3 and summary["settings"]["data"] == str(ds)
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert [r["image"] for r in rows] == [f"{ds}:train[{i}]" for i in range(3)]
    assert (int(rows[0]["width"]), int(rows[0]["height"])) == (48, 40)
    assert summary["vaes"]["tiny-vae"]["psnr"] == pytest.approx(np.mean([float(r["psnr"]) for r in rows]))


def test_tradeoff_on_existing_runs_writes_its_table_and_plots(vae_folder, tmp_path, lpips_dir):
    """`latentvae tradeoff --runs A --runs B`: nothing trained; the evaluation, the table and both plots."""
    other = tmp_path / "other-vae"
    torch.manual_seed(1)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4,
                  layers_per_block=1).save_pretrained(other)
    images = tmp_path / "few"
    images.mkdir()
    for i in range(2):
        make_photo(seed=i).save(images / f"p{i}.png")  # 48x40: AlexNet-LPIPS cannot take 32x24
    out = tmp_path / "tradeoff"
    cli.main(["tradeoff", "--runs", str(vae_folder), "--runs", str(other), "--data", str(images), "--out", str(out),
              "--lpips-dir", lpips_dir])
    assert {"tradeoff.md", "tradeoff.json", "perception_distortion.png", "rate_distortion.png", "eval"} <= \
        {p.name for p in out.iterdir()}
    assert not (out / "runs").exists()  # --runs: nothing trained
    table = (out / "tradeoff.md").read_text()
    assert "| tiny-vae |" in table and "| other-vae |" in table and "2 autoencoders on 2 images" in table
    report = json.loads((out / "tradeoff.json").read_text())
    assert set(report["vaes"]) == {"tiny-vae", "other-vae"} and report["vaes"]["other-vae"]["lpips_vgg"] > 0
    assert json.loads((out / "eval" / "summary.json").read_text())["settings"]["max_side"] == 256


def test_tradeoff_trains_with_the_training_cli(tmp_path):
    from latentvae import tradeoff

    cmd = tradeoff.train_command(tmp_path / "run", "mse+lpips+gan", 40, "configs/quickstart.yaml")
    assert cmd[cmd.index("--out") + 1] == str(tmp_path / "run") and "--output-dir" not in cmd
    assert cmd[cmd.index("--config") + 1] == "configs/quickstart.yaml" and "loss.gan_start=20" in cmd


# ----------------------------------------------------------------------------- demos
@pytest.mark.parametrize("mode", ["linear", "slerp"])
def test_interpolation_ends_are_the_reconstructions(mode):
    vae = tiny_vae()
    x_a, x_b = (torch.from_numpy(photo((32, 32), s).copy()).permute(2, 0, 1).float() / 127.5 - 1 for s in (1, 2))
    frames = demos.interpolation_frames(vae, x_a, x_b, [0.0, 0.5, 1.0], mode)
    recon = demos.reconstruct_batch(vae, torch.stack([x_a, x_b]))
    torch.testing.assert_close(frames[0], recon[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(frames[-1], recon[1], atol=1e-5, rtol=0)
    assert not torch.allclose(frames[1], recon[0], atol=1e-3)


def test_slerp_keeps_the_norm_between_equal_norm_latents():
    z0, z1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert demos.slerp(z0, z1, 0.5).norm() == pytest.approx(1.0)
    assert demos.lerp(z0, z1, 0.5).norm() == pytest.approx(2 ** -0.5)
    with pytest.raises(ValueError, match="linear, slerp"):
        demos.get_interpolation("cubic")


def test_demo_commands_write_their_images(vae_folder, image_folder, tmp_path):
    a, b = sorted(image_folder.glob("*.png"))[:2]
    demo_main(["interpolate", "--vae", str(vae_folder), "--a", str(a), "--b", str(b), "--out", str(tmp_path / "i"),
               "--steps", "4", "--resolution", "32"])
    from PIL import Image

    with Image.open(tmp_path / "i" / "slerp.gif") as gif:
        assert gif.n_frames == 6  # forward 4, back 2
    demo_main(["recon-grid", "--vae", str(vae_folder), "--data", str(image_folder), "--out", str(tmp_path / "g.png"),
               "--limit", "2", "--resolution", "32"])
    assert Image.open(tmp_path / "g.png").size[1] > 2 * 32
    demo_main(["prior", "--vae", str(vae_folder), "--data", str(image_folder), "--out", str(tmp_path / "p"),
               "--limit", "3", "--resolution", "32"])
    numbers = json.loads((tmp_path / "p" / "prior.json").read_text())["tiny-vae"]
    assert numbers["mahalanobis_ratio_real"] == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("name", ["taesd:sd", "taesd:flux"])
def test_taesd_references_evaluate(name, tmp_path):
    from latentvae.convert import default_taesd_dir

    if default_taesd_dir() is None:
        pytest.skip("no TAESD weights: set LATENTVAE_TAESD_DIR or place ../shared/weights/taesd")
    out = tmp_path / "report"
    evaluate_main(["--vae", name, "--data", str(REPO / "data" / "samples" / "val"), "--out", str(out), "--lpips",
                   "none", "--max-side", "192", "--mixed-precision", "no"])
    s = json.loads((out / "summary.json").read_text())["vaes"][name]
    assert s["downsample_factor"] == 8 and s["kl_per_element"] is None
    assert s["psnr"] > 20  # a real pretrained autoencoder on a real photo, unlike the random tiny ones
