"""Validation during training: RUN/eval.jsonl, the metrics of `latentvae evaluate`, checkpoints/best, trackers."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import fresh_trainer, make_photo
from latentvae import runs
from latentvae.config import ConfigError, load_config
from latentvae.train import validation
from latentvae.train.checkpoint import read_best


def _run(cfg, out, resume=None):
    trainer = fresh_trainer(cfg, out, resume=resume)
    trainer.run()
    return trainer


def _val_images(cfg):
    from latentvae.train.data import build_sources
    return validation.load_val_images(build_sources(cfg.data)[1], cfg.data.val_resolution, cfg.train.eval_count)[0]


def _hwc(x_u8):
    return x_u8.permute(1, 2, 0).numpy()


def test_eval_log_has_a_line_per_evaluation_and_best_is_the_best_line_scored_as_evaluate_does(tiny_config, tmp_path):
    from latentvae import metrics
    from latentvae.vae.loading import load_autoencoder
    from latentvae.perceptual import load_lpips

    # NCHW pinned: the checkpoint is scored below in NCHW, and channels_last (`auto` on bf16 CPUs) rounds
    # the convolutions differently (hf_energy_ratio moved by 2e-6 relative on an AMX CPU)
    cfg = tiny_config(**{"train.eval_every": "2", "train.save_every": "2", "train.keep_last": "1",
                         "train.best_metric": "psnr", "data.val_count": "2", "train.channels_last": "false"})
    _run(cfg, tmp_path / "r")
    records = validation.read_records(tmp_path / "r")
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:
        assert r["images"] == 2
        for key in ("psnr", "psnr_pooled", "ssim", "lpips_alex"):
            assert math.isfinite(r[key]), (r["step"], key)
    best = read_best(tmp_path / "r")
    top = max(records, key=lambda r: r["psnr"])
    assert best == {"step": top["step"], "metric": "psnr", "value": top["psnr"]}
    # checkpoints/best verifies and loads; its EMA weights give that line's numbers with metrics.image_metrics
    path = runs.checkpoints_root(tmp_path / "r") / "best"
    runs.verify(path)
    assert runs.find_checkpoint(path) == path and runs.read_state(path)["step"] == top["step"]
    vae = load_autoencoder(str(path)).float().eval()
    images, lp = _val_images(cfg), {"alex": load_lpips("alex", cfg.loss.lpips_dir)}
    rows = []
    for ref, x_hat in zip(images, validation.reconstruct(vae, images, "cpu")):  # one batch, as in training
        out_float = ((x_hat.double() + 1) / 2).permute(1, 2, 0).numpy()
        rows.append(metrics.image_metrics(_hwc(ref), _hwc(validation.to_uint8(x_hat)), out_float, lp))
    for key in ("psnr", "ssim", "hf_energy_ratio", "laplacian_var_ratio"):
        assert np.mean([r[key] for r in rows]) == pytest.approx(top[key], rel=1e-6), key
    # LPIPS: validation runs it on batches, image_metrics one image at a time (fp32 convolutions differ ~1e-5)
    assert np.mean([r["lpips_alex"] for r in rows]) == pytest.approx(top["lpips_alex"], rel=1e-4)


@pytest.mark.parametrize("save_every", ["2", "3"], ids=["best-at-a-checkpoint-step", "best-between-checkpoints"])
def test_best_follows_the_metric_and_survives_rotation(tiny_config, tmp_path, monkeypatch, save_every):
    scripted = {2: 0.5, 4: 0.2, 6: 0.3}  # lpips_alex: step 4 is the best, the last step is worse
    evaluated = {}
    real = validation.Validator.evaluate

    def evaluate(self, vae, step):
        evaluated[step] = {k: v.clone() for k, v in vae.state_dict().items()}  # the EMA weights it scored
        record = real(self, vae, step)
        record["lpips_alex"] = scripted[step]
        return record

    monkeypatch.setattr(validation.Validator, "evaluate", evaluate)
    cfg = tiny_config(**{"train.eval_every": "2", "train.save_every": save_every, "train.keep_last": "1",
                         "train.ema_decay": "0.5"})
    _run(cfg, tmp_path / "r")
    assert [p.name for p in runs.list_checkpoints(tmp_path / "r")] == ["checkpoint-00000006"]
    best = runs.checkpoints_root(tmp_path / "r") / "best"
    assert read_best(tmp_path / "r") == {"step": 4, "metric": "lpips_alex", "value": 0.2}
    runs.verify(best)
    assert runs.read_state(best)["step"] == 4
    ema = runs.load_tensors(best / "ema.safetensors")
    for k, v in evaluated[4].items():
        assert torch.equal(ema[k], v), k
    assert not any(torch.equal(ema[k], evaluated[6][k]) for k in ema if "weight" in k)
    assert not [p for p in best.parent.iterdir() if p.name.startswith(".")]  # no staging left over


def test_resume_drops_the_lines_of_steps_a_killed_run_did_not_checkpoint(tiny_config, tmp_path, capsys):
    cfg = tiny_config(**{"train.eval_every": "2", "train.save_every": "3", "train.keep_last": "3",
                         "train.best_metric": "psnr", "train.channels_last": "true"})
    _run(cfg, tmp_path / "r")
    # a kill after the evaluation at step 6, before its checkpoint, in the middle of a line
    runs.final_dir(tmp_path / "r", 6).rename(tmp_path / "gone")
    with open(tmp_path / "r" / validation.EVAL_LOG, "ab") as f:
        f.write(b'{"step": 8, "psnr": 9')
    assert [r["step"] for r in validation.read_records(tmp_path / "r")] == [2, 4, 6]  # the cut line is skipped
    full = validation.read_records(tmp_path / "r")
    trainer = fresh_trainer(cfg, tmp_path / "r", resume="latest")
    assert trainer.state.step == 3
    assert (tmp_path / "r" / validation.EVAL_LOG).read_bytes().count(b"\n") == 1  # step 2 only
    best = read_best(tmp_path / "r")
    assert best is None or best["step"] <= 3
    trainer.run()
    again = validation.read_records(tmp_path / "r")
    assert [r["step"] for r in again] == [2, 4, 6]
    for a, b in zip(full, again):  # exact resume: the same numbers
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    top = max(again, key=lambda r: r["psnr"])
    assert read_best(tmp_path / "r")["step"] == top["step"]


def test_a_best_lost_between_its_record_and_its_publication_is_rebuilt_at_start(tiny_config, tmp_path, capsys):
    import shutil
    cfg = tiny_config(**{"train.steps": "4", "train.eval_every": "2", "train.save_every": "2",
                         "train.best_metric": "ssim"})
    _run(cfg, tmp_path / "r")
    expected = read_best(tmp_path / "r")
    shutil.rmtree(runs.checkpoints_root(tmp_path / "r") / "best")
    fresh_trainer(cfg, tmp_path / "r", resume="latest")  # finished run: only the start-up checks
    assert read_best(tmp_path / "r") == expected
    runs.verify(runs.checkpoints_root(tmp_path / "r") / "best")
    assert "from eval.jsonl" in capsys.readouterr().out


def test_a_kill_between_the_two_renames_of_best_leaves_the_old_one(tiny_config, tmp_path):
    from latentvae.train.checkpoint import recover_best
    cfg = tiny_config(**{"train.steps": "2", "train.eval_every": "2", "train.save_every": "2"})
    _run(cfg, tmp_path / "r")
    best = runs.checkpoints_root(tmp_path / "r") / "best"
    before = read_best(tmp_path / "r")
    best.rename(best.with_name(".best.old"))  # publish_best's first rename done, the second not
    recover_best(tmp_path / "r")
    assert read_best(tmp_path / "r") == before
    runs.verify(best)


@pytest.mark.parametrize("key, value", [("train.report_to", "tensorbored"), ("train.report_to", "wandb,nope"),
                                        ("train.report_to", ""), ("train.best_metric", "fid")])
def test_an_unknown_tracker_or_metric_is_a_config_error_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [f"{key}={value}"])


def test_known_trackers_are_accelerates():
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    from latentvae.config import TRACKERS
    assert set(TRACKERS) <= set(LOGGER_TYPE_TO_CLASS)
    assert load_config(None, ["train.report_to=tensorboard,wandb"]).train.report_to == "tensorboard,wandb"


def test_a_tracker_whose_package_is_missing_is_named_at_start(tmp_path):
    from accelerate.tracking import get_available_trackers

    from latentvae.errors import UserError
    from latentvae.train.report import tracker_list
    if "wandb" in {getattr(t, "value", str(t)) for t in get_available_trackers()}:
        pytest.skip("wandb is installed here")
    with pytest.raises(UserError, match="report_to=wandb: the wandb package is not installed"):
        tracker_list("wandb", tmp_path)


def test_report_to_none_trains_and_still_writes_eval_log_and_grids(tiny_config, tmp_path):
    cfg = tiny_config(**{"train.report_to": "none", "train.steps": "2", "train.save_every": "2",
                         "train.eval_every": "2"})
    trainer = _run(cfg, tmp_path / "r")
    assert trainer.acc.trackers == []
    assert not (tmp_path / "r" / "tb").exists()
    assert [r["step"] for r in validation.read_records(tmp_path / "r")] == [2]
    assert (tmp_path / "r" / "samples" / "recon-00000002.png").is_file()


def test_tensorboard_gets_the_validation_scalars_and_the_grid(tiny_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(**{"train.steps": "2", "train.save_every": "2", "train.image_every": "2",
                         "train.eval_every": "null"})  # null: at every checkpoint
    _run(cfg, tmp_path / "r")
    events = EventAccumulator(str(next((tmp_path / "r" / "tb").rglob("events.out.tfevents.*")).parent)).Reload()
    tags = events.Tags()
    assert {"val/psnr", "val/ssim", "val/lpips_alex"} <= set(tags["scalars"])
    assert "val/reconstruction" in tags["images"]


def test_validation_is_off_by_default(tiny_config, tmp_path):
    cfg = tiny_config(**{"train.steps": "2", "train.save_every": "2"})
    assert cfg.train.eval_every == 0
    _run(cfg, tmp_path / "r")
    assert not (tmp_path / "r" / validation.EVAL_LOG).exists()
    assert not (runs.checkpoints_root(tmp_path / "r") / "best").exists()


@pytest.fixture
def three_val_images(tmp_path):
    folder = tmp_path / "val"
    folder.mkdir()
    for i in range(3):
        make_photo(seed=10 + i).save(folder / f"v{i}.png")
    return folder


@pytest.mark.slow  # ~50 s on 2 cores: the Fréchet distance of 2048-d features is an eigendecomposition
def test_rfid_is_the_fid_of_fid_py_on_the_reconstructions(tiny_config, three_val_images):
    fid = pytest.importorskip("latentvae.fid", reason="latentvae/fid.py is not there yet")
    from conftest import SHARED
    weights = SHARED / "weights" / "inception" / fid.INCEPTION_FILE
    if not weights.is_file():
        pytest.skip(f"no offline Inception weights ({weights})")
    from latentvae.vae.model import build_vae
    torch.manual_seed(0)
    cfg = tiny_config(**{"data.val_source": str(three_val_images), "train.eval_fid_min": "3",
                         "train.inception_weights": str(weights), "train.best_metric": "rfid"})
    vae = build_vae(cfg.model).eval()
    images = _val_images(cfg)
    v = validation.Validator(cfg, images, "cpu")
    record = v.evaluate(vae, 1)
    assert math.isfinite(record["rfid"]) and record["rfid"] >= 0
    real, rec = fid.FeatureStats(), fid.FeatureStats()
    real.add(v.inception, images)
    rec.add(v.inception, validation.to_uint8(validation.reconstruct(vae, images, "cpu")))
    # FID of 3 images: singular covariances, so batch-size rounding shows in the 4th digit
    assert record["rfid"] == pytest.approx(fid.frechet_distance(real, rec), rel=1e-3)


def test_too_few_images_for_rfid_are_said_once_and_no_best_is_kept(tiny_config, three_val_images, tmp_path):
    from latentvae.vae.model import build_vae
    cfg = tiny_config(**{"data.val_source": str(three_val_images), "train.eval_fid_min": "4",
                         "train.best_metric": "rfid"})
    said = []
    v = validation.Validator(cfg, _val_images(cfg), "cpu", said.append)
    vae = build_vae(cfg.model).eval()
    assert "rfid" not in v.evaluate(vae, 1) and "rfid" not in v.evaluate(vae, 2)
    assert [s for s in said if "rFID" in s or "best_metric" in s] == [
        "validation: rFID not computed: 3 validation image(s), fewer than train.eval_fid_min=4",
        "validation: train.best_metric=rfid is not computed; no best checkpoint is kept"]


def test_missing_inception_weights_skip_rfid_with_one_line(tiny_config, three_val_images, tmp_path):
    from latentvae.vae.model import build_vae
    cfg = tiny_config(**{"data.val_source": str(three_val_images), "train.eval_fid_min": "3",
                         "train.inception_weights": str(tmp_path / "missing.safetensors")})
    said = []
    v = validation.Validator(cfg, _val_images(cfg), "cpu", said.append)
    vae = build_vae(cfg.model).eval()
    assert "rfid" not in v.evaluate(vae, 1) and "rfid" not in v.evaluate(vae, 2)
    assert len([s for s in said if "rFID not computed" in s]) == 1


def test_a_cut_last_line_does_not_break_reading_or_appending(tmp_path):
    (tmp_path / validation.EVAL_LOG).write_bytes(b'{"step": 1, "psnr": 20.0}\n{"step": 2, "ps')
    validation.append_record(tmp_path, {"step": 3, "psnr": 21.0})
    assert [r["step"] for r in validation.read_records(tmp_path)] == [1, 3]
    assert validation.prune_log(tmp_path, 2) == [{"step": 1, "psnr": 20.0}]
    assert json.loads((tmp_path / validation.EVAL_LOG).read_text()) == {"step": 1, "psnr": 20.0}
