"""Preference pairs from phase-1 trajectories: the final revision chosen over the initial answer.

Constitutional AI's critique-then-revise loop already states a preference: the revision is the
answer rewritten to follow the principle. These pairs cost no engine call and no judge, so they are
a baseline for judge labels and contrastive (RLCD) labels on the same prompts.

Read from an SFT export (`sft.jsonl`, whose `metadata.trajectory` keeps every step). A row is
skipped, and counted by reason, when its revision equals its answer (no preference), when the
answer or the final revision was cut at the token budget (a truncated text is not an answer), or
when it is unrevised. Rows are written in cai's preference format with `score` 1.0 (the pair's
direction comes from construction) and `metadata.labeller` "revision".
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from cai.errors import CaiError
from cai.files import read_jsonl_numbered
from cai.records import stable_id

LABELLER = "revision"


def _pair_of(row: dict[str, Any]) -> dict[str, Any] | str:
    """The preference row of one SFT row, or why it has none."""
    meta = row.get("metadata") or {}
    steps = meta.get("trajectory") or []
    answers = [s for s in steps if s.get("kind") == "answer"]
    revisions = [s for s in steps if s.get("kind") == "revision"]
    if not answers or not revisions:
        return "unrevised"
    answer, final = answers[0], revisions[-1]
    if answer.get("finish_reason") != "stop" or final.get("finish_reason") != "stop":
        return "truncated"
    if answer["text"].strip() == final["text"].strip():
        return "revision_equals_answer"
    messages = row["messages"]
    return {
        "prompt": messages[:-1],
        "chosen": [{"role": "assistant", "content": final["text"]}],
        "rejected": [{"role": "assistant", "content": answer["text"]}],
        "score": 1.0, "margin": 1.0, "consistent": None,
        "metadata": {
            "id": stable_id("revpair", meta.get("id")), "parent_ids": [meta.get("id")], "labeller": LABELLER,
            "constitution": meta.get("constitution"), "prompt_group": meta.get("prompt_group"),
            "principle_ids": meta.get("principle_ids", []), "policy_model": meta.get("model"),
            "seed": meta.get("seed"), "template_hash": meta.get("template_hash"),
            "cai_version": meta.get("cai_version"),
        },
    }


def revision_pairs(sft_export: str | Path) -> tuple[list[dict[str, Any]], Counter]:
    """(preference rows, skipped rows by reason) of an SFT export file or a phase-1 job folder."""
    path = Path(sft_export)
    if path.is_dir():
        path = path / "sft.jsonl"
    if not path.is_file():
        raise CaiError(f"{path}: no SFT export; give a phase-1 job folder (after its export) or its sft.jsonl")
    rows, skipped = [], Counter()
    for number, row in read_jsonl_numbered(path):
        if "messages" not in row or not isinstance(row.get("metadata"), dict):
            raise CaiError(f"{path}:{number}: not an SFT export row (needs `messages` and `metadata`); "
                           "give the sft.jsonl a phase-1 job exported")
        pair = _pair_of(row)
        if isinstance(pair, str):
            skipped[pair] += 1
        else:
            rows.append(pair)
    return rows, skipped
