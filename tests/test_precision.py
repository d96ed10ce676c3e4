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
BF16_LATENT_ATOL = 0.05  # encoded latents: max |bf16 - fp32| / max |fp32|; autocast or bf16 weights
FP16_LATENT_ATOL = 0.01  # the same with fp16 weights (VAEs without force_upcast only)
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
    # where bf16 is fast, encoding runs its weights in bf16 (no autocast); elsewhere fp32
    assert m["this_run"]["weights_dtype"] == ("bf16" if fast_bf16 else "fp32") and not m["this_run"]["autocast"]


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


def _encoded(tmp_path, vae, data, name, **opts):
    """(manifest, {source_index: fp32 latent mean}) of one encode run into tmp_path / name."""
    from latentvae.cache import encode, from_storage
    from latentvae.options import EncodeOptions
    import datasets

    out = tmp_path / name
    m = encode(EncodeOptions(vae=str(vae), data=str(data), out=str(out), resolution=32, dtype="fp32",
                             num_workers=0, progress=False, **opts))
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / f"hf-{name}"))
    return m, {r["source_index"]: from_storage(r["latent_mean"], "fp32") for r in ds}


def _save_vae(path, force_upcast):
    """conftest's tiny VAE with force_upcast set (diffusers' default: True, the SD VAEs' setting)."""
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4,
                  layers_per_block=1, force_upcast=force_upcast).save_pretrained(path)
    return path


@pytest.mark.parametrize("mp, weights, autocast, tol", [
    ("bf16", "fp32", True, BF16_LATENT_ATOL),  # fp32 weights under bf16 autocast
    ("no", "bf16", False, BF16_LATENT_ATOL),  # pure bf16: weights cast, no autocast
    ("no", "fp16", False, FP16_LATENT_ATOL),  # pure fp16, on a VAE without force_upcast
], ids=["bf16-autocast", "bf16-weights", "fp16-weights"])
def test_half_precision_encoding_matches_fp32(image_folder, tmp_path, mp, weights, autocast, tol):
    vae = _save_vae(tmp_path / "vae", force_upcast=False)
    _, ref = _encoded(tmp_path, vae, image_folder, "fp32", mixed_precision="no")
    m, got = _encoded(tmp_path, vae, image_folder, "half", mixed_precision=mp, weights_dtype=weights, verify=True)
    run = m["this_run"]
    assert (run["mixed_precision"], run["weights_dtype"], run["autocast"]) == (mp, weights, autocast)
    assert ref.keys() == got.keys() and len(ref) == 5
    for i, z in ref.items():
        err = float((got[i] - z).abs().max() / z.abs().max())
        assert 0 < err < tol, (i, err, cpu_capability())  # > 0: the half precision really ran
    # the VAE itself stayed fp32: same weights hash (the cache's settings), and --verify decoded with it
    assert m["vae"]["weights_sha256"] == _encoded(tmp_path, vae, image_folder, "again")[0]["vae"]["weights_sha256"]
    assert m["verify"]["mean_psnr"] > 0


def test_weights_dtype_auto_and_diffusers_upcast_rule(image_folder, tmp_path):
    from latentvae.errors import BadInputError
    from latentvae.precision import resolve_weights_dtype

    assert resolve_weights_dtype("auto", "bf16", force_upcast=True) == "bf16"  # bf16 has fp32's range
    assert resolve_weights_dtype("auto", "fp16", force_upcast=False) == "fp16"
    assert resolve_weights_dtype("auto", "fp16", force_upcast=True) == "fp32"  # then fp32 weights, fp16 autocast
    assert resolve_weights_dtype("auto", "no", force_upcast=False) == "fp32"
    assert resolve_weights_dtype("fp32", "bf16", force_upcast=False) == "fp32"
    vae = _save_vae(tmp_path / "vae", force_upcast=True)
    m, _ = _encoded(tmp_path, vae, image_folder, "auto16", mixed_precision="fp16")
    assert (m["this_run"]["weights_dtype"], m["this_run"]["autocast"]) == ("fp32", True)
    with pytest.raises(BadInputError, match="force_upcast"):
        _encoded(tmp_path, vae, image_folder, "fp16", weights_dtype="fp16")
    assert not (tmp_path / "fp16").exists()


def _tiny_vae():
    """The seeded two-level test AutoencoderKL (conftest.save_tiny_vae's), in memory, eval mode."""
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4,
                         layers_per_block=1).eval()


def test_inference_encoder_keeps_the_moments_in_fp32():
    """bf16 weights in the encoder, an fp32 quant_conv, fp32 moments; the VAE it was made from untouched."""
    from latentvae.vae.model import InferenceEncoder, encode_moments

    vae = _tiny_vae()
    x = _batch(2, 32)
    with torch.inference_mode():
        ref_mean, ref_logvar = encode_moments(vae, x)
        assert all(torch.equal(a, b) for a, b in zip(InferenceEncoder(vae)(x), (ref_mean, ref_logvar)))
        enc = InferenceEncoder(vae, torch.bfloat16)
        mean, logvar = enc(x)
    assert enc.encoder.conv_in.weight.dtype == torch.bfloat16 and enc.quant_conv.weight.dtype == torch.float32
    assert vae.encoder.conv_in.weight.dtype == torch.float32  # a copy was cast, not the VAE
    assert mean.dtype == logvar.dtype == torch.float32
    assert float((mean - ref_mean).abs().max() / ref_mean.abs().max()) < BF16_LATENT_ATOL


def test_bf16_evaluation_matches_fp32():
    from latentvae.evaluate import hwc_uint8, reconstruct
    from latentvae.metrics import psnr

    vae = _tiny_vae()
    x = _batch(1, 48)
    fp32 = reconstruct(vae, x, (48, 48), None)
    bf16 = reconstruct(vae, x, (48, 48), torch.bfloat16)
    assert bf16.x_hat.dtype == torch.float32 and bf16.x_hat.shape == fp32.x_hat.shape
    assert psnr(hwc_uint8(fp32.x_hat), hwc_uint8(bf16.x_hat)) > BF16_RECON_PSNR, cpu_capability()
    assert not torch.equal(fp32.x_hat, bf16.x_hat)  # bf16 really ran
    assert np.isfinite(bf16.mean.numpy()).all()
