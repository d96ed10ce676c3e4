"""Each loss term trains what it should and nothing else; the adaptive GAN weight; LPIPS sanity."""
import pytest
import torch
from torchvision.transforms.functional import gaussian_blur

from latentvae.config import LossConfig, load_config
from latentvae.train.discriminator import PatchDiscriminator
from latentvae.train.losses import adaptive_weight, discriminator_loss, generator_loss, kl_to_standard_normal
from latentvae.vae.model import build_vae, last_decoder_layer
from latentvae.perceptual import LPIPSWeightsError, load_lpips, lpips_distance
from latentvae.train.step import Autoencoder, discriminator_step, generator_step


def _grad_groups(vae, disc=None):
    groups = {
        "encoder": list(vae.encoder.parameters()) + list(vae.quant_conv.parameters()),
        "decoder": list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters()),
    }
    if disc is not None:
        groups["disc"] = list(disc.parameters())
    return {k: sum(float(p.grad.abs().sum()) for p in ps if p.grad is not None) for k, ps in groups.items()}


def _setup(seed=0):
    torch.manual_seed(seed)
    vae = build_vae(load_config(None, ["model.preset=test"]).model)
    ae = Autoencoder(vae, stochastic=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    return vae, ae, x


def _only(**weights):
    base = dict(recon_weight=0.0, lpips_weight=0.0, kl_weight=0.0, gan_weight=1.0, adaptive_weight=False)
    base.update(weights)
    return LossConfig(**base)


@pytest.fixture(scope="module")
def lpips_alex():
    from conftest import LPIPS_DIR
    if LPIPS_DIR is None:
        pytest.skip("no offline LPIPS weights")
    return load_lpips("alex", LPIPS_DIR)


@pytest.mark.parametrize("term, expect", [
    ("recon", {"encoder", "decoder"}),
    ("lpips", {"encoder", "decoder"}),
    ("kl", {"encoder"}),
])
def test_each_term_sends_gradient_where_it_should(term, expect, lpips_alex):
    vae, ae, x = _setup()
    cfg = _only(**{"recon": dict(recon_weight=1.0), "lpips": dict(lpips_weight=1.0), "kl": dict(kl_weight=1.0)}[term])
    x_hat, mean, logvar, _ = ae(x)
    loss, _ = generator_loss(cfg, x, x_hat, mean, logvar, step=0, lpips=lpips_alex)
    loss.backward()
    got = _grad_groups(vae)
    assert {k for k, v in got.items() if v > 0} == expect, got
    assert all(p.grad is None for p in lpips_alex.parameters())  # LPIPS itself stays frozen


def test_gan_term_trains_the_vae_and_not_the_discriminator(image_folder, tmp_path):
    """Through the trainer's own generator step: the adversarial term sends gradient to the encoder
    and decoder and none to the discriminator, which is trainable again afterwards."""
    from conftest import fresh_trainer, tiny_overrides
    cfg = load_config(None, tiny_overrides(image_folder, **{"loss.gan": "true", "loss.gan_start": "0",
                                                            "loss.recon_weight": "0", "loss.lpips_weight": "0",
                                                            "loss.kl_weight": "0", "loss.adaptive_weight": "false"}))
    trainer = fresh_trainer(cfg, tmp_path / "r")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_hat, logs = generator_step(trainer.parts, x, step=0, gan=True)
    got = _grad_groups(trainer.vae, trainer.parts.disc_module())
    assert got["decoder"] > 0 and got["encoder"] > 0 and got["disc"] == 0, got
    assert "g_loss" in logs and not x_hat.requires_grad
    assert all(p.requires_grad for p in trainer.parts.disc_module().parameters())
    discriminator_step(trainer.parts, x, x_hat)
    assert _grad_groups(trainer.vae, trainer.parts.disc_module())["disc"] > 0


def test_discriminator_loss_sees_detached_reconstructions():
    vae, ae, x = _setup()
    disc = PatchDiscriminator(layers=2, channels=8)
    x_hat, _, _, _ = ae(x)
    d, logs = discriminator_loss(LossConfig(gan=True), disc, x, x_hat)
    d.backward()
    got = _grad_groups(vae, disc)
    assert got["disc"] > 0 and got["encoder"] == 0 and got["decoder"] == 0
    assert set(logs) == {"d_loss", "logits_real", "logits_fake"}


def test_adaptive_weight_matches_a_hand_computation():
    torch.manual_seed(0)
    w = torch.randn(3, 4, requires_grad=True)
    h = torch.randn(5, 4)
    out = h @ w.T  # (5, 3)
    rec = out.square().mean()
    g = -(out * torch.tensor([1.0, -2.0, 0.5])).mean()
    # by hand: d rec/dW = 2/15 * out^T h ; d g/dW = -c_i * sum_n h_n / 15
    rec_grad = 2.0 / 15 * out.detach().T @ h
    g_grad = -torch.tensor([1.0, -2.0, 0.5])[:, None] * h.sum(0)[None, :] / 15
    expected = rec_grad.norm() / (g_grad.norm() + 1e-4)
    got = adaptive_weight(rec, g, w)
    assert torch.allclose(got, expected, rtol=1e-5)
    assert not got.requires_grad


def test_adaptive_weight_at_the_decoder_last_layer_balances_the_terms():
    vae, ae, x = _setup()
    disc = PatchDiscriminator(layers=2, channels=8).requires_grad_(False)
    x_hat, mean, logvar, _ = ae(x)
    cfg = LossConfig(recon_weight=1.0, lpips_weight=0.0, kl_weight=0.0, gan_weight=0.5, adaptive_weight=True)
    _, logs = generator_loss(cfg, x, x_hat, mean, logvar, 0, disc=disc, last_layer=last_decoder_layer(vae))
    last = last_decoder_layer(vae)
    rec = (x_hat - x).abs().mean()
    g = -disc(x_hat).mean()
    gr = torch.autograd.grad(rec, last, retain_graph=True)[0]
    gg = torch.autograd.grad(g, last, retain_graph=True)[0]
    assert torch.allclose(logs["d_weight"], 0.5 * gr.norm() / (gg.norm() + 1e-4), rtol=1e-4)


def test_kl_is_zero_exactly_at_the_prior_and_positive_elsewhere():
    zeros = torch.zeros(1, 4, 2, 2)
    assert kl_to_standard_normal(zeros, zeros).abs().max() == 0
    assert (kl_to_standard_normal(zeros + 1, zeros) > 0).all()
    assert (kl_to_standard_normal(zeros, zeros - 2) > 0).all()


def test_autoencoder_mode_is_deterministic_and_vae_mode_samples():
    vae, _, x = _setup()
    ae, sampling = Autoencoder(vae, stochastic=False), Autoencoder(vae, stochastic=True)
    with torch.no_grad():
        assert torch.equal(ae(x)[0], ae(x)[0])
        assert not torch.equal(sampling(x)[0], sampling(x)[0])


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_is_zero_on_identity_and_grows_with_blur(net):
    from conftest import LPIPS_DIR, make_photo
    from latentvae.images import to_tensor
    if LPIPS_DIR is None:
        pytest.skip("no offline LPIPS weights")
    model = load_lpips(net, LPIPS_DIR)
    x = torch.stack([to_tensor(make_photo((64, 64), seed=s)) for s in range(2)])
    assert lpips_distance(model, x, x).abs().max() < 1e-6
    dists = [float(lpips_distance(model, x, gaussian_blur(x, 9, sigma)).mean()) for sigma in (0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(dists, dists[1:])), dists


def test_lpips_without_weights_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.delenv("LATENTVAE_LPIPS_DIR", raising=False)
    with pytest.raises(LPIPSWeightsError, match="vgg16_features.safetensors does not exist"):
        load_lpips("vgg", str(tmp_path))
    monkeypatch.setenv("LATENTVAE_LPIPS_DIR", str(tmp_path / "nope"))
    with pytest.raises(LPIPSWeightsError, match="LATENTVAE_LPIPS_DIR=.*is not a folder"):
        load_lpips("alex")
    # no folder at all: torchvision's loader is tried; offline it must fail loudly, never go random
    monkeypatch.delenv("LATENTVAE_LPIPS_DIR")
    import torchvision.models as tvm
    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(tvm, "alexnet", offline)
    monkeypatch.setattr("lpips.pretrained_networks.tv.alexnet", offline)
    with pytest.raises(LPIPSWeightsError, match="torchvision could not load"):
        load_lpips("alex")



def test_equivariance_transforms_are_seeded_and_fit_the_latent():
    from latentvae.train import equivariance

    names = ("rot90", "rot180", "rot270", "scale0.5", "scale0.75")
    drawn = [equivariance.draw(names, 0, k, (8, 8)).name for k in range(200)]
    assert drawn == [equivariance.draw(names, 0, k, (8, 8)).name for k in range(200)]  # a pure function
    assert set(drawn) == set(names)  # every transform is used
    assert drawn != [equivariance.draw(names, 1, k, (8, 8)).name for k in range(200)]  # the seed matters
    assert "scale0.75" not in {equivariance.draw(names, 0, k, (6, 6)).name for k in range(100)}  # 4.5 rows: never
    assert {equivariance.draw(names, 0, k, (4, 6)).name for k in range(100)} <= {"rot180", "scale0.5"}  # not square
    z, x = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 32, 32)
    for n in names:
        t = equivariance.draw((n,), 0, 0, (8, 8))
        assert t.image(x, (8, 8), 4).shape[-2:] == tuple(s * 4 for s in t.latent(z).shape[-2:])
    rot = equivariance.draw(("rot90",), 0, 0, (8, 8))
    assert torch.equal(rot.image(x, (8, 8), 4), torch.rot90(x, 1, dims=(-2, -1)))


def test_the_equivariance_term_is_added_to_the_loss(image_folder, tmp_path):
    """loss.equivariance_weight adds w x (the reconstruction objective between the transformed image and the
    decoded transformed latent) to the loss, through the trainer's own step."""
    from conftest import fresh_trainer, tiny_overrides
    from latentvae.config import ConfigError

    cfg = load_config(None, tiny_overrides(image_folder, **{"loss.equivariance_weight": "2.0", "loss.recon_weight": "1",
                                                            "loss.lpips_weight": "0", "loss.kl_weight": "0"}))
    trainer = fresh_trainer(cfg, tmp_path / "r")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    _, logs = generator_step(trainer.parts, x, step=0, gan=False, micro_step=3)
    assert float(logs["eq"]) > 0
    assert float(logs["loss"]) == pytest.approx(float(logs["rec"]) + 2.0 * float(logs["eq"]), rel=1e-5)
    _, plain = generator_step(fresh_trainer(load_config(None, tiny_overrides(image_folder, **{
        "loss.recon_weight": "1", "loss.lpips_weight": "0", "loss.kl_weight": "0"})), tmp_path / "p").parts, x, 0, False)
    assert "eq" not in plain  # off by default
    with pytest.raises(ConfigError, match="loss.equivariance_transforms: unknown.*valid: rot90"):
        load_config(None, tiny_overrides(image_folder, **{"loss.equivariance_transforms": "[shear]"}))


# ----------------------------------------------------------------------------- every family
def _own_api(vae, x):
    """The class's own encode/decode, called directly: (mean or latent, logvar or None, reconstruction), 4-D."""
    five_d = type(vae).__name__ in ("AutoencoderKLQwenImage", "AutoencoderKLWan")
    out = vae.encode(x[:, :, None] if five_d else x)
    dist = getattr(out, "latent_dist", None)
    mean = dist.mean if dist is not None else getattr(out, "latent", None)
    mean = out.latents if mean is None else mean
    x_hat = vae.decode(mean).sample
    logvar = None if dist is None else dist.logvar
    if five_d:
        mean, logvar, x_hat = mean[:, :, 0], logvar[:, :, 0], x_hat[:, :, 0]
    return mean, logvar, x_hat


@pytest.mark.parametrize("name", ["kl", "flux2", "qwenimage", "wan", "dc", "hunyuanimage", "tiny"])
def test_the_training_forward_of_every_family_is_its_class_own_encode_and_decode_in_4d(name):
    """Autoencoder (mode ae) runs each class as the class itself does, 5-D handling included; a class
    without a posterior gives logvar None, and the loss then has no KL term."""
    from families import images, tiny_vae

    vae = tiny_vae(name)
    x = images(2, 32)
    with torch.no_grad():
        x_hat, mean, logvar, _ = Autoencoder(vae, stochastic=True if name in ("dc", "tiny") else False)(x)
        ref_mean, ref_logvar, ref_x_hat = _own_api(vae, x)
    assert x_hat.dim() == mean.dim() == 4 and torch.equal(mean, ref_mean) and torch.equal(x_hat, ref_x_hat)
    assert (logvar is None) == (ref_logvar is None) and (logvar is None or torch.equal(logvar, ref_logvar))
    loss, logs = generator_loss(_only(recon_weight=1.0, kl_weight=1.0), x, x_hat, mean, logvar, step=0)
    assert ("kl_per_elem" in logs) == (logvar is not None)
    if logvar is None:
        assert torch.equal(loss, logs["rec"])  # reconstruction only
