"""latentvae probe: a small diffusion model trained on each latent cache, scored on held-out images.

    python -m pytest tests/test_probe.py -q
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_photo, save_tiny_vae
from latentvae.cache import encode
from latentvae.errors import BadInputError, UserError
from latentvae.options import EncodeOptions, ProbeOptions
from latentvae.probe import run_probe


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    """Two caches of the same crops of 6 photographs, from two tiny VAEs (8x8x4 latents)."""
    root = tmp_path_factory.mktemp("probe")
    data = root / "imgs"
    data.mkdir()
    for i in range(6):
        make_photo(size=(48, 40), seed=i).save(data / f"p{i}.png")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        vae = save_tiny_vae(root / f"vae-{name}", seed=seed)
        out[name] = root / f"cache-{name}"
        encode(EncodeOptions(vae=str(vae), data=str(data), out=str(out[name]), preprocess="crops", crops=8,
                             resolution=16, batch_size=16, num_workers=0, progress=False, mixed_precision="no",
                             store="moments"))
    return out


def probe(caches, out, **kw) -> dict:
    base = dict(preset="test", steps=60, batch_size=8, lr=3e-3, warmup_steps=5, log_every=10, save_every=0,
                samples=4, sample_steps=4, report_to="none", ema_decay=0.9)
    return run_probe(ProbeOptions(cache=tuple(str(c) for c in caches), out=str(out), **{**base, **kw}),
                     log=lambda *a: None)


def test_the_loss_falls_the_same_seed_gives_the_same_figures_and_two_caches_give_one_table(caches, tmp_path):
    s = probe([caches["a"], caches["b"]], tmp_path / "r1")
    a = s["caches"]["cache-a"]
    untrained = probe([caches["a"]], tmp_path / "r0", steps=1)["caches"]["cache-a"]["heldout_loss_mean"]
    assert a["heldout_loss_mean"] < 0.95 * untrained  # it learns: the held-out loss falls over the budget
    assert a["held_out_rows"] == 8 * a["held_out_images"] and a["train_rows"] == 8 * (6 - a["held_out_images"])
    assert len(a["per_level_mean"]) == 8 and a["heldout_loss_mean"] > 0
    assert set(s["caches"]) == {"cache-a", "cache-b"} and "cache-b - cache-a" in s["differences"]
    report = (tmp_path / "r1" / "report.md").read_text()
    assert "| cache-a |" in report and "| cache-b |" in report and "cache-b - cache-a" in report
    assert (tmp_path / "r1" / "samples-cache-a.png").is_file() and (tmp_path / "r1" / "samples-cache-b.png").is_file()
    stats = a["latent_statistics"]
    assert 0 < stats["spectrum"]["latent_hf_share"] < 1 and len(stats["kl_per_channel"]) == 4
    assert stats["scale_equivariance_psnr"] > 0
    again = probe([caches["a"]], tmp_path / "r2")
    assert again["caches"]["cache-a"]["heldout_loss_mean"] == a["heldout_loss_mean"]  # bit for bit
    assert json.loads((tmp_path / "r1" / "summary.json").read_text())["recipe"]["steps"] == 60


def test_a_resumed_probe_gives_the_figures_of_an_uninterrupted_one(caches, tmp_path):
    straight = probe([caches["a"]], tmp_path / "straight", steps=30, seeds=2)
    probe([caches["a"]], tmp_path / "resumed", steps=15, seeds=2)  # what a kill after step 15 leaves, and more
    resumed = probe([caches["a"]], tmp_path / "resumed", steps=30, seeds=2)
    for x, y in zip(straight["caches"]["cache-a"]["seeds"], resumed["caches"]["cache-a"]["seeds"]):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6)
    spread = straight["caches"]["cache-a"]["heldout_loss_std"]
    assert spread is not None and spread > 0  # two seeds: a spread


def test_unmeasured_factors_are_measured_and_said_so_and_bad_caches_refused(caches, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(caches["a"], bare)
    m = json.loads((bare / "manifest.json").read_text())
    m.pop("latent_statistics")
    (bare / "manifest.json").write_text(json.dumps(m))
    s = probe([bare], tmp_path / "r", steps=10)
    assert s["caches"]["bare"]["normalization"].startswith("measured by the probe on the")
    with pytest.raises(UserError, match="not a latent cache|does not exist"):
        probe([tmp_path / "nothing"], tmp_path / "r2", steps=10)
    with pytest.raises(BadInputError, match="--class-column 'label' is not a column"):
        probe([caches["a"]], tmp_path / "r3", steps=10, class_column="label")
