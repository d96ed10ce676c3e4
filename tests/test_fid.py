"""rFID: torch-fidelity's Inception and figure, the weights found offline, and evaluate's report of it.

    pytest tests/test_fid.py     # needs ../shared/weights/inception (skips, saying so, without it)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ImageFilter

from conftest import make_photo
from latentvae import cli, fid

INCEPTION_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "weights" / "inception"
WEIGHTS = INCEPTION_DIR / fid.INCEPTION_FILE


@pytest.fixture(scope="module")
def weights() -> str:
    if not WEIGHTS.is_file():
        pytest.skip(f"no FID Inception weights at {WEIGHTS} (../shared/weights/inception)")
    return str(WEIGHTS)


@pytest.fixture(scope="module")
def extractor(weights):
    return fid.load_inception(weights, "cpu")


def batch(images) -> torch.Tensor:
    """PIL images of one size -> (N, 3, H, W) uint8"""
    return torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in images])


@pytest.fixture(scope="module")
def pair():
    """6 small photos and their blurred versions, uint8 NCHW."""
    real = [make_photo((64, 48), seed=i) for i in range(6)]
    return batch(real), batch([im.filter(ImageFilter.GaussianBlur(2)) for im in real])


class Images(torch.utils.data.Dataset):
    """A uint8 (N, 3, H, W) batch as the Dataset torch-fidelity reads."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def stats(extractor, images: torch.Tensor) -> fid.FeatureStats:
    s = fid.FeatureStats()
    for k in range(0, len(images), 4):  # batches of unequal size accumulate as one set
        s.add(extractor, images[k:k + 4])
    return s


@pytest.fixture(scope="module")
def real_stats(extractor, pair) -> fid.FeatureStats:
    return stats(extractor, pair[0])


def test_identity_is_zero(real_stats):
    a = real_stats
    # 6 samples of 2048-d: the covariance is singular, and Tr sqrt(cov cov) from 2048 eigenvalues carries
    # rounding noise of about 1e-7 of the trace (torch-fidelity's figure for the same sets, too)
    scale = 2 * np.trace(a.mean_cov()[1])
    assert a.n == 6 and abs(fid.frechet_distance(a, a)) < 1e-6 * scale


def test_equals_torch_fidelity(extractor, weights, pair, real_stats, monkeypatch):
    """Our figure is torch-fidelity's own `calculate_metrics(..., fid=True)` on the same images."""
    import torch_fidelity
    import torch_fidelity.feature_extractor_inceptionv3 as tfi
    from safetensors.torch import load_file

    real, blurred = pair
    ours = fid.frechet_distance(real_stats, stats(extractor, blurred))
    monkeypatch.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: load_file(weights))
    theirs = torch_fidelity.calculate_metrics(input1=Images(real), input2=Images(blurred), fid=True, cache=False,
                                              cuda=False, verbose=False)["frechet_inception_distance"]
    assert ours > 10  # blur moves the features
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-4)


def test_stats_match_numpy(extractor, pair, real_stats):
    mean, cov = real_stats.mean_cov()
    feats = fid.inception_features(extractor, pair[0]).numpy()
    np.testing.assert_allclose(mean, feats.mean(0), atol=1e-9)
    np.testing.assert_allclose(cov, np.cov(feats, rowvar=False), atol=1e-8)


def test_a_bad_weights_path_names_the_file(tmp_path, monkeypatch):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(fid.InceptionUnavailable, match="--inception-weights .*nope.safetensors"):
        fid.load_inception(str(missing))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    monkeypatch.setenv(fid.INCEPTION_ENV, str(junk))
    with pytest.raises(fid.InceptionUnavailable, match=f"{fid.INCEPTION_ENV}=.*junk.safetensors"):
        fid.load_inception(None)


def test_a_wrong_state_dict_names_the_file(tmp_path):
    from safetensors.torch import save_file

    wrong = tmp_path / "wrong.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(fid.InceptionUnavailable, match="wrong.safetensors.*state_dict"):
        fid.load_inception(str(wrong))


def evaluate(argv):
    cli.main(["evaluate", "--lpips", "none", "--limit", "3", *argv])


def test_evaluate_reports_rfid(vae_dir, image_folder, weights, tmp_path):
    out = tmp_path / "report"
    evaluate(["--vae", str(vae_dir), "--data", str(image_folder), "--out", str(out), "--inception-weights", weights])
    summary = json.loads((out / "summary.json").read_text())
    s = summary["vaes"]["tiny"]
    assert s["rfid"] > 0 and s["rfid_images"] == 3
    assert summary["settings"]["inception_weights"] == weights
    report = (out / "report.md").read_text()
    assert "rFID" in report and "biased" in report


def test_evaluate_without_weights_leaves_rfid_out(vae_dir, image_folder, tmp_path, monkeypatch, capsys):
    """No flag, no env var, no torch-fidelity download (offline, empty hub cache): one line, no rfid, exit 0."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    def offline(*_a, **_k):
        raise OSError("no network")
    monkeypatch.delenv(fid.INCEPTION_ENV, raising=False)
    monkeypatch.setattr(tfi, "load_state_dict_from_url", offline)  # as on a machine with no internet
    out = tmp_path / "report"
    evaluate(["--vae", str(vae_dir), "--data", str(image_folder), "--out", str(out)])
    s = json.loads((out / "summary.json").read_text())["vaes"]["tiny"]
    assert "rfid" not in s and s["psnr"] > 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "rFID" in ln]
    assert len(lines) == 1 and "--inception-weights" in lines[0] and fid.INCEPTION_ENV in lines[0]


def test_evaluate_refuses_a_missing_weights_file(vae_dir, image_folder, tmp_path, capsys):
    out = tmp_path / "report"
    with pytest.raises(SystemExit) as e:
        evaluate(["--vae", str(vae_dir), "--data", str(image_folder), "--out", str(out), "--inception-weights",
                  str(tmp_path / "missing.safetensors")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--inception-weights" in err and "missing.safetensors" in err
    assert not out.exists()
