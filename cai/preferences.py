"""Phase 2 (RL-CAI data): sample K answers per prompt, judge pairs, build preference records.

Pure: no file I/O. Two passes, each one engine call per batch:
1. `sample_answers`: the policy samples K answers per prompt (temperature > 0,
   per-request seeds) -> `SampledAnswers`;
2. `judge_samples`: the judge compares the usable answers pairwise, each pair
   under its own seeded principle of the prompt group's constitution, in both
   orders (see cai.judge) -> `PreferenceRecord`.
The pipeline runs pass 1 over the whole job, closes the policy engine, then runs
pass 2, so a policy and a different judge never share one GPU.

Exclusions: a sample that failed, was truncated (hit max_tokens), is empty, or
repeats an earlier sample of the same prompt is kept in the record but not
paired. With fewer than two usable samples the prompt becomes an error row.

Pairing (``Phase2Config.pairing``):
- ``best_worst`` (default): every usable pair is judged; each answer gets a soft
  win count (the sum of its judged P(win) over its pairs, a Copeland/Borda score
  that uses the soft labels rather than hard wins); the top and bottom answers are
  emitted as one record, oriented and scored by the judge's own verdict on that
  pair. One row per prompt keeps prompts equally weighted (all pairs would weight
  a prompt by K(K-1)/2 strongly correlated rows) and picks the pair with the
  widest quality gap, i.e. the least noisy label. For K = 2 this is the one pair.
  If any pair of the prompt failed, the ranking is incomplete: error row.
- ``all``: one record per judged pair.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import combinations
from typing import Any

from pydantic import BaseModel, Field

from cai import __version__
from cai.constitution import LoadedConstitution, sample_principle
from cai.constitution_plan import ConstitutionPlan, PlanError
from cai.critique import step_error
from cai.engine.base import Engine
from cai.judge import JudgeItem, judge_pairs
from cai.prompts import (
    CONTRAST_TEMPLATE_HASH,
    answer_chat,
    judge_template_hash,
    with_system,
)
from cai.recipe import Phase2Config
from cai.records import (
    AnswerSample,
    Comparison,
    ErrorCode,
    ErrorInfo,
    ModelRef,
    PreferenceLineage,
    PreferenceRecord,
    SampledAnswers,
    SamplingParams,
    SourcePrompt,
    stable_id,
)

StepHook = Callable[[str, int], None]


def phase2_id(source: SourcePrompt) -> str:
    return stable_id("prefs", [m.model_dump() for m in source.messages])


def answer_samples(completions) -> list[AnswerSample]:
    out: list[AnswerSample] = []
    seen: set[str] = set()
    for c in completions:
        err = step_error(c)
        text = c.text.strip()
        excluded = err.code.value if err else ("duplicate" if text in seen else None)
        seen.add(text)
        out.append(AnswerSample(text=text, finish_reason=c.finish_reason, prompt_tokens=c.prompt_tokens,
                                completion_tokens=c.completion_tokens, excluded=excluded, error=err))
    return out


def policy_params(config: Phase2Config) -> SamplingParams:
    params = config.policy
    return params if params.seed is not None else params.model_copy(update={"seed": config.seed})


def _pairs(samples: list[AnswerSample]) -> list[tuple[int, int]]:
    usable = [k for k, s in enumerate(samples) if s.excluded is None]
    return list(combinations(usable, 2))


def sample_answers(
    sources: Sequence[SourcePrompt], policy_engine: Engine, config: Phase2Config, on_step: StepHook | None = None,
) -> list[SampledAnswers]:
    """Pass 1: K answers per prompt in one engine call; a prompt with < 2 usable answers is an error row."""
    judge_labeller(config)
    k = config.samples
    chats = [with_system(answer_chat(s.messages), config.system_prompt) for s in sources for _ in range(k)]
    completions = policy_engine.generate(chats, policy_params(config)) if chats else []
    if len(completions) != len(chats):
        raise RuntimeError(f"engine returned {len(completions)} completions for {len(chats)} chats")
    if on_step:
        on_step("sample", len(chats))
    return [sampled_row(source, answer_samples(completions[n * k:(n + 1) * k]), policy_engine.model)
            for n, source in enumerate(sources)]


def sampled_row(source: SourcePrompt, answers: list[AnswerSample], model: ModelRef, error=None) -> SampledAnswers:
    usable = sum(a.excluded is None for a in answers)
    if error is None and usable < 2:
        reasons = sorted({a.excluded for a in answers if a.excluded})
        error = ErrorInfo(code=next((a.error.code for a in answers if a.error), ErrorCode.EMPTY),
                          message=f"only {usable} of {len(answers)} samples usable "
                                  f"(excluded: {', '.join(reasons)}); need 2 to form a pair",
                          raw=next((a.error.raw or a.text for a in answers if a.error), None))
    return SampledAnswers(id=phase2_id(source), parent_ids=[source.id], prompt=source.messages,
                          group=source.group, answers=answers, model=model, error=error)


def judge_samples(
    sampled: Sequence[SampledAnswers],
    constitution: LoadedConstitution | ConstitutionPlan,
    judge_engine: Engine,
    config: Phase2Config,
    on_step: StepHook | None = None,
) -> list[PreferenceRecord]:
    """Pass 2: judge every usable pair of each prompt under its group's constitution; records in order."""
    judge_labeller(config)
    plan = ConstitutionPlan.of(constitution)
    jobs: list[tuple[int, tuple[int, int]]] = []
    items: list[JudgeItem] = []
    for n, row in enumerate(sampled):
        if row.error is not None:
            continue
        for a, b in _pairs(row.answers):
            principle = sample_principle(phase2_constitution(plan, row.group), config.seed, row.id, [a, b])
            jobs.append((n, (a, b)))
            items.append(JudgeItem.for_principle(row.prompt, row.answers[a].text, row.answers[b].text, principle))
    judgements = judge_pairs(judge_engine, items, config.judge) if items else []
    if on_step and items:
        on_step("judge", len(items) * config.judge.orders)
    comparisons: list[list[Comparison]] = [[] for _ in sampled]
    for (n, (a, b)), j in zip(jobs, judgements):
        comparisons[n].append(Comparison(a=a, b=b, judgement=j))
    records: list[PreferenceRecord] = []
    for n, row in enumerate(sampled):
        lineage = lineage_parts(phase2_constitution(plan, row.group), row.group, row.model,
                                 judge_engine.model, config)
        records += _records(row, comparisons[n], config, lineage)
    return records


def run_phase2(
    sources: Sequence[SourcePrompt],
    constitution: LoadedConstitution | ConstitutionPlan,
    policy_engine: Engine,
    judge_engine: Engine,
    config: Phase2Config,
    on_step: StepHook | None = None,
) -> list[PreferenceRecord]:
    """Both passes on one batch (for callers holding both engines): sample, then judge."""
    return judge_samples(sample_answers(sources, policy_engine, config, on_step), constitution, judge_engine,
                         config, on_step)


def phase2_constitution(plan: ConstitutionPlan, group: str) -> LoadedConstitution:
    constitution = plan.for_group(group)
    if constitution is None:
        raise PlanError(f"prompt group {group!r} has no constitution; phase 2 needs one for every group")
    return constitution


def cancelled_records(sources: Sequence[SourcePrompt], constitution: LoadedConstitution | ConstitutionPlan,
                      policy: ModelRef, judge: ModelRef, config: Phase2Config, reason: str) -> list[PreferenceRecord]:
    """A `cancelled` error row for each prompt a stopped job never started (or never judged)."""
    plan = ConstitutionPlan.of(constitution)
    error = ErrorInfo(code=ErrorCode.CANCELLED, message=reason)
    return [_record(phase2_id(s), dict(parent_ids=[s.id], prompt=s.messages), [], None,
                    lineage_parts(phase2_constitution(plan, s.group), s.group, policy, judge, config), error=error)
            for s in sources]


NO_JUDGE = ModelRef(id="none", engine="none")
"""The `judge_model` of pairs labelled by construction alone (labeller contrastive): no judge ran."""


def lineage_parts(constitution: LoadedConstitution, group: str, policy: ModelRef, judge: ModelRef,
                  config: Phase2Config) -> dict[str, Any]:
    """Lineage of the job's records. Labeller contrastive: no judge, no judge settings, and the
    template hash is the steering template's (cai.prompts.CONTRAST_TEMPLATE_HASH)."""
    judged = config.labeller != "contrastive"
    sampling = {"policy": policy_params(config), **({"judge": config.judge.generation()} if judged else {})}
    return dict(
        constitution=constitution.ref,
        prompt_group=group or None,
        model=policy,
        judge_model=judge if judged else NO_JUDGE,
        judge_config=config.judge.model_dump(mode="json") if judged else {},
        sampling=sampling,
        seed=config.seed,
        template_hash=judge_template_hash(config.judge.mode) if judged else CONTRAST_TEMPLATE_HASH,
        cai_version=__version__,
        labeller=config.labeller,
    )


def judge_labeller(config: Phase2Config) -> None:
    """ValueError unless `config` has the judge label K sampled answers (this module's passes);
    contrastive pairs go through cai.contrastive (sample_pass, label_pass)."""
    if config.labeller != "judge":
        raise ValueError(f"labeller {config.labeller!r}: use cai.contrastive.sample_pass / label_pass "
                         "(cai.preferences samples and judges K answers for labeller 'judge' only)")


def _records(row: SampledAnswers, comparisons, config, lineage) -> list[PreferenceRecord]:
    base = dict(parent_ids=row.parent_ids, prompt=row.prompt, answers=row.answers)
    rid = row.id
    if row.error is not None:
        return [_record(rid, base, [], None, lineage, error=row.error)]
    if config.pairing == "all":
        return [_record(stable_id("prefs", rid, [c.a, c.b]), base, [c], c, lineage) for c in comparisons]
    failed = next((c for c in comparisons if c.judgement.error is not None), None)
    if failed is not None:
        err = failed.judgement.error.model_copy(
            update={"message": f"pair ({failed.a}, {failed.b}): {failed.judgement.error.message}"})
        return [_record(rid, base, comparisons, None, lineage, error=err)]
    return [_record(rid, base, comparisons, _best_vs_worst(comparisons), lineage)]


def win_scores(comparisons: Sequence[Comparison]) -> dict[int, float]:
    """Soft win count per answer: the sum over its pairs of its judged P(win)."""
    wins: dict[int, float] = {}
    for c in comparisons:
        wins[c.a] = wins.get(c.a, 0.0) + c.judgement.p_a
        wins[c.b] = wins.get(c.b, 0.0) + 1.0 - c.judgement.p_a
    return wins


def _best_vs_worst(comparisons: Sequence[Comparison]) -> Comparison:
    wins = win_scores(comparisons)
    best = max(wins, key=lambda i: (wins[i], -i))
    worst = min((i for i in wins if i != best), key=lambda i: (wins[i], i))
    pair = {best, worst}
    return next(c for c in comparisons if {c.a, c.b} == pair)


def _record(rid, base, comparisons, emitted: Comparison | None, lineage, error=None) -> PreferenceRecord:
    principles = [c.judgement.principle_id for c in comparisons if c.judgement.principle_id]
    if emitted is not None:  # a backend without log-probs may have made it a structured verdict
        lineage = {**lineage, "template_hash": judge_template_hash(emitted.judgement.mode)}
    record = PreferenceRecord(id=rid, **base, comparisons=comparisons,
                              lineage=PreferenceLineage(principle_ids=principles, **lineage), error=error)
    if emitted is None or error is not None:
        return record
    j = emitted.judgement
    if j.error is not None:
        return record.model_copy(update={"judgement": j, "pair": (emitted.a, emitted.b), "error": j.error})
    a_wins = j.p_a >= 0.5  # an exact tie (score 0.5, margin 0) is not exported; see cai.formats
    chosen, rejected = (emitted.a, emitted.b) if a_wins else (emitted.b, emitted.a)
    score = j.p_a if a_wins else 1.0 - j.p_a
    answers = base["answers"]
    return record.model_copy(update=dict(
        judgement=j, pair=(emitted.a, emitted.b), chosen_index=chosen, rejected_index=rejected,
        chosen=answers[chosen].text, rejected=answers[rejected].text, score=score, margin=2 * score - 1,
    ))


class ContrastStats(BaseModel):
    """Contrastive pairs (labeller contrastive|both; see cai.contrastive): pairs labelled by construction
    and, with `both`, how often the judge's P(toward answer preferred) agrees: > 0.5 agrees, < 0.5
    disagrees, exactly 0.5 (e.g. a judge that always picks one position) counts one half."""

    pairs: int = Field(0, description="pairs labelled by construction (error rows not counted)")
    judge_scored: int = Field(0, description="of those, pairs the judge scored without an error")
    judge_errors: dict[str, int] = Field(default_factory=dict)
    agree: int = 0
    disagree: int = 0
    ties: int = 0
    agreement: float | None = Field(None, description="(agree + ties / 2) / judge_scored")
    agreement_low: float | None = Field(None, description="95% Wilson interval of `agreement`")
    agreement_high: float | None = None
    mean_p_toward: float | None = None


class PreferenceStats(BaseModel):
    """Label statistics for a data card (computed over judged records; `exported` after filtering)."""

    records: int = 0
    judged: int = 0
    exported: int = 0
    errors: dict[str, int] = Field(default_factory=dict)
    excluded: dict[str, int] = Field(default_factory=dict)
    principles: dict[str, int] = Field(default_factory=dict)
    groups: dict[str, int] = Field(default_factory=dict, description="exported pairs per prompt group")
    judge_modes: dict[str, int] = Field(default_factory=dict, description="judged records per judge mode")
    mean_confidence: float | None = None
    consistency_rate: float | None = None
    first_position_wins: float | None = None
    mean_option_mass: float | None = None
    mean_chosen_chars: float | None = None
    mean_rejected_chars: float | None = None
    chosen_longer: float | None = None
    contrast: ContrastStats | None = Field(None, description="labeller contrastive|both")
