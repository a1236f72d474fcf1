"""Records -> TRL dataset files (JSONL + Parquet) and a data card (cai.cards).

The rows and the export filters are cai.formats' (SFT: TRL's conversational `messages`;
preferences: TRL's conversational `prompt` / `chosen` / `rejected`), each with its lineage in
`metadata`. Error rows and pairs the export filters leave out stay in the job's shards and are
only counted here.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cai.cards import (  # noqa: F401  (SFTExportStats: part of this module's API)
    PreferenceStatsCounter,
    SFTExportStats,
    SFTStatsCounter,
    prefs_data_card,
    sft_data_card,
)
from cai.files import atomic_open, atomic_write_lines, atomic_write_text, read_jsonl
from cai.formats import (
    ExportFilters,
    preference_exclusion,
    preference_row,
    sft_exclusion,
    sft_row,
)
from cai.preferences import PreferenceStats
from cai.records import PreferenceRecord, SFTRecord
from cai.store import JobStore


def _parquet_safe(value):
    """Parquet cannot store a struct with no fields: an empty mapping (e.g. `judge_config` of pairs
    no judge labelled) is written as null there; the JSONL export keeps `{}`."""
    if isinstance(value, dict):
        return {k: _parquet_safe(v) for k, v in value.items()} or None
    if isinstance(value, list):
        return [_parquet_safe(v) for v in value]
    return value


def jsonl_to_parquet(jsonl: Path, rows_per_group: int = 1000) -> Path:
    """Stream a JSONL export into Parquet beside it, one row group per chunk of rows.

    The writer keeps each row group's footer metadata until it closes (about 0.15 MB per
    group with this nested schema), so this step grows slowly with the row count; the
    JSONL export does not grow at all. The schema comes from the first chunk.
    """
    parquet = jsonl.with_suffix(".parquet")
    rows = map(_parquet_safe, read_jsonl(jsonl))
    chunks = iter(lambda: list(itertools.islice(rows, rows_per_group)), [])
    first = next(chunks)
    schema = pa.RecordBatch.from_pylist(first).schema
    with atomic_open(parquet, "wb") as f, pq.ParquetWriter(f, schema) as writer:
        for chunk in itertools.chain([first], chunks):
            writer.write_batch(pa.RecordBatch.from_pylist(chunk, schema=schema))
    return parquet


def export_sft(store: JobStore, parquet: bool = True) -> SFTExportStats:
    """Write DIR/sft.jsonl, DIR/sft.parquet (unless `parquet=False`) and DIR/README.md from the shards."""
    counter = SFTStatsCounter()

    def rows() -> Iterable[str]:
        for row in store.read("sft"):
            record = SFTRecord.model_validate(row)
            counter.add(record)
            if sft_exclusion(record) is None:
                yield json.dumps(sft_row(record), ensure_ascii=False) + "\n"

    jsonl = store.export_path("sft.jsonl")
    atomic_write_lines(jsonl, rows())
    stats = counter.result()
    stats.files = [str(jsonl)]
    if stats.rows and parquet:
        stats.files.append(str(jsonl_to_parquet(jsonl)))
    atomic_write_text(store.export_path("README.md"), sft_data_card(store, stats))
    return stats


def export_prefs(
    store: JobStore, min_confidence: float, require_consistent: bool, parquet: bool = True
) -> tuple[PreferenceStats, list[str]]:
    """Write DIR/prefs.jsonl (+ .parquet) and the data card; error and excluded rows stay in the shards."""
    counter = PreferenceStatsCounter(min_confidence, require_consistent)
    filters = ExportFilters(min_confidence=min_confidence, require_consistent=require_consistent)

    def rows() -> Iterable[str]:
        for row in store.read("prefs"):
            record = PreferenceRecord.model_validate(row)
            counter.add(record)
            if preference_exclusion(record, filters) is None:
                yield json.dumps(preference_row(record), ensure_ascii=False) + "\n"

    jsonl = store.export_path("prefs.jsonl")
    atomic_write_lines(jsonl, rows())
    stats = counter.stats()
    files = [str(jsonl)]
    if stats.exported and parquet:
        files.append(str(jsonl_to_parquet(jsonl)))
    atomic_write_text(store.export_path("README.md"), prefs_data_card(store, stats, min_confidence, require_consistent))
    return stats, files


