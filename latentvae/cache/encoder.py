"""The encoder of `latentvae encode`: the VAE loaded and checked, and batches of pixels turned into latent columns.

    lv, channels_last = prepare_vae("vae/", device, None)          # vae/loaded.py's record, on the device
    check_vae_fits(opts, lv)                                       # --resolution, --store against the family
    encoder, weights = inference_encoder(opts, lv, "bf16")         # vae/model.InferenceEncoder, --compile
    columns = encode_rows(encoder, rows, "moments", 0, device, torch.bfloat16, True)
    latents = OomBackoff(64, device)(encode, rows)                 # halves the batch on out-of-memory

What is stored is the VAE's own latent, 4-D (Qwen-Image and Wan's T=1 dropped; a video VAE's clips 5-D), never
patchified nor scaled: `latent_mean` (the posterior mean, or a deterministic family's latent), `latent_logvar`, or
`latent_sample`; the reader applies the family's consumer rule and formula (cache/normalize.py).
"""
from __future__ import annotations

import hashlib
from typing import Optional

import torch

from ..errors import BadInputError
from ..options import EncodeOptions
from ..precision import autocast

# --batch-size 0: pixels per encoder call. On a CPU small calls are a little faster: the `sd` encoder
# alone ran 1-3% faster at one 256x256 image a call than at 4 and 11% faster than at 8, the naive loop
# 12-14% faster at 1 than at 4 (the activations of a small call stay in the caches; measured on the
# AVX2 development CPU, benchmarks/RESULTS.md, "Batch size on the CPU"), and memory grows with the batch. A GPU
# wants as many as fit, which OomBackoff finds by halving from this start on the first out-of-memory error.
AUTO_BATCH_PIXELS = {"cpu": 1 * 256 * 256, "cuda": 64 * 256 * 256}
MAX_AUTO_BATCH = 128


# ----------------------------------------------------------------------------- the VAE, checked
def prepare_vae(spec: str, device, channels_last: Optional[bool]):
    """The loaded VAE (vae/loaded.LoadedVae) on `device`, eval mode, no gradients, in the memory format asked
    for (auto: channels-last, except for the 5-D classes); (record, channels_last). A family that cannot
    encode says so in one line."""
    from ..precision import resolve_channels_last
    from ..vae.loading import NotAnAutoencoder, load_vae, with_flag

    try:
        lv = load_vae(spec)
    except NotAnAutoencoder as e:
        raise with_flag("--vae", spec, e) from e
    lv.require("encode", f"--vae {spec}")
    lv.to(device).module.requires_grad_(False)
    if channels_last and lv.layout.five_d:
        raise BadInputError(f"--channels-last yes: --vae {spec}: {lv.class_name} runs 3-D convolutions on 5-D input; "
                            "channels-last is a layout of 4-D ones (leave it auto)")
    cl = resolve_channels_last(channels_last, device.type, inference=True) and not lv.layout.five_d
    if cl:
        lv.module.to(memory_format=torch.channels_last)
    return lv, cl


def check_vae_fits(opts: EncodeOptions, lv) -> None:
    """What the VAE itself rules out: a resolution off its factor (times the patch its pipeline applies), a
    log-variance it does not have, a posterior sample its family's consumers never take."""
    f, m, p = lv.layout.factor, lv.layout.multiple, lv.layout.patch
    if opts.resolution % m:
        lo = opts.resolution - opts.resolution % m
        hint = f"; use {lo} or {lo + m}" if lo else f"; use {m} or a multiple of it"
        what = (f"the downsampling factor {f}" if p == 1 else
                f"{m} (the downsampling factor {f} times the {p}x{p} patch its {lv.family.name} pipeline applies)")
        raise BadInputError(f"--resolution {opts.resolution} is not a multiple of {what} of --vae {opts.vae}{hint}")
    check_store(opts, lv)


def check_store(opts: EncodeOptions, lv) -> None:
    """--store against the family: a log-variance it does not have, a sample its consumers never take."""
    if opts.store != "mean" and not lv.stochastic:
        raise BadInputError(f"--store {opts.store} needs a log-variance, but --vae {opts.vae} is a deterministic "
                            f"{lv.class_name} ({lv.family.name} family, no trained posterior); use --store mean")
    if opts.store == "sample" and lv.family.consumer != "sample":
        raise BadInputError(f"--store sample: {lv.class_name}'s pipelines take the posterior mode, not a sample "
                            f"({lv.family.consumer_cite}); use --store mean (or moments)")


def inference_encoder(opts: EncodeOptions, lv, precision: str):
    """(model.InferenceEncoder in the --weights-dtype resolved, compiled with --compile; that dtype's name).
    Not part of encode-settings.json: a cache may be resumed in another precision."""
    from ..precision import WEIGHT_DTYPES, resolve_weights_dtype
    from ..vae.model import InferenceEncoder

    force_upcast = bool(lv.module.config.get("force_upcast", False))
    weights = resolve_weights_dtype(opts.weights_dtype, precision, force_upcast)
    if weights == "fp16" and force_upcast:
        raise BadInputError(f"--weights-dtype fp16: --vae {opts.vae} says force_upcast in its config (it overflows in "
                            "fp16; diffusers runs it in fp32); use --weights-dtype bf16, or fp32 (with "
                            "--mixed-precision fp16 for fp16 autocast)")
    encoder = InferenceEncoder(lv.module, WEIGHT_DTYPES[weights]).eval()
    if opts.compile:
        encoder.compile()  # in place: compiled on the first batch, again on the first batch of another shape
    return encoder, weights


# ----------------------------------------------------------------------------- batches
def resolve_batch_size(requested: int, device: torch.device, resolution: int, pixels: int = 0) -> int:
    """--batch-size: as given, or (0) the device's pixel budget over resolution² (or over `pixels` a row:
    a clip's T * H * W), 1 to MAX_AUTO_BATCH."""
    if requested > 0:
        return requested
    budget = AUTO_BATCH_PIXELS.get(device.type, AUTO_BATCH_PIXELS["cpu"])
    return max(1, min(MAX_AUTO_BATCH, budget // (pixels or resolution * resolution)))


class OomBackoff:
    """Calls `fn` on at most `size` rows at a time; an out-of-memory error halves `size` (for the rest of
    the run) and retries the same rows, so every row is encoded exactly once, whatever size works. Out of
    memory with one row is the allocator's error, raised as it is; or, with `skip` (video clips: one clip
    may be too large where the others fit), `skip(row)` is called, the row left out of the result and listed
    in `skipped`, and the rest go on. A call whose every row was skipped returns None."""

    def __init__(self, size: int, device: torch.device, log=print, skip=None):
        self.size, self.device, self.log, self.halvings = size, device, log, 0
        self.skip, self.skipped = skip, []

    def __call__(self, fn, rows: list) -> Optional[dict]:
        parts, i, self.skipped = [], 0, []
        while i < len(rows):
            chunk, failed = rows[i:i + self.size], False
            try:
                parts.append(fn(chunk))
            except torch.OutOfMemoryError:
                if len(chunk) == 1 and self.skip is None:
                    raise
                failed = True  # handled outside the except: its traceback holds the failed call's tensors
            if failed and len(chunk) == 1:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.skip(chunk[0])
                self.skipped.append(chunk[0])
                i += 1
                continue
            if failed:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.size, self.halvings = max(1, len(chunk) // 2), self.halvings + 1
                self.log(f"out of memory encoding {len(chunk)} images at once on {self.device}: "
                         f"{self.size} from now on (pass --batch-size to choose)")
                continue
            i += len(chunk)
        if len(parts) <= 1:
            return parts[0] if parts else None
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def sample_noise(shape, seed: int, key: str, flipped: bool) -> torch.Tensor:
    """The posterior noise of one row: a pure function of (seed, source key, flipped), not of batching
    or of the input's position (which files added before it change)."""
    h = hashlib.blake2b(f"{seed}:{key}:{int(flipped)}".encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(h, "little") >> 1)
    return torch.randn(shape, generator=g)


def encode_rows(encoder, rows: list[dict], store: str, seed: int, device, autocast_dtype, channels_last: bool) -> dict:
    """Same-shape rows -> {column: float32 (B, C, h, w)} for the columns of `store` (clips, rows of uint8
    (3, T, H, W) pixels: (B, C, T', h, w)); `encoder`: a model.InferenceEncoder (autocast_dtype None where its
    weights are half already)."""
    x = torch.stack([r["pixels"] for r in rows]).to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(device.type, autocast_dtype):
        mean, logvar = encoder(x)
    # fp32 from here: exp/sampling of the posterior is numerically delicate in 16 bits
    mean = mean.float().cpu().contiguous()
    logvar = None if logvar is None else logvar.float().cpu().contiguous()
    if store != "mean" and logvar is None:
        raise ValueError(f"--store {store} needs a log-variance, but {encoder.family.class_name} is deterministic; "
                         "use --store mean")
    out = {"latent_mean": mean} if store in ("mean", "moments") else {}
    if store == "moments":
        out["latent_logvar"] = logvar
    if store == "sample":
        noise = torch.stack([sample_noise(mean.shape[1:], seed, r["source_key"], r["flipped"]) for r in rows])
        out["latent_sample"] = mean + torch.exp(0.5 * logvar) * noise
    return out
