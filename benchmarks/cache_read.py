"""Reading a latent cache for training: LatentDataset + BucketBatchSampler against plain `datasets` indexing.

    python benchmarks/cache_read.py                      # caches of 10,000 and 20,000 rows, 4x64x64 fp16
    python benchmarks/cache_read.py --rows 10000 --rows 40000 --work /tmp/cache-read
    python benchmarks/cache_read.py --rows 20000 --only latentvae,latentvae:loader,latentvae:loader:fp16

Synthesizes each cache directly (parquet shards written with latentvae.cache.schema/writer helpers and
a manifest; no VAE), lets `datasets` convert it to its arrow files once, then, each in a fresh process
(so peak memory is that run's own):

  latentvae   LatentDataset(convention="sd") read in batches of 64 by BucketBatchSampler through
              DataLoader(batch_sampler=..., collate_fn=collate, num_workers=1), one whole epoch,
              worker start included
  (0 workers) the same, read in the main process
  LatentLoader  LatentLoader(ds, sampler=...): the same batches read ahead by one thread of the main
              process (no DataLoader, no shared memory handover)
  + step      the loop does a CPU "training step" per batch (fp32 matmuls, one torch thread, ~--step-ms
              ms, calibrated at start): rows/s of LatentLoader or of the 0-worker DataLoader against
              "step alone" (the same steps on one ready batch) says how much of the reading the
              loop still waits for
  fp16        the same with LatentDataset(dtype=torch.float16): half the bytes per batch
  datasets path  the same with the reader's fast arrow index switched off (each batch gathered by
              `datasets`' arrow formatting, the reader before the index): what the index alone gains
  transport   DataLoader(num_workers=1) passing ready-made float32 (or float16) batches of the same
              size, each handed over as the reader's are (latentvae.cache.reader.shared_copy: a new
              shared-memory tensor written through its file descriptor): what the worker -> main
              process transfer alone costs (its ceiling)
  --sweep     adds the DataLoader settings: sharing strategy file_system (default file_descriptor),
              prefetch_factor 4 (default 2), persistent_workers over 2 epochs
  datasets    the same arrow files, `ds[i]` per row (python lists, then a float32 tensor), and
              `ds.with_format("numpy")[i]` per row; timed over the first --baseline-rows rows

Memory: peak RSS (VmHWM) of the process and of its DataLoader worker (the worker's sampled every 8
batches, near its end), and the worker's peak anonymous (private) RSS, from /proc/self/status: memory-mapped arrow pages that were read
count in RSS as file pages the kernel can drop, while the anonymous part is what the reader holds.
CPU: user + system CPU time per batch of the main process and of the worker (from its first batch
on): what each costs whatever else runs on the machine; 1000 / (worker ms) * 64 is the rows/s a
worker with a core of its own would give, as long as the main process keeps up.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPE = (4, 64, 64)


def synthesize(out: Path, rows: int, shard_size: int = 1000, chunk: int = 250) -> None:
    """A cache of `rows` rows of SHAPE fp16 latents ~ N(0.3, 2), a caption each, written as `encode` would."""
    import datasets

    from latentvae.cache.manifest import MANIFEST_FILE, SETTINGS_FILE, measured_statistics
    from latentvae.cache.schema import arrow_schema, make_table
    from latentvae.cache.writer import ShardWriter, row_moments, scan_shards

    (out / "data").mkdir(parents=True)
    features = datasets.Features({"caption": datasets.Value("string")})
    writer = ShardWriter(out / "data", 1, 0, shard_size, arrow_schema("fp16", "mean", features))
    g = torch.Generator().manual_seed(0)
    C, h, w = SHAPE
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        z = 0.3 + 2 * torch.randn(n, C, h, w, generator=g)
        idx = list(range(start, start + n))
        values = {"source_index": idx, "source_id": [f"img{i}.png" for i in idx], "flipped": [False] * n,
                  "pixel_size": [[8 * h, 8 * w]] * n, "original_size": [[8 * h, 8 * w]] * n,
                  "crop_top_left": [[0, 0]] * n, "latent_shape": [list(SHAPE)] * n}
        extra = datasets.Dataset.from_dict({"caption": [f"a photo number {i}" for i in idx]}).data.table
        writer.add(make_table(values, {"latent_mean": z}, "fp16", extra), row_moments({"latent_mean": z}))
    writer.close()
    (out / SETTINGS_FILE).write_text("{}")
    shards = scan_shards(out)
    manifest = {"format_version": 1, "store": "mean", "dtype": "fp16",
                "vae": {"family": "kl", "class": "AutoencoderKL", "latent_channels": C, "scaling_factor": 0.18215,
                        "shift_factor": None, "factors": "synthetic benchmark cache"},
                "shards": [{"file": f"data/{s['name']}", "rows": s["rows"]} for s in shards],
                "latent_statistics": measured_statistics(shards, C, ("sd", "sdxl", "sd3"))}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))


def status_kib(key: str) -> int:
    """A field of /proc/self/status in KiB: VmHWM (peak RSS of this process image; unlike ru_maxrss it
    starts afresh at exec), RssAnon (private memory now)."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


# --sweep's extra kinds: DataLoader settings
SWEEP = ["transport:fp16:fs", "transport:fp16:pf4", "latentvae:fp16:fs", "latentvae:fp16:pf4", "latentvae:fp16:persist"]
OPTIONS = {"0": "in-process (0 workers)", "step": "+ step", "fp16": "dtype=float16", "datasets": "datasets path (no arrow index)",
           "fs": "sharing file_system", "pf4": "prefetch_factor=4", "persist": "persistent_workers, 2nd epoch"}


def loader_options(options: list, workers: int = 1) -> dict:
    """DataLoader keyword arguments (and the sharing strategy, set here) for a kind's options."""
    if "fs" in options:
        torch.multiprocessing.set_sharing_strategy("file_system")
    kw = {"num_workers": 0 if "0" in options else workers}
    if "pf4" in options:
        kw["prefetch_factor"] = 4
    if "persist" in options:
        kw["persistent_workers"] = True
    return kw


def run_transport(batch_size: int, options: list, batches: int = 150) -> dict:
    """The DataLoader's own cost: ready-made batches of the same size through one worker, each a fresh
    shared-memory tensor written in the worker (as LatentDataset's are)."""
    from torch.utils.data import DataLoader, Dataset

    from latentvae.cache.reader import shared_copy

    zeros = torch.zeros(batch_size, *SHAPE, dtype=torch.float16 if "fp16" in options else torch.float32)

    class Zeros(Dataset):
        def __len__(self):
            return batches

        def __getitem__(self, i):
            probe_cpu(i)
            return shared_copy(zeros)

    t0, cpu0 = time.perf_counter(), cpu_seconds()
    rows, first = 0, None
    for batch in DataLoader(Zeros(), batch_size=None, **loader_options(options)):
        if first is None:
            first = (time.perf_counter(), batch.shape[0])
        rows += batch.shape[0]
    seconds = time.perf_counter() - t0
    return {"rows": rows, "seconds": seconds, "steady_rows_s": (rows - first[1]) / (t0 + seconds - first[0]),
            "rss_mib": status_kib("VmHWM") / 1024, "worker_rss_mib": None, "worker_anon_mib": None,
            "main_cpu_ms": (cpu_seconds() - cpu0) / batches * 1e3, "worker_cpu_ms": worker_cpu_ms()}


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def probe_cpu(call: int) -> None:
    """In a DataLoader worker: its CPU time at batch 1 and every 8th batch after, for worker_cpu_ms."""
    if torch.utils.data.get_worker_info() is not None and call % 8 == 1:
        path = Path(os.environ["PROBE"] + ".cpu")
        first = path.read_text().split()[:2] if call > 1 and path.is_file() else [str(cpu_seconds()), str(call)]
        path.write_text(f"{first[0]} {first[1]} {cpu_seconds()} {call}")


def worker_cpu_ms() -> Optional[float]:
    """The worker's CPU time per batch (its busy time: on a core of its own, its rows/s ceiling), or None."""
    path = Path(os.environ["PROBE"] + ".cpu")
    if not path.is_file():
        return None
    c0, n0, c1, n1 = (float(v) for v in path.read_text().split())
    path.unlink()
    return (c1 - c0) / (n1 - n0) * 1e3 if n1 > n0 else None


def make_step(step_ms: float):
    """A CPU "training step" of about step_ms ms: fp32 matmuls (calibrated here, one torch thread)."""
    a = torch.randn(384, 384)
    t0 = time.perf_counter()
    for _ in range(20):
        a @ a
    repeats = max(1, round(step_ms / ((time.perf_counter() - t0) / 20 * 1e3)))

    def step(latents: torch.Tensor) -> None:
        for _ in range(repeats):
            a @ a
        float(latents[0, 0, 0, 0])
    return step


def run_step_alone(batch_size: int, step_ms: float, batches: int) -> dict:
    """The steps alone, on one ready batch: the loop's rate when reading costs it nothing."""
    step, z = make_step(step_ms), torch.zeros(batch_size, *SHAPE)
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    for _ in range(batches):
        step(z)
    seconds = time.perf_counter() - t0
    return {"rows": batches * batch_size, "seconds": seconds, "steady_rows_s": None,
            "rss_mib": status_kib("VmHWM") / 1024, "worker_rss_mib": None, "worker_anon_mib": None,
            "main_cpu_ms": (cpu_seconds() - cpu0) / batches * 1e3, "worker_cpu_ms": None}


def run_latentvae(cache: Path, hf_cache: str, batch_size: int, options: list, step_ms: float = 0) -> dict:
    from torch.utils.data import DataLoader

    from latentvae import BucketBatchSampler, LatentDataset, LatentLoader, collate

    class Sampled(LatentDataset):
        """Records the reading process's peak anonymous RSS every 8 batches (the benchmark's probe, not the reader)."""
        calls, peak = 0, 0

        def read_batch(self, indices):
            out = super().read_batch(indices)
            self._probe()
            return out

        def __getitems__(self, indices):
            out = super().__getitems__(indices)
            self._probe()
            return out

        def _probe(self):
            Sampled.calls += 1
            probe_cpu(Sampled.calls)
            if Sampled.calls % 8 == 1:
                Sampled.peak = max(Sampled.peak, status_kib("RssAnon"))
                Path(os.environ["PROBE"]).write_text(f"{Sampled.peak} {status_kib('VmHWM')}")

    dtype = torch.float16 if "fp16" in options else torch.float32
    ds = Sampled(cache, convention="sd", cache_dir=hf_cache, dtype=dtype)
    if "datasets" in options:
        ds._values = None  # the reader's fast arrow index off: batches gathered through `datasets`
    sampler = BucketBatchSampler(ds, batch_size=batch_size, seed=0)
    kw = loader_options(options)
    if "loader" in options:
        loader, kw = LatentLoader(ds, sampler=sampler), {"num_workers": 0}
    else:
        loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, **kw)
    step = make_step(step_ms) if "step" in options else None
    for epoch in range(2 if "persist" in options else 1):  # persistent: the 2nd epoch's workers are warm
        sampler.set_epoch(epoch)
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        rows, first = 0, None
        for batch in loader:
            if first is None:
                first = (time.perf_counter(), batch["latents"].shape[0])
            rows += batch["latents"].shape[0]
            assert batch["latents"].shape[1:] == SHAPE and batch["latents"].dtype == dtype
            if step is not None:
                step(batch["latents"])
        seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    del loader
    anon, hwm = (int(v) / 1024 for v in Path(os.environ["PROBE"]).read_text().split())
    if not kw["num_workers"]:  # read in this process: its own anonymous memory, no worker
        anon, hwm = status_kib("RssAnon") / 1024 if "loader" in options else None, None
    steady = (rows - first[1]) / (t0 + seconds - first[0])
    return {"rows": rows, "seconds": seconds, "steady_rows_s": steady, "rss_mib": status_kib("VmHWM") / 1024,
            "worker_rss_mib": hwm,
            "worker_anon_mib": anon, "main_cpu_ms": cpu / len(sampler) * 1e3, "worker_cpu_ms": worker_cpu_ms()}


def run_datasets(cache: Path, hf_cache: str, limit: int, fmt: str) -> dict:
    import datasets

    files = sorted(str(p) for p in (cache / "data").glob("*.parquet"))
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=hf_cache)
    if fmt == "numpy":
        ds = ds.with_format("numpy")
    n = min(limit, len(ds))
    t0 = time.perf_counter()
    for i in range(n):
        row = ds[i]
        z = torch.as_tensor(np.asarray(row["latent_mean"], dtype=np.float32))
        assert z.shape == SHAPE
    seconds = time.perf_counter() - t0
    return {"rows": n, "seconds": seconds, "steady_rows_s": None, "rss_mib": status_kib("VmHWM") / 1024, "worker_rss_mib": None,
            "worker_anon_mib": None}


def child(args) -> None:
    torch.set_num_threads(1)
    cache, hf_cache = Path(args.cache), args.hf_cache
    if args.child == "prepare":
        import datasets
        files = sorted(str(p) for p in (cache / "data").glob("*.parquet"))
        datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=hf_cache)
        result = {}
    elif args.child.split(":")[0] == "latentvae":
        result = run_latentvae(cache, hf_cache, args.batch_size, args.child.split(":")[1:], args.step_ms)
    elif args.child == "step":
        import datasets
        files = sorted(str(p) for p in (cache / "data").glob("*.parquet"))
        rows = len(datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=hf_cache))
        result = run_step_alone(args.batch_size, args.step_ms, -(-rows // args.batch_size))
    elif args.child.split(":")[0] == "transport":
        result = run_transport(args.batch_size, args.child.split(":")[1:])
    else:
        result = run_datasets(cache, hf_cache, args.baseline_rows, args.child.split(":")[1])
    print("RESULT " + json.dumps(result))


def in_child(kind: str, cache: Path, hf_cache: Path, args, probe: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--cache", str(cache), "--hf-cache", str(hf_cache),
           "--batch-size", str(args.batch_size), "--baseline-rows", str(args.baseline_rows),
           "--step-ms", str(args.step_ms)]
    env = {**os.environ, "PROBE": str(probe), "OMP_NUM_THREADS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    return json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, action="append", help="cache sizes (repeatable; default 10000 and 20000)")
    p.add_argument("--work", default="/tmp/latentvae-cache-read", help="where the synthetic caches go")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--baseline-rows", type=int, default=2000, help="rows the per-row datasets baselines read")
    p.add_argument("--sweep", action="store_true", help="also DataLoader settings: file_system sharing, "
                   "prefetch_factor 4, persistent_workers")
    p.add_argument("--step-ms", type=float, default=8.0, help="the + step rows' CPU step per batch, ms")
    p.add_argument("--only", help="comma-separated kinds to run (default: all; e.g. latentvae:loader,datasets:numpy)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--hf-cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    work = Path(args.work)
    sizes = args.rows or [10000, 20000]
    table = []
    for n in sizes:
        cache, hf_cache = work / f"cache-{n}", work / f"hf-{n}"
        if not (cache / "manifest.json").is_file():
            t0 = time.perf_counter()
            synthesize(cache, n)
            print(f"synthesized {n} rows in {time.perf_counter() - t0:.1f} s", flush=True)
        in_child("prepare", cache, hf_cache, args, work / "probe")
        kinds = ["latentvae", "latentvae:fp16", "latentvae:datasets", "latentvae:0", "latentvae:0:fp16",
                 "latentvae:loader", "latentvae:loader:fp16", "step", "latentvae:loader:step", "latentvae:0:step",
                 "transport", "transport:fp16"]
        kinds += SWEEP if args.sweep else []
        kinds += ["datasets:python", "datasets:numpy"]
        if args.only:
            unknown = set(args.only.split(",")) - set(kinds) - set(SWEEP)
            if unknown:
                raise SystemExit(f"--only: unknown kinds {sorted(unknown)}; valid: {', '.join(kinds)}")
            kinds = args.only.split(",")
        for kind in kinds:
            r = in_child(kind, cache, hf_cache, args, work / "probe")
            table.append((n, kind, r))
            print(n, kind, json.dumps(r), flush=True)
    mib = lambda v: "-" if v is None else f"{v:.0f}"
    rate = lambda v: "-" if v is None else f"{v:,.0f}"
    ms = lambda v: "-" if v is None else f"{v:.2f}"
    print(f"\ncpu capability: {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"{'x'.join(map(str, SHAPE))} fp16 latents, batches of {args.batch_size}")
    print("\n| cache rows | reader | rows read | rows/s | rows/s after the first batch | peak RSS MiB (main) | "
          "peak RSS MiB (worker) | peak anon MiB (reading process) | CPU ms/batch main | CPU ms/batch worker |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    names = {"datasets:python": "datasets `ds[i]` per row (python lists)",
             "datasets:numpy": "datasets `ds.with_format(\"numpy\")[i]` per row",
             "step": f"step alone (~{args.step_ms:g} ms CPU per batch, no reading)"}
    for _, kind, _ in table:
        options = kind.split(":")[1:]
        if kind.startswith("latentvae:loader"):
            names[kind] = "LatentDataset + BucketBatchSampler, LatentLoader (1 reader thread)" + "".join(
                ", " + OPTIONS[o] for o in options if o != "loader")
        elif kind.startswith("latentvae"):
            names[kind] = "LatentDataset + BucketBatchSampler, DataLoader " + (
                ", ".join(OPTIONS[o] for o in options) if "0" in options else
                ", ".join(["1 worker"] + [OPTIONS[o] for o in options]))
        elif kind.startswith("transport"):
            names[kind] = (f"DataLoader 1 worker passing ready-made zero {'float16' if 'fp16' in options else 'float32'} "
                           f"batches (its own ceiling){''.join(', ' + OPTIONS[o] for o in options if o != 'fp16')}")
    for n, kind, r in table:
        print(f"| {n} | {names[kind]} | {r['rows']} | {r['rows'] / r['seconds']:,.0f} | {rate(r['steady_rows_s'])} | {mib(r['rss_mib'])} | "
              f"{mib(r['worker_rss_mib'])} | {mib(r['worker_anon_mib'])} | {ms(r.get('main_cpu_ms'))} | "
              f"{ms(r.get('worker_cpu_ms'))} |")


if __name__ == "__main__":
    main()
