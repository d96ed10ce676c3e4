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
from latentvae.vae.loading import NotAnAutoencoder
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
    # the latent-space statistics (latent_stats.py) beside the reconstruction numbers
    assert len(s["latent_channel_std"]) == 4 and all(v > 0 for v in s["latent_channel_std"])
    assert len(s["latent_kl_per_channel"]) == 4 and 0 < s["latent_hf_share"] < 1 and 0 < s["image_hf_share"] < 1
    assert s["scale_equivariance_psnr"] > 0 and s["scale_equivariance_images"] == 3  # 48x40: multiples of 2 x 2


def test_a_deterministic_encoder_has_null_kl(image_folder, lpips_dir, tmp_path):
    from diffusers import AutoencoderTiny

    folder = tmp_path / "tiny-taesd"
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=4).save_pretrained(folder)
    out = tmp_path / "report"
    evaluate_main(["--vae", str(folder), "--data", str(image_folder), "--out", str(out), "--lpips", "none", "--limit",
                   "2"])
    s = json.loads((out / "summary.json").read_text())["vaes"]["tiny-taesd"]
    assert s["kl_per_element"] is None and s["lpips_alex"] is None and s["latent_kl_per_channel"] is None


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
    import latentvae.evaluate.report as ev

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


def test_demo_folders_are_replaced_whole_and_other_folders_refused(vae_folder, image_folder, tmp_path, capsys):
    args = ["prior", "--vae", str(vae_folder), "--data", str(image_folder), "--limit", "2", "--resolution", "32"]
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        demo_main(args + ["--out", str(notes)])
    assert e.value.code == 2 and "is a non-empty folder that is not an earlier prior demo" in capsys.readouterr().err
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]
    out = tmp_path / "p"
    demo_main(args + ["--out", str(out)])
    (out / "stale.txt").write_text("from before")
    demo_main(args + ["--out", str(out), "--seed", "1"])  # an earlier prior demo: replaced whole
    assert sorted(p.name for p in out.iterdir()) == ["prior.json", "prior.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "notes", "p", "tiny-vae"]  # no staging left


@pytest.mark.parametrize("name", ["taesd:sd", "taesd:flux"])
def test_taesd_references_evaluate(name, tmp_path):
    from latentvae.vae.convert import default_taesd_dir

    if default_taesd_dir() is None:
        pytest.skip("no TAESD weights: set LATENTVAE_TAESD_DIR or place ../shared/weights/taesd")
    out = tmp_path / "report"
    evaluate_main(["--vae", name, "--data", str(REPO / "data" / "samples" / "val"), "--out", str(out), "--lpips",
                   "none", "--max-side", "192", "--mixed-precision", "no"])
    s = json.loads((out / "summary.json").read_text())["vaes"][name]
    assert s["downsample_factor"] == 8 and s["kl_per_element"] is None
    assert s["psnr"] > 20  # a real pretrained autoencoder on a real photo, unlike the random tiny ones


# ----------------------------------------------------------------------------- protocols, latent, precision, tiling
def test_imagenet256_protocol_and_a_seeded_sample(vae_folder, tmp_path):
    """--protocol imagenet256: short side to 256 and the central 256x256; --latent sample repeats with its seed;
    fp32 unless asked, recorded in summary.json and report.md."""
    images = tmp_path / "big"
    images.mkdir()
    for i in range(2):
        make_photo((320, 288), seed=i).save(images / f"p{i}.png")
    runs = {}
    for name, extra in {"mean": [], "sample": ["--latent", "sample"], "again": ["--latent", "sample"]}.items():
        out = tmp_path / name
        evaluate_main(["--vae", str(vae_folder), "--data", str(images), "--out", str(out), "--lpips", "none",
                       "--protocol", "imagenet256", *extra])
        runs[name] = json.loads((out / "summary.json").read_text())
    settings = runs["sample"]["settings"]
    assert settings["protocol"] == "imagenet256" and settings["protocol_resolution"] == 256
    assert settings["latent"] == "sample" and settings["seed"] == 0
    assert settings["mixed_precision"] == "no" and settings["precision_resolved"] == "no"
    rows = list(csv.DictReader(open(tmp_path / "mean" / "per_image.csv")))
    sizes = {(r["width"], r["height"], r["eval_width"], r["eval_height"]) for r in rows}
    assert sizes == {("320", "288", "256", "256")}
    psnr = {k: v["vaes"]["tiny-vae"]["psnr"] for k, v in runs.items()}
    assert psnr["sample"] == psnr["again"] != psnr["mean"]
    md = (tmp_path / "sample" / "report.md").read_text()
    assert "Protocol `imagenet256`" in md and "precision_resolved: no" in md and "posterior sample (seed 0)" in md


def test_bad_evaluation_options_name_their_flag(vae_folder, image_folder, tmp_path, capsys):
    base = ["--vae", str(vae_folder), "--data", str(image_folder), "--out", str(tmp_path / "r")]
    for extra, flag in [(["--protocol", "imagenet512"], "--protocol"), (["--latent", "mode"], "--latent"),
                        (["--protocol", "coco256", "--max-side", "512"], "--max-side"),
                        (["--tile-size", "64"], "--tile-size"), (["--tiling", "--tile-size", "33"], "--tile-size")]:
        with pytest.raises(SystemExit) as e:
            evaluate_main(base + extra)
        assert e.value.code == 2 and flag in capsys.readouterr().err, extra
    assert not (tmp_path / "r").exists()


def test_help_lists_the_evaluation_flags(capsys):
    with pytest.raises(SystemExit) as e:
        evaluate_main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert all(f in out for f in ("--protocol", "--latent", "--seed", "--tiling", "--tile-size", "--inception-weights",
                                  "imagenet256", "coco256"))


def no_attention_vae(tile: int) -> AutoencoderKL:
    """The tiny /2 VAE without its mid-block attention (quadratic in pixels at 1024²), diffusers tile = `tile`."""
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4,
                         layers_per_block=1, mid_block_add_attention=False, sample_size=tile).eval()


PEAK_SCRIPT = r"""
import re, sys, torch
sys.path.insert(0, sys.argv[1])
from test_eval import no_attention_vae, photo
from latentvae.evaluate import configure_tiling, reconstruct

def kb(key):
    return int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1))

def peak_growth(vae, x):  # bytes the resident set grows by at its peak (VmHWM reset through clear_refs)
    open("/proc/self/clear_refs", "w").write("5")
    before = kb("VmRSS")
    reconstruct(vae, x, x.shape[-2:])
    return (kb("VmHWM") - before) * 1024

side, tile = int(sys.argv[2]), int(sys.argv[3])
x = torch.from_numpy(photo((side, side)).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
tiled, full = no_attention_vae(tile), no_attention_vae(tile)
print(configure_tiling("tiled", tiled, True))
for vae in (tiled, full):  # one-time costs (kernel JIT, thread pools, scratch buffers) are paid here, not measured
    reconstruct(vae, x[..., : 2 * tile, : 2 * tile], (2 * tile, 2 * tile))
print(peak_growth(tiled, x), peak_growth(full, x))
"""


def test_tiling_bounds_peak_memory():
    """Peak resident memory of one reconstruction at 768², tiled (128² tiles) against whole.

    In a fresh process whose allocator hands every buffer over 64 kB straight back to the system when it is freed
    (fixed glibc thresholds), so a buffer freed by the warm-up or the first run cannot be reused unseen by the second.
    """
    import ast
    import os
    import subprocess
    import sys

    try:
        open("/proc/self/clear_refs", "w").close()
    except OSError:
        pytest.skip("peak RSS cannot be reset here (/proc/self/clear_refs, Linux)")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(REPO / "tests"), "768", "128"], capture_output=True,
                         text=True, check=True, env=env).stdout.splitlines()
    assert ast.literal_eval(out[0]) == {"tile_sample_min_size": 128, "tile_latent_min_size": 64,
                                        "tile_overlap_factor": 0.25}
    peak_tiled, peak_full = map(int, out[1].split())
    # whole: several 8-16 channel fp32 activations of 768² (19-38 MB each) alive at once; tiled: the output, the
    # decoded tiles waiting to be blended (together about the image's size) and one tile's activations (~1 MB each)
    assert peak_full > 60e6 and peak_tiled < peak_full / 3, (peak_tiled, peak_full)


def test_tiled_psnr_is_close_to_untiled(vae_folder, image_folder, tmp_path):
    from diffusers import AutoencoderTiny

    from latentvae.errors import BadInputError
    from latentvae.evaluate import configure_tiling

    base = ["--vae", str(vae_folder), "--data", str(image_folder), "--lpips", "none", "--limit", "2"]
    evaluate_main(base + ["--out", str(tmp_path / "full")])
    evaluate_main(base + ["--out", str(tmp_path / "tiled"), "--tiling", "--tile-size", "16"])
    full, tiled = (json.loads((tmp_path / k / "summary.json").read_text()) for k in ("full", "tiled"))
    assert tiled["settings"]["tiles"]["tiny-vae"]["tile_sample_min_size"] == 16
    assert "tiled encode/decode" in (tmp_path / "tiled" / "report.md").read_text()
    assert tiled["vaes"]["tiny-vae"]["psnr"] == pytest.approx(full["vaes"]["tiny-vae"]["psnr"], abs=1.0)
    assert tiled["vaes"]["tiny-vae"]["psnr"] != full["vaes"]["tiny-vae"]["psnr"]  # the tiles were used
    tiny16 = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                             num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=16)
    with pytest.raises(BadInputError, match="--tiling.*16 latent channels"):
        configure_tiling("taesd16", tiny16, True)  # diffusers' AutoencoderTiny tiles 4-channel latents only
    with pytest.raises(BadInputError, match="--tiling: taesd16 downsamples by 2, but .* assume 8"):
        configure_tiling("taesd16", tiny16, True, encode=False)  # decoding only: any channels, but its tiles assume /8
