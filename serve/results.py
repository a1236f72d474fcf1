"""Reading a job's records and exports, and applying human reviews to the exported datasets.

The pipeline writes the datasets (`sft.jsonl` / `prefs.jsonl`, cai.export's rules).
Exports served by the API are those files with the reviews applied, written beside
them under `reviewed/`:
- agree / flip (prefs): the row becomes a human label. chosen/rejected are the reviewer's
  (flip swaps them, and the chosen/rejected indices), and `score` = `margin` =
  `metadata.confidence` = 1.0: a reviewer's decision is taken as a confident label, not
  as one more noisy vote, so the trainers (`cai train rm` margins, `cai train dpo` soft
  labels) give it full weight. `metadata.label_source` is "human";
- discard: the row is dropped;
- no review: the row is kept as the judge labelled it (`label_source` "judge").
Every prefs row keeps the judge's own verdict under `metadata.judge_verdict` = {score,
margin, consistent, chosen_index, rejected_index, p_a, p_a_orders, first_shown,
confidence}, as the pipeline exported it (same keys on every row, so Parquet has one schema).
Every row gets `metadata.review` = {label, reviewer, note, reviewed_at} ("" when not
reviewed); it holds the review store's fields only, never an API key.
When several reviewers labelled a record, the latest review is the one applied.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import HTTPException

from cai.export import jsonl_to_parquet
from cai.judge_eval import JudgedItem
from cai.preferences import keep_for_export
from cai.records import HUMAN_LABELS, HUMAN_SCORE, PreferenceRecord, SFTRecord
from cai.store import CorruptShard, atomic_write_lines, atomic_write_text, read_shard, scan_shard

STAGES = {"sft": "sft", "prefs": "prefs"}
JUDGE_VERDICT_KEYS = ("chosen_index", "rejected_index", "p_a", "p_a_orders", "first_shown", "confidence")
EXPORTS = {
    "sft": ("sft.jsonl", "sft.parquet", "README.md", "manifest.json"),
    "prefs": ("prefs.jsonl", "prefs.parquet", "README.md", "manifest.json"),
    "judge_eval": ("report.json", "report.md", "reliability.png", "predictions.jsonl"),
}
MEDIA = {".jsonl": "application/jsonl", ".json": "application/json", ".md": "text/markdown; charset=utf-8",
         ".parquet": "application/vnd.apache.parquet", ".png": "image/png"}
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def shard_stats(path: Path, stage: str | None) -> tuple[int, Counter, int]:
    """(records, error codes, generated tokens) of one shard, counted the way cai counts them.
    An unreadable line raises CorruptShard, which names the shard and the line."""
    model = {"sft": SFTRecord, "prefs": PreferenceRecord, "judge-eval": JudgedItem}[stage]
    rows, errors, tokens = 0, Counter(), 0
    for line in scan_shard(path, model):
        if line.problem is not None:
            raise CorruptShard(path, line.number, line.problem)
        record = line.record
        rows += 1
        tokens += record.generated_tokens
        if record.error is not None:
            errors[record.error.code.value] += 1
    return rows, errors, tokens


def iter_records(job: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The job's records as stored: shard rows (sft, prefs) or judge_eval predictions (with an id)."""
    root = Path(job["dir"])
    if job["kind"] in STAGES:
        for shard in sorted((root / "shards").glob(f"{STAGES[job['kind']]}-*.jsonl")):
            try:  # missing_ok: a resuming job just dropped this shard's `cancelled` rows
                yield from read_shard(shard, missing_ok=True)
            except CorruptShard as exc:  # 409 naming the line, not a bare 500
                raise HTTPException(409, f"job records unreadable: shards/{shard.name} line {exc.line} "
                                         f"({exc.reason}); `cai jobs repair` on the job directory moves "
                                         "unreadable lines aside") from None
        return
    predictions = root / "predictions.jsonl"
    if predictions.is_file():
        with open(predictions, encoding="utf-8") as f:
            for n, line in enumerate(f):
                yield {"id": f"item-{n:06d}", **json.loads(line)}


def record_error(job: dict[str, Any], record: dict[str, Any]) -> Any:
    return record.get("error") if job["kind"] in STAGES else (record.get("cai") or {}).get("error")


def record_principles(job: dict[str, Any], record: dict[str, Any]) -> set[str]:
    if job["kind"] not in STAGES:
        return set()
    found = set((record.get("lineage") or {}).get("principle_ids") or [])
    judgement = record.get("judgement") or {}
    if judgement.get("principle_id"):
        found.add(judgement["principle_id"])
    return found


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
    in_force = latest_reviews(reviews)
    by_record: dict[str, list[dict[str, Any]]] = {}
    for r in reviews:
        by_record.setdefault(r["record_id"], []).append(r)
    recipe = json.loads(job["recipe"])
    total, items = 0, []
    for record in iter_records(job):
        failed = record_error(job, record) is not None
        if (status == "ok" and failed) or (status == "error" and not failed):
            continue
        if principle and principle not in record_principles(job, record):
            continue
        total += 1
        if offset < total <= offset + limit:
            review = in_force.get(record["id"])
            record["review"] = review["label"] if review else None
            record["reviews"] = by_record.get(record["id"], [])
            if job["kind"] == "prefs":
                record["exported"] = keep_for_export(PreferenceRecord.model_validate(record),
                                                     recipe.get("min_confidence", 0.0),
                                                     recipe.get("require_consistent", True))
            items.append(record)
    return total, items


def find_record(job: dict[str, Any], record_id: str) -> dict[str, Any] | None:
    return next((r for r in iter_records(job) if r.get("id") == record_id), None)


# ---------------------------------------------------------------- exports


def export_names(job: dict[str, Any]) -> list[str]:
    """Export files that exist for a completed job."""
    if job["state"] != "completed":
        return []
    root = Path(job["dir"])
    names = []
    for name in EXPORTS[job["kind"]]:
        if name.endswith(".parquet"):
            if (root / name).is_file():  # the pipeline writes Parquet only when rows were exported
                names.append(name)
        elif (root / name).is_file():
            names.append(name)
    return names


def _review_meta(review: dict[str, Any] | None) -> dict[str, str]:
    """The review in force as the export shows it: the review store's fields, named one by one."""
    if review is None:
        return {"label": "", "reviewer": "", "note": "", "reviewed_at": ""}
    return {"label": review["label"], "reviewer": review["reviewer"], "note": review.get("note") or "",
            "reviewed_at": review.get("created_at") or ""}


def judge_verdict(row: dict[str, Any]) -> dict[str, Any]:
    """The judge's label of an exported prefs row, as the pipeline wrote it."""
    meta = row["metadata"]
    return {"score": row.get("score"), "margin": row.get("margin"), "consistent": row.get("consistent"),
            **{key: meta.get(key) for key in JUDGE_VERDICT_KEYS}}


def reviewed_row(kind: str, row: dict[str, Any], review: dict[str, Any] | None) -> dict[str, Any] | None:
    """An exported dataset row with its review applied; None when the review discards it.

    prefs: agree / flip make the row a confident human label (score = margin = 1.0, chosen per the
    reviewer); the judge's verdict stays under `metadata.judge_verdict`. See the module docstring."""
    label = review["label"] if review else None
    if label == "discard":
        return None
    meta = {**row["metadata"], "review": _review_meta(review)}
    row = {**row, "metadata": meta}
    if kind != "prefs":
        return row
    meta["judge_verdict"] = judge_verdict(row)
    meta["label_source"] = "human" if label in HUMAN_LABELS else "judge"
    if label == "flip":
        row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
        meta["chosen_index"], meta["rejected_index"] = meta.get("rejected_index"), meta.get("chosen_index")
    if label in HUMAN_LABELS:
        row["score"] = row["margin"] = meta["confidence"] = HUMAN_SCORE
    return row


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
    atomic_write_text(root / "reviewed" / "manifest.json", json.dumps({**manifest, "recipe": _shown(recipe)},
                                                                      indent=2) + "\n")
    return root / "reviewed" / "manifest.json"


def export_file(job: dict[str, Any], name: str, reviews: list[dict[str, Any]]) -> Path:
    """Path of the export `name` (one of export_names), rebuilt with the current reviews."""
    root = Path(job["dir"])
    if name == "manifest.json":
        return client_manifest(root)
    if job["kind"] not in STAGES:
        return root / name
    out = root / "reviewed"
    out.mkdir(exist_ok=True)
    stem = STAGES[job["kind"]]
    in_force = latest_reviews(reviews)
    with _lock(job["id"]):
        kept = Counter()

        def rows() -> Iterator[str]:
            with open(root / f"{stem}.jsonl", encoding="utf-8") as f:
                for line in f:
                    row = json.loads(line)
                    review = in_force.get(row["metadata"]["id"])
                    new = reviewed_row(job["kind"], row, review)
                    kept[review["label"] if review else "unreviewed"] += 1
                    if new is not None:
                        kept["rows"] += 1
                        yield json.dumps(new, ensure_ascii=False) + "\n"

        atomic_write_lines(out / f"{stem}.jsonl", rows())
        (out / f"{stem}.parquet").unlink(missing_ok=True)
        if name.endswith(".parquet") and kept["rows"]:
            jsonl_to_parquet(out / f"{stem}.jsonl")
        card = (root / "README.md").read_text(encoding="utf-8") if (root / "README.md").is_file() else ""
        counts = review_counts(reviews, judged=job["kind"] == "prefs")
        atomic_write_text(out / "README.md", card + review_section(job["kind"], kept, counts))
    path = out / name
    if not path.is_file():
        raise FileNotFoundError(f"{name}: nothing to export (no rows left after review)")
    return path


PREFS_REVIEW_RULES = """This export applies the reviews stored with the job. A reviewed pair is a human label:
"agree" keeps the judge's chosen answer, "flip" swaps chosen and rejected, and both set
`score` = `margin` = 1.0 (a human decision is taken as a confident label, so `cai train rm`
asks for a full reward margin and `cai train dpo --soft-label smoothing` counts it as
noise-free); `metadata.label_source` is "human". "discard" drops the row. Unreviewed rows
keep the judge's label (`label_source` "judge"). Every row keeps the judge's own verdict
(score, margin, consistent, chosen/rejected index, p_a, ...) under `metadata.judge_verdict`,
and `metadata.review` names the review in force (label, reviewer, note, reviewed_at)."""
SFT_REVIEW_RULES = """This export applies the reviews stored with the job: "discard" drops the row, "agree"
keeps it; `metadata.review` names the review in force (label, reviewer, note, reviewed_at)."""


def review_section(kind: str, kept: Counter, counts: dict[str, Any]) -> str:
    rate = counts["agreement_rate"]
    return f"""
## Human review (cai serve)

{PREFS_REVIEW_RULES if kind == "prefs" else SFT_REVIEW_RULES}

| | rows |
| --- | --- |
| rows in this export | {kept['rows']} |
| agreed | {kept['agree']} |
| flipped | {kept['flip']} |
| discarded | {kept['discard']} |
| not reviewed | {kept['unreviewed']} |

Reviewer–judge agreement (agree / (agree + flip)) over all reviews: {'n/a' if rate is None else f'{rate:.3f}'}
({counts['agree']} agree, {counts['flip']} flip, {counts['discard']} discard).
"""
