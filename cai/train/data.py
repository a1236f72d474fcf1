"""Datasets for the trainers: loading a file, folder or Dataset, the columns TRL reads, held-out
splits, and preference labels as reviews left them (cai.formats.apply_review). Reads no model."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import datasets

from cai.errors import CaiError
from cai.formats import RowKind, apply_review, row_review

DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Columns TRL's conversational formats use; anything else (metadata, score, ...) is dropped
# before a dataset reaches a TRL trainer.
TRL_COLUMNS = ("messages", "prompt", "completion", "chosen", "rejected", "text", "tools", "chat_template_kwargs")


class TrainError(CaiError, ValueError):
    """A problem with the caller's data, model or settings (the CLI prints it without a traceback)."""


# ---- data --------------------------------------------------------------------------


def load_data(path: str | os.PathLike | datasets.Dataset | datasets.DatasetDict) -> datasets.Dataset:
    """A dataset from a JSONL / JSON / Parquet file, a folder holding one such
    export (cai's job folder: `sft.parquet` or `sft.jsonl`), a `save_to_disk`
    folder, or a `datasets.Dataset` already in memory. A `DatasetDict` gives
    its "train" split."""
    if isinstance(path, datasets.DatasetDict):
        return path["train"]
    if isinstance(path, datasets.Dataset):
        return path
    p = Path(path).expanduser()
    if not p.exists():
        raise TrainError(f"dataset not found: {p}")
    if p.is_dir() and any((p / n).exists() for n in ("dataset_info.json", "dataset_dict.json", "state.json")):
        loaded = datasets.load_from_disk(str(p))
        return loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded
    if p.is_dir():
        p = _pick_file(p)
    kind = DATA_SUFFIXES.get(p.suffix)
    if kind is None:
        raise TrainError(f"{p}: expected .jsonl, .json or .parquet")
    ds = datasets.load_dataset(kind, data_files=str(p), split="train")
    if len(ds) == 0:
        raise TrainError(f"{p}: the dataset is empty")
    return ds


def describe(data) -> str:
    """A dataset argument as metrics.json records it."""
    return str(data) if isinstance(data, (str, os.PathLike)) else f"<in-memory {type(data).__name__}>"


def _pick_file(folder: Path) -> Path:
    for suffixes in ((".parquet",), (".jsonl", ".json")):  # Parquet and JSONL exports hold the same rows
        found = sorted(f for f in folder.iterdir() if f.suffix in suffixes and not f.name.startswith("."))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(f.name for f in found)
            raise TrainError(f"{folder} holds several datasets ({names}); pass the file")
    raise TrainError(f"{folder} holds no .parquet/.jsonl dataset")


def keep_columns(ds: datasets.Dataset, extra: Iterable[str] = ()) -> datasets.Dataset:
    """Drop everything TRL does not read (lineage `metadata`, `score`, `consistent`, ...)."""
    keep = set(TRL_COLUMNS) | set(extra)
    return ds.remove_columns([c for c in ds.column_names if c not in keep])


def require_columns(ds: datasets.Dataset, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise TrainError(f"{what} needs columns {list(columns)}; the dataset has {ds.column_names}")


def heldout_split(ds: datasets.Dataset, fraction: float, seed: int):
    """(train, held_out or None): a seeded random `fraction` of the rows, at least one."""
    if fraction <= 0:
        return ds, None
    if len(ds) < 2:
        raise TrainError(f"cannot hold out {fraction:.0%} of {len(ds)} row(s); set the held-out fraction to 0")
    n = max(1, round(len(ds) * fraction))
    split = ds.train_test_split(test_size=n, seed=seed)
    return split["train"], split["test"]


# ---- reviews and preference labels ------------------------------------------------
# A row a reviewer labelled (`metadata.review`, cai serve's exports) is read through
# cai.formats.apply_review, the rule the service's export applies: "discard" drops it, agree /
# flip make it a confident human label.

REVIEW_COLUMNS = ("chosen", "rejected", "score", "margin", "consistent", "metadata")


def reviewed_rows(ds: datasets.Dataset, kind: RowKind = "prefs") -> list[dict[str, Any] | None]:
    """Per row: the row with its own review applied (cai.formats.apply_review); None when discarded.
    Only the columns a review reads or changes are read."""
    columns = [c for c in REVIEW_COLUMNS if c in ds.column_names]
    return [apply_review(row, row_review(row), kind) for row in ds.select_columns(columns).to_list()]


def human_labelled(ds: datasets.Dataset) -> list[bool]:
    """Per row: whether a human reviewer decided the pair (agree or flip)."""
    if "metadata" not in ds.column_names:
        return [False] * len(ds)
    return [_human(row) for row in reviewed_rows(ds)]


def _human(row: dict[str, Any] | None) -> bool:
    return row is not None and (row.get("metadata") or {}).get("label_source") == "human"


def without_discarded(ds: datasets.Dataset, kind: RowKind, source: str) -> datasets.Dataset:
    """The rows a reviewer did not discard (only `metadata` is read)."""
    if "metadata" not in ds.column_names:
        return ds
    keep = [i for i, meta in enumerate(ds["metadata"])
            if apply_review({"metadata": meta}, row_review({"metadata": meta}), kind) is not None]
    if not keep:
        raise TrainError(f"{source}: every row was discarded by a reviewer (metadata.review.label)")
    return ds if len(keep) == len(ds) else ds.select(keep)


def load_preferences(data) -> datasets.Dataset:
    """Preference pairs whose labels a trainer can take as they are.

    `chosen` must be the preferred answer. Reviews are applied as cai.formats.apply_review says:
    a row a reviewer discarded is dropped; a row a human decided (`metadata.review.label` agree or
    flip) is a confident label, its `score` and `margin` (where the columns exist) 1.0 and its
    chosen answer the reviewer's. cai serve's reviewed exports already write that; older exports
    wrote `score = 1 - score` on a flip, which this repairs. Any other row with `score` outside
    [0.5, 1] or a negative `margin` says the rejected answer is the better one: a TrainError
    names the file and the row, rather than training on the contradiction.
    """
    ds = load_data(data)
    require_columns(ds, ("chosen", "rejected"), "a preference dataset")
    rows = reviewed_rows(ds)
    human = [_human(row) for row in rows]
    check_labels(ds, [h or row is None for h, row in zip(human, rows)], describe(data))
    columns = [c for c in ("chosen", "rejected", "score", "margin") if c in ds.column_names]
    if any(human):
        ds = ds.map(lambda row, i: {c: rows[i][c] if human[i] else row[c] for c in columns}, with_indices=True)
    keep = [i for i, row in enumerate(rows) if row is not None]
    if not keep:
        raise TrainError(f"{describe(data)}: every row was discarded by a reviewer (metadata.review.label)")
    return ds if len(keep) == len(ds) else ds.select(keep)


def check_labels(ds: datasets.Dataset, reviewed: list[bool], source: str) -> None:
    """TrainError on the first unreviewed row whose score or margin prefers the rejected answer."""
    rules = {"score": (lambda v: 0.5 <= v <= 1.0, "0.5 <= score <= 1"), "margin": (lambda v: v >= 0.0, "margin >= 0")}
    for column, (ok, rule) in rules.items():
        if column not in ds.column_names:
            continue
        for i, (value, skip) in enumerate(zip(ds[column], reviewed)):
            if value is None or skip or ok(float(value)):
                continue
            meta = ds[i]["metadata"] if "metadata" in ds.column_names else None
            row_id = f" (id {meta['id']})" if isinstance(meta, dict) and meta.get("id") else ""
            raise TrainError(
                f"{source}: row {i + 1}{row_id} has {column} = {value}; a preference row needs {rule} "
                "(its chosen answer is the preferred one). Fix or drop the row; a human 'flip' belongs in "
                "metadata.review, as cai serve's export writes it (score = margin = 1.0)"
            )
