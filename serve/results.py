"""Reading a job's records and exports, and applying human reviews to the exported datasets.

The pipeline writes the datasets (`sft.jsonl` / `prefs.jsonl`, cai.formats' rows and export
filters). Exports served by the API are rebuilt from the job's records with the reviews applied
(`cai.formats.exported_row`, which says what a review changes), written under `reviewed/`:
- agree / flip (prefs): the row becomes a human label. chosen/rejected are the reviewer's
  (flip swaps them, and the chosen/rejected indices), and `score` = `margin` =
  `metadata.confidence` = 1.0: a reviewer's decision is taken as a confident label, not
  as one more noisy vote, so the trainers (`cai train rm` margins, `cai train dpo` soft
  labels) give it full weight. `metadata.label_source` is "human". A pair the export rules
  left out (tie, low confidence, inconsistent) is exported once a reviewer decided it;
- discard: the row is dropped;
- no review: the row is kept as the judge labelled it (`label_source` "judge"), if the
  export rules keep it.
Every prefs row keeps the judge's own verdict under `metadata.judge_verdict` = {score,
margin, consistent, chosen_index, rejected_index, p_a, p_a_orders, first_shown,
confidence}, as the pipeline exported it (same keys on every row, so Parquet has one schema).
Every row gets `metadata.review` = {label, reviewer, note, reviewed_at} ("" when not
reviewed); it holds the review store's fields only, never an API key.
When several reviewers labelled a record, the latest review is the one applied.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from fastapi import HTTPException

from cai.export import jsonl_to_parquet
from cai.files import (
    atomic_write_json,
    atomic_write_lines,
    atomic_write_text,
    parse_json_line,
    read_jsonl,
)
from cai.formats import (
    REVIEW_FORMAT_VERSION,
    ExportFilters,
    ReviewMeta,
    exported_row,
    preference_exclusion,
)
from cai.kinds import kind
from cai.records import HUMAN_LABELS
from cai.shards import readable_lines
from cai.store import CorruptShard, JobError, JobStore

MEDIA = {".jsonl": "application/jsonl", ".json": "application/json", ".md": "text/markdown; charset=utf-8",
         ".parquet": "application/vnd.apache.parquet", ".png": "image/png"}
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def reviewable(job: dict[str, Any]) -> bool:
    """Whether the job's records are dataset rows people review (sft, prefs), not a report's predictions."""
    return kind(job["kind"]).reviewable


def read_stage(root: Path, stage: str) -> Iterator[dict[str, Any]]:
    """The rows of a job's `stage` as stored (JobStore.read; CorruptShard at an unreadable line); none
    before the job has a manifest (a queued job)."""
    try:
        store = JobStore.at(root)
    except JobError:
        return
    yield from store.read(stage)


def _unreadable(exc: CorruptShard) -> HTTPException:
    """409 naming the shard and line, not a bare 500."""
    return HTTPException(409, f"job records unreadable: shards/{exc.path.name} line {exc.line} ({exc.reason}); "
                              "`cai jobs repair` on the job directory moves unreadable lines aside")


def iter_records(job: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The job's records as stored: shard rows (sft, prefs) or judge-eval predictions (with an id)."""
    root = Path(job["dir"])
    if reviewable(job):
        try:
            yield from read_stage(root, kind(job["kind"]).result_stage)
        except CorruptShard as exc:
            raise _unreadable(exc) from None
        return
    predictions = root / "predictions.jsonl"
    if predictions.is_file():
        for n, row in enumerate(read_jsonl(predictions)):
            yield {"id": f"item-{n:06d}", **row}


def record_error(job: dict[str, Any], record: dict[str, Any]) -> Any:
    return record.get("error") if reviewable(job) else (record.get("cai") or {}).get("error")


def record_principles(job: dict[str, Any], record: dict[str, Any]) -> set[str]:
    if not reviewable(job):
        return set()
    found = set((record.get("lineage") or {}).get("principle_ids") or [])
    judgement = record.get("judgement") or {}
    if judgement.get("principle_id"):
        found.add(judgement["principle_id"])
    return found


def record_stratum(job: dict[str, Any], record: dict[str, Any]) -> tuple[str, float | None]:
    """(principle, judge confidence) a review sample is stratified by: the judged pair's principle and its
    confidence |p_a - 0.5| * 2 = 2 |P(chosen) - 0.5| (prefs); the first revision's principle, None (sft)."""
    judgement, score = record.get("judgement") or {}, record.get("score")
    if judgement:
        confidence = judgement.get("confidence")
        if confidence is None and score is not None:
            confidence = abs(score - 0.5) * 2
        return judgement.get("principle_id") or "", confidence
    principles = (record.get("lineage") or {}).get("principle_ids") or []
    return (principles[0] if principles else ""), None


def latest_reviews(reviews: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """record id -> the review in force (the latest one)."""
    return {r["record_id"]: r for r in reviews}


def review_counts(reviews: list[dict[str, Any]], judged: bool = True) -> dict[str, Any]:
    """Label counts; `agreement_rate` = agree / (agree + flip), for AI-judged records (prefs) only."""
    counts = Counter(r["label"] for r in reviews)
    decided = counts["agree"] + counts["flip"]
    return {"agree": counts["agree"], "flip": counts["flip"], "discard": counts["discard"],
            "records_reviewed": len({r["record_id"] for r in reviews}),
            "agreement_rate": counts["agree"] / decided if decided and judged else None}


def page(job: dict[str, Any], reviews: list[dict[str, Any]], status: str | None, principle: str | None,
         offset: int, limit: int) -> tuple[int, list[dict[str, Any]]]:
    """(matching count, one page of records) with each record's review and export status."""
    found = _indexed_page(job, status, principle, offset, limit) if reviewable(job) else None
    total, items = found if found is not None else _scanned_page(job, status, principle, offset, limit)
    return total, with_reviews(job, reviews, items)


def with_reviews(job: dict[str, Any], reviews: list[dict[str, Any]],
                 items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records with their review in force, every review of them and (prefs) whether they are exported."""
    in_force = latest_reviews(reviews)
    by_record: dict[str, list[dict[str, Any]]] = {}
    for r in reviews:
        by_record.setdefault(r["record_id"], []).append(r)
    filters = ExportFilters.of(json.loads(job["recipe"]))
    job_kind = kind(job["kind"])
    for record in items:
        review = in_force.get(record["id"])
        record["review"] = review["label"] if review else None
        record["reviews"] = by_record.get(record["id"], [])
        if job_kind.judged_pairs:
            record["exported"] = preference_exclusion(job_kind.record_model.model_validate(record), filters,
                                                      record["review"] or "") is None
    return items


def _matches(failed: bool, principles: set[str] | frozenset[str], status: str | None, principle: str | None) -> bool:
    return not ((status == "ok" and failed) or (status == "error" and not failed)
                or (principle and principle not in principles))


def _scanned_page(job: dict[str, Any], status: str | None, principle: str | None, offset: int,
                  limit: int) -> tuple[int, list[dict[str, Any]]]:
    """Every record parsed in turn (judge-eval predictions; shards that keep changing under the index)."""
    total, items = 0, []
    for record in iter_records(job):
        if _matches(record_error(job, record) is not None, record_principles(job, record), status, principle):
            total += 1
            if offset < total <= offset + limit:
                items.append(record)
    return total, items


# ---------------------------------------------------------------- shard index
# A records page parses only its own rows: each shard's lines (byte range, error or not, principles, id,
# stratum) are indexed once and kept while the file is unchanged (same inode, size and mtime), so a page of a
# running job costs its rows, not the job's. Shards are written once and replaced, never edited in place.


class _Line(NamedTuple):
    start: int
    end: int
    failed: bool
    principles: frozenset[str]
    id: str
    principle: str  # record_stratum's
    confidence: float | None


Located = tuple[Path, tuple, _Line]  # a shard, its stat key when indexed, a line
INDEX_LINES = 100_000  # shard lines indexed in memory, all jobs together (about 400 bytes each: ~40 MB)
_indexes: OrderedDict[tuple, tuple[_Line, ...]] = OrderedDict()
_indexed_lines = 0
_indexes_guard = threading.Lock()


def _stat_key(path: Path, st: os.stat_result) -> tuple:
    return str(path), st.st_ino, st.st_size, st.st_mtime_ns


def _shard_index(job: dict[str, Any], path: Path) -> tuple[tuple, tuple[_Line, ...]] | None:
    """(the file's stat key, its lines), cached while the file is unchanged; None for a shard just removed."""
    global _indexed_lines
    try:
        key = _stat_key(path, path.stat())
    except FileNotFoundError:
        return None
    with _indexes_guard:
        if key in _indexes:
            _indexes.move_to_end(key)
            return key, _indexes[key]
    lines, start = [], 0
    for line in readable_lines(path, missing_ok=True):
        principle, confidence = record_stratum(job, line.row)
        lines.append(_Line(start, start + len(line.raw), record_error(job, line.row) is not None,
                           frozenset(map(sys.intern, record_principles(job, line.row))), str(line.row.get("id")),
                           sys.intern(principle), confidence))
        start += len(line.raw)
    index = tuple(lines)
    try:
        unchanged = _stat_key(path, path.stat()) == key  # not replaced while it was read
    except FileNotFoundError:
        unchanged = False
    if unchanged:
        with _indexes_guard:
            if key not in _indexes:
                _indexes[key], _indexed_lines = index, _indexed_lines + len(index)
            while _indexed_lines > INDEX_LINES and len(_indexes) > 1:
                _indexed_lines -= len(_indexes.popitem(last=False)[1])
    return key, index


def shard_lines(job: dict[str, Any]) -> list[Located]:
    """Every line of the job's result shards from the shard indexes (nothing parsed that is indexed already)."""
    try:
        store = JobStore.at(Path(job["dir"]))
    except JobError:
        return []  # a queued job: no manifest, no records yet
    found = []
    try:
        for path in store.shard_paths(kind(job["kind"]).result_stage):
            index = _shard_index(job, path)
            if index is not None:
                found.extend((path, index[0], line) for line in index[1])
    except CorruptShard as exc:
        raise _unreadable(exc) from None
    return found


def read_lines(wanted: list[Located]) -> list[dict[str, Any]] | None:
    """The records of these lines, in this order; None if a shard changed since it was indexed."""
    items: list[dict[str, Any] | None] = [None] * len(wanted)
    by_path: dict[Path, list[int]] = {}
    for n, (path, _, _) in enumerate(wanted):
        by_path.setdefault(path, []).append(n)
    for path, numbers in by_path.items():
        try:
            with open(path, "rb") as f:
                if _stat_key(path, os.fstat(f.fileno())) != wanted[numbers[0]][1]:
                    return None
                for n in sorted(numbers, key=lambda n: wanted[n][2].start):
                    line = wanted[n][2]
                    f.seek(line.start)
                    items[n] = parse_json_line(f.read(line.end - line.start))
        except FileNotFoundError:
            return None
    return items  # type: ignore[return-value]


def _indexed_page(job: dict[str, Any], status: str | None, principle: str | None, offset: int,
                  limit: int) -> tuple[int, list[dict[str, Any]]] | None:
    """The page from the shard indexes (only its rows parsed); None if a shard changed meanwhile."""
    matching = [x for x in shard_lines(job) if _matches(x[2].failed, x[2].principles, status, principle)]
    items = read_lines(matching[offset:offset + limit])
    return None if items is None else (len(matching), items)


def find_record(job: dict[str, Any], record_id: str) -> dict[str, Any] | None:
    return next((r for r in iter_records(job) if r.get("id") == record_id), None)


# ---------------------------------------------------------------- exports


def _lock(job_id: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(job_id, threading.Lock())


def _shown(value: Any) -> Any:
    if isinstance(value, dict) and "options" in value:  # an engine spec: its backend only
        return {"backend": value.get("backend")}
    if isinstance(value, dict):
        return {k: _shown(v) for k, v in value.items()}
    return Path(value).name if isinstance(value, str) and value.startswith("/") else value


def client_manifest(root: Path) -> Path:
    """manifest.json as a client may read it. The service writes it so (engines by profile name, paths
    relative, see serve.resolve.client_recipe); a job directory from an older server recorded engine
    specs (options: base_url, api_key...) and absolute paths: that one is served as a copy under
    reviewed/ with engine options left out and paths by name."""
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    recipe = manifest.get("recipe") or {}
    if _shown(recipe) == recipe:
        return root / "manifest.json"
    (root / "reviewed").mkdir(exist_ok=True)
    atomic_write_json(root / "reviewed" / "manifest.json", {**manifest, "recipe": _shown(recipe)})
    return root / "reviewed" / "manifest.json"


def export_file(job: dict[str, Any], name: str, reviews: list[dict[str, Any]]) -> Path:
    """Path of the export `name` (one of export_names), rebuilt with the current reviews."""
    root = Path(job["dir"])
    if name == "manifest.json":
        return client_manifest(root)
    job_kind = kind(job["kind"])
    if not job_kind.reviewable:
        return root / name
    out = root / "reviewed"
    out.mkdir(exist_ok=True)
    stem = job_kind.result_stage
    with _lock(job["id"]):
        kept: Counter[str] = Counter()
        atomic_write_lines(out / f"{stem}.jsonl", _reviewed_lines(job, latest_reviews(reviews), kept))
        (out / f"{stem}.parquet").unlink(missing_ok=True)
        if name.endswith(".parquet") and kept["rows"]:
            jsonl_to_parquet(out / f"{stem}.jsonl")
        card = (root / "README.md").read_text(encoding="utf-8") if (root / "README.md").is_file() else ""
        counts = review_counts(reviews, judged=job_kind.judged_pairs)
        atomic_write_text(out / "README.md", card + review_section(job_kind.judged_pairs, kept, counts))
    path = out / name
    if not path.is_file():
        raise FileNotFoundError(f"{name}: nothing to export (no rows left after review)")
    return path


def _reviewed_lines(job: dict[str, Any], in_force: dict[str, dict[str, Any]], kept: Counter) -> Iterator[str]:
    """The dataset's rows rebuilt from the job's records with the reviews in force (cai.formats), counted
    into `kept` by review label. Error rows, and unreviewed pairs the export rules leave out, are skipped."""
    job_kind = kind(job["kind"])
    filters = ExportFilters.of(json.loads(job["recipe"]))
    for stored in iter_records(job):
        record = job_kind.record_model.model_validate(stored)
        review = ReviewMeta.of(in_force.get(record.id)) if record.id in in_force else None
        row = exported_row(record, review, filters)
        label = review.label if review else "unreviewed"
        if record.error is not None or (row is None and review is None):
            continue
        kept[label] += 1
        if row is None:
            continue
        kept["rows"] += 1
        if job_kind.judged_pairs and label in HUMAN_LABELS and preference_exclusion(record, filters) is not None:
            kept["rules_overridden"] += 1
        yield json.dumps(row, ensure_ascii=False) + "\n"


PREFS_REVIEW_RULES = """This export applies the reviews stored with the job. A reviewed pair is a human label:
"agree" keeps the judge's chosen answer, "flip" swaps chosen and rejected, and both set
`score` = `margin` = 1.0 (a human decision is taken as a confident label, so `cai train rm`
asks for a full reward margin and `cai train dpo --soft-label smoothing` counts it as
noise-free); `metadata.label_source` is "human". A pair the export rules left out (a tie,
below the confidence floor, inconsistent) is exported once a reviewer agreed or flipped it.
"discard" drops the row. Unreviewed rows keep the judge's label (`label_source` "judge").
Every row keeps the judge's own verdict (score, margin, consistent, chosen/rejected index,
p_a, ...) under `metadata.judge_verdict`, and `metadata.review` names the review in force
(label, reviewer, note, reviewed_at)."""
SFT_REVIEW_RULES = """This export applies the reviews stored with the job: "discard" drops the row, "agree"
keeps it; `metadata.review` names the review in force (label, reviewer, note, reviewed_at)."""


def review_section(judged_pairs: bool, kept: Counter, counts: dict[str, Any]) -> str:
    rate = counts["agreement_rate"]
    return f"""
## Human review (cai serve)

{PREFS_REVIEW_RULES if judged_pairs else SFT_REVIEW_RULES} Review format: cai review v{REVIEW_FORMAT_VERSION} (`cai.formats`).

| | rows |
| --- | --- |
| rows in this export | {kept['rows']} |
| agreed | {kept['agree']} |
| flipped | {kept['flip']} |
| discarded | {kept['discard']} |
| not reviewed | {kept['unreviewed']} |
| reviewed pairs the export rules had left out | {kept['rules_overridden']} |

Reviewer–judge agreement (agree / (agree + flip)) over all reviews: {'n/a' if rate is None else f'{rate:.3f}'}
({counts['agree']} agree, {counts['flip']} flip, {counts['discard']} discard).
"""
