"""The encoding pipeline and `latentvae encode`: images in, a resumable cache of latents out.

    manifest = encode(EncodeOptions(vae=..., data=..., out=...))       # the library call; the manifest
    latentvae encode --vae VAE --data SRC --out DST                    # = run(options): one summary line
    accelerate launch -m latentvae encode --vae VAE --data SRC --out DST   # any number of processes

Every check (the VAE, the data, --resolution against the VAE's factor, DST itself: a folder that
is not a cache, or a cache made with other settings) runs on every process before anything is
written, and a new DST that fails before its first shard is removed again.

DataLoader workers decode and preprocess (preprocess.load_preprocessed), the main process groups
same-shape images (BucketBatcher) and runs the encoder only (encode_rows); a ShardWriter stores
the rows. What is done is read back from the shards and failure logs, so a rerun of the same
command encodes only the rest, split among the processes by position; the first process then
checks that every input is in exactly once and writes the manifest.

A rerun into a finished cache is an update: rows record their sources (size, mtime, sha256 of the
decoded bytes, metadata hash), and update.py works out what is new, changed or gone; new shards and
a new manifest generation replace the old ones atomically (see update.py).

A signal (SIGINT, SIGTERM, SIGUSR1: interrupts.py) stops the run at once: the shard being written
is a hidden temporary, removed (writer.py), the finished ones stay, and the one line says how many
inputs they hold (stopped_message). A rerun that continues a run which did not finish says so first,
with the inputs done and to do; one into a finished cache whose inputs changed says it updated; both,
after an interrupted update (update.continuation decides, once).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..errors import BadInputError, MissingInputError
from ..fsutil import atomic_write_bytes, atomic_write_json
from ..images import BadImage
from ..interrupts import Interrupted, ignore_in_worker
from ..options import EncodeOptions, validated
from ..precision import AUTOCAST_DTYPES, autocast
from ..preprocess import Preprocess, load_preprocessed
from .manifest import (MANIFEST_FILE, factor_provenance, README_FILE, SETTINGS_FILE, build_manifest, check_out_folder, check_settings,
                       dataset_card, run_settings, vae_identity)
from .schema import OWN_COLUMNS, STORES, arrow_schema, make_table
from .verify import print_report, verify_cache
from .writer import (COPY_RANK, FailureLog, ShardWriter, failure_log_path, list_shards, next_attempt,
                     remove_stale_temporaries, row_moments, scan_failures, scan_shards, shard_attempt_rank)


# ----------------------------------------------------------------------------- inputs
def open_inputs(opts: EncodeOptions):
    """(image source, passthrough dataset or None): every non-image column of a `datasets` input, or the
    captions and metadata of an image folder (metadata.jsonl / metadata.csv, .txt / .caption sidecars)."""
    from ..sources import CropSource, FolderImageSource, HFImageSource, open_source

    src = open_source(opts.data, opts.data_kind, opts.split, opts.image_column, opts.max_image_pixels)
    if opts.preprocess == "crops":  # one input per crop; each crop keeps its image's columns
        src, rest = CropSource(src, opts.crops, opts.seed), open_inputs(replace(opts, preprocess="center-crop"))[1]
        if rest is not None:
            rest = rest.select([src.image(j) for j in range(len(src))])
        return src, rest
    if isinstance(src, HFImageSource):
        rest = src.dataset.remove_columns([opts.image_column])
    elif isinstance(src, FolderImageSource):
        rest = src.passthrough()
        if rest is None:
            return src, None
    else:
        return src, None
    clash = [c for c in rest.column_names if c in OWN_COLUMNS]
    if clash:
        raise BadInputError(f"{opts.data}: columns {clash} clash with the cache's own columns ({', '.join(OWN_COLUMNS)})")
    return src, rest


class PreprocessedImages(torch.utils.data.Dataset):
    """Item k: image `indices[k]` preprocessed, or the reason it could not be (in a DataLoader worker)."""

    def __init__(self, src, indices: list[int], pre: Preprocess, draft: bool):
        self.src, self.indices, self.pre, self.draft = src, indices, pre, draft

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        i = self.indices[k]
        try:
            return {"index": i, **load_preprocessed(self.src, i, self.pre, self.draft, identify=True)}
        except BadImage as e:
            try:
                identity = self.src.stat_identity(i)  # a rerun retries it once this changes
            except OSError:
                identity = None
            return {"index": i, "error": str(e), "identity": identity}


def collate_list(items: list[dict]) -> list[dict]:
    return items


def resolve_workers(n: int, device: str) -> int:
    """--num-workers: -1 is 0 when the encoder runs on the CPU, else one fewer than the CPU cores, at most 4.

    On the CPU the encoder's threads use every core, and decoding is a small part of the time (a JPEG
    at 256x256 decodes 100-150x faster than the `sd` encoder encodes it), so a worker process has
    little to overlap and competes with those threads for the cores: on the 2-core AVX2 development
    CPU decoding in the main process ran 1.18x, 0.98x and 1.06x the speed with one worker in three
    paired runs (benchmarks/RESULTS.md, "Batch size on the CPU"), and it saves starting a process."""
    if n >= 0:
        return n
    if device == "cpu":
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


# ----------------------------------------------------------------------------- batching, encoding
# --batch-size 0: pixels per encoder call. On a CPU small calls are a little faster: the `sd` encoder
# alone ran 1-3% faster at one 256x256 image a call than at 4 and 11% faster than at 8, the naive loop
# 12-14% faster at 1 than at 4 (the activations of a small call stay in the caches; measured on the
# AVX2 development CPU, benchmarks/RESULTS.md, "Batch size on the CPU"), and memory grows with the batch. A GPU
# wants as many as fit, which OomBackoff finds by halving from this start on the first out-of-memory error.
AUTO_BATCH_PIXELS = {"cpu": 1 * 256 * 256, "cuda": 64 * 256 * 256}
MAX_AUTO_BATCH = 128


def resolve_batch_size(requested: int, device: torch.device, resolution: int) -> int:
    """--batch-size: as given, or (0) the device's pixel budget over resolution², 1 to MAX_AUTO_BATCH."""
    if requested > 0:
        return requested
    budget = AUTO_BATCH_PIXELS.get(device.type, AUTO_BATCH_PIXELS["cpu"])
    return max(1, min(MAX_AUTO_BATCH, budget // (resolution * resolution)))


class OomBackoff:
    """Calls `fn` on at most `size` rows at a time; an out-of-memory error halves `size` (for the rest of
    the run) and retries the same rows, so every row is encoded exactly once, whatever size works. Out of
    memory with one row is the allocator's error, raised as it is."""

    def __init__(self, size: int, device: torch.device, log=print):
        self.size, self.device, self.log, self.halvings = size, device, log, 0

    def __call__(self, fn, rows: list) -> dict:
        parts, i = [], 0
        while i < len(rows):
            chunk, failed = rows[i:i + self.size], False
            try:
                parts.append(fn(chunk))
            except torch.OutOfMemoryError:
                if len(chunk) == 1:
                    raise
                failed = True  # handled outside the except: its traceback holds the failed call's tensors
            if failed:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.size, self.halvings = max(1, len(chunk) // 2), self.halvings + 1
                self.log(f"out of memory encoding {len(chunk)} images at once on {self.device}: "
                         f"{self.size} from now on (pass --batch-size to choose)")
                continue
            i += len(chunk)
        if len(parts) == 1:
            return parts[0]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class BucketBatcher:
    """Groups rows by pixel shape; `add` returns a full batch of one shape or None; `flush` the rest."""

    def __init__(self, batch_size: int):
        self.batch_size, self.queues = batch_size, {}

    def add(self, row: dict) -> Optional[list[dict]]:
        q = self.queues.setdefault(tuple(row["pixels"].shape), [])
        q.append(row)
        if len(q) == self.batch_size:
            return self.queues.pop(tuple(row["pixels"].shape))
        return None

    def flush(self) -> Iterator[list[dict]]:
        while self.queues:
            yield self.queues.pop(next(iter(self.queues)))


def sample_noise(shape, seed: int, key: str, flipped: bool) -> torch.Tensor:
    """The posterior noise of one row: a pure function of (seed, source key, flipped), not of batching
    or of the input's position (which files added before it change)."""
    h = hashlib.blake2b(f"{seed}:{key}:{int(flipped)}".encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(h, "little") >> 1)
    return torch.randn(shape, generator=g)


def encode_rows(encoder, rows: list[dict], store: str, seed: int, device, autocast_dtype, channels_last: bool) -> dict:
    """Same-shape rows -> {column: float32 (B, C, h, w)} for the columns of `store`; `encoder`: a
    model.InferenceEncoder (autocast_dtype None where its weights are half already)."""
    x = torch.stack([r["pixels"] for r in rows]).to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(device.type, autocast_dtype):
        mean, logvar = encoder(x)
    # fp32 from here: exp/sampling of the posterior is numerically delicate in 16 bits
    mean = mean.float().cpu().contiguous()
    logvar = None if logvar is None else logvar.float().cpu().contiguous()
    if store != "mean" and logvar is None:
        raise ValueError(f"--store {store} needs a log-variance, but {encoder.vae_class} is deterministic; use --store mean")
    out = {"latent_mean": mean} if store in ("mean", "moments") else {}
    if store == "moments":
        out["latent_logvar"] = logvar
    if store == "sample":
        noise = torch.stack([sample_noise(mean.shape[1:], seed, r["source_key"], r["flipped"]) for r in rows])
        out["latent_sample"] = mean + torch.exp(0.5 * logvar) * noise
    return out


def batch_table(rows: list[dict], latents: dict, dtype: str, passthrough) -> pa.Table:
    """One encoded batch as the shards' rows: our columns, the latents, then the input's other columns."""
    from .update import table_metadata_hashes

    shape = list(next(iter(latents.values())).shape[1:])
    extra = None if passthrough is None else passthrough.select([r["index"] for r in rows]).with_format("arrow")[:]
    ids = [r["identity"] for r in rows]
    values = {"source_index": [r["index"] for r in rows], "source_id": [r["source_id"] for r in rows],
              "source_key": [r["source_key"] for r in rows], "source_size": [d.get("size") for d in ids],
              "source_mtime_ns": [d.get("mtime_ns") for d in ids], "source_sha256": [d["sha256"] for d in ids],
              "source_fingerprint": [d.get("fingerprint") for d in ids],
              "metadata_sha256": table_metadata_hashes(extra) or [None] * len(rows),
              "flipped": [r["flipped"] for r in rows], "pixel_size": [list(r["pixels"].shape[1:]) for r in rows],
              "original_size": [list(r["original_size"]) for r in rows],
              "crop_top_left": [list(r["crop_top_left"]) for r in rows], "latent_shape": [shape] * len(rows)}
    return make_table(values, latents, dtype, extra)


# ----------------------------------------------------------------------------- checks, before writing
def prepare_vae(path: str, device, channels_last: Optional[bool]):
    """The VAE on `device`, eval mode, no gradients, in the memory format asked for; (vae, channels_last)."""
    from ..vae.loading import NotAnAutoencoder, load_autoencoder, with_flag
    from ..precision import resolve_channels_last

    try:
        vae = load_autoencoder(path)
    except NotAnAutoencoder as e:
        raise with_flag("--vae", path, e) from e
    vae = vae.to(device).eval().requires_grad_(False)
    cl = resolve_channels_last(channels_last, device.type, inference=True)
    if cl:
        vae = vae.to(memory_format=torch.channels_last)
    return vae, cl


def check_vae_fits(opts: EncodeOptions, vae) -> None:
    """What the VAE itself rules out: a resolution off its factor, a log-variance it does not have."""
    from diffusers import AutoencoderTiny

    from ..vae.model import downsample_factor

    f = downsample_factor(vae)
    if opts.resolution % f:
        lo = opts.resolution - opts.resolution % f
        hint = f"; use {lo} or {lo + f}" if lo else f"; use {f} or a multiple of it"
        raise BadInputError(f"--resolution {opts.resolution} is not a multiple of the downsampling factor {f} of "
                            f"--vae {opts.vae}{hint}")
    if opts.store != "mean" and isinstance(vae, AutoencoderTiny):
        raise BadInputError(f"--store {opts.store} needs a log-variance, but --vae {opts.vae} is a deterministic "
                            f"{type(vae).__name__}; use --store mean")


@dataclass
class Job:
    """An encoding run whose inputs passed every check: what the writing part needs."""
    opts: EncodeOptions
    out: Path
    vae: Any
    channels_last: bool
    precision: str  # --mixed-precision resolved: no | bf16 | fp16
    pre: Preprocess
    src: Any  # sources.ImageSource
    passthrough: Any  # the other columns of a `datasets` input (a datasets.Dataset), or None
    vae_id: dict
    settings: dict  # encode-settings.json: what every row of the cache shares
    n: int  # the inputs encoded: the first n of the source (--limit)
    encoder: Any  # model.InferenceEncoder: what encode_rows runs (`vae` itself stays fp32, for verify)
    weights_dtype: str  # --weights-dtype resolved: fp32 | bf16 | fp16 (half: no autocast)

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        return AUTOCAST_DTYPES[self.precision] if self.weights_dtype == "fp32" else None

    @property
    def schema(self) -> pa.Schema:
        """The shards' arrow schema: our columns, the latents of --store, the passthrough columns."""
        return arrow_schema(self.opts.dtype, self.opts.store, None if self.passthrough is None else self.passthrough.features)

    @property
    def flips(self) -> tuple[bool, ...]:
        return (False, True) if self.opts.flip else (False,)


def prepare_job(opts: EncodeOptions, device) -> Job:
    """Every check of the inputs, in an order that names the first mistake; nothing is written."""
    from ..vae.model import downsample_factor
    from ..precision import resolve_mixed_precision

    out = Path(opts.out)
    check_out_folder(out)
    vae, cl = prepare_vae(opts.vae, device, opts.channels_last)
    precision = resolve_mixed_precision(opts.mixed_precision, device.type)
    check_vae_fits(opts, vae)
    crops = opts.crops if opts.preprocess == "crops" else 0
    pre = Preprocess(opts.preprocess, opts.resolution, downsample_factor(vae), opts.max_aspect, opts.flip,
                     crops=crops, crop_scale=opts.crop_scale if crops else 0, crop_seed=opts.seed if crops else 0)
    src, passthrough = open_inputs(opts)
    if len(src) == 0:
        raise MissingInputError(f"--data {opts.data}: no images (split {opts.split!r} has no rows)")
    n = min(opts.limit, len(src)) if opts.limit else len(src)
    vae_id = vae_identity(vae, opts.vae)
    settings = run_settings(opts, vae_id, pre)
    check_settings(out, settings)
    encoder, weights = inference_encoder(opts, vae, precision)
    return Job(opts, out, vae, cl, precision, pre, src, passthrough, vae_id, settings, n, encoder, weights)


def inference_encoder(opts: EncodeOptions, vae, precision: str):
    """(model.InferenceEncoder in the --weights-dtype resolved, compiled with --compile; that dtype's name).
    Not part of encode-settings.json: a cache may be resumed in another precision."""
    from ..vae.model import InferenceEncoder
    from ..precision import WEIGHT_DTYPES, resolve_weights_dtype

    force_upcast = bool(vae.config.get("force_upcast", False))
    weights = resolve_weights_dtype(opts.weights_dtype, precision, force_upcast)
    if weights == "fp16" and force_upcast:
        raise BadInputError(f"--weights-dtype fp16: --vae {opts.vae} says force_upcast in its config (it overflows in "
                            "fp16; diffusers runs it in fp32); use --weights-dtype bf16, or fp32 (with "
                            "--mixed-precision fp16 for fp16 autocast)")
    encoder = InferenceEncoder(vae, WEIGHT_DTYPES[weights]).eval()
    if opts.compile:
        encoder.compile()  # in place: compiled on the first batch, again on the first batch of another shape
    return encoder, weights


def first_missing(path: Path) -> Optional[Path]:
    """The outermost folder that creating `path` would create (None if `path` exists)."""
    if path.exists():
        return None
    path = path.absolute()
    while not path.parent.exists():
        path = path.parent
    return path


def discard_if_unstarted(out: Path, created: Path) -> bool:
    """Remove what this run created (DST, and any parent folders it made) when no shard made it:
    a failed or interrupted first run leaves nothing behind. Whether it removed anything."""
    if created.exists() and not list_shards(out):
        shutil.rmtree(created, ignore_errors=True)
        return True
    return False


# ----------------------------------------------------------------------------- the run
def open_cache(job: Job) -> None:
    """The first process's writes before anyone encodes: the settings (first: a folder with data/ is
    always a cache), data/ without the partial shards of a killed run, the dataset card."""
    out = job.out
    out.mkdir(parents=True, exist_ok=True)
    if not (out / SETTINGS_FILE).exists():
        atomic_write_json(out / SETTINGS_FILE, job.settings)
    (out / "data").mkdir(exist_ok=True)
    remove_stale_temporaries(out)
    card = dataset_card("manifest.json appears when every input is accounted for.").encode()
    if not (out / README_FILE).is_file() or (out / README_FILE).read_bytes() != card:
        atomic_write_bytes(out / README_FILE, card)


def rows_to_encode(loader, todo: dict[int, list[bool]], src, log: FailureLog, bar) -> Iterator[dict]:
    """One row per copy still to do (flipped or not) of each preprocessed item; unreadable inputs go
    to the failure log instead."""
    for items in loader:
        for it in items:
            i = it["index"]
            if "error" in it:
                log.add(i, src.name(i), it["error"], src.relative_name(i), it["identity"])
                bar.update(len(todo[i]))
                bar.set_postfix(failed=log.count)
                continue
            for flipped in todo[i]:
                yield {**it, "flipped": flipped, "source_id": src.name(i), "source_key": src.relative_name(i),
                       "pixels": it["pixels"].flip(-1) if flipped else it["pixels"]}


def encode_share(job: Job, state, todo: dict[int, list[bool]], attempt: int) -> dict:
    """This process's share of `todo` (every num_processes-th input by index) into its own shards."""
    from tqdm.auto import tqdm

    opts, rank = job.opts, state.process_index
    mine = sorted(todo)[rank::state.num_processes]
    log = FailureLog(failure_log_path(job.out, rank))
    writer = ShardWriter(job.out / "data", attempt, rank, opts.shard_size, job.schema)
    batch_size = resolve_batch_size(opts.batch_size, state.device, opts.resolution)
    backoff = OomBackoff(batch_size, state.device, log=lambda m: tqdm.write(m, file=sys.stderr))
    loader = torch.utils.data.DataLoader(
        PreprocessedImages(job.src, mine, job.pre, opts.jpeg_draft), batch_size=batch_size,
        collate_fn=collate_list, num_workers=resolve_workers(opts.num_workers, state.device.type),
        pin_memory=state.device.type == "cuda", worker_init_fn=ignore_in_worker)  # stopped by us (interrupts.py)
    bar = tqdm(total=sum(len(todo[i]) for i in mine), unit="img", dynamic_ncols=True,
               disable=not (opts.progress and state.is_local_main_process), desc=f"encode x{state.num_processes}")
    batcher, encoded, t0 = BucketBatcher(batch_size), 0, time.perf_counter()
    timing = {"encoder_seconds": 0.0, "first_batch_seconds": 0.0, "first_batch_rows": 0}

    def encode(rows: list[dict]) -> dict:
        return encode_rows(job.encoder, rows, opts.store, opts.seed, state.device, job.autocast_dtype,
                           job.channels_last)

    def store(batch: list[dict]) -> None:
        nonlocal encoded
        t = time.perf_counter()
        latents = backoff(encode, batch)  # the latents come back on the CPU: the time is the device's
        dt = time.perf_counter() - t
        timing["encoder_seconds"] += dt
        if not timing["first_batch_rows"]:  # with --compile, the compilation is in here
            timing["first_batch_seconds"], timing["first_batch_rows"] = dt, len(batch)
        writer.add(batch_table(batch, latents, opts.dtype, job.passthrough), row_moments(latents))
        bar.update(len(batch))
        encoded += len(batch)

    for row in rows_to_encode(loader, todo, job.src, log, bar):
        batch = batcher.add(row)
        if batch:
            store(batch)
    for batch in batcher.flush():
        store(batch)
    writer.close()
    bar.close()
    return {"rows_encoded": encoded, "failures": log.count, "encode_seconds": time.perf_counter() - t0,
            "batch_size": batch_size, "batch_size_after_oom": backoff.size if backoff.halvings else None,
            "num_workers": loader.num_workers, **timing}


def stopped_message(out: Path, plan, inputs, attempt: int, generation: int) -> str:
    """The interrupt's line: the inputs the finished shards and failure logs hold now (the todo of the
    plan less what this run's shards and new failures cover), or that the new generation was committed."""
    from .update import live_failures, manifest_generation

    if generation and manifest_generation(out) == generation:  # stopped after the commit (tidying, --verify)
        return f"{out}: generation {generation} was complete and committed when the signal came; nothing is lost"
    shards = [(p.name, *shard_attempt_rank(p.name)) for p in list_shards(out)]
    new = [name for name, a, rank in shards if a == attempt and rank != COPY_RANK]  # this run's, every process's
    got = {(k, f) for s in scan_shards(out, new) for k, f in zip(s["identity"]["source_key"], s["flipped"])}
    failed = {rec["source_key"] for rec in live_failures(scan_failures(out), inputs, set())}
    left = sum(1 for i, copies in plan.todo.items()
               if inputs.keys[i] not in failed and any((inputs.keys[i], f) not in got for f in copies))
    encoded = inputs.n - left - len(failed)
    failures = f" (and {len(failed)} failed)" if failed else ""
    previous = manifest_generation(out)
    readers = f"; readers still see generation {previous}, whole" if previous else ""
    return (f"{out}: {encoded} of {inputs.n} inputs are encoded{failures} in {len(shards)} shard(s), kept"
            f"{readers}; rerun the same command to resume")


def write_cache(job: Job, state, t0: float) -> dict:
    """Finish an interrupted update, compare what is there with the inputs now (update.make_plan), say
    whether this resumes or updates (update.continuation), carry over and encode what is needed on every
    process, then the next manifest generation (first process). A signal from here on raises Interrupted
    with stopped_message (first process)."""
    from .update import Inputs, continuation, make_plan, manifest_generation, recover, resume_message

    if state.is_main_process and job.out.is_dir():
        recover(job.out)
    state.wait_for_everyone()
    # what is there, and what the inputs are now: read on every process while nobody writes
    shards, records = scan_shards(job.out), scan_failures(job.out)
    attempt = next_attempt(shards)
    inputs = Inputs(job.src, job.n, job.passthrough)

    def schema_of(name: str) -> pa.Schema:
        return pq.read_schema(job.out / "data" / name)

    plan = make_plan(shards, records, inputs, job.flips, job.schema, schema_of)
    cont = continuation(job.out, shards, plan, inputs, job.flips, job.schema, schema_of)
    generation = manifest_generation(job.out)
    # a resume writes a manifest even with nothing left to encode: its shards are not in the last one yet
    writes = plan.writes or generation == 0 or cont.resumed or any(rec not in plan.failures for rec in records)
    if writes:
        generation += 1
    if state.is_main_process and cont.resumed:
        print(resume_message(job.out, cont), flush=True)
    try:
        return write_generation(job, state, t0, shards, inputs, plan, cont, attempt, generation, writes)
    except Interrupted as e:
        if not state.is_main_process or e.message:
            raise
        line = stopped_message(job.out, plan, inputs, attempt, generation if writes else 0)
        raise Interrupted(e.signum, line) from None


def write_generation(job: Job, state, t0: float, shards: list[dict], inputs, plan, cont, attempt: int,
                     generation: int, writes: bool) -> dict:
    """write_cache's writing part: carry, encode, commit the manifest of `generation` (when `writes`)."""
    from .update import begin, carry_rows, compact_failures, finish, live_failures

    if state.is_main_process:
        open_cache(job)
        if plan.superseded:
            begin(job.out, generation, attempt, plan.superseded)
    state.wait_for_everyone()
    carried = 0
    if state.is_main_process and plan.superseded:
        writer = ShardWriter(job.out / "data", attempt, COPY_RANK, job.opts.shard_size, job.schema)
        carried = carry_rows(job.out, plan, inputs, writer, job.opts.dtype, list(STORES[job.opts.store]),
                             [] if job.passthrough is None else job.passthrough.column_names)
    stats = encode_share(job, state, plan.todo, attempt)
    state.wait_for_everyone()
    if state.is_main_process and (writes or not (job.out / MANIFEST_FILE).exists()):
        # the shards of the new generation: those scanned above that stay, and this run's new ones
        superseded, known = set(plan.superseded), {s["name"] for s in shards}
        final = [s for s in shards if s["name"] not in superseded]
        final += scan_shards(job.out, [p.name for p in list_shards(job.out) if p.name not in known])
        encoded = {k for s in final for k in s["identity"].get("source_key", [])}
        failures = live_failures(scan_failures(job.out), inputs, encoded)
        manifest = build_manifest(job.out, job.settings, job.vae_id, job.opts, job.pre, inputs, final, failures,
                                  generation, cont.changes)
        manifest["vae"]["factors"] = factor_provenance(job.vae, job.opts.vae)
        atomic_write_json(job.out / MANIFEST_FILE, manifest)  # the commit
        finish(job.out, plan.superseded)
        compact_failures(job.out, failures)
    state.wait_for_everyone()
    manifest = json.loads((job.out / MANIFEST_FILE).read_text())
    seconds = stats["encode_seconds"]
    manifest["this_run"] = {"process": state.process_index, "processes": state.num_processes, "attempt": attempt,
                            **stats, "rows_carried": carried, "changes": cont.changes,
                            "resumed": {"inputs": cont.inputs, "encoded": cont.encoded, "failed": cont.failed,
                                        "todo": cont.todo} if cont.resumed else None, "update": cont.update,
                            "total_seconds": time.perf_counter() - t0,
                            "images_per_second": stats["rows_encoded"] / seconds if seconds > 0 else 0.0,
                            "mixed_precision": job.precision, "weights_dtype": job.weights_dtype,
                            "autocast": job.autocast_dtype is not None, "compile": job.opts.compile,
                            "channels_last": job.channels_last}
    if job.opts.verify and state.is_main_process:
        manifest["verify"] = verify_cache(job.out, seed=job.opts.seed, vae=job.vae)
    return manifest


def encode(opts: EncodeOptions) -> dict:
    """Encode `opts.data` into `opts.out` (resuming what is there); returns the manifest, on every process.

    The manifest carries `this_run` stats (seconds, rows encoded by this process, images/s) and,
    with `opts.verify`, on the first process, the `verify` report of 8 decoded rows."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    opts = validated(opts)  # the command line's coercion and checks, for library callers too
    # as Accelerator does: `accelerate launch --cpu` (ACCELERATE_USE_CPU=1) makes gloo processes on CPUs
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    out = Path(opts.out)
    created = first_missing(out)
    t0 = time.perf_counter()
    try:
        job = prepare_job(opts, state.device)  # on every process, before anyone writes: all fail alike
        return write_cache(job, state, t0)
    except BaseException as e:
        removed = created is not None and state.is_main_process and discard_if_unstarted(out, created)
        # no message yet: the signal came before write_cache's plan (not a second one while it made the line)
        if isinstance(e, Interrupted) and state.is_main_process and (removed or not (e.message or e.__context__)):
            what = ("before its first shard; the new folder is removed" if removed else
                    "before encoding; nothing was written")
            raise Interrupted(e.signum, f"{out}: stopped {what}; rerun the same command") from None
        raise


def run(opts: EncodeOptions) -> dict:
    """`latentvae encode`: encode, then one summary line (and the --verify table) from the first process;
    a line that it updated the cache when its inputs changed since the last finished generation."""
    from .update import update_message

    manifest = encode(opts)
    this = manifest["this_run"]
    if this["process"] == 0:
        c = manifest["counts"]
        print(f"{opts.out}: {c['rows']} rows of {c['encoded_inputs']}/{c['inputs']} inputs in {c['shards']} shards, "
              f"{c['failures']} failures; this run {this['rows_encoded']} rows at {this['images_per_second']:.2f} img/s "
              f"on {this['processes']} process(es)")
        if this["update"]:  # a resume said so when it started (update.continuation)
            print(update_message(Path(opts.out), manifest["generation"], this["changes"]))
        if "verify" in manifest:
            print_report(manifest["verify"])
        if manifest["vae"]["factors"].startswith("NOT measured"):
            stats = manifest.get("latent_statistics") or {}
            sd = stats.get("factors", {}).get("sd", {}).get("scaling_factor")
            print(f"warning: the VAE's scaling factors were never measured ({manifest['vae']['factors']}); do not "
                  "use its config's scaling_factor. This cache's manifest holds factors measured on its rows "
                  "(latent_statistics.factors" + (f"; sd convention: scaling_factor {sd:.4g})" if sd else ")")
                  + f", or measure them on your images: latentvae export {opts.vae} --out VAE --calibrate DATA")
    return manifest
