"""Where a DataLoader worker's time goes when it reads a latent cache: CPU time per batch of each phase
of LatentDataset's read, in the worker and, for comparison, in the main process (0 workers).

    python benchmarks/cache_read_phases.py                 # a synthesized 10,000-row 4x64x64 fp16 cache
    python benchmarks/cache_read_phases.py --rows 20000 --work /tmp/cache-read-phases

Phases (thread CPU time, summed over an epoch, per batch of 64):
  gather         the rows' stored values copied out of the memory-mapped arrow chunks (LatentDataset._gather)
  normalize      the family formula in float32 and the rounding to the output dtype (_latents less the two others)
  handover copy  in a worker: the batch written into new shared memory (reader.shared_copy)
  other columns  the passthrough and bookkeeping columns as Python lists (_other_columns)
  row dicts      the rest of __getitems__: one dict per row
  collate        reader.collate: the rows' latents are already one tensor
  worker rest    in a worker: its process CPU time not in the phases above (receiving the indices,
                 pickling the batch, passing the shared memory's file descriptor)
and, beside them, the cost of fresh shared memory on this machine: writing a float32 batch's bytes into a
new memfd by pwrite (what shared_copy does) against mapping it first and writing through the mapping.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PHASES = ("gather", "normalize", "handover copy", "other columns", "row dicts", "collate", "worker rest")


def measure(cache: Path, hf_cache: str, workers: int, dtype: torch.dtype, out: Path) -> dict:
    """One epoch in this process (run in a fresh one per configuration); phase CPU ms per batch."""
    from latentvae.cache import loader as L
    from latentvae.cache import reader as R

    totals: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                totals[name] = totals.get(name, 0.0) + time.thread_time() - t
        return wrapper

    R.LatentDataset._gather = timed("gather", R.LatentDataset._gather)
    R.LatentDataset._other_columns = timed("other columns", R.LatentDataset._other_columns)
    R.shared_copy = timed("handover copy", R.shared_copy)
    R.LatentDataset._latents = timed("latents", R.LatentDataset._latents)
    getitems = timed("getitems", R.LatentDataset.__getitems__)
    collate = timed("collate", L.collate)

    class Dataset(R.LatentDataset):
        calls = 0

        def __getitems__(self, indices):
            if Dataset.calls == 0:
                totals["process0"] = time.process_time()
            Dataset.calls += 1
            result = getitems(self, indices)
            if torch.utils.data.get_worker_info() is not None:  # the worker's figures so far, for the main process
                out.write_text(json.dumps({**totals, "batches": Dataset.calls, "process1": time.process_time()}))
            return result

    ds = Dataset(cache, convention="sd", cache_dir=hf_cache, dtype=dtype)
    sampler = L.BucketBatchSampler(ds, batch_size=64, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
    t0, batches = time.perf_counter(), 0
    for _ in loader:
        batches += 1
    wall = time.perf_counter() - t0
    rec = json.loads(out.read_text()) if workers else {**totals, "batches": batches, "process1": time.process_time()}
    n = rec["batches"]
    ms = {"gather": rec["gather"], "normalize": rec["latents"] - rec["gather"] - rec.get("handover copy", 0.0),
          "handover copy": rec.get("handover copy", 0.0), "other columns": rec["other columns"],
          "row dicts": rec["getitems"] - rec["latents"] - rec["other columns"], "collate": rec["collate"]}
    total = rec["process1"] - rec["process0"]
    if workers:
        ms["worker rest"] = total - sum(ms.values())
    ms = {k: v / n * 1e3 for k, v in ms.items()}
    return {"workers": workers, "dtype": str(dtype).replace("torch.", ""), "rows_per_s": batches * 64 / wall,
            "cpu_ms_per_batch": total / n * 1e3, "phases_ms": ms}


def fresh_shared_memory(nbytes: int, reps: int = 100) -> dict:
    """ms to put `nbytes` into new shared memory: pwrite into a memfd, or map it and write through the mapping."""
    from latentvae.cache.reader import shared_copy

    x = torch.randn(nbytes // 4)
    y = torch.empty_like(x)

    def mapped():
        fd = os.memfd_create("latentvae-bench", os.MFD_CLOEXEC)
        os.ftruncate(fd, nbytes)
        storage = torch.UntypedStorage._new_shared_fd_cpu(fd, nbytes)
        os.close(fd)
        torch.empty(0).set_(storage, 0, x.shape).copy_(x)

    result = {}
    for name, fn in (("pwrite into a new memfd (shared_copy)", lambda: shared_copy(x)),
                     ("map a new memfd, write through the mapping", mapped),
                     ("copy into reused private memory", lambda: y.copy_(x))):
        fn()
        t = time.thread_time()
        for _ in range(reps):
            fn()
        result[name] = (time.thread_time() - t) / reps * 1e3
    return result


def main(argv=None) -> None:
    from _common import hardware
    from cache_read import synthesize

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10000)
    ap.add_argument("--work", default="/tmp/latentvae-cache-read-phases")
    ap.add_argument("--out", help="write the results here as JSON (and .txt beside it)")
    ap.add_argument("--run", nargs=2, help=argparse.SUPPRESS)  # internal: one configuration, in a fresh process
    args = ap.parse_args(argv)
    work = Path(args.work)
    cache = work / f"cache-{args.rows}"
    if args.run:
        workers, dtype = int(args.run[0]), getattr(torch, args.run[1])
        print(json.dumps(measure(cache, str(work / "hf"), workers, dtype, work / "worker.json")))
        return
    if not (cache / "manifest.json").exists():
        work.mkdir(parents=True, exist_ok=True)
        synthesize(cache, args.rows)
    lines = [f"hardware: {json.dumps(hardware('cpu'))}", f"cache: {args.rows} rows of 4x64x64 fp16, batches of 64, "
             "family sd; thread CPU ms per batch (one epoch, after a first epoch in another process warmed the files)"]
    results = []
    for workers, dtype in ((0, "float32"), (1, "float32"), (0, "float16"), (1, "float16")):
        cmd = [sys.executable, __file__, "--rows", str(args.rows), "--work", str(work), "--run", str(workers), dtype]
        for attempt in range(2):  # the first run of each warms the page cache and `datasets`' arrow files
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    head = "| reader | rows/s | CPU ms/batch (process) | " + " | ".join(PHASES) + " |"
    lines += ["", head, "|---" * (3 + len(PHASES)) + "|"]
    for r in results:
        cells = [f"{r['phases_ms'][p]:.2f}" if p in r["phases_ms"] else "-" for p in PHASES]
        lines.append(f"| {r['workers']} worker(s), {r['dtype']} | {r['rows_per_s']:,.0f} | {r['cpu_ms_per_batch']:.2f} | "
                     + " | ".join(cells) + " |")
    shm = {f"{mb} MiB": fresh_shared_memory(mb << 20) for mb in (2, 4)}
    lines += ["", "fresh shared memory, ms per batch-sized write:"]
    for size, rec in shm.items():
        lines.append(f"  {size}: " + "; ".join(f"{k} {v:.2f}" for k, v in rec.items()))
    print(*lines, sep="\n")
    if args.out:
        Path(args.out).write_text(json.dumps({"hardware": hardware("cpu"), "rows": args.rows, "results": results,
                                              "fresh_shared_memory_ms": shm}, indent=1))
        Path(args.out).with_suffix(".txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
