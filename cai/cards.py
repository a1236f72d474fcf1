"""Data cards: the README.md an export writes into a job directory, and the statistics it reports.

The text comes from the job's own settings (manifest.json: its constitution plan, models, phase-1
rounds, phase-2 judge mode, orders and pairing) and from counts over its records, so a card
describes the job that made the data, whatever its mode.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable

from pydantic import BaseModel, Field

from cai.card_judging import consistency_rule, judging_text, label_rows, orders_phrase
from cai.constitution import display_path
from cai.constitution_plan import describe
from cai.contrastive import (
    CONSTRUCTION_EXPORT,
    PAIRS_TITLE,
    ContrastCounter,
    agreement_section,
    judge_judgement,
)
from cai.engine.openai_batch import BatchUsage
from cai.formats import (
    PREFERENCE_FORMAT_VERSION,
    SFT_FORMAT_VERSION,
    ExportFilters,
    preference_exclusion,
)
from cai.job_usage import read_usage, sampled_tokens, usage_section
from cai.preferences import PreferenceStats
from cai.records import ErrorCode, PreferenceRecord, SFTRecord
from cai.store import JobStore
from cai.update_report import read_update_report, update_section


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
    prompt_tokens: int = Field(0, description="prompt tokens of every request the rows keep")
    mean_final_chars: float = 0.0
    files: list[str] = Field(default_factory=list)

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())


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


class SFTStatsCounter:
    """Running counts for SFTExportStats, so an export streams records without keeping them."""

    def __init__(self) -> None:
        self.stats = SFTExportStats()
        self.errors: Counter[str] = Counter()
        self.principles: Counter[str] = Counter()
        self.groups: Counter[str] = Counter()
        self.outcomes: dict[str, PrincipleOutcomes] = {}
        self.final_chars = 0

    def add(self, record: SFTRecord) -> None:
        self.stats.generated_tokens += sum(s.completion_tokens for s in record.trajectory)
        self.stats.prompt_tokens += sum(s.prompt_tokens for s in record.trajectory)
        _count_outcomes(record, self.outcomes)
        if record.error is not None:
            self.errors[record.error.code.value] += 1
            return
        self.stats.rows += 1
        self.final_chars += len(record.final or "")
        self.principles.update(record.lineage.principle_ids)
        self.groups[record.lineage.prompt_group or "(none)"] += 1

    def result(self) -> SFTExportStats:
        stats = self.stats
        stats.errors = dict(self.errors)
        stats.principles = dict(sorted(self.principles.items()))
        stats.principle_outcomes = dict(sorted(self.outcomes.items()))
        stats.groups = dict(sorted(self.groups.items()))
        stats.mean_final_chars = self.final_chars / stats.rows if stats.rows else 0.0
        return stats


class PreferenceStatsCounter:
    """Running sums for PreferenceStats, so an export streams records without keeping them."""

    def __init__(self, min_confidence: float = 0.0, require_consistent: bool = True):
        self.filters = ExportFilters(min_confidence=min_confidence, require_consistent=require_consistent)
        self.records = self.judged = self.exported = 0
        self.errors: Counter[str] = Counter()
        self.excluded: Counter[str] = Counter()
        self.principles: Counter[str] = Counter()
        self.groups: Counter[str] = Counter()
        self.judge_modes: Counter[str] = Counter()
        self.sums: defaultdict[str, list[float]] = defaultdict(lambda: [0.0, 0])  # name -> [sum, count]
        self.contrast = ContrastCounter()

    def _mean_of(self, name: str, value: float) -> None:
        self.sums[name][0] += value
        self.sums[name][1] += 1

    def add(self, r: PreferenceRecord) -> None:
        self.records += 1
        self.contrast.add(r)
        if r.error is not None:
            self.errors[r.error.code.value] += 1
            return
        if r.judgement is None:
            return
        self.judged += 1
        if (j := judge_judgement(r)) is not None and j.ok:  # the judge's, not a contrastive construction
            self._judge_stats(j)
        if (why := preference_exclusion(r, self.filters)) is not None:
            self.excluded[why] += 1
            return
        self.exported += 1
        self.principles[r.judgement.principle_id or "none"] += 1
        self.groups[r.lineage.prompt_group or "(none)"] += 1
        self._mean_of("mean_chosen_chars", len(r.chosen))
        self._mean_of("mean_rejected_chars", len(r.rejected))
        if len(r.chosen) != len(r.rejected):
            self._mean_of("chosen_longer", float(len(r.chosen) > len(r.rejected)))

    def _judge_stats(self, j) -> None:
        self.judge_modes[j.mode] += 1
        self._mean_of("mean_confidence", j.confidence)
        if j.consistent is not None:
            self._mean_of("consistency_rate", float(j.consistent))
        for o in j.orders:
            if o.option_mass is not None:
                self._mean_of("mean_option_mass", o.option_mass)
            if o.p_first is not None and o.p_first != 0.5:
                self._mean_of("first_position_wins", float(o.p_first > 0.5))

    def stats(self) -> PreferenceStats:
        means = {name: total / n for name, (total, n) in self.sums.items() if n}
        return PreferenceStats(records=self.records, judged=self.judged, exported=self.exported,
                               errors=dict(self.errors), excluded=dict(self.excluded),
                               principles=dict(sorted(self.principles.items())),
                               groups=dict(sorted(self.groups.items())),
                               judge_modes=dict(sorted(self.judge_modes.items())),
                               contrast=self.contrast.result(), **means)


def preference_stats(records: Iterable[PreferenceRecord], min_confidence: float = 0.0,
                     require_consistent: bool = True) -> PreferenceStats:
    """Counts and label statistics: mean confidence, consistency, first-position wins, lengths."""
    counter = PreferenceStatsCounter(min_confidence, require_consistent)
    for record in records:
        counter.add(record)
    return counter.stats()


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
- row format: cai SFT row v{SFT_FORMAT_VERSION} (TRL conversational format; `cai.formats`)

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
{job_sections(store, BatchUsage(prompt_tokens=stats.prompt_tokens, completion_tokens=stats.generated_tokens),
              "every answer, critique and revision, error rows included")}"""


def job_sections(store: JobStore, rows: BatchUsage, what: str) -> str:
    """The card's closing sections: token usage and cost (`rows`: the tokens the rows keep, of `what`), and
    what an update reused and regenerated."""
    return usage_section(read_usage(store.root), rows, what) + "\n" + update_section(read_update_report(store.root))


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


def prefs_data_card(store: JobStore, stats: PreferenceStats, min_confidence: float, require_consistent: bool) -> str:
    m = store.manifest
    inputs = m.fingerprint_inputs
    const, policy, judge = inputs.get("constitution", {}), inputs.get("policy", {}), inputs.get("judge", {})
    phase2 = inputs.get("phase2") or m.recipe.get("phase2") or {}
    judge_cfg = phase2.get("judge") or {}
    labeller = phase2.get("labeller", "judge")
    table = lambda counts: "\n".join(f"| {k} | {v} |" for k, v in sorted(counts.items())) or "| none | 0 |"  # noqa: E731
    judge_line = "judge: none (labels by construction)" if labeller == "contrastive" else (
        f"judge: `{judge.get('id')}` (revision `{judge.get('revision')}`, engine `{judge.get('engine')}`)"
        f", mode `{judge_cfg.get('mode', 'logprob')}`, {orders_phrase(judge_cfg)}")
    return f"""---
tags: [constitutional-ai, rlaif, preferences, synthetic]
configs:
- config_name: default
  data_files: prefs.jsonl
---
# Preference data: {PAIRS_TITLE.get(labeller, 'AI-judged pairs')} under `{const.get('name')}` v{const.get('version')}

Made by `cai` {m.cai_version} (phase 2, RL-CAI; labeller `{labeller}`). {judging_text(phase2, stats)}

- constitution: `{const.get('name')}` version {const.get('version')}, sha256 `{const.get('sha256')}`
- policy: `{policy.get('id')}` (revision `{policy.get('revision')}`, engine `{policy.get('engine')}`)
- {judge_line}
- prompts: `{_shown(m.recipe.get('prompts'))}`; job fingerprint `{m.fingerprint}`
- records: {stats.records}; {"judged" if labeller == "judge" else "labelled"}: {stats.judged}; exported: {stats.exported}
- export rules: {CONSTRUCTION_EXPORT if labeller != "judge" else f"confidence ≥ {min_confidence}; {consistency_rule(judge_cfg, require_consistent)}"}
- row format: cai preference row v{PREFERENCE_FORMAT_VERSION} (TRL conversational preference format; `cai.formats`)

## Label statistics (judged records)

| statistic | value |
| --- | --- |
{label_rows(judge_cfg, stats, labeller)}

{agreement_section(stats.contrast, labeller)}

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

{job_sections(store, sampled_tokens(store), "the policy's answers; the judge's requests keep no token counts")}"""
