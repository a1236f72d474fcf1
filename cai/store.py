"""The job directory: manifest, one shard per committed batch, resume. Every read of a job's rows,
counts and exports goes through JobStore.

    DIR/manifest.json                    resolved recipe + fingerprint of everything that changes output
    DIR/shards/STAGE-SEQ-DIGEST.jsonl    one committed batch: SEQ its place in plan order, DIGEST a hash of
                                         its input ids (together the batch id); written to a temp name, renamed
    DIR/shards/STAGE-SEQ.jsonl           a shard written before batch ids (read and resumed alike)
    DIR/.lock                 held while a process works on the job, and while the manifest is read or written
    DIR/quarantine/SHARD.bad  unreadable shard lines moved aside by `JobStore.repair` (`cai jobs repair`)

A shard becomes visible only whole (rename is atomic), so a killed process loses
at most the batches it was generating and never leaves a half record behind. A
batch id is committed once: a batch executed twice (a retried worker) is written
once. Shards are read in SEQ order, which is plan order whatever order batches
finished in. A line that still cannot be read (a disk fault, a hand edit) stops
readers with an error naming the shard and line (CorruptShard) until it is repaired.

The store knows no job kind: each stage's record model is passed in (`models`), so
rows are checked against it; a stage without one is checked for the shape every
stage shares (an `id`, an `error` that is null or carries a known code).
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, Field

from cai import __version__
from cai.files import (
    atomic_write_jsonl,
    atomic_write_lines,
    atomic_write_text,
    fsync_dir,
)
from cai.records import sha256_text, utc_now
from cai.shards import (  # noqa: F401  (JobError, ShardLine, batch_id: part of this module's API)
    CorruptShard,
    JobError,
    ShardLine,
    batch_id,
    line_text,
    parse_shard_name,
    read_shard,
    readable_lines,
    scan_shard,
    shard_name,
)

RecordModels = Mapping[str, type[BaseModel]]
"""stage -> the record model of its rows (e.g. {"sft": SFTRecord})."""


class IdSet:
    """A set of record ids in a private temporary SQLite file, so memory stays flat however
    many ids a job has (dedupe and resume need every id seen so far)."""

    def __init__(self, ids: Iterable[str] = ()):
        self._db = sqlite3.connect("")  # "" = a temporary on-disk database, removed on close
        self._db.execute("PRAGMA cache_size=-4096")  # KiB
        self._db.execute("CREATE TABLE ids (k INTEGER PRIMARY KEY)")
        self._size = 0
        for record_id in ids:
            self.add(record_id)

    @staticmethod
    def _key(record_id: str) -> int:
        # Record ids are 64-bit hash prefixes already: a 64-bit digest adds no real collision risk.
        return int.from_bytes(hashlib.blake2b(record_id.encode(), digest_size=8).digest(), "big", signed=True)

    def add(self, record_id: str) -> None:
        self._size += self._db.execute("INSERT OR IGNORE INTO ids VALUES (?)", (self._key(record_id),)).rowcount

    def __contains__(self, record_id: object) -> bool:
        if not isinstance(record_id, str):
            return False
        return self._db.execute("SELECT 1 FROM ids WHERE k = ?", (self._key(record_id),)).fetchone() is not None

    def __len__(self) -> int:
        return self._size


class Manifest(BaseModel):
    stage: str
    fingerprint: str
    fingerprint_inputs: dict[str, Any]
    recipe: dict[str, Any]
    cai_version: str = __version__
    created_at: str = Field(default_factory=utc_now)


def fingerprint(inputs: dict[str, Any]) -> str:
    return sha256_text(json.dumps(inputs, sort_keys=True, default=str))[:16]


def read_manifest(job_dir: str | Path) -> Manifest:
    path = Path(job_dir) / "manifest.json"
    if not path.is_file():
        raise JobError(f"{job_dir} is not a job directory (no manifest.json)")
    return Manifest.model_validate_json(path.read_text())


def _changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


class Unreadable(NamedTuple):
    path: Path
    line: int
    reason: str


class StageStats(BaseModel):
    """What a stage's shards hold: rows (error rows included), error rows by code, generated tokens,
    shards, and the lines that are not readable rows (neither ok nor error rows)."""

    stage: str
    rows: int = 0
    errors: dict[str, int] = Field(default_factory=dict)
    generated_tokens: int = 0
    shards: int = 0
    unreadable: list[Unreadable] = Field(default_factory=list)

    @property
    def ok(self) -> int:
        return self.rows - sum(self.errors.values())

    def check(self) -> StageStats:
        """self, or CorruptShard naming the first unreadable line."""
        if self.unreadable:
            raise CorruptShard(*self.unreadable[0])
        return self


LOCK_WAIT_SECONDS = 2.0
"""How long `with store:` waits for the job's lock. A process at work on the job holds it for the whole
run; a moment's hold is a copy of the lock's descriptor in a child another thread is forking (a
subprocess such as `git`, until it execs), which lets go within milliseconds."""


def _flock_within(fd: int, seconds: float) -> bool:
    """Take an exclusive flock on `fd`, trying for up to `seconds`; whether it was taken."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


class JobStore:
    """One job directory. Use `JobStore.open(...)` as a context manager to work on a job (it holds
    the lock); `JobStore.at(dir)` reads one (status, service, export) without the lock."""

    def __init__(self, root: Path, manifest: Manifest, replan_if_empty: bool = False,
                 models: RecordModels | None = None):
        self.root = Path(root)
        self.manifest = manifest
        self.shards = self.root / "shards"
        self.replan_if_empty = replan_if_empty
        self.models: dict[str, type[BaseModel]] = dict(models or {})
        self._lock_fd: int | None = None

    @classmethod
    def open(cls, root: str | Path, manifest: Manifest, replan_if_empty: bool = False,
             models: RecordModels | None = None) -> JobStore:
        """Create the job, or reopen it to resume. A different fingerprint is refused, unless
        `replan_if_empty` and the job has no rows yet (a first run that failed before its first
        row): then the new manifest replaces the old one.

        The manifest is read and written only under the job's lock, here and again by
        `with store:` (which holds the lock while the job works), so two first runs with
        different settings never both pass the check: rows always match the manifest.
        """
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        store = cls(root, manifest, replan_if_empty, models)
        with store:
            pass
        return store

    @classmethod
    def at(cls, root: str | Path, models: RecordModels | None = None) -> JobStore:
        """The job in `root` as its manifest.json describes it, for reading (JobError if there is none)."""
        return cls(Path(root), read_manifest(root), models=models)

    def __enter__(self) -> JobStore:
        self._lock_fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT)
        if not _flock_within(self._lock_fd, LOCK_WAIT_SECONDS):
            os.close(self._lock_fd)
            self._lock_fd = None
            raise JobError(f"{self.root} is being worked on by another process; wait for it or stop it")
        try:
            self._check_manifest()
        except BaseException:
            self.__exit__()
            raise
        for stale in [*self.shards.glob(".*.tmp-*"), *self.root.glob(".*.tmp-*")]:  # left by a killed writer
            stale.unlink()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _check_manifest(self) -> None:
        """Under the lock: adopt the stored manifest when it has this fingerprint, write ours when
        there is none (or the job is re-planned), refuse otherwise."""
        path = self.root / "manifest.json"
        existing = Manifest.model_validate_json(path.read_text()) if path.exists() else None
        if existing is not None and existing.fingerprint == self.manifest.fingerprint:
            self.manifest = existing
        else:
            if existing is not None and not (self.replan_if_empty and not self.has_rows()):
                changed = _changed_keys(existing.fingerprint_inputs, self.manifest.fingerprint_inputs)
                raise JobError(
                    f"{self.root} holds a job made with different settings (changed: {', '.join(changed)}). "
                    "Rows of two settings are never mixed: choose another --out, or pass --new-job "
                    "to start a fresh job directory beside it."
                )
            atomic_write_text(path, self.manifest.model_dump_json(indent=2) + "\n")
        self.shards.mkdir(exist_ok=True)

    # ---------------------------------------------------------------- shards

    def has_rows(self) -> bool:
        """Whether any shard (of any stage) exists: a job without one may be re-planned."""
        return self.shards.is_dir() and any(self.shards.glob("*.jsonl"))

    def _numbered_shards(self, stage: str) -> list[tuple[int, Path]]:
        found = [(parsed[1], path) for path in self.shards.glob("*.jsonl")
                 if (parsed := parse_shard_name(path.name)) and parsed[0] == stage]
        return sorted(found, key=lambda pair: (pair[0], pair[1].name))

    def shard_paths(self, stage: str) -> list[Path]:
        """The stage's shards in plan order (old `STAGE-SEQ` and batch-id names alike)."""
        return [path for _, path in self._numbered_shards(stage)]

    def next_batch_seq(self, stage: str) -> int:
        """The plan position after every shard of the stage: a new plan's batches come after them."""
        shards = self._numbered_shards(stage)
        return shards[-1][0] + 1 if shards else 0

    def commit(self, stage: str, batch: str, records: Iterable[BaseModel]) -> Path | None:
        """Write the shard of batch `batch` (an id from `batch_id`), visible only once complete; its
        path. A batch already committed is not written again (None): a batch run twice commits once."""
        path = self.shards / shard_name(stage, batch)
        if path.exists():
            return None
        atomic_write_jsonl(path, records)
        return path

    def model_of(self, stage: str) -> type[BaseModel] | None:
        return self.models.get(stage)

    # ---------------------------------------------------------------- reading

    def read(self, stage: str, validate: bool = False) -> Iterator[dict[str, Any]]:
        """Every row of a stage as stored, streamed shard by shard; CorruptShard at an unreadable line.
        `validate` also checks each row against the stage's record model."""
        model = self.model_of(stage) if validate else None
        for shard in self.shard_paths(stage):
            yield from read_shard(shard, model, missing_ok=True)  # a resuming job may drop a shard meanwhile

    def records(self, stage: str) -> Iterator[BaseModel]:
        """Every record of a stage as its record model, in plan order; CorruptShard at an unreadable line."""
        model = self.model_of(stage)
        if model is None:
            raise JobError(f"{self.root}: no record model for stage {stage!r}")
        for shard in self.shard_paths(stage):
            for line in readable_lines(shard, model, missing_ok=True):
                yield line.record

    def head(self, stage: str, count: int) -> list[dict[str, Any]]:
        """The first `count` rows of a stage (error rows included)."""
        return list(itertools.islice(self.read(stage), count))

    def stats(self, stage: str) -> StageStats:
        """Rows, error rows by code, generated tokens and shards of a stage, with every unreadable line
        named (`cai jobs status`); `.check()` raises CorruptShard for the first of them."""
        stats, errors = StageStats(stage=stage), Counter()
        model = self.model_of(stage)
        for shard in self.shard_paths(stage):
            stats.shards += 1
            for line in scan_shard(shard, model, missing_ok=True):
                if line.problem is not None:
                    stats.unreadable.append(Unreadable(shard, line.number, line.problem))
                    continue
                stats.rows += 1
                if line.row["error"] is not None:
                    errors[line.row["error"]["code"]] += 1
                stats.generated_tokens += getattr(line.record, "generated_tokens", 0)
        stats.errors = dict(errors)
        return stats

    def done_ids(self, stage: str, key: Callable[[dict[str, Any]], str] = lambda row: row["id"],
                 redo: Collection[str] = ()) -> IdSet:
        """Input ids finished in this stage (`key` maps a stored row to its input id).

        Rows with an error code in `redo` do not count as finished and are dropped from the
        shards, so the caller generates them again; one read of the shards serves both.
        Rows are checked against the stage's model: a resume never counts a wrong row as done.
        """
        ids, found = IdSet(), False
        for row in self.read(stage, validate=True):
            if (error := row.get("error")) is not None and error["code"] in redo:
                found = True
            else:
                ids.add(key(row))
        if found:
            self.drop_errors(stage, codes=redo)
        return ids

    def export_path(self, name: str) -> Path:
        """Where the job's export `name` (sft.jsonl, report.json, ...) is written."""
        return self.root / name

    def exports(self, names: Iterable[str]) -> list[str]:
        """Those of `names` the job has written (Parquet only exists when rows were exported)."""
        return [name for name in names if self.export_path(name).is_file()]

    # ---------------------------------------------------------------- rewriting

    def drop_errors(self, stage: str, codes: Collection[str] | None = None) -> dict[str, int]:
        """Remove error rows (of `codes`, or all) from the shards, each shard rewritten atomically,
        so a resume redoes them. A kill between two rewrites only leaves some for the next call.
        """
        dropped: Counter[str] = Counter()
        for shard in self.shard_paths(stage):
            rows = [(line.row, line.raw) for line in readable_lines(shard)]  # lines end at b"\n" only (U+2028)
            drop = [(e := row["error"]) is not None and (codes is None or e["code"] in codes) for row, _ in rows]
            if not any(drop):
                continue
            dropped.update(row["error"]["code"] for (row, _), d in zip(rows, drop) if d)
            self._rewrite(shard, [line_text(raw) for (_, raw), d in zip(rows, drop) if not d])
        return dict(dropped)

    @staticmethod
    def _rewrite(shard: Path, keep: list[str]) -> None:
        if keep:
            atomic_write_lines(shard, keep)
        else:
            shard.unlink()

    def repair(self) -> list[tuple[Path, int, str]]:
        """Move every unreadable line of every stage's shards (not UTF-8, not JSON, truncated, not a
        row of its stage) to quarantine/SHARD.bad, raw and appended, fsynced before the shard is
        rewritten without it; readable rows stay. A run then generates the moved inputs again
        (their ids are no longer done). Hold the lock (`with store:`). (shard, line, why) per line moved.
        """
        moved: list[tuple[Path, int, str]] = []
        for shard in sorted(self.shards.glob("*.jsonl")):
            parsed = parse_shard_name(shard.name)
            lines = list(scan_shard(shard, self.model_of(parsed[0]) if parsed else None))
            bad = [line for line in lines if line.problem is not None]
            if not bad:
                continue
            quarantine = self.root / "quarantine"
            quarantine.mkdir(exist_ok=True)
            with open(quarantine / f"{shard.name}.bad", "ab") as f:
                f.writelines(line.raw if line.raw.endswith(b"\n") else line.raw + b"\n" for line in bad)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(quarantine)
            self._rewrite(shard, [line_text(line.raw) for line in lines if line.problem is None])
            moved += [(shard, line.number, line.problem) for line in bad]
        return moved
