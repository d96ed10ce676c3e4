"""Configs: presets, YAML + --set overrides, and errors that name the valid keys and choices."""
import pytest
import yaml

from latentvae.config import MODEL_PRESETS, Config, ConfigError, config_from_dict, load_config
from latentvae.train.losses import D_LOSSES, G_LOSSES, RECON_LOSSES
from latentvae.vae.model import build_vae, downsample_factor


def test_sd_and_flux_presets_match_the_real_architectures():
    sd = load_config(None, ["model.preset=sd"]).model
    assert sd.block_out_channels == (128, 256, 512, 512) and sd.layers_per_block == 2
    assert sd.latent_channels == 4 and sd.use_quant_conv
    flux = load_config(None, ["model.preset=flux"]).model
    assert flux.block_out_channels == (128, 256, 512, 512) and flux.latent_channels == 16
    assert not flux.use_quant_conv and not flux.use_post_quant_conv


def test_sd_preset_builds_the_stable_diffusion_vae_shape():
    vae = build_vae(load_config(None, ["model.preset=sd"]).model)
    assert downsample_factor(vae) == 8
    assert 83e6 < sum(p.numel() for p in vae.parameters()) < 84e6  # SD VAE: 83.65M parameters


def test_yaml_then_set_overrides_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"preset": "tiny", "latent_channels": 8}, "train": {"lr": 0.5}}))
    cfg = load_config(path, ["train.lr=1e-4", "train.betas=[0.9, 0.99]", "loss.lpips_dir=null"])
    assert cfg.model.block_out_channels == MODEL_PRESETS["tiny"]["block_out_channels"]
    assert cfg.model.latent_channels == 8  # YAML key beside the preset wins over the preset
    assert cfg.train.lr == 1e-4 and cfg.train.betas == (0.9, 0.99) and cfg.loss.lpips_dir is None


@pytest.mark.parametrize("override, needle", [
    ("train.lrr=1", "unknown key train.lrr; valid keys in 'train': seed, steps"),
    ("trian.lr=1", "unknown section 'trian'; valid sections: model, loss, data, train"),
    ("train.steps=ten", "train.steps: expected an integer, got 'ten'"),
    ("train.steps=1.5", "train.steps: expected an integer"),
    ("train.channels_last=maybe", "train.channels_last: expected true or false"),
    ("loss.recon=l3", "loss.recon: unknown choice 'l3'; valid choices: l1, mse"),
    ("loss.gan_loss=wgan", "valid choices: hinge, vanilla"),
    ("model.preset=sdxl-huge", "valid choices: sd, flux, small"),
    ("train.mixed_precision=fp8", "valid choices: auto, no, bf16, fp16"),
    ("data.resolution=100", "multiple of the downsampling factor 8"),
    ("train.ema_decay=1.5", "train.ema_decay must be in [0, 1)"),
    ("lr=1", "expected section.key=value"),
])
def test_bad_overrides_fail_at_once_naming_the_valid_ones(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_bad_yaml_key_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  resolutoin: 64\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key data\.resolutoin; valid keys in 'data'"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_string_choices_match_the_function_tables():
    import typing
    from latentvae.config import LossConfig
    hints = typing.get_type_hints(LossConfig)
    assert set(typing.get_args(hints["recon"])) == set(RECON_LOSSES)
    assert set(typing.get_args(hints["gan_loss"])) == set(D_LOSSES) == set(G_LOSSES)


def test_saved_config_round_trips():
    cfg = load_config(None, ["model.preset=flux", "train.lr=3e-5"])
    assert config_from_dict(cfg.to_dict()) == cfg
    assert Config() == config_from_dict(Config().to_dict())


def test_shipped_configs_load():
    from pathlib import Path
    for path in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        load_config(path)


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_every_preset_keeps_several_channels_per_norm_group(preset):
    m = load_config(None, [f"model.preset={preset}"]).model
    assert min(m.block_out_channels) // m.norm_num_groups >= 2


def test_one_channel_per_norm_group_is_refused_with_the_reason():
    # GroupNorm with one channel per group normalizes away each image's mean colour in the
    # decoder's last norm layer: the small preset trained that way could not reproduce red
    with pytest.raises(ConfigError, match="mean colour"):
        load_config(None, ["model.preset=small", "model.norm_num_groups=32"])


@pytest.mark.parametrize("order", [0, 1])
def test_overrides_apply_in_any_order_and_are_validated_once(order):
    sets = ["model.block_out_channels=[8,16]", "model.norm_num_groups=4"]
    m = load_config(None, sets[::-1] if order else sets).model
    assert m.block_out_channels == (8, 16) and m.norm_num_groups == 4


def test_a_preset_given_on_the_command_line_keeps_the_model_keys_of_the_yaml(tmp_path):
    """Documented order: defaults -> preset -> YAML -> --set, wherever the preset is named."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"preset": "small", "latent_channels": 16, "layers_per_block": 2}}))
    m = load_config(path, ["model.preset=tiny"]).model
    assert m.preset == "tiny" and m.block_out_channels == MODEL_PRESETS["tiny"]["block_out_channels"]
    assert m.latent_channels == 16 and m.layers_per_block == 2  # the YAML's keys survive the --set preset
    # and a --set key after a --set preset, or before it, wins over the preset either way
    for sets in (["model.preset=tiny", "model.latent_channels=8"], ["model.latent_channels=8", "model.preset=tiny"]):
        assert load_config(None, sets).model.latent_channels == 8


def test_keys_that_did_nothing_are_rejected_but_old_saved_configs_still_load():
    with pytest.raises(ConfigError, match="unknown key loss.logvar_clamp"):
        load_config(None, ["loss.logvar_clamp=10"])
    saved = Config().to_dict()
    saved["loss"]["logvar_clamp"] = 30.0  # written by latentvae 0.1 runs
    assert config_from_dict(saved) == Config()


@pytest.mark.parametrize("text, needle", [
    ("- model\n- train\n", "expected a mapping of sections (model, loss, data, train), got list"),
    ("just a string\n", "expected a mapping of sections"),
    ("model: small\n", "section 'model' must be a mapping of keys"),
    ("model: {preset: [unclosed\n", "not valid YAML"),
])
def test_a_yaml_file_that_is_not_a_mapping_of_sections_is_refused_naming_the_file(tmp_path, text, needle):
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(str(path)) and needle in str(e.value)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan", "inf"])
def test_non_finite_numbers_are_refused(value):
    with pytest.raises(ConfigError, match=f"--set train.lr={value}: train.lr: expected a finite number"):
        load_config(None, [f"train.lr={value}"])


# ----------------------------------------------------------------------------- the families
@pytest.mark.parametrize("preset, cls, channels", [("flux2-small", "AutoencoderKLFlux2", 32),
                                                    ("qwenimage-small", "AutoencoderKLQwenImage", 16),
                                                    ("wan-small", "AutoencoderKLWan", 16),
                                                    ("flux2-test", "AutoencoderKLFlux2", 4),
                                                    ("qwenimage-test", "AutoencoderKLQwenImage", 4)])
def test_a_family_preset_builds_its_diffusers_class(preset, cls, channels):
    from latentvae.vae.model import latent_channels
    cfg = load_config(None, [f"model.preset={preset}"])
    vae = build_vae(cfg.model)
    assert type(vae).__name__ == cls and latent_channels(vae) == channels
    assert downsample_factor(vae) == 2 ** (len(cfg.model.block_out_channels) - 1)


def test_the_checks_of_a_new_model_follow_its_family():
    # Qwen-Image and Wan have no GroupNorm: model.norm_num_groups does not apply to them
    load_config(None, ["model.preset=qwenimage-test", "model.norm_num_groups=8"])
    with pytest.raises(ConfigError, match="puts one channel per group"):
        load_config(None, ["model.preset=flux2-test", "model.norm_num_groups=8"])
    with pytest.raises(ConfigError, match=r"model.family=qwenimage builds every level as a multiple of the first \(8\)"):
        load_config(None, ["model.preset=qwenimage-test", "model.block_out_channels=[8,12]"])
    with pytest.raises(ConfigError, match="no gradient checkpointing for AutoencoderKLWan"):
        load_config(None, ["model.preset=wan-small", "model.gradient_checkpointing=true"])
    load_config(None, ["model.preset=flux2-test", "model.gradient_checkpointing=true"])


def test_with_init_from_the_architecture_keys_are_the_loaded_vaes():
    """The model keys and the factor they imply do not describe a VAE loaded with model.init_from (it is
    checked once loaded, train/build.py); the rest of the config still is checked at once."""
    cfg = load_config(None, ["model.init_from=some/vae", "model.norm_num_groups=32", "data.resolution=100"])
    assert cfg.data.resolution == 100
    with pytest.raises(ConfigError, match="train.lr must be positive"):
        load_config(None, ["model.init_from=some/vae", "train.lr=-1"])


def test_train_help_lists_each_preset_with_its_family():
    from latentvae.config import describe_keys
    text = describe_keys()
    for name, preset in MODEL_PRESETS.items():
        assert f"  {name}: {preset['family']} {list(preset['block_out_channels'])}" in text
