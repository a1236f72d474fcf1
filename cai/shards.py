"""Shard files: their names (stage, plan position, batch id) and their lines, read and checked.

A shard holds the records of one committed batch, one JSON object per line (lines end at b"\\n"
only, as the writer wrote them). It is named `STAGE-SEQ-DIGEST.jsonl`: SEQ is the batch's place in
plan order and DIGEST a hash of its input ids; `SEQ-DIGEST` is the batch id. Jobs written before
batch ids have `STAGE-SEQ.jsonl` shards, read the same way and sorted by SEQ with the new ones.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ValidationError

from cai.errors import CaiError
from cai.files import BadLine, parse_json_line
from cai.records import ErrorCode

_SHARD_NAME = re.compile(r"(?P<stage>.+?)-(?P<seq>\d{6,})(?:-(?P<digest>[0-9a-f]{10}))?\.jsonl")
_BATCH_ID = re.compile(r"\d{6,}-[0-9a-f]{10}")


def batch_id(seq: int, ids: Iterable[str]) -> str:
    """A batch's id, which names its shard: its place in plan order and a digest of its input ids."""
    digest = hashlib.blake2b(digest_size=5)
    for input_id in ids:
        digest.update(input_id.encode() + b"\n")
    return f"{seq:06d}-{digest.hexdigest()}"


class JobError(CaiError):
    """A job directory cannot be used as asked; the message says what to do."""


class CorruptShard(JobError):
    """A shard line that is not a readable row of its stage; the message names the file and line."""

    def __init__(self, path: Path, line: int, reason: str):
        self.path, self.line, self.reason = path, line, reason
        super().__init__(f"{path}:{line}: unreadable row ({reason}). Run `cai jobs repair {path.parent.parent}` "
                         "to move unreadable lines to its quarantine/ folder; their inputs are generated again "
                         "by the next run")


class ShardLine(NamedTuple):
    """One line of a shard: `row` (and `record`, when checked against a model) or the `problem`."""

    number: int
    raw: bytes
    row: dict[str, Any] | None
    record: BaseModel | None
    problem: str | None


_ERROR_CODES = frozenset(code.value for code in ErrorCode)


def _parse(raw: bytes, model: type[BaseModel] | None) -> tuple[dict | None, BaseModel | None, str | None]:
    """(row, record, None), or (None, None, what is wrong). Without `model` only the shape every
    stage shares is checked (an `id`, an `error` that is null or carries a known code)."""
    try:
        row = parse_json_line(raw)
    except BadLine as exc:
        return None, None, exc.reason
    if not isinstance(row, dict) or not isinstance(row.get("id"), str) or "error" not in row:
        return None, None, "not a record: a JSON object with an `id` and an `error` is expected"
    error = row["error"]
    if error is not None and not (isinstance(error, dict) and error.get("code") in _ERROR_CODES):
        return None, None, "not a record: `error` is neither null nor an object with a known `code`"
    if model is None:
        return row, None, None
    try:
        return row, model.model_validate(row), None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "row"
        return None, None, f"not a {model.__name__} ({exc.error_count()} problems; {where}: {first['msg']})"


def scan_shard(path: Path, model: type[BaseModel] | None = None, missing_ok: bool = False) -> Iterator[ShardLine]:
    """Every line of a shard, readable or not (lines end at b"\\n" only, as the writer wrote them)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        if missing_ok:  # e.g. a resuming job has just dropped this shard's `cancelled` rows
            return
        raise
    with f:
        for number, raw in enumerate(f, 1):
            yield ShardLine(number, raw, *_parse(raw, model))


def readable_lines(path: Path, model: type[BaseModel] | None = None, missing_ok: bool = False) -> Iterator[ShardLine]:
    """The lines of a shard; CorruptShard (naming the file and line) at the first unreadable one."""
    for line in scan_shard(path, model, missing_ok):
        if line.problem is not None:
            raise CorruptShard(path, line.number, line.problem)
        yield line


def read_shard(path: Path, model: type[BaseModel] | None = None, missing_ok: bool = False) -> Iterator[dict]:
    """The rows of a shard; CorruptShard (naming the file and line) at the first unreadable one."""
    for line in readable_lines(path, model, missing_ok):
        yield line.row


def line_text(raw: bytes) -> str:
    """A shard line's bytes as the text to write back (its newline restored if it had none)."""
    return raw.decode("utf-8") + ("" if raw.endswith(b"\n") else "\n")


def shard_name(stage: str, batch: str) -> str:
    """The file name of batch `batch`'s shard (ValueError for a string that is not a batch id)."""
    if not _BATCH_ID.fullmatch(batch):
        raise ValueError(f"{batch!r} is not a batch id (see cai.shards.batch_id)")
    return f"{stage}-{batch}.jsonl"


def parse_shard_name(name: str) -> tuple[str, int] | None:
    """(stage, plan position) of a shard file name, old or new style; None for another file."""
    match = _SHARD_NAME.fullmatch(name)
    return (match["stage"], int(match["seq"])) if match else None
