"""What a rerun of `latentvae encode` into an existing cache has to do, found from the sources, not guessed.

Every row records what identified its source when it was encoded (schema.ROW_COLUMNS): the key
(a folder image's path relative to the folder, or a dataset row `[i]`), the file's size and
modification time, the sha256 of exactly the bytes that were decoded, a dataset's fingerprint,
and the sha256 of the row's passthrough columns (captions, labels). A rerun compares each row with
the input of the same key now (plan):

    kept       same size and mtime (same fingerprint for a dataset), same metadata: left where it is
    carried    the same image bytes (sha256 equal, though size/mtime or the fingerprint changed), or
               only the captions/metadata changed: the latent is copied into a new shard with the
               source's identity and metadata as they are now; no re-encoding
    stale      the key is gone (file deleted, --limit lowered), the bytes changed, or a second copy
               of a row already kept: dropped; an input that still exists is encoded again

A finished shard is never rewritten. A shard holding any row that is not kept is *superseded*: its
carried rows go into new shards (process rank writer.COPY_RANK), the new and changed inputs are
encoded into new shards, then a new manifest generation lists the shards that hold every current
input exactly once, and only then are the superseded shards deleted. `update.json`, written before
the first new shard, names the superseded shards and the attempt of the new ones, so a run killed
at any moment is finished (manifest committed: delete what it superseded) or undone (not committed:
delete the carried copies; the freshly encoded rows are valid rows of the current sources and are
kept) by the next run, before it looks at anything (recover). Until the commit, manifest.json is
the previous generation, whose shards all still exist: a reader going by the manifest
(LatentDataset, `latentvae decode`) always sees one whole generation.

Resume or update (continuation, one rule, decided before anything is encoded):

    resumed    the previous run did not finish: data/ holds shards that manifest.json does not list
               (or shards and no manifest.json yet). Its rows are kept; the rerun says so first, with
               the inputs done and to do (resume_message)
    update     there is a finished generation (manifest.json) and the inputs changed since: the plan
               of that generation's own shards and failures against the inputs now has something to
               write. Its counts (changes since that generation) are what the summary reports
               (update_message) and the next manifest records as `last_update`

Both hold after an update that was interrupted: the rerun says it resumes, then that it updated.
Without a finished generation a resume also names the rows whose sources changed since it stopped.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..fsutil import atomic_write_bytes, atomic_write_json, fsync_dir
from ..images import BadImage
from .schema import ROW_COLUMNS, VIDEO_COLUMNS, from_storage
from .writer import COPY_RANK, ShardWriter, failure_log_paths, list_shards, read_jsonl, shard_attempt_rank

JOURNAL_FILE = "update.json"
MANIFEST_FILE = "manifest.json"


# ----------------------------------------------------------------------------- identities of the inputs now
def metadata_hash(values: Optional[dict]) -> Optional[str]:
    """sha256 of one row's passthrough values (None without any): what a caption edit changes."""
    if not values:
        return None
    text = json.dumps(values, sort_keys=True, ensure_ascii=False,
                      default=lambda o: hashlib.sha256(o).hexdigest() if isinstance(o, (bytes, bytearray)) else repr(o))
    return hashlib.sha256(text.encode()).hexdigest()


def table_metadata_hashes(table: Optional[pa.Table]) -> list[Optional[str]]:
    """metadata_hash of each row of an arrow table of passthrough columns."""
    if table is None:
        return []
    return [metadata_hash(row) for row in table.to_pylist()]


@dataclass
class Inputs:
    """The first `n` inputs of the source as they are now: keys, and lazily their identities."""
    src: Any
    n: int
    passthrough: Any  # datasets.Dataset of the passthrough columns, or None
    keys: list[str] = field(init=False)
    index: dict[str, int] = field(init=False)
    _stat: dict[int, Optional[dict]] = field(default_factory=dict, init=False)
    _sha: dict = field(default_factory=dict, init=False)  # input index (or ("video", v)) -> sha256
    _meta: Optional[list] = field(default=None, init=False)

    def __post_init__(self):
        self.keys = [self.src.relative_name(i) for i in range(self.n)]
        self.index = {k: i for i, k in enumerate(self.keys)}

    def stat(self, i: int) -> Optional[dict]:
        """Input i's identity without reading it (None: the file is gone)."""
        if i not in self._stat:
            try:
                self._stat[i] = self.src.stat_identity(i)
            except OSError:
                self._stat[i] = None
        return self._stat[i]

    def sha256(self, i: int) -> Optional[str]:
        """sha256 of input i's bytes now (read once; None if unreadable). The clips of one video (ClipSource:
        `video(i)`) share its bytes: read once for all of them."""
        key = ("video", self.src.video(i)) if hasattr(self.src, "video") else i
        if key not in self._sha:
            try:
                self._sha[key] = self.src.fetch(i)[1]["sha256"]
            except BadImage:
                self._sha[key] = None
        return self._sha[key]

    def metadata(self, i: int) -> Optional[str]:
        if self.passthrough is None:
            return None
        if self._meta is None:
            table = self.passthrough.select(range(self.n)).with_format("arrow")[:] if self.n else None
            self._meta = table_metadata_hashes(table)
        return self._meta[i]


def stat_matches(row: dict, now: Optional[dict]) -> bool:
    """The row's recorded identity and the input's stat identity now agree (no read needed)."""
    if now is None:
        return False
    if "fingerprint" in now:
        return now["fingerprint"] is not None and row.get("source_fingerprint") == now["fingerprint"]
    return row.get("source_size") == now["size"] and row.get("source_mtime_ns") == now["mtime_ns"]


# ----------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    kept: set  # (key, flipped) of rows left where they are or carried
    superseded: list[str]  # shard names to replace
    carry: dict[str, list[tuple[int, int]]]  # superseded shard -> [(row position, current input index)]
    failures: list[dict]  # failure records still true of the inputs as they are
    todo: dict[int, list[bool]]  # input index -> copies (flipped or not) to encode
    changes: dict[str, int]  # inputs added / changed / removed / metadata_changed, rows dropped / carried

    @property
    def writes(self) -> bool:
        return bool(self.superseded or self.todo)


def row_identity(shard: dict, r: int) -> dict:
    return {c: v[r] for c, v in shard["identity"].items()}


def make_plan(shards: list[dict], failure_records: list[dict], inputs: Inputs, flips: tuple[bool, ...],
              current_schema: Optional[pa.Schema] = None, schema_of: Optional[Callable[[str], pa.Schema]] = None) -> Plan:
    """Compare every row (shards in name order) and failure record with the inputs now; see the module doc.
    `current_schema`/`schema_of`: a shard whose passthrough columns are not the current ones (a metadata
    column added or removed) has all its rows carried, so every shard keeps one schema."""
    kept, superseded, carry = set(), [], {}
    changed_keys, removed_keys, meta_keys = set(), set(), set()
    for s in shards:
        moves, replace = [], (current_schema is not None and schema_of is not None
                              and not same_columns(schema_of(s["name"]), current_schema))
        keys = s["identity"].get("source_key") or [None] * s["rows"]
        for r, (key, flipped) in enumerate(zip(keys, s["flipped"])):
            i = inputs.index.get(key) if key is not None else None
            if i is None:  # gone (or a format-1 row without a key)
                removed_keys.add(key)
                replace = True
                continue
            if (key, flipped) in kept:  # a second copy: an interrupted update's leftovers
                replace = True
                continue
            row = row_identity(s, r)
            same_stat = stat_matches(row, inputs.stat(i))
            if not same_stat and (inputs.stat(i) is None or inputs.sha256(i) != row.get("source_sha256")):
                changed_keys.add(key)  # other bytes: encoded again
                replace = True
                continue
            same_meta = row.get("metadata_sha256") == inputs.metadata(i)
            if not same_meta:
                meta_keys.add(key)
            replace = replace or not (same_stat and same_meta)
            kept.add((key, flipped))
            moves.append((r, i))
        if replace:
            superseded.append(s["name"])
            carry[s["name"]] = moves
    carried = sum(len(v) for v in carry.values())
    dropped = sum(s["rows"] for s in shards if s["name"] in carry) - carried
    # a failure to retry (out of memory: writer.FailureLog) is encoded again; the manifest lists it until then
    failures = [rec for rec in live_failures(failure_records, inputs, {k for k, _ in kept}) if not rec.get("retry")]
    failed = {rec["source_key"] for rec in failures}
    todo = {}
    for i, key in enumerate(inputs.keys):
        if key in failed:
            continue
        missing = [f for f in flips if (key, f) not in kept]
        if missing:
            todo[i] = missing
    known = {k for k, _ in kept} | failed | changed_keys
    changes = {"added": sum(1 for i in todo if inputs.keys[i] not in known), "changed": len(changed_keys),
               "removed": len(removed_keys - set(inputs.index)), "metadata_changed": len(meta_keys),
               "rows_dropped": dropped, "rows_carried": carried}
    return Plan(kept, superseded, carry, failures, todo, changes)


def same_columns(a: pa.Schema, b: pa.Schema) -> bool:
    """The same column names and types (the `datasets` features metadata aside)."""
    return a.remove_metadata().equals(b.remove_metadata())


def live_failures(records: list[dict], inputs: Inputs, encoded_keys: set) -> list[dict]:
    """The last record per key of an input that still exists unchanged (its stat identity then = now)
    and was not encoded since: those inputs count as done; any other input is tried again."""
    last = {}
    for rec in records:
        key = rec.get("source_key")
        if key is not None:
            last[key] = rec
    out = []
    for key, rec in last.items():
        i = inputs.index.get(key)
        if i is None or key in encoded_keys or rec.get("identity") is None:
            continue
        now = inputs.stat(i)
        if now is not None and {k: now.get(k) for k in rec["identity"]} == rec["identity"]:
            out.append(rec)
    return sorted(out, key=lambda rec: inputs.index[rec["source_key"]])


# ----------------------------------------------------------------------------- resume or update
@dataclass
class Continuation:
    """What a run continues (module doc): a resume, an update, both, or neither (a first run, a rerun
    with nothing changed)."""
    resumed: bool  # the previous run stopped before its manifest: shards on disk the manifest does not list
    finished: bool  # there is a finished generation (manifest.json)
    update: bool  # ... and the inputs changed since it
    inputs: int
    todo: int  # inputs with a copy still to encode
    failed: int  # inputs that count as done as failures
    changes: dict  # since the finished generation (else since the shards on disk): Plan.changes' keys

    @property
    def encoded(self) -> int:
        return self.inputs - self.todo - self.failed


def manifest_listing(out: Path) -> Optional[tuple[set[str], list[dict]]]:
    """(shard names, failure records) of the finished generation manifest.json describes; None without one."""
    try:
        manifest = json.loads((out / MANIFEST_FILE).read_text())
        return {Path(s["file"]).name for s in manifest["shards"]}, list(manifest.get("failures") or [])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def continuation(out: Path, shards: list[dict], plan: Plan, inputs: Inputs, flips: tuple[bool, ...],
                 current_schema: Optional[pa.Schema] = None,
                 schema_of: Optional[Callable[[str], pa.Schema]] = None) -> Continuation:
    """Resume, update or both (module doc), from the shards on disk (after recover), their plan, and the
    manifest: a resume's update is measured against the finished generation's own shards."""
    listing = manifest_listing(out)
    listed = listing[0] if listing else set()
    resumed = any(s["name"] not in listed for s in shards)
    since = plan
    if listing is not None and resumed:  # what changed since the finished generation, not since the stop
        since = make_plan([s for s in shards if s["name"] in listed], listing[1], inputs, flips, current_schema,
                          schema_of)
    return Continuation(resumed, listing is not None, listing is not None and since.writes, inputs.n,
                        len(plan.todo), len(plan.failures), since.changes)


def count_line(encoded: int, inputs: int, failed: int, todo: int) -> str:
    """`4 of 10 inputs already encoded, 1 failed, 5 to do`"""
    failures = f", {failed} failed" if failed else ""
    return f"{encoded} of {inputs} inputs already encoded{failures}, {todo} to do"


def resume_message(out: Path, c: Continuation) -> Optional[str]:
    """The line a resume starts with (None unless `c.resumed`)."""
    if not c.resumed:
        return None
    ch = c.changes
    since = ""
    if not c.finished and (ch["changed"] or ch["removed"] or ch["metadata_changed"]):
        since = (f"; since it stopped {ch['changed']} input(s) changed, {ch['removed']} removed, "
                 f"{ch['metadata_changed']} with new metadata")
    return f"{out}: resuming an interrupted run: {count_line(c.encoded, c.inputs, c.failed, c.todo)}{since}"


def update_message(out: Path, generation: int, ch: dict) -> str:
    """The summary of an update: what changed since the previous generation."""
    return (f"{out}: updated to generation {generation}: {ch['added']} new, {ch['changed']} changed, {ch['removed']} "
            f"removed input(s), {ch['metadata_changed']} with new metadata; {ch['rows_dropped']} row(s) dropped, "
            f"{ch['rows_carried']} carried over without re-encoding")


# ----------------------------------------------------------------------------- carrying rows over
def carry_rows(out: Path, plan: Plan, inputs: Inputs, writer: ShardWriter, dtype: str, store_columns: list[str],
               passthrough_names: list[str]) -> int:
    """The carried rows of each superseded shard into `writer`, with the source's identity and passthrough
    values as they are now (its bytes are the recorded ones: plan checked), the latents as stored (no
    re-encoding, and the manifest's moments summed from the stored values). Returns the rows carried."""
    total = 0
    for name in plan.superseded:
        moves = plan.carry.get(name) or []
        if not moves:
            continue
        part = pq.read_table(out / "data" / name).take(pa.array([r for r, _ in moves], pa.int64()))
        idx = [i for _, i in moves]
        now = [inputs.stat(i) or {} for i in idx]
        cols = {c: part.column(c) for c in (*ROW_COLUMNS, *VIDEO_COLUMNS) if c in part.column_names}
        for col, key in (("source_size", "size"), ("source_mtime_ns", "mtime_ns"), ("source_fingerprint", "fingerprint")):
            if any(key in n for n in now):
                cols[col] = pa.array([n.get(key) for n in now], ROW_COLUMNS[col])
        cols["metadata_sha256"] = pa.array([inputs.metadata(i) for i in idx], pa.string())
        new = pa.table({**cols, **{c: part.column(c) for c in store_columns}})
        if passthrough_names:
            extra = inputs.passthrough.select(idx).with_format("arrow")[:]
            for c in passthrough_names:
                new = new.append_column(c, extra.column(c))
        # row by row: the rows of one shard may be of several latent shapes (buckets)
        stored = {c: part.column(c).to_pylist() for c in store_columns}
        moments = [writer.moments({c: from_storage(stored[c][k], dtype)[None] for c in store_columns})
                   for k in range(len(moves))]
        writer.add(new, np.concatenate(moments))
        total += len(moves)
    writer.close()
    return total


# ----------------------------------------------------------------------------- the journal
def begin(out: Path, generation: int, attempt: int, superseded: list[str]) -> None:
    """update.json, before the first new shard: what the update replaces, and the name of its new shards."""
    atomic_write_json(out / JOURNAL_FILE, {"generation": generation, "attempt": attempt, "superseded": superseded})


def finish(out: Path, superseded: list[str]) -> None:
    """After the manifest commit: delete what it superseded, then the journal."""
    for name in superseded:
        (out / "data" / name).unlink(missing_ok=True)
    fsync_dir(out / "data")
    (out / JOURNAL_FILE).unlink(missing_ok=True)
    fsync_dir(out)


def manifest_generation(out: Path) -> int:
    try:
        return int(json.loads((out / MANIFEST_FILE).read_text()).get("generation", 1))
    except (OSError, ValueError, AttributeError):
        return 0


def recover(out: Path, log: Callable[[str], Any] = print) -> Optional[str]:
    """Finish or undo the update a kill interrupted (before anything is scanned); what was done, or None."""
    path = out / JOURNAL_FILE
    if not path.is_file():
        return None
    try:
        journal = json.loads(path.read_text())
        generation, attempt, superseded = journal["generation"], journal["attempt"], journal["superseded"]
    except (OSError, ValueError, KeyError, TypeError):  # cut short before the rename: nothing was written after it
        path.unlink(missing_ok=True)
        return None
    if manifest_generation(out) == generation:
        finish(out, superseded)
        what = f"finished an interrupted update (generation {generation}): removed {len(superseded)} superseded shard(s)"
    else:
        copies = [p for p in list_shards(out) if shard_attempt_rank(p.name) == (attempt, COPY_RANK)]
        for p in copies:
            p.unlink()
        fsync_dir(out / "data")
        path.unlink()
        fsync_dir(out)
        what = (f"undid an interrupted update: removed {len(copies)} shard(s) of carried rows; rows it encoded "
                "are kept and the update runs again")
    log(f"{out}: {what}")
    return what


def compact_failures(out: Path, live: list[dict]) -> None:
    """Rewrite the failure logs to hold only the records still true (atomically, file by file)."""
    keep = {(rec.get("source_key"), json.dumps(rec, sort_keys=True)) for rec in live}
    for p in failure_log_paths(out):
        records = [rec for rec in read_jsonl(p) if (rec.get("source_key"), json.dumps(rec, sort_keys=True)) in keep]
        if records:
            atomic_write_bytes(p, "".join(json.dumps(rec) + "\n" for rec in records).encode())
        else:
            p.unlink()
    fsync_dir(out)
