"""The job directory: manifest, append-only shards, resume.

    DIR/manifest.json         resolved recipe + fingerprint of everything that changes output
    DIR/shards/STAGE-N.jsonl  one line per input id per stage, written to a temp name then renamed
    DIR/.lock                 held while a process works on the job, and while the manifest is read or written
    DIR/quarantine/SHARD.bad  unreadable shard lines moved aside by `JobStore.repair` (`cai jobs repair`)

A shard becomes visible only whole (rename is atomic), so a killed process loses
at most the batch it was generating and never leaves a half record behind. A line
that still cannot be read (a disk fault, a hand edit) stops readers with an error
naming the shard and line (CorruptShard) until it is repaired.
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
from typing import Any, NamedTuple

from pydantic import BaseModel, Field, ValidationError

from cai import __version__
from cai.records import ErrorCode, PreferenceRecord, SampledAnswers, SFTRecord, sha256_text, utc_now


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


class CorruptShard(JobError):
    """A shard line that is not a readable row of its stage; the message names the file and line."""

    def __init__(self, path: Path, line: int, reason: str):
        self.path, self.line, self.reason = path, line, reason
        super().__init__(f"{path}:{line}: unreadable row ({reason}). Run `cai jobs repair {path.parent.parent}` "
                         "to move unreadable lines to its quarantine/ folder; their inputs are generated again "
                         "by the next run")


class ShardLine(NamedTuple):
    """One line of a shard: `row` (and `record`, when checked against a schema) or the `problem`."""

    number: int
    raw: bytes
    row: dict[str, Any] | None
    record: BaseModel | None
    problem: str | None


_ERROR_CODES = frozenset(code.value for code in ErrorCode)


def stage_schema(stage: str) -> type[BaseModel] | None:
    """The record model of a stage's rows; None for a stage the store does not know."""
    if stage == "judge-eval":
        from cai.judge_eval import JudgedItem  # judge_eval builds on this module: imported when asked

        return JudgedItem
    return {"sft": SFTRecord, "prefs": PreferenceRecord, "samples": SampledAnswers}.get(stage)


def _parse(raw: bytes, schema: type[BaseModel] | None) -> tuple[dict | None, BaseModel | None, str | None]:
    """(row, record, None), or (None, None, what is wrong). Without `schema` only the shape every
    stage shares is checked (an `id`, an `error` that is null or carries a known code)."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return None, None, f"not UTF-8 text: byte {exc.start}"
    except json.JSONDecodeError as exc:
        cut = "" if raw.endswith(b"\n") else ", truncated (no newline at the end)"
        return None, None, f"not JSON: {exc.msg} at column {exc.colno}{cut}"
    if not isinstance(row, dict) or not isinstance(row.get("id"), str) or "error" not in row:
        return None, None, "not a record: a JSON object with an `id` and an `error` is expected"
    error = row["error"]
    if error is not None and not (isinstance(error, dict) and error.get("code") in _ERROR_CODES):
        return None, None, "not a record: `error` is neither null nor an object with a known `code`"
    if schema is None:
        return row, None, None
    try:
        return row, schema.model_validate(row), None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "row"
        return None, None, f"not a {schema.__name__} ({exc.error_count()} problems; {where}: {first['msg']})"


def scan_shard(path: Path, schema: type[BaseModel] | None = None, missing_ok: bool = False) -> Iterator[ShardLine]:
    """Every line of a shard, readable or not (lines end at b"\\n" only, as the writer wrote them)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        if missing_ok:  # e.g. a resuming job has just dropped this shard's `cancelled` rows
            return
        raise
    with f:
        for number, raw in enumerate(f, 1):
            yield ShardLine(number, raw, *_parse(raw, schema))


def read_shard(path: Path, schema: type[BaseModel] | None = None, missing_ok: bool = False) -> Iterator[dict]:
    """The rows of a shard; CorruptShard (naming the file and line) at the first unreadable one."""
    for line in scan_shard(path, schema, missing_ok):
        if line.problem is not None:
            raise CorruptShard(path, line.number, line.problem)
        yield line.row


def _text(raw: bytes) -> str:
    return raw.decode("utf-8") + ("" if raw.endswith(b"\n") else "\n")


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

    def __init__(self, root: Path, manifest: Manifest, replan_if_empty: bool = False):
        self.root = root
        self.manifest = manifest
        self.shards = root / "shards"
        self.replan_if_empty = replan_if_empty
        self._lock_fd: int | None = None

    @classmethod
    def open(cls, root: str | Path, manifest: Manifest, replan_if_empty: bool = False) -> JobStore:
        """Create the job, or reopen it to resume. A different fingerprint is refused, unless
        `replan_if_empty` and the job has no rows yet (a first run that failed before its first
        row): then the new manifest replaces the old one.

        The manifest is read and written only under the job's lock, here and again by
        `with store:` (which holds the lock while the job works), so two first runs with
        different settings never both pass the check: rows always match the manifest.
        """
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        store = cls(root, manifest, replan_if_empty)
        with store:
            pass
        return store

    def __enter__(self) -> JobStore:
        self._lock_fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise JobError(f"{self.root} is being worked on by another process; wait for it or stop it") from None
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

    def has_rows(self) -> bool:
        """Whether any shard (of any stage) exists: a job without one may be re-planned."""
        return self.shards.is_dir() and any(self.shards.glob("*.jsonl"))

    def shard_paths(self, stage: str) -> list[Path]:
        return sorted(self.shards.glob(f"{stage}-*.jsonl"))

    def read(self, stage: str, validate: bool = False) -> Iterator[dict[str, Any]]:
        """Every record of a stage, streamed shard by shard; CorruptShard at an unreadable line.
        `validate` also checks each row against the stage's record model (stage_schema)."""
        schema = stage_schema(stage) if validate else None
        for shard in self.shard_paths(stage):
            yield from read_shard(shard, schema)

    def done_ids(self, stage: str, key: Callable[[dict[str, Any]], str] = lambda row: row["id"],
                 redo: Collection[str] = ()) -> IdSet:
        """Input ids finished in this stage (`key` maps a stored row to its input id).

        Rows with an error code in `redo` do not count as finished and are dropped from the
        shards, so the caller generates them again; one read of the shards serves both.
        Rows are checked against the stage's schema: a resume never counts a wrong row as done.
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

    def drop_errors(self, stage: str, codes: Collection[str] | None = None) -> dict[str, int]:
        """Remove error rows (of `codes`, or all) from the shards, each shard rewritten atomically,
        so a resume redoes them. A kill between two rewrites only leaves some for the next call.
        """
        dropped: Counter[str] = Counter()
        for shard in self.shard_paths(stage):
            rows = self._rows_of(shard)  # lines end at b"\n" only: a row's text may hold U+2028
            drop = [(e := row["error"]) is not None and (codes is None or e["code"] in codes) for row, _ in rows]
            if not any(drop):
                continue
            dropped.update(row["error"]["code"] for (row, _), d in zip(rows, drop) if d)
            self._rewrite(shard, [_text(raw) for (_, raw), d in zip(rows, drop) if not d])
        return dict(dropped)

    @staticmethod
    def _rows_of(shard: Path) -> list[tuple[dict[str, Any], bytes]]:
        rows = []
        for line in scan_shard(shard):
            if line.problem is not None:
                raise CorruptShard(shard, line.number, line.problem)
            rows.append((line.row, line.raw))
        return rows

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
            lines = list(scan_shard(shard, stage_schema(shard.stem.rsplit("-", 1)[0])))
            bad = [line for line in lines if line.problem is not None]
            if not bad:
                continue
            quarantine = self.root / "quarantine"
            quarantine.mkdir(exist_ok=True)
            with open(quarantine / f"{shard.name}.bad", "ab") as f:
                f.writelines(line.raw if line.raw.endswith(b"\n") else line.raw + b"\n" for line in bad)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(quarantine)
            self._rewrite(shard, [_text(line.raw) for line in lines if line.problem is None])
            moved += [(shard, line.number, line.problem) for line in bad]
        return moved

    def append(self, stage: str, records: Iterable[BaseModel]) -> Path:
        """Write one shard for a finished batch; visible only once complete."""
        existing = self.shard_paths(stage)
        index = int(existing[-1].stem.rsplit("-", 1)[1]) + 1 if existing else 0
        path = self.shards / f"{stage}-{index:06d}.jsonl"
        atomic_write_lines(path, (r.model_dump_json() + "\n" for r in records))
        return path
