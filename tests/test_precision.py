"""Every precision we offer, on any CPU: what `auto` means, bf16 against fp32, fp16 with the GAN.

`mixed_precision: auto` means bf16 on CPUs with bf16 kernels (AVX512-BF16/AMX) and fp32 elsewhere,
so numeric tests elsewhere in the suite pin the precision they assert about. Here the `auto`
decision is tested both ways by faking the CPU's answer, and the bf16 paths (training step,
encode, evaluate) run for real and are compared with fp32 within the tolerances stated in
README.md ("Precision"). They run on every CPU: where oneDNN has no bf16 kernels PyTorch takes
its slow reference path, which costs a tiny model only a second, and on a bf16-capable CPU the
same assertions cover the fast kernels. fp16 trains with our own GradScaler, on a CPU too.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from conftest import fresh_trainer, make_photo, save_tiny_vae, tiny_overrides
from latentvae import precision
from latentvae.config import load_config
from latentvae.images import to_tensor
from latentvae.precision import cpu_capability, resolve_channels_last, resolve_mixed_precision
from latentvae.train.step import train_step

# stated tolerances (README.md, "Precision"): bf16 keeps 8 significant bits (relative rounding 2^-9)
BF16_STEP_RTOL = 0.05  # training loss and gradient norm of one step, relative to fp32
BF16_LATENT_ATOL = 0.05  # encoded latents: max |bf16 - fp32| / max |fp32|
BF16_RECON_PSNR = 35.0  # dB between the fp32 and the bf16 reconstruction of the same image
FP16_NORM_RTOL = 0.02  # gradient norms of one fp16 step (GAN on) relative to fp32


def _cfg(image_folder, mp, **extra):
    base = {"train.mixed_precision": mp, "loss.lpips_weight": "0", "train.ema_decay": "0", "train.steps": "1"}
    return load_config(None, tiny_overrides(image_folder, **{**base, **extra}))


def _batch(n=2, size=32):
    return torch.stack([to_tensor(make_photo((size, size), seed=10 + i)) for i in range(n)])


def test_the_cpu_capability_is_reported():
    assert cpu_capability() in {"DEFAULT", "AVX2", "AVX512", "ZVECTOR", "VSX", "NO AVX"} or cpu_capability()


@pytest.mark.parametrize("fast_bf16", [False, True], ids=["avx2-like", "amx-like"])
def test_auto_means_bf16_exactly_where_the_cpu_has_bf16_kernels(monkeypatch, fast_bf16, image_folder, tmp_path):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast_bf16)
    want = "bf16" if fast_bf16 else "no"
    assert resolve_mixed_precision("auto", "cpu") == want
    for explicit in ("no", "bf16", "fp16"):
        assert resolve_mixed_precision(explicit, "cpu") == explicit  # an explicit choice is never second-guessed
    assert resolve_channels_last(None, "cpu") is fast_bf16
    assert resolve_channels_last(None, "cpu", inference=True) is True
    assert resolve_channels_last(False, "cpu") is False
    # the jobs take the decision from there: training, encoding and evaluation alike
    trainer = fresh_trainer(_cfg(image_folder, "auto"), tmp_path / "run")
    assert trainer.parts.precision == want and trainer.parts.channels_last is fast_bf16
    assert not trainer.parts.scaler.is_enabled()

    from latentvae.cache import encode
    from latentvae.options import EncodeOptions
    vae = save_tiny_vae(tmp_path / "vae")
    m = encode(EncodeOptions(vae=str(vae), data=str(image_folder), out=str(tmp_path / "cache"), resolution=32,
                            num_workers=0, progress=False))
    assert m["this_run"]["mixed_precision"] == want


def test_auto_on_cuda_follows_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_mixed_precision("auto", "cuda") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_mixed_precision("auto", "cuda") == "no"
    assert resolve_channels_last(None, "cuda") is True


def _one_step(image_folder, out, mp, **extra):
    trainer = fresh_trainer(_cfg(image_folder, mp, **extra), out)
    logs = train_step(trainer.parts, trainer.state, _batch())
    return trainer, {k: float(v) for k, v in logs.items()}


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def test_a_bf16_training_step_matches_fp32(image_folder, tmp_path):
    _, ref = _one_step(image_folder, tmp_path / "fp32", "no")
    trainer, got = _one_step(image_folder, tmp_path / "bf16", "bf16")
    assert trainer.parts.precision == "bf16"
    for key in ("loss", "rec", "grad_norm"):
        assert _rel(got[key], ref[key]) < BF16_STEP_RTOL, (key, got[key], ref[key], cpu_capability())


def test_fp16_with_the_gan_unscales_each_optimizer_once(image_folder, tmp_path):
    """The discriminator's gradient norm under fp16 (scaled loss) equals fp32's: its gradients
    are unscaled exactly once, and the scaler is updated once per step, not once per optimizer."""
    # a first step at 2^16 overflows this tiny random discriminator (the scaler then skips it, as it
    # should); start lower so that the step can be compared with fp32
    gan = {"loss.gan": "true", "loss.gan_start": "0", "train.lr": "1e-4", "train.fp16_init_scale": "1024"}
    ref_trainer, ref = _one_step(image_folder, tmp_path / "fp32", "no", **gan)
    trainer, got = _one_step(image_folder, tmp_path / "fp16", "fp16", **gan)
    assert trainer.parts.scaler.is_enabled() and got["grad_scale"] == 1024.0
    assert trainer.parts.scaler.state_dict()["_growth_tracker"] == 1  # one update for the step, not two
    for key in ("grad_norm", "d_grad_norm"):
        assert _rel(got[key], ref[key]) < FP16_NORM_RTOL, (key, got[key], ref[key])
    assert trainer.state.step == 1
    # both optimizers stepped, and the discriminator's update points where fp32's does (Adam's first
    # step is about lr * sign(gradient), so near-zero gradient elements may differ; compare directions)
    init = fresh_trainer(_cfg(image_folder, "no", **gan), tmp_path / "init").parts.disc_module()
    weights = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])
    step32 = weights(ref_trainer.parts.disc_module()) - weights(init)
    step16 = weights(trainer.parts.disc_module()) - weights(init)
    assert step16.norm() > 0.5 * step32.norm() > 0
    assert torch.nn.functional.cosine_similarity(step16, step32, dim=0) > 0.9


def test_bf16_encoding_matches_fp32(image_folder, tmp_path):
    from latentvae.cache import encode, from_storage
    from latentvae.options import EncodeOptions
    import datasets

    vae = save_tiny_vae(tmp_path / "vae")
    caches = {}
    for mp in ("no", "bf16"):
        out = tmp_path / f"cache-{mp}"
        m = encode(EncodeOptions(vae=str(vae), data=str(image_folder), out=str(out), resolution=32, dtype="fp32",
                                mixed_precision=mp, num_workers=0, progress=False))
        assert m["this_run"]["mixed_precision"] == mp
        ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / f"hf-{mp}"))
        caches[mp] = {r["source_index"]: from_storage(r["latent_mean"], "fp32") for r in ds}
    assert caches["no"].keys() == caches["bf16"].keys() and len(caches["no"]) == 5
    for i, z in caches["no"].items():
        err = float((caches["bf16"][i] - z).abs().max() / z.abs().max())
        assert err < BF16_LATENT_ATOL, (i, err, cpu_capability())


def test_bf16_evaluation_matches_fp32():
    from latentvae.evaluate import hwc_uint8, reconstruct
    from latentvae.metrics import psnr

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4,
                        layers_per_block=1).eval()
    x = _batch(1, 48)
    fp32 = reconstruct(vae, x, (48, 48), None)
    bf16 = reconstruct(vae, x, (48, 48), torch.bfloat16)
    assert bf16.x_hat.dtype == torch.float32 and bf16.x_hat.shape == fp32.x_hat.shape
    assert psnr(hwc_uint8(fp32.x_hat), hwc_uint8(bf16.x_hat)) > BF16_RECON_PSNR, cpu_capability()
    assert not torch.equal(fp32.x_hat, bf16.x_hat)  # bf16 really ran
    assert np.isfinite(bf16.mean.numpy()).all()
