"""The one way cai writes files (atomically) and reads JSONL (naming the file and line of a bad row).

Every file cai writes (shards, manifests, exports, data cards, reports, trainer metrics) goes
through `atomic_write_*`: a temp file beside the target, fsync, rename, fsync of the folder. A
reader never sees half a file, and a killed writer leaves only a `.NAME.tmp-PID` that the next
writer of that folder may remove.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from cai.errors import CaiError


class JsonlError(CaiError):
    """A JSONL line that is not a JSON object; the message names the file and line."""


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_lines(path, [text])


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """`obj` as indented JSON (non-JSON values written with str), atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def atomic_write_lines(path: str | Path, lines: Iterable[str]) -> None:
    """Write to a temp file beside `path`, fsync, rename. Errors (disk full...) propagate."""
    with atomic_open(path, "w") as f:
        for line in lines:
            f.write(line)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """`data` as the file's bytes (e.g. a rendered image), atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A file open for writing (`w` or `wb`) at a temp name beside `path`; on a clean exit it is flushed,
    fsynced and renamed to `path`; on an error it is removed. For writers that want a file object
    (Parquet, torch.save, matplotlib)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_jsonl(path: str | Path, rows: Iterable[Any]) -> None:
    """One JSON object per line (pydantic records or plain dicts), atomically."""
    atomic_write_lines(path, (_jsonl_line(row) for row in rows))


def _jsonl_line(row: Any) -> str:
    if hasattr(row, "model_dump_json"):
        return row.model_dump_json() + "\n"
    return json.dumps(row, ensure_ascii=False) + "\n"


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


UTF8_BOM = b"\xef\xbb\xbf"


class BadLine(ValueError):
    """A line that is not UTF-8 JSON: `reason` says what is wrong, `cause` is the decoder's own error."""

    def __init__(self, reason: str, cause: UnicodeDecodeError | json.JSONDecodeError):
        super().__init__(reason)
        self.reason, self.cause = reason, cause


def parse_json_line(raw: bytes) -> Any:
    """The JSON value of one line as read (bytes, its newline included; a UTF-8 BOM before it is
    ignored): the one JSONL line parser, used by every JSONL reader (prompts, job shards, exports).
    BadLine when the bytes are not UTF-8 or not JSON."""
    try:
        text = raw.removeprefix(UTF8_BOM).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadLine(f"not UTF-8 text: byte {exc.start}", exc) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        cut = "" if raw.endswith(b"\n") else ", truncated (no newline at the end)"
        raise BadLine(f"not JSON: {exc.msg} at column {exc.colno}{cut}", exc) from None


def read_jsonl(path: str | Path, skip_blank: bool = True) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSONL file, streamed; JsonlError naming `path:line` at a bad line.
    Lines end at b"\\n" only (a row's text may hold U+2028, which str.splitlines would split)."""
    for number, row in read_jsonl_numbered(path, skip_blank):
        yield row


def read_jsonl_numbered(path: str | Path, skip_blank: bool = True) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each line of a JSONL file; see read_jsonl."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if skip_blank and not raw.strip():
                continue
            try:
                row = parse_json_line(raw)
            except BadLine as exc:
                raise JsonlError(f"{path}:{number}: not a JSON line ({exc.reason})") from None
            if not isinstance(row, dict):
                raise JsonlError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            yield number, row
