"""The job directory: manifest, append-only shards, resume.

    DIR/manifest.json         resolved recipe + fingerprint of everything that changes output
    DIR/shards/STAGE-N.jsonl  one line per input id per stage, written to a temp name then renamed
    DIR/.lock                 held while a process works on the job

A shard becomes visible only whole (rename is atomic), so a killed process loses
at most the batch it was generating and never leaves a half record behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from cai import __version__
from cai.records import sha256_text, utc_now


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


class JobError(RuntimeError):
    """A job directory cannot be used as asked; the message says what to do."""


class Manifest(BaseModel):
    stage: str
    fingerprint: str
    fingerprint_inputs: dict[str, Any]
    recipe: dict[str, Any]
    cai_version: str = __version__
    created_at: str = Field(default_factory=utc_now)


def fingerprint(inputs: dict[str, Any]) -> str:
    return sha256_text(json.dumps(inputs, sort_keys=True, default=str))[:16]


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_lines(path, [text])


def atomic_write_lines(path: Path, lines: Iterable[str]) -> None:
    """Write to a temp file beside `path`, fsync, rename. Errors (disk full...) propagate."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


class JobStore:
    """One job directory. Use `JobStore.open(...)` as a context manager."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root = root
        self.manifest = manifest
        self.shards = root / "shards"
        self._lock_fd: int | None = None

    @classmethod
    def open(cls, root: str | Path, manifest: Manifest) -> JobStore:
        """Create the job, or reopen it to resume. A different fingerprint is refused."""
        root = Path(root)
        path = root / "manifest.json"
        if path.exists():
            existing = Manifest.model_validate_json(path.read_text())
            if existing.fingerprint != manifest.fingerprint:
                changed = _changed_keys(existing.fingerprint_inputs, manifest.fingerprint_inputs)
                raise JobError(
                    f"{root} holds a job made with different settings (changed: {', '.join(changed)}). "
                    "Rows of two settings are never mixed: choose another --out, or pass --new-job "
                    "to start a fresh job directory beside it."
                )
            manifest = existing
        else:
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, manifest.model_dump_json(indent=2) + "\n")
        store = cls(root, manifest)
        store.shards.mkdir(exist_ok=True)
        return store

    def __enter__(self) -> JobStore:
        self._lock_fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise JobError(f"{self.root} is being worked on by another process; wait for it or stop it")
        for stale in [*self.shards.glob(".*.tmp-*"), *self.root.glob(".*.tmp-*")]:  # left by a killed writer
            stale.unlink()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def shard_paths(self, stage: str) -> list[Path]:
        return sorted(self.shards.glob(f"{stage}-*.jsonl"))

    def read(self, stage: str) -> Iterator[dict[str, Any]]:
        """Every record of a stage, streamed shard by shard."""
        for shard in self.shard_paths(stage):
            with open(shard, encoding="utf-8") as f:
                for line in f:
                    yield json.loads(line)

    def done_ids(self, stage: str, key: Callable[[dict[str, Any]], str] = lambda row: row["id"],
                 redo: Collection[str] = ()) -> IdSet:
        """Input ids finished in this stage (`key` maps a stored row to its input id).

        Rows with an error code in `redo` do not count as finished and are dropped from the
        shards, so the caller generates them again; one read of the shards serves both.
        """
        ids, found = IdSet(), False
        for row in self.read(stage):
            if (error := row.get("error")) is not None and error["code"] in redo:
                found = True
            else:
                ids.add(key(row))
        if found:
            self.drop_errors(stage, codes=redo)
        return ids

    def drop_errors(self, stage: str, codes: Collection[str] | None = None) -> dict[str, int]:
        """Remove error rows (of `codes`, or all) from the shards, each shard rewritten atomically,
        so a resume redoes them. A kill between two rewrites only leaves some for the next call.
        """
        dropped: Counter[str] = Counter()
        for shard in self.shard_paths(stage):
            lines = shard.read_text(encoding="utf-8").splitlines(keepends=True)
            errors = [json.loads(line).get("error") for line in lines]
            drop = [e is not None and (codes is None or e["code"] in codes) for e in errors]
            if not any(drop):
                continue
            dropped.update(e["code"] for e, d in zip(errors, drop) if d)
            keep = [line for line, d in zip(lines, drop) if not d]
            if keep:
                atomic_write_lines(shard, keep)
            else:
                shard.unlink()
        return dict(dropped)

    def append(self, stage: str, records: Iterable[BaseModel]) -> Path:
        """Write one shard for a finished batch; visible only once complete."""
        existing = self.shard_paths(stage)
        index = int(existing[-1].stem.rsplit("-", 1)[1]) + 1 if existing else 0
        path = self.shards / f"{stage}-{index:06d}.jsonl"
        atomic_write_lines(path, (r.model_dump_json() + "\n" for r in records))
        return path
