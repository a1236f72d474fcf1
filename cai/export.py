"""Records -> TRL dataset files (JSONL + Parquet) and a data card.

SFT rows use TRL's conversational format: `{"messages": [...], "metadata": {...}}`;
the metadata column carries the lineage and the whole trajectory. Error rows
stay in the job's shards and are only counted here.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pyarrow.json as pa_json
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from cai.records import SFTRecord
from cai.store import JobStore, atomic_write_lines, atomic_write_text


class SFTExportStats(BaseModel):
    rows: int = 0
    errors: dict[str, int] = Field(default_factory=dict)
    principles: dict[str, int] = Field(default_factory=dict)
    generated_tokens: int = 0
    mean_final_chars: float = 0.0
    files: list[str] = Field(default_factory=list)

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())


def sft_row(record: SFTRecord) -> dict:
    lineage = record.lineage
    metadata = {
        "id": record.id,
        "parent_ids": record.parent_ids,
        "constitution": lineage.constitution.model_dump(exclude={"path"}),
        "principle_ids": lineage.principle_ids,
        "model": lineage.model.model_dump(),
        "sampling": {k: v.model_dump() for k, v in lineage.sampling.items()},
        "seed": lineage.seed,
        "template_hash": lineage.template_hash,
        "cai_version": lineage.cai_version,
        "created_at": lineage.created_at,
        "trajectory": [s.model_dump() for s in record.trajectory],
    }
    messages = [m.model_dump() for m in record.prompt] + [{"role": "assistant", "content": record.final}]
    return {"messages": messages, "metadata": metadata}


def _ok_rows(records: Iterable[SFTRecord], stats: SFTExportStats) -> Iterable[str]:
    errors: Counter[str] = Counter()
    principles: Counter[str] = Counter()
    final_chars = 0
    for record in records:
        stats.generated_tokens += sum(s.completion_tokens for s in record.trajectory)
        if record.error is not None:
            errors[record.error.code.value] += 1
            continue
        stats.rows += 1
        final_chars += len(record.final or "")
        principles.update(record.lineage.principle_ids)
        yield json.dumps(sft_row(record), ensure_ascii=False) + "\n"
    stats.errors = dict(errors)
    stats.principles = dict(sorted(principles.items()))
    stats.mean_final_chars = final_chars / stats.rows if stats.rows else 0.0


def export_sft(store: JobStore) -> SFTExportStats:
    """Write DIR/sft.jsonl, DIR/sft.parquet and DIR/README.md from the job's shards."""
    stats = SFTExportStats()
    records = (SFTRecord.model_validate(row) for row in store.read("sft"))
    jsonl = store.root / "sft.jsonl"
    atomic_write_lines(jsonl, _ok_rows(records, stats))
    stats.files = [str(jsonl)]
    if stats.rows:
        parquet = store.root / "sft.parquet"
        tmp = parquet.with_name(".sft.parquet.tmp")
        pq.write_table(pa_json.read_json(jsonl), tmp)
        tmp.replace(parquet)
        stats.files.append(str(parquet))
    atomic_write_text(store.root / "README.md", sft_data_card(store, stats))
    return stats


def sft_data_card(store: JobStore, stats: SFTExportStats) -> str:
    m = store.manifest
    recipe = m.recipe
    const = m.fingerprint_inputs.get("constitution", {})
    model = m.fingerprint_inputs.get("model", {})
    errors = "\n".join(f"| {code} | {n} |" for code, n in sorted(stats.errors.items())) or "| none | 0 |"
    principles = "\n".join(f"| {pid} | {n} |" for pid, n in stats.principles.items()) or "| - | 0 |"
    return f"""---
tags: [constitutional-ai, sft, synthetic]
configs:
- config_name: default
  data_files: sft.jsonl
---
# SFT data: critique-then-revise under `{const.get('name')}` v{const.get('version')}

Made by `cai` {m.cai_version} (phase 1, SL-CAI). Each row's `messages` are the
prompt and the model's final revision after {recipe.get('phase1', {}).get('rounds')} rounds
of critique and revision; `metadata` holds the full trajectory and lineage.

- constitution: `{const.get('name')}` version {const.get('version')}, sha256 `{const.get('sha256')}`, git commit `{const.get('git_commit')}`
- model: `{model.get('id')}` (revision `{model.get('revision')}`, engine `{model.get('engine')}`)
- prompts: `{recipe.get('prompts')}`
- seed: {recipe.get('phase1', {}).get('seed')}; job fingerprint `{m.fingerprint}`
- rows exported: {stats.rows}; error rows excluded: {stats.error_total}
- mean length of final revisions: {stats.mean_final_chars:.0f} characters
- tokens generated: {stats.generated_tokens}

Load it with `datasets.load_dataset("json", data_files="sft.jsonl")` or
`load_dataset("parquet", data_files="sft.parquet")`; TRL's `SFTTrainer` takes
the `messages` column as is.

## Errors by kind

| code | rows |
| --- | --- |
{errors}

## Principles used (across all rounds of exported rows)

| principle | uses |
| --- | --- |
{principles}
"""
