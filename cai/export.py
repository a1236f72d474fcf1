"""Records -> TRL dataset files (JSONL + Parquet) and a data card.

SFT rows use TRL's conversational format: `{"messages": [...], "metadata": {...}}`;
the metadata column carries the lineage and the whole trajectory. Error rows
stay in the job's shards and are only counted here.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from cai.constitution import display_path
from cai.constitution_plan import describe
from cai.preferences import (
    PreferenceStats,
    PreferenceStatsCounter,
    keep_for_export,
    preference_row,
)
from cai.records import ErrorCode, PreferenceRecord, SFTRecord
from cai.store import JobStore, atomic_write_lines, atomic_write_text


class PrincipleOutcomes(BaseModel):
    """Per principle, over every trajectory that sampled it: how many ended in the export, how many
    ended as error rows in a round under it, and how many of its critiques hit max_tokens (kept as context)."""

    exported: int = 0
    dropped: int = 0
    truncated_critiques: int = 0


class SFTExportStats(BaseModel):
    rows: int = 0
    errors: dict[str, int] = Field(default_factory=dict)
    principles: dict[str, int] = Field(default_factory=dict)
    principle_outcomes: dict[str, PrincipleOutcomes] = Field(default_factory=dict)
    groups: dict[str, int] = Field(default_factory=dict, description="exported rows per prompt group")
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
        "constitution": lineage.constitution.model_dump(exclude={"path"}) if lineage.constitution else None,
        "prompt_group": lineage.prompt_group,
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


def _count_outcomes(record: SFTRecord, outcomes: dict[str, PrincipleOutcomes]) -> None:
    for step in record.trajectory:
        if step.kind == "critique" and step.finish_reason == "length" and step.principle_id:
            outcomes.setdefault(step.principle_id, PrincipleOutcomes()).truncated_critiques += 1
    if record.error is not None and record.error.code == ErrorCode.CANCELLED:
        return
    ids = record.lineage.principle_ids
    for pid in set(ids if record.error is None else ids[-1:]):  # an error row: the round it ended in
        counts = outcomes.setdefault(pid, PrincipleOutcomes())
        if record.error is None:
            counts.exported += 1
        else:
            counts.dropped += 1


def _ok_rows(records: Iterable[SFTRecord], stats: SFTExportStats) -> Iterable[str]:
    errors: Counter[str] = Counter()
    principles: Counter[str] = Counter()
    groups: Counter[str] = Counter()
    outcomes: dict[str, PrincipleOutcomes] = {}
    final_chars = 0
    for record in records:
        stats.generated_tokens += sum(s.completion_tokens for s in record.trajectory)
        _count_outcomes(record, outcomes)
        if record.error is not None:
            errors[record.error.code.value] += 1
            continue
        stats.rows += 1
        final_chars += len(record.final or "")
        principles.update(record.lineage.principle_ids)
        groups[record.lineage.prompt_group or "(none)"] += 1
        yield json.dumps(sft_row(record), ensure_ascii=False) + "\n"
    stats.errors = dict(errors)
    stats.principles = dict(sorted(principles.items()))
    stats.principle_outcomes = dict(sorted(outcomes.items()))
    stats.groups = dict(sorted(groups.items()))
    stats.mean_final_chars = final_chars / stats.rows if stats.rows else 0.0


def jsonl_to_parquet(jsonl: Path, rows_per_group: int = 1000) -> Path:
    """Stream a JSONL export into Parquet beside it, one row group per chunk of rows.

    The writer keeps each row group's footer metadata until it closes (about 0.15 MB per
    group with this nested schema), so this step grows slowly with the row count; the
    JSONL export does not grow at all. The schema comes from the first chunk.
    """
    parquet = jsonl.with_suffix(".parquet")
    tmp = parquet.with_name(f".{parquet.name}.tmp")
    with open(jsonl, encoding="utf-8") as f:
        chunks = iter(lambda: [json.loads(line) for line in itertools.islice(f, rows_per_group)], [])
        first = next(chunks)
        schema = pa.RecordBatch.from_pylist(first).schema
        try:
            with pq.ParquetWriter(tmp, schema) as writer:
                for chunk in itertools.chain([first], chunks):
                    writer.write_batch(pa.RecordBatch.from_pylist(chunk, schema=schema))
            tmp.replace(parquet)
        finally:
            tmp.unlink(missing_ok=True)
    return parquet


def export_sft(store: JobStore, parquet: bool = True) -> SFTExportStats:
    """Write DIR/sft.jsonl, DIR/sft.parquet (unless `parquet=False`) and DIR/README.md from the shards."""
    stats = SFTExportStats()
    records = (SFTRecord.model_validate(row) for row in store.read("sft"))
    jsonl = store.root / "sft.jsonl"
    atomic_write_lines(jsonl, _ok_rows(records, stats))
    stats.files = [str(jsonl)]
    if stats.rows and parquet:
        stats.files.append(str(jsonl_to_parquet(jsonl)))
    atomic_write_text(store.root / "README.md", sft_data_card(store, stats))
    return stats


def _shown(prompts: str | None) -> str | None:
    """The prompt source as a data card names it: a bundled set's name, else display_path (no absolute path)."""
    return display_path(prompts) if prompts else prompts


def sft_data_card(store: JobStore, stats: SFTExportStats) -> str:
    m = store.manifest
    recipe = m.recipe
    const = m.fingerprint_inputs.get("constitution", {})
    model = m.fingerprint_inputs.get("model", {})
    errors = "\n".join(f"| {code} | {n} |" for code, n in sorted(stats.errors.items())) or "| none | 0 |"
    principles = "\n".join(f"| {pid} | {n} |" for pid, n in stats.principles.items()) or "| - | 0 |"
    outcomes = _outcome_rows(stats.principle_outcomes)
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
- prompts: `{_shown(recipe.get('prompts'))}`
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

## Outcome by principle

A trajectory that ends as an error row (a failed, empty or truncated answer or revision) is
counted against the principle of the round it ended in. A critique that hits its token budget
is kept as context for the revision, not dropped; `truncated critiques` counts those.

| principle | exported | dropped | drop rate | truncated critiques |
| --- | --- | --- | --- | --- |
{outcomes}

{constitution_section(m.fingerprint_inputs, stats.groups)}
"""


def _outcome_rows(outcomes: dict[str, PrincipleOutcomes]) -> str:
    rows = []
    for pid, o in outcomes.items():
        total = o.exported + o.dropped
        rate = f"{o.dropped / total:.2f}" if total else "n/a"
        rows.append(f"| {pid} | {o.exported} | {o.dropped} | {rate} | {o.truncated_critiques} |")
    return "\n".join(rows) or "| - | 0 | 0 | n/a | 0 |"


def constitution_section(inputs: dict, groups: dict[str, int]) -> str:
    """Which constitution each prompt group used, with the exported rows of each group."""
    rows = "\n".join(f"| {group} | {label} |" for group, label in describe(inputs))
    counts = "\n".join(f"| {group} | {n} |" for group, n in groups.items()) or "| - | 0 |"
    return f"""## Constitution by prompt group

| prompt group | constitution |
| --- | --- |
{rows}

| prompt group | rows exported |
| --- | --- |
{counts}
"""


def export_prefs(
    store: JobStore, min_confidence: float, require_consistent: bool, parquet: bool = True
) -> tuple[PreferenceStats, list[str]]:
    """Write DIR/prefs.jsonl (+ .parquet) and the data card; error and excluded rows stay in the shards."""
    counter = PreferenceStatsCounter(min_confidence, require_consistent)

    def rows() -> Iterable[str]:
        for row in store.read("prefs"):
            record = PreferenceRecord.model_validate(row)
            counter.add(record)
            if keep_for_export(record, min_confidence, require_consistent):
                yield json.dumps(preference_row(record), ensure_ascii=False) + "\n"

    jsonl = store.root / "prefs.jsonl"
    atomic_write_lines(jsonl, rows())
    stats = counter.stats()
    files = [str(jsonl)]
    if stats.exported and parquet:
        files.append(str(jsonl_to_parquet(jsonl)))
    atomic_write_text(store.root / "README.md", prefs_data_card(store, stats, min_confidence, require_consistent))
    return stats, files


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def prefs_data_card(store: JobStore, stats: PreferenceStats, min_confidence: float, require_consistent: bool) -> str:
    m = store.manifest
    inputs = m.fingerprint_inputs
    const, policy, judge = inputs.get("constitution", {}), inputs.get("policy", {}), inputs.get("judge", {})
    table = lambda counts: "\n".join(f"| {k} | {v} |" for k, v in sorted(counts.items())) or "| none | 0 |"  # noqa: E731
    return f"""---
tags: [constitutional-ai, rlaif, preferences, synthetic]
configs:
- config_name: default
  data_files: prefs.jsonl
---
# Preference data: AI-judged pairs under `{const.get('name')}` v{const.get('version')}

Made by `cai` {m.cai_version} (phase 2, RL-CAI). For each prompt the policy sampled
{m.recipe.get('phase2', {}).get('samples')} answers; the judge compared them under a sampled principle's
comparison question, in both orders, from the log-probabilities of its options.
`score` is P(chosen preferred) averaged over both orders; `margin` = 2·score − 1.

- constitution: `{const.get('name')}` version {const.get('version')}, sha256 `{const.get('sha256')}`
- policy: `{policy.get('id')}` (revision `{policy.get('revision')}`, engine `{policy.get('engine')}`)
- judge: `{judge.get('id')}` (revision `{judge.get('revision')}`, engine `{judge.get('engine')}`), mode `{m.recipe.get('phase2', {}).get('judge', {}).get('mode')}`
- prompts: `{_shown(m.recipe.get('prompts'))}`; job fingerprint `{m.fingerprint}`
- records: {stats.records}; judged: {stats.judged}; exported: {stats.exported}
- export rules: confidence ≥ {min_confidence}; {'both orders must agree' if require_consistent else 'inconsistent pairs kept'}

## Label statistics (judged records)

| statistic | value |
| --- | --- |
| mean confidence (abs(P − 0.5)·2) | {_fmt(stats.mean_confidence)} |
| consistency rate (both orders agree) | {_fmt(stats.consistency_rate)} |
| share of first-position wins (per order) | {_fmt(stats.first_position_wins)} |
| mean P(A) + P(B) before normalising (per order; logprob and cot) | {_fmt(stats.mean_option_mass)} |
| mean length chosen / rejected (chars, exported) | {_fmt(stats.mean_chosen_chars, '.0f')} / {_fmt(stats.mean_rejected_chars, '.0f')} |
| chosen is the longer answer (exported) | {_fmt(stats.chosen_longer)} |

## Errors by kind

| code | rows |
| --- | --- |
{table(stats.errors)}

## Excluded from the export (kept in shards/)

| reason | rows |
| --- | --- |
{table(stats.excluded)}

## Principles of exported pairs

| principle | pairs |
| --- | --- |
{table(stats.principles)}

{constitution_section(inputs, stats.groups)}

Load with `datasets.load_dataset("json", data_files="prefs.jsonl")`; TRL's `DPOTrainer`
and `RewardTrainer` take the `prompt` / `chosen` / `rejected` columns as is.
"""
