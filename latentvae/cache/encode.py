"""The encoding pipeline and `latentvae encode`: images in, a resumable cache of latents out.

    manifest = encode(EncodeOptions(vae=..., data=..., out=...))       # the library call; the manifest
    latentvae encode --vae VAE --data SRC --out DST                    # = run(options): one summary line
    accelerate launch -m latentvae encode --vae VAE --data SRC --out DST   # any number of processes

The VAE is any family's (vae/loaded.py's record, from any door); the cache stores its raw latent and the
manifest records its family, consumer rule, layout and formula, so the reader gives what its pipeline
expects. Every check (the VAE and what its family can store, the data, --resolution against the VAE's
factor and patch, DST itself: a folder that is not a cache, or a cache made with other settings) runs on
every process before anything is written, and a new DST that fails before its first shard is removed again.

DataLoader workers decode and preprocess (inputs.py: preprocess.load_preprocessed), the main process
groups same-shape images (BucketBatcher) and runs the encoder only (encoder.py: encode_rows); a
ShardWriter stores the rows (writer.py). What is done is read back from the shards and failure logs, so a rerun of the same
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

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..errors import MissingInputError
from ..fsutil import atomic_write_bytes, atomic_write_json
from ..interrupts import Interrupted, ignore_in_worker
from ..options import EncodeOptions, validated
from ..precision import AUTOCAST_DTYPES
from ..preprocess import Preprocess
# encode_rows, resolve_batch_size and build_manifest are looked up here when a run calls them (tests patch them)
from .encoder import (OomBackoff, check_store, check_vae_fits, encode_rows, inference_encoder, prepare_vae,
                      resolve_batch_size)
from .inputs import (BucketBatcher, PreprocessedImages, batch_table, collate_list, open_inputs, resolve_workers,
                     rows_to_encode)
from .manifest import (MANIFEST_FILE, README_FILE, SETTINGS_FILE, build_manifest, check_out_folder, check_settings,
                       dataset_card, run_settings, vae_identity)
from .schema import STORES, arrow_schema
from .verify import print_report, verify_cache
from .writer import (COPY_RANK, FailureLog, ShardWriter, failure_log_path, list_shards, next_attempt,
                     remove_stale_temporaries, scan_failures, scan_shards, shard_attempt_rank)


@dataclass
class Job:
    """An encoding run whose inputs passed every check: what the writing part needs."""
    opts: EncodeOptions
    out: Path
    vae: Any  # vae/loaded.LoadedVae, fp32 on the device (for --verify; the encoder is `encoder`)
    channels_last: bool
    precision: str  # --mixed-precision resolved: no | bf16 | fp16
    pre: Any  # preprocess.Preprocess, or clips.ClipPreprocess for video data
    src: Any  # sources.ImageSource, or video_sources.ClipSource (one input per clip)
    passthrough: Any  # the other columns of a `datasets` input (a datasets.Dataset), or None
    vae_id: dict
    settings: dict  # encode-settings.json: what every row of the cache shares
    n: int  # the inputs encoded: the first n of the source (--limit)
    encoder: Any  # model.InferenceEncoder: what encode_rows runs (`vae` itself stays fp32, for verify)
    weights_dtype: str  # --weights-dtype resolved: fp32 | bf16 | fp16 (half: no autocast)
    tiles: Optional[dict] = None  # --tiling: the tile settings (model.configure_tiling)

    @property
    def video(self) -> bool:
        return getattr(self.pre, "video", False)

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        return AUTOCAST_DTYPES[self.precision] if self.weights_dtype == "fp32" else None

    @property
    def schema(self) -> pa.Schema:
        """The shards' arrow schema: our columns, the latents of --store, the passthrough columns."""
        return arrow_schema(self.opts.dtype, self.opts.store, None if self.passthrough is None else self.passthrough.features,
                            video=self.video)

    @property
    def flips(self) -> tuple[bool, ...]:
        return (False, True) if self.opts.flip else (False,)

    def writer(self, attempt: int, rank: int) -> ShardWriter:
        """A ShardWriter whose shards record the moments of what this family's trainers draw: posterior
        samples from --store moments where its consumers sample, else the stored latent; patchified as
        its pipeline patchifies (writer.row_moments)."""
        sample = self.opts.store == "moments" and self.vae.family.consumer == "sample"
        return ShardWriter(self.out / "data", attempt, rank, self.opts.shard_size, self.schema, sample,
                           self.vae.layout.patch)


def prepare_job(opts: EncodeOptions, device) -> Job:
    """Every check of the inputs, in an order that names the first mistake; nothing is written."""
    from ..precision import resolve_mixed_precision
    from ..vae.model import configure_tiling
    from .clips import clip_preprocess, image_options, is_video_job, open_clip_inputs

    out = Path(opts.out)
    check_out_folder(out)
    lv, cl = prepare_vae(opts.vae, device, opts.channels_last)
    precision = resolve_mixed_precision(opts.mixed_precision, device.type)
    if is_video_job(opts):  # one input per clip (clips.py); the rest is the images' machinery
        pre = clip_preprocess(opts, lv)
        check_store(opts, lv)
        src, passthrough = open_clip_inputs(opts, pre)
    else:
        opts = image_options(opts)
        check_vae_fits(opts, lv)
        crops = opts.crops if opts.preprocess == "crops" else 0
        # sides a multiple of the factor times the patch: flux2's pipeline patchifies 2x2 latent pixels
        pre = Preprocess(opts.preprocess, opts.resolution, lv.layout.multiple, opts.max_aspect, opts.flip,
                         crops=crops, crop_scale=opts.crop_scale if crops else 0, crop_seed=opts.seed if crops else 0)
        src, passthrough = open_inputs(opts)
    if len(src) == 0:
        raise MissingInputError(f"--data {opts.data}: no {'videos' if getattr(pre, 'video', False) else 'images'} "
                                f"(split {opts.split!r} has no rows)")
    tiles = configure_tiling(f"--vae {opts.vae}", lv.module, opts.tiling, opts.tile_size, encode=True)
    n = min(opts.limit, len(src)) if opts.limit else len(src)
    vae_id = vae_identity(lv, opts.vae)
    settings = run_settings(opts, vae_id, pre)
    check_settings(out, settings)
    encoder, weights = inference_encoder(opts, lv, precision)
    return Job(opts, out, lv, cl, precision, pre, src, passthrough, vae_id, settings, n, encoder, weights, tiles)


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


def encode_share(job: Job, state, todo: dict[int, list[bool]], attempt: int) -> dict:
    """This process's share of `todo` (every num_processes-th input by index) into its own shards."""
    from tqdm.auto import tqdm

    opts, rank = job.opts, state.process_index
    mine = sorted(todo)[rank::state.num_processes]
    log = FailureLog(failure_log_path(job.out, rank))
    writer = job.writer(attempt, rank)
    if job.video:  # a clip too large for memory is listed and retried next run (`skip`); the run goes on
        from .clips import clip_items

        batch_size, items, skip = clip_items(job.src, mine, job.pre, opts.batch_size, state.device, log)
    else:
        batch_size = resolve_batch_size(opts.batch_size, state.device, opts.resolution)
        items, skip = PreprocessedImages(job.src, mine, job.pre, opts.jpeg_draft), None
    backoff = OomBackoff(batch_size, state.device, log=lambda m: tqdm.write(m, file=sys.stderr), skip=skip)
    loader = torch.utils.data.DataLoader(
        items, batch_size=batch_size,
        collate_fn=collate_list, num_workers=resolve_workers(opts.num_workers, state.device.type),
        pin_memory=state.device.type == "cuda", worker_init_fn=ignore_in_worker)  # stopped by us (interrupts.py)
    bar = tqdm(total=sum(len(todo[i]) for i in mine), unit="clip" if job.video else "img", dynamic_ncols=True,
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
        if backoff.skipped:  # out of memory at one clip: in the failure log instead
            batch = [r for r in batch if not any(r is s for s in backoff.skipped)]
            bar.set_postfix(failed=log.count)
        if latents is None:
            bar.update(len(backoff.skipped))
            return
        timing["encoder_seconds"] += dt
        if not timing["first_batch_rows"]:  # with --compile, the compilation is in here
            timing["first_batch_seconds"], timing["first_batch_rows"] = dt, len(batch)
        writer.add(batch_table(batch, latents, opts.dtype, job.passthrough), writer.moments(latents))
        bar.update(len(batch) + len(backoff.skipped))
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
        writer = job.writer(attempt, COPY_RANK)
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
                            "channels_last": job.channels_last, "tiles": job.tiles}
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
        unit = "clips" if "video" in manifest else "img"
        print(f"{opts.out}: {c['rows']} rows of {c['encoded_inputs']}/{c['inputs']} inputs in {c['shards']} shards, "
              f"{c['failures']} failures; this run {this['rows_encoded']} rows at {this['images_per_second']:.2f} "
              f"{unit}/s on {this['processes']} process(es)")
        if this["update"]:  # a resume said so when it started (update.continuation)
            print(update_message(Path(opts.out), manifest["generation"], this["changes"]))
        if "verify" in manifest:
            print_report(manifest["verify"])
        if manifest["vae"]["factors"].startswith("NOT measured"):
            convention = (manifest["vae"].get("formula") or {}).get("convention", "sd")  # (a manifest of before)
            measured = (manifest.get("latent_statistics") or {}).get("factors", {}).get(convention, {})
            sf = measured.get("scaling_factor")
            print(f"warning: the VAE's factors were never measured ({manifest['vae']['factors']}); do not use the "
                  f"{convention} formula's entries in its config. This cache's manifest holds factors measured on its "
                  f"rows (latent_statistics.factors.{convention}" + (f": scaling_factor {sf:.4g})" if sf else ")")
                  + ", which LatentDataset uses (factors='auto'), or measure them on your images: "
                  f"latentvae export {opts.vae} --out VAE --calibrate DATA")
    return manifest
