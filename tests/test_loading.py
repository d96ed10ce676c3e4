"""Every door a user has for naming a VAE (latentvae/loading.py), built offline from one tiny AutoencoderKL:
a diffusers folder, a pipeline folder, a hub cache laid out as huggingface_hub lays it out (plain and pipeline
repos, HF_HUB_OFFLINE=1), variants, an LDM single file, a latentvae run. The same weights must come out of
every door; pickles are refused unless asked for; the spec's options are checked."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from conftest import make_photo
from helpers_ckpt import make_run, tiny_config, to_ldm_state_dict
from latentvae import runs
from latentvae.vae.loading import NotAnAutoencoder, load_autoencoder, load_vae, parse_spec
from latentvae.vae.spec import SPEC_OPTIONS
from latentvae.vae.model import build_vae, encode_moments

REPO = Path(__file__).resolve().parents[1]
SHA = "0123456789abcdef0123456789abcdef01234567"  # the one commit of every faked hub repo


def mean(vae) -> torch.Tensor:
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        return encode_moments(vae, x)[0]


def half_of(vae):
    """The fp16 copy that `save_pretrained(variant="fp16")` stores."""
    return copy.deepcopy(vae).half()


def hub_repo(hub: Path, repo_id: str, files: dict[str, Path], commit: str = SHA) -> Path:
    """A repo in the hub cache as huggingface_hub writes it: blobs/<hash>, snapshots/<commit>/<path> links
    to the blobs, refs/main holding the commit."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    for rel, src in files.items():
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def files_of(folder: Path, under: str = "") -> dict[str, Path]:
    return {f"{under}{p.relative_to(folder).as_posix()}": p for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    vae = build_vae(tiny_config().model).eval()  # (8, 16) blocks, 4 groups, 4 latent channels, 1 layer per block
    with torch.no_grad():  # off the default init, so that fp16 rounding shows and GroupNorm weights are not all 1
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae


@pytest.fixture(scope="module")
def root(ref, tmp_path_factory) -> Path:
    """Every door, written once: ROOT/{folder, pipe, fp16only, both, sd-vae.safetensors, run, bin, hf/hub/...}."""
    root = tmp_path_factory.mktemp("doors")
    ref.save_pretrained(root / "folder")
    half_of(ref).save_pretrained(root / "fp16only", variant="fp16")
    ref.save_pretrained(root / "both")
    half_of(ref).save_pretrained(root / "both", variant="fp16")
    ref.save_pretrained(root / "bin", safe_serialization=False)
    save_file(to_ldm_state_dict(ref), root / "sd-vae.safetensors")
    # a pipeline folder: model_index.json, vae/ (plain + fp16), and a unet/ that must never be read
    pipe = root / "pipe"
    ref.save_pretrained(pipe / "vae")
    half_of(ref).save_pretrained(pipe / "vae", variant="fp16")
    (pipe / "unet").mkdir()
    (pipe / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    (pipe / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights: never read")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "_diffusers_version": "0.42.1",
                                                       "vae": ["diffusers", "AutoencoderKL"],
                                                       "unet": ["diffusers", "UNet2DConditionModel"]}))
    # a latentvae run whose EMA weights are the reference (make_run's config is the same `test` preset)
    run = make_run(root / "run")
    runs.save_tensors(runs.find_checkpoint(run) / "ema.safetensors", ref.state_dict())
    # the hub cache: a VAE repo (plain + fp16 + an LDM file), a pipeline repo, a repo with only a .bin
    hub = root / "hf" / "hub"
    hub_repo(hub, "org/tiny-vae", {**files_of(root / "both"), "sd-vae.safetensors": root / "sd-vae.safetensors"})
    hub_repo(hub, "org/tiny-pipe", files_of(pipe))
    hub_repo(hub, "org/tiny-bin", files_of(root / "bin"))
    return root


@pytest.fixture
def offline_hub(root, monkeypatch):
    """HF_HOME = ROOT/hf and HF_HUB_OFFLINE=1, for this process: huggingface_hub read its constants at import."""
    from huggingface_hub import constants

    home = root / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home


def test_the_faked_cache_is_what_huggingface_hub_finds_offline(root, offline_hub):
    from huggingface_hub import snapshot_download

    snapshot = offline_hub / "hub" / "models--org--tiny-pipe" / "snapshots" / SHA
    assert Path(snapshot_download("org/tiny-pipe")) == snapshot
    assert (Path(snapshot_download("org/tiny-vae")) / "diffusion_pytorch_model.fp16.safetensors").is_symlink()


# door, spec (ROOT = the fixture's folder), what the record's origin must say
FP32_DOORS = [
    ("folder", "ROOT/folder", dict(kind="folder", variant=None)),
    ("folder-subfolder", "ROOT[subfolder=folder]", dict(kind="folder", subfolder="folder")),
    ("plain-wins", "ROOT/both", dict(kind="folder", variant=None)),
    ("pipeline", "ROOT/pipe", dict(kind="pipeline", subfolder="vae", variant=None)),
    ("pipeline-subfolder", "ROOT/pipe[subfolder=vae]", dict(kind="pipeline", subfolder="vae")),
    ("single-file", "ROOT/sd-vae.safetensors[norm_num_groups=4]", dict(kind="single-file")),
    ("folder-file", "ROOT[file=sd-vae.safetensors,norm_num_groups=4]", dict(kind="single-file")),
    ("run", "ROOT/run", dict(kind="run", weights="ema")),
    ("hub", "org/tiny-vae", dict(kind="hub", repo_id="org/tiny-vae", revision=SHA, variant=None, subfolder=None)),
    ("hub-revision", f"org/tiny-vae[revision={SHA}]", dict(kind="hub", revision=SHA)),
    ("hub-pipeline", "org/tiny-pipe", dict(kind="hub", repo_id="org/tiny-pipe", subfolder="vae", variant=None)),
    ("hub-file", "org/tiny-vae[file=sd-vae.safetensors,norm_num_groups=4]", dict(kind="hub", revision=SHA)),
]
FP16_DOORS = [
    ("variant-only", "ROOT/fp16only", dict(kind="folder", variant="fp16")),
    ("variant-chosen", "ROOT/both[variant=fp16]", dict(kind="folder", variant="fp16")),
    ("pipeline-variant", "ROOT/pipe[variant=fp16]", dict(kind="pipeline", variant="fp16")),
    ("hub-variant", "org/tiny-vae[variant=fp16]", dict(kind="hub", variant="fp16", revision=SHA)),
    ("hub-pipeline-variant", "org/tiny-pipe[ variant = fp16 ]", dict(kind="hub", variant="fp16", subfolder="vae")),
]


def _check_source(lv, spec: str, expected: dict) -> None:
    source = lv.origin
    assert source["spec"] == spec and Path(source["path"]).exists()
    assert {k: source[k] for k in expected} == expected
    if source["kind"] == "hub":
        assert f"snapshots{os.sep}{SHA}" in source["path"]  # read from the cache, not anywhere else


@pytest.mark.parametrize("door, spec, expected", FP32_DOORS, ids=[d[0] for d in FP32_DOORS])
def test_every_fp32_door_gives_the_same_weights(ref, root, offline_hub, door, spec, expected):
    spec = spec.replace("ROOT", str(root))
    lv = load_vae(spec)
    vae = lv.module
    assert isinstance(vae, AutoencoderKL) and not vae.training and lv.family.name == "kl"
    assert next(vae.parameters()).dtype == torch.float32
    assert torch.equal(mean(vae), mean(ref))
    _check_source(lv, spec, expected)


@pytest.mark.parametrize("door, spec, expected", FP16_DOORS, ids=[d[0] for d in FP16_DOORS])
def test_every_fp16_variant_door_gives_the_fp16_weights_as_fp32(ref, root, offline_hub, door, spec, expected):
    spec = spec.replace("ROOT", str(root))
    lv = load_vae(spec)
    vae = lv.module
    assert next(vae.parameters()).dtype == torch.float32  # upcast: what every job (and training) runs
    assert torch.equal(mean(vae), mean(half_of(ref).float()))  # exactly the stored fp16 weights
    assert torch.allclose(mean(vae), mean(ref), atol=2e-2) and not torch.equal(mean(vae), mean(ref))
    _check_source(lv, spec, expected)


def test_training_starts_from_a_hub_variant_in_fp32(ref, offline_hub):
    from latentvae.train.loop import initial_vae

    vae = initial_vae(replace(tiny_config().model, init_from="org/tiny-pipe[variant=fp16]"))
    assert vae.training and all(p.dtype == torch.float32 for p in vae.parameters())
    assert torch.equal(mean(vae.eval()), mean(half_of(ref).float()))


def test_run_weights_are_an_option_too(root):
    raw = load_autoencoder(f"{root}/run[weights=raw]")
    assert load_vae(f"{root}/run[weights=raw]").origin["weights"] == "raw"
    assert torch.equal(mean(raw), mean(load_autoencoder(root / "run", weights="raw")))
    assert not torch.equal(mean(raw), mean(load_autoencoder(root / "run")))
    assert load_vae(f"{root}/run[weights=raw]", weights="raw").origin["weights"] == "raw"
    with pytest.raises(NotAnAutoencoder, match=r"weights=raw contradicts weights='ema'"):
        load_autoencoder(f"{root}/run[weights=raw]", weights="ema")


# ----------------------------------------------------------------------------- hub ids and local paths
def test_an_uncached_hub_id_offline_fails_at_once_naming_the_id(offline_hub):
    start = time.monotonic()
    with pytest.raises(NotAnAutoencoder) as e:
        load_autoencoder("someone/not-cached")
    assert time.monotonic() - start < 5
    text = str(e.value)
    assert text.startswith("someone/not-cached: no local file or folder someone/not-cached, so it was tried as a "
                           "Hugging Face hub id: someone/not-cached is not in the hub cache")
    assert "HF_HUB_OFFLINE=1" in text and "\n" not in text
    with pytest.raises(NotAnAutoencoder, match=r"org/tiny-vae at revision v9 is not in the hub cache"):
        load_autoencoder("org/tiny-vae[revision=v9]")


def test_a_local_path_wins_over_a_hub_id_and_a_missing_path_says_what_was_tried(ref, root, offline_hub,
                                                                               tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    half_of(ref).save_pretrained(tmp_path / "org" / "tiny-vae", variant="fp16")  # a local folder of that name
    assert load_vae("org/tiny-vae").origin["kind"] == "folder"
    assert load_vae("./org/tiny-vae").origin["kind"] == "folder"
    with pytest.raises(NotAnAutoencoder, match=r"^runs/missing: no local file or folder runs/missing, so it was "
                                               r"tried as a Hugging Face hub id"):
        load_autoencoder("runs/missing")
    with pytest.raises(NotAnAutoencoder, match=r"^runs/x/missing does not exist \(expected .*hub id org/name"):
        load_autoencoder("runs/x/missing")
    bracketed = tmp_path / "vae[1]"  # an existing path with brackets in its name is a path, not options
    ref.save_pretrained(bracketed)
    assert load_vae(str(bracketed)).origin["kind"] == "folder"


def test_a_hub_repo_without_what_was_asked_says_so(root, offline_hub):
    hub_repo(offline_hub / "hub", "org/readme-only", {"README.md": root / "pipe" / "model_index.json"})
    with pytest.raises(NotAnAutoencoder, match=r"neither config.json .* nor model_index.json .*\[file=NAME\]"):
        load_autoencoder("org/readme-only")
    with pytest.raises(NotAnAutoencoder, match=r"commit 0123456789ab\): no file ldm/vae.safetensors in the hub cache "
                                               r"\(the hub did not answer: HF_HUB_OFFLINE=1"):
        load_autoencoder("org/tiny-vae[subfolder=ldm,file=vae.safetensors]")
    with pytest.raises(NotAnAutoencoder, match=r"no unet/config.json in the hub cache"):
        load_autoencoder("org/tiny-vae[subfolder=unet]")


def test_online_only_the_vae_config_and_the_chosen_weights_are_fetched(ref, root, tmp_path, monkeypatch):
    """The hub as huggingface_hub answers online (faked: snapshot_download copies what allow_patterns
    select from a pipeline repo, and caches its listing): the UNet is never asked for, one weight file is."""
    import fnmatch

    import huggingface_hub
    from huggingface_hub import constants

    remote = files_of(root / "pipe")
    snapshot, asked = tmp_path / "snapshots" / SHA, []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False, **_):
        assert repo_id == "org/remote-pipe" and revision in (None, "main", SHA) and not local_files_only
        asked.append(sorted(allow_patterns))
        for rel, src in remote.items():
            if any(fnmatch.fnmatch(rel, pat) for pat in allow_patterns):
                (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
                (snapshot / rel).write_bytes(src.read_bytes())
        return str(snapshot)

    class RepoFile:
        def __init__(self, path):
            self.path = path

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "get_cached_repo_tree",
                        lambda repo_id, revision=None: [RepoFile(p) for p in remote], raising=False)
    lv = load_vae("org/remote-pipe[variant=fp16]")
    vae = lv.module
    assert asked == [["config.json", "model_index.json", "vae/config.json"],
                     ["vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors"]]
    assert torch.equal(mean(vae), mean(half_of(ref).float())) and lv.origin["variant"] == "fp16"
    asked.clear()
    assert torch.equal(mean(load_autoencoder("org/remote-pipe")), mean(ref))  # the plain file is listed: it wins
    assert asked[1] == ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    assert not (snapshot / "unet").exists()


# ----------------------------------------------------------------------------- pickles
def test_torch_weights_are_refused_with_the_conversion_route_unless_allowed(ref, root, offline_hub, tmp_path):
    for spec in (str(root / "bin"), "org/tiny-bin"):
        with pytest.raises(NotAnAutoencoder, match=r"diffusion_pytorch_model.bin.*only safetensors are read by "
                                                   r"default.*allow_pickle=yes"):
            load_autoencoder(spec)
        vae = load_autoencoder(f"{spec}[allow_pickle=yes]")
        assert torch.equal(mean(vae), mean(ref))
    # a single file: refused; the one-liner in the message converts it; allowed with the option
    torch.save(to_ldm_state_dict(ref), tmp_path / "sd-vae.ckpt")
    with pytest.raises(NotAnAutoencoder, match=r"sd-vae.ckpt: a pickle-based torch file") as e:
        load_autoencoder(tmp_path / "sd-vae.ckpt")
    code = re.search(r'python -c "([^"]+)"', str(e.value)).group(1)
    exec(code, {})  # the route the message gives, as given
    assert torch.equal(mean(load_autoencoder(f"{tmp_path}/sd-vae.safetensors[norm_num_groups=4]")), mean(ref))
    allowed = load_autoencoder(f"{tmp_path}/sd-vae.ckpt[allow_pickle=yes,norm_num_groups=4]")
    assert torch.equal(mean(allowed), mean(ref))


# ----------------------------------------------------------------------------- the spec's options
def test_bad_options_name_the_key_and_the_valid_ones(root):
    valid = ", ".join(SPEC_OPTIONS)
    with pytest.raises(NotAnAutoencoder, match=rf"unknown option 'colour'; valid options: {valid}$"):
        load_autoencoder(f"{root}/folder[colour=red]")
    with pytest.raises(NotAnAutoencoder, match=r"option variant needs a value"):
        load_autoencoder(f"{root}/folder[variant]")
    with pytest.raises(NotAnAutoencoder, match=r"option weights=best: expected ema or raw"):
        load_autoencoder(f"{root}/run[weights=best]")
    with pytest.raises(NotAnAutoencoder, match=r"option subfolder=\.\./x: expected a relative path"):
        load_autoencoder(f"{root}[subfolder=../x]")
    with pytest.raises(NotAnAutoencoder, match=r"option variant given twice"):
        load_autoencoder(f"{root}/both[variant=fp16,variant=fp16]")
    with pytest.raises(NotAnAutoencoder, match=r"option revision does not apply to a folder; options for it: "
                                               r"subfolder, variant, file, allow_pickle"):
        load_autoencoder(f"{root}/folder[revision=main]")
    with pytest.raises(NotAnAutoencoder, match=r"option variant does not apply to a latentvae training run"):
        load_autoencoder(f"{root}/run[variant=fp16]")
    with pytest.raises(NotAnAutoencoder, match=r"does not apply to a TAESD reference; options for it: none"):
        load_autoencoder("taesd:sd[variant=fp16]")
    with pytest.raises(NotAnAutoencoder, match=r"no variant 'bf16' .*found safetensors: plain, fp16"):
        load_autoencoder(f"{root}/both[variant=bf16]")
    assert parse_spec("a/b[ subfolder = vae/ , variant=fp16 ]").options == {"subfolder": "vae", "variant": "fp16"}


def test_several_variants_without_a_plain_file_ask_for_one(ref, tmp_path):
    half_of(ref).save_pretrained(tmp_path / "v", variant="fp16")
    copy.deepcopy(ref).to(torch.bfloat16).save_pretrained(tmp_path / "v", variant="bf16")
    with pytest.raises(NotAnAutoencoder, match=r"several weight variants and no plain file \(bf16, fp16\); "
                                               r"choose one with the option \[variant=NAME\]"):
        load_autoencoder(tmp_path / "v")
    assert load_vae(f"{tmp_path}/v[variant=bf16]").origin["variant"] == "bf16"


# ----------------------------------------------------------------------------- as a user runs it
def test_encode_with_a_hub_id_from_the_offline_cache(root, tmp_path):
    """`latentvae encode --vae org/tiny-pipe[variant=fp16]` with HF_HOME and HF_HUB_OFFLINE=1 set in the
    environment, as a user would; the manifest records where the VAE came from."""
    data = tmp_path / "images"
    data.mkdir()
    for i in range(2):
        make_photo(seed=i).save(data / f"p{i}.png")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(root / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    def encode(vae: str, out: str):
        cmd = [sys.executable, "-m", "latentvae", "encode", "--vae", vae, "--data", str(data), "--out",
               str(tmp_path / out), "--resolution", "32", "--num-workers", "0", "--no-progress",
               "--mixed-precision", "no"]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)

    proc = encode("org/tiny-pipe[variant=fp16]", "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    source = manifest["vae"]["source"]  # manifest.vae_identity records where the VAE came from
    assert source["repo_id"] == "org/tiny-pipe" and source["revision"] == SHA and source["variant"] == "fp16"
    assert source["kind"] == "hub" and source["subfolder"] == "vae"
    # an id that is not cached: one line, exit status 2, naming the id and what was tried
    proc = encode("org/absent", "c2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert ("--vae org/absent: no local file or folder org/absent, so it was tried as a Hugging Face hub id: "
            "org/absent is not in the hub cache") in proc.stderr
