"""Prompt readers: JSONL, HH-RLHF transcripts, Hugging Face datasets, bundled sets.

Every reader yields `SourcePrompt`s lazily, one line or row at a time, and each
prompt is the conversation up to the turn to answer: it always ends with a user
turn. Bad input raises `SourceError`, naming the file, the line (or row), what
is wrong and what to do about it.
"""

from __future__ import annotations

import codecs
import itertools
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from cai.errors import CaiError
from cai.files import BadLine, parse_json_line
from cai.records import Chat, Message, SourcePrompt, stable_id

BUNDLED_DIR = Path(__file__).resolve().parent / "data"
BUNDLED = ("redteam", "benign")
ROLES = ("system", "user", "assistant")
FORMATS = ("auto", "jsonl", "hh", "hf")

# A turn marker: "\n\nHuman:" / "\n\nAssistant:", or the same at the very start of the text.
_HH_MARKER = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # JSON "\ud800": valid only as half of a pair
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


class SourceError(CaiError, ValueError):
    """Input that cannot be read as prompts; the message says where and how to fix it."""


# ---------------------------------------------------------------- HH transcripts


def parse_hh_transcript(text: str) -> list[Message]:
    """All turns of an HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...").

    Turn texts are stripped. Consecutive turns of the same role (a few HH rows
    have "\\n\\nAssistant:" twice in a row) are merged with a blank line, so roles
    alternate as chat templates expect. A final empty assistant turn is kept as "".
    Raises ValueError when the text has no markers or text before the first one.
    """
    parts = _HH_MARKER.split(text)
    if len(parts) < 3:
        raise ValueError("no '\\n\\nHuman:' / '\\n\\nAssistant:' turn markers found")
    if parts[0].strip():
        raise ValueError(f"text before the first turn marker: {parts[0][:40]!r}")
    messages: list[Message] = []
    for name, body in zip(parts[1::2], parts[2::2]):
        role, content = _HH_ROLE[name], body.strip()
        if messages and messages[-1].role == role:
            merged = "\n\n".join(t for t in (messages[-1].content, content) if t)
            messages[-1] = Message(role=role, content=merged)
        else:
            messages.append(Message(role=role, content=content))
    return messages


def hh_prompt_and_answer(text: str) -> tuple[Chat, str]:
    """(conversation up to and including the last human turn, final assistant answer).

    The answer is "" when the transcript ends on a human turn or an empty assistant turn.
    """
    messages = parse_hh_transcript(text)
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    if last_user is None:
        raise ValueError("transcript has no Human turn")
    answer = "\n\n".join(m.content for m in messages[last_user + 1 :] if m.content)
    return messages[: last_user + 1], answer


def read_hh_transcripts(path: str | Path, field: str = "chosen") -> Iterator[SourcePrompt]:
    """Prompts from an HH-RLHF JSONL file: each row's `field` transcript up to its last human turn."""
    for where, row in _json_lines(path):
        yield _prompt(_hh_messages(row, field, where), row.get("id"), where)


def _hh_messages(row: dict, field: str, where: str) -> Chat:
    text = row.get(field)
    if not isinstance(text, str):
        raise SourceError(
            f"{where}: no string field {field!r} (fields: {sorted(row)}); "
            "HH-RLHF rows need 'chosen'/'rejected' transcripts, or pass field=... / fmt='jsonl'"
        )
    try:
        messages, _ = hh_prompt_and_answer(text)
    except ValueError as exc:
        raise SourceError(f"{where}: field {field!r} is not an HH transcript: {exc}") from None
    return messages


# ---------------------------------------------------------------- JSONL prompts


def read_jsonl_prompts(path: str | Path) -> Iterator[SourcePrompt]:
    """Prompts from JSONL rows with `prompt` (a string, or a list of messages) or `messages`.

    A row's optional `source` field names its group (see `prompt_group`), e.g. in a mixed file.

    A conversation that ends with an assistant turn (an SFT row) loses that turn.
    An `id` field is used as the id; otherwise the id is a hash of the messages.
    """
    for where, row in _json_lines(path):
        prompt = _prompt(_row_messages(row, where), row.get("id"), where)
        group = row.get("source")
        if group is not None and not (isinstance(group, str) and group.strip()):
            raise SourceError(f"{where}: 'source' names the prompt's group and must be a non-empty string, "
                              f"got {group!r}")
        yield prompt.model_copy(update={"group": group.strip()}) if group else prompt


def _row_messages(row: dict, where: str, column: str | None = None) -> Chat:
    if column is not None:
        value = row.get(column)
    elif "messages" in row:
        column, value = "messages", row["messages"]
    elif "prompt" in row:
        column, value = "prompt", row["prompt"]
    else:
        raise SourceError(
            f"{where}: no 'prompt' or 'messages' field (fields: {sorted(row)}); "
            "write {\"prompt\": \"...\"} or {\"messages\": [{\"role\": \"user\", \"content\": \"...\"}]}"
        )
    if isinstance(value, str):
        if _looks_hh(value):
            return _hh_messages(row, column, where)
        return [Message(role="user", content=value.strip())]
    if isinstance(value, list):
        return _to_messages(value, where, column)
    raise SourceError(
        f"{where}: field {column!r} must be a string or a list of messages, "
        f"got {type(value).__name__}"
    )


def _to_messages(items: list, where: str, column: str) -> Chat:
    messages: Chat = []
    for n, item in enumerate(items, 1):
        if not isinstance(item, dict) or not isinstance(item.get("content"), str):
            raise SourceError(
                f"{where}: {column}[{n}] must be {{\"role\": ..., \"content\": \"...\"}}, got {item!r:.80}"
            )
        role = item.get("role")
        if role not in ROLES:
            raise SourceError(
                f"{where}: {column}[{n}] has role {role!r}; use one of {', '.join(ROLES)}"
            )
        messages.append(Message(role=role, content=item["content"]))
    if messages and messages[-1].role == "assistant":
        messages.pop()  # an answered conversation: keep it up to the turn to answer
    if not messages or messages[-1].role != "user":
        raise SourceError(
            f"{where}: {column!r} must end with a user turn (or a user turn then one "
            "assistant turn, which is dropped)"
        )
    return messages


# ---------------------------------------------------------------- Hugging Face datasets


def read_hf_dataset(
    path: str | Path, split: str | None = None, column: str | None = None
) -> Iterator[SourcePrompt]:
    """Prompts from a dataset saved with `save_to_disk`; rows as in the JSONL and HH readers."""
    ds, name = _load_hf(path, split)
    if column is None:
        column = next((c for c in ("messages", "prompt", "chosen") if c in ds.column_names), None)
    if column not in ds.column_names:
        raise SourceError(
            f"{name}: no column {column!r} (columns: {ds.column_names}); "
            "pass column=... naming the prompt, messages or HH transcript column"
        )
    keep = [c for c in (column, "id") if c in ds.column_names]
    for i, row in enumerate(ds.select_columns(keep)):
        where = f"{name} row {i}"
        yield _prompt(_row_messages(row, where, column), row.get("id"), where)


def _load_hf(path: str | Path, split: str | None):
    try:
        import datasets
    except ImportError:
        raise SourceError("reading a saved dataset needs `datasets`: pip install datasets") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise SourceError(f"{path}: not a dataset saved with save_to_disk ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = split or ("train" if "train" in ds else None)
        if split not in ds:
            raise SourceError(f"{path}: choose a split with split=...; splits: {list(ds)}")
        return ds[split], f"{path} [{split}]"
    if split is not None:
        raise SourceError(f"{path}: a single dataset without splits; drop split={split!r}")
    return ds, str(path)


# ---------------------------------------------------------------- dispatch


def read_prompts(
    spec: str | Path, limit: int | None = None, fmt: str = "auto"
) -> Iterator[SourcePrompt]:
    """Prompts from a bundled set name ("redteam", "benign"), a JSONL/JSON file or a dataset folder.

    `fmt` forces a reader: "jsonl" (prompt/messages rows), "hh" (HH-RLHF transcripts)
    or "hf" (a `save_to_disk` folder); "auto" picks by path and by sniffing the first row.
    """
    if fmt not in FORMATS:
        raise SourceError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if limit is not None and limit < 0:
        raise SourceError(f"limit must be >= 0, got {limit}")
    path = _resolve(spec)
    group = prompt_group(spec)
    prompts = (p if p.group else p.model_copy(update={"group": group}) for p in _reader(path, fmt))
    prompts = _not_empty(prompts, spec)
    return prompts if limit is None else itertools.islice(prompts, limit)


def _not_empty(prompts: Iterator[SourcePrompt], spec: str | Path) -> Iterator[SourcePrompt]:
    """The prompts; SourceError at the end when there were none: an empty input is a mistake,
    not a job of 0 rows."""
    empty = True
    for prompt in prompts:
        empty = False
        yield prompt
    if empty:
        raise SourceError(f"{spec}: no prompts in it (an empty file, only blank lines, or a dataset without rows); "
                          "give at least one, e.g. a line {\"prompt\": \"...\"}")


def prompt_group(spec: str | Path) -> str:
    """The group of a source's prompts when a row names none: the bundled set's name, else the file
    or folder name without its suffix (`data/red_team.jsonl` -> `red_team`)."""
    return str(spec) if str(spec) in BUNDLED and not Path(spec).exists() else Path(spec).stem


def _resolve(spec: str | Path) -> Path:
    path = Path(spec)
    if str(spec) in BUNDLED and not path.exists():
        return BUNDLED_DIR / f"{spec}.jsonl"
    if not path.exists():
        raise SourceError(
            f"{spec}: no such file or folder; give a .jsonl file, a save_to_disk folder "
            f"or a bundled set ({', '.join(BUNDLED)})"
        )
    return path


def _reader(path: Path, fmt: str) -> Iterator[SourcePrompt]:
    if fmt == "hf" or (fmt == "auto" and path.is_dir()):
        if not path.is_dir():
            raise SourceError(f"{path}: fmt='hf' needs a folder written by save_to_disk")
        return read_hf_dataset(path)
    if path.is_dir():
        raise SourceError(f"{path}: a folder; use fmt='hf' (or 'auto') for a save_to_disk folder")
    if fmt == "auto" and path.suffix not in (".jsonl", ".json"):
        raise SourceError(
            f"{path}: unknown file type {path.suffix!r}; use .jsonl, or force fmt='jsonl' or 'hh'"
        )
    if fmt == "hh" or (fmt == "auto" and _sniff_hh(path)):
        return read_hh_transcripts(path)
    return read_jsonl_prompts(path)


def _sniff_hh(path: Path) -> bool:
    """True when the first non-empty line is an object whose `chosen` is an HH transcript."""
    with open(path, "rb") as f:
        line = next((raw for raw in f if raw.strip()), b"")
    try:
        row = parse_json_line(line)
    except BadLine as exc:
        if isinstance(exc.cause, UnicodeDecodeError):
            raise _bad_line(path, 1, line, exc) from None
        return False  # the JSONL reader reports the bad line properly
    return isinstance(row, dict) and _looks_hh(row.get("chosen"))


def _looks_hh(value: Any) -> bool:
    return isinstance(value, str) and value.lstrip().startswith("Human:")


# ---------------------------------------------------------------- shared helpers


def _bad_line(path: str | Path, n: int, raw: bytes, exc: BadLine) -> SourceError:
    """What is wrong with line `n` (not UTF-8, or not JSON) and how to fix it."""
    cause, nul = exc.cause, b"\x00" in raw  # NUL bytes: UTF-16 or binary, which the file's first bytes may show
    if nul and not isinstance(cause, UnicodeDecodeError):
        try:
            with open(path, "rb") as f:
                codecs.getincrementaldecoder("utf-8")().decode(f.read(1 << 16), final=False)
        except UnicodeDecodeError as head:
            cause = head
    if isinstance(cause, UnicodeDecodeError):
        byte = cause.object[cause.start:cause.start + 1]
        return SourceError(f"{path}: not UTF-8 text ({cause.reason}, byte {byte!r}); {_encoding_hint(path)}")
    hint = f"; {_encoding_hint(path)}" if nul else " (a JSON array? write one object per line: jq -c '.[]')" * (n == 1)
    return SourceError(f"{path}:{n}: invalid JSON: {cause.msg}{hint}")


def _encoding_hint(path: str | Path) -> str:
    with open(path, "rb") as raw:
        head = raw.read(4096)
    zeros = max(head[0::2].count(0), head[1::2].count(0))  # UTF-16 of ASCII text: every other byte is 0
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or zeros > 0.4 * max(1, len(head) // 2):
        return f"it looks like UTF-16: convert it, e.g. iconv -f UTF-16 -t UTF-8 {path} > prompts.jsonl"
    if b"\x00" in head:
        return "it looks like a binary file: give a JSONL file (one JSON object per line) saved as UTF-8"
    return "save it as UTF-8 (one JSON object per line)"


def _json_lines(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(location, object) per non-blank line, read one line at a time (cai.files' line parser)."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise SourceError(f"{path}: cannot open ({exc.strerror})") from None
    with f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = parse_json_line(raw)
            except BadLine as exc:
                raise _bad_line(path, n, raw, exc) from None
            if not isinstance(row, dict):
                raise SourceError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
            if _SURROGATE_ESCAPE.search(raw.decode("utf-8")):
                _check_unicode(row, where)
            yield where, row


def _check_unicode(row: dict, where: str) -> None:
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise SourceError(f"{where}: invalid Unicode: a lone surrogate escape (\\ud800-\\udfff without its "
                          "pair); fix or remove the row") from None


def _prompt(messages: Chat, row_id: Any, where: str) -> SourcePrompt:
    if not messages[-1].content.strip():
        raise SourceError(f"{where}: empty prompt (the last user turn has no text); remove the row")
    if row_id is None:
        row_id = stable_id("prompt", [m.model_dump() for m in messages])
    elif isinstance(row_id, (str, int)) and not isinstance(row_id, bool) and str(row_id).strip():
        row_id = str(row_id)
    else:
        raise SourceError(f"{where}: 'id' must be a non-empty string or integer, got {row_id!r}")
    return SourcePrompt(id=row_id, messages=messages, source=where)


def dedupe(prompts: Iterable[SourcePrompt]) -> tuple[list[SourcePrompt], int]:
    """Drop prompts whose messages repeat an earlier one; keeps first-seen order.

    Returns (kept, dropped). Two different prompts sharing one id raise SourceError:
    downstream stages key their output by id.
    """
    seen: set[tuple] = set()
    ids: dict[str, str] = {}
    kept: list[SourcePrompt] = []
    dropped = 0
    for p in prompts:
        key = tuple((m.role, m.content) for m in p.messages)
        if key in seen:
            dropped += 1
            continue
        if p.id in ids:
            raise SourceError(
                f"{p.source}: id {p.id!r} already used by a different prompt at {ids[p.id]}; "
                "give each prompt a unique id"
            )
        seen.add(key)
        ids[p.id] = p.source
        kept.append(p)
    return kept, dropped


def near_duplicate_key(prompt: SourcePrompt) -> str:
    """A key equal for prompts that differ only in case, punctuation or spacing."""
    words = [
        "".join(ch for ch in word if ch.isalnum())
        for m in prompt.messages
        for word in f"{m.role} {m.content}".casefold().split()
    ]
    return stable_id("near", " ".join(w for w in words if w))
