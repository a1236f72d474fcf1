"""Contrastive preference pairs (RLCD, Yang et al. 2023): phase 2's labellers `contrastive` and `both`.

For each prompt, one principle of its group's constitution is sampled (seeded by the prompt, as
labeller `judge` samples the principle of the pair (0, 1)), and the policy answers twice with the
same sampling settings and seed (two engine calls of the same shape, so request i gets the same
per-request seed in both), once with the principle's `directions.toward` appended to the last user
turn and once with `directions.away` (cai.prompts.steered_chat). The pair's label comes from that
construction: the toward answer is chosen, the away answer rejected. The exported prompt is the
prompt as read; the instructions are kept only in `metadata.contrast`.

`score` = `margin` = 1.0 on these rows: a hard label, as RLCD trains on, not a measured probability
(`metadata.labeller` says which). The trainers read it as such: soft DPO's per-pair smoothing is
ε = 1 − score = 0, i.e. plain DPO on that pair. With `both`, the judge also compares each pair in
its orders under the sampled principle's comparison question; its P(toward preferred) goes to
`metadata.contrast.judge_p_toward` and the data card reports its agreement with the construction
(with a 95% Wilson interval). The judge never changes a label or drops a pair; a pair it failed
to score is still exported (its error is counted on the card).

Answers are excluded as in labeller `judge` (failed, truncated, empty, or the two identical): the
prompt is then an error row.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from cai.constitution import LoadedConstitution, Principle, sample_principle
from cai.constitution_plan import ConstitutionPlan
from cai.constitution_source import ConstitutionError
from cai.engine.base import Engine
from cai.evaluate import wilson
from cai.judge import JudgeItem, judge_pairs
from cai.preferences import (
    ContrastStats,
    StepHook,
    answer_samples,
    judge_samples,
    lineage_parts,
    phase2_constitution,
    phase2_id,
    policy_params,
    sample_answers,
    sampled_row,
)
from cai.prompts import (
    CONTRAST_TEMPLATE_HASH,
    answer_chat,
    judge_template_hash,
    steered_chat,
    with_system,
)
from cai.recipe import Phase2Config
from cai.records import (
    CONSTRUCTION,
    Comparison,
    Completion,
    Contrast,
    Judgement,
    PreferenceLineage,
    PreferenceRecord,
    SampledAnswers,
    SourcePrompt,
)

TOWARD, AWAY = 0, 1  # the answers' indices: the chosen answer was steered toward the principle
CONSTRUCTION_EXPORT = "every labelled pair (a label by construction has confidence 1 and no orders to disagree)"
PAIRS_TITLE = {"contrastive": "contrastive pairs", "both": "contrastive pairs, judge-scored"}  # data card title


def require_directions(constitution: LoadedConstitution) -> None:
    """ConstitutionError naming the file and every principle without `directions`: any principle
    may be sampled, so a contrastive job needs them all."""
    c = constitution.constitution
    missing = [(i, p.id) for i, p in enumerate(c.principles) if p.directions is None]
    if not missing:
        return
    where = ", ".join(f"'{pid}' (principles[{i}])" for i, pid in missing)
    raise ConstitutionError(
        constitution.ref.path or c.name, None, "directions",
        f"{len(missing)} of {len(c.principles)} principles of {c.name} v{c.version} have no directions: {where}. "
        "Labellers contrastive and both steer the policy toward and away from the sampled principle: add "
        "`directions: {toward: ..., away: ...}` to each (see constitutions/harmless.yaml), or use labeller judge")


def require_plan_directions(plan: LoadedConstitution | ConstitutionPlan) -> None:
    """require_directions for the default constitution and every group's (phase 2 has no `none` group)."""
    plan = ConstitutionPlan.of(plan)
    for constitution in [plan.default, *plan.groups.values()]:
        if constitution is not None:
            require_directions(constitution)


def contrast_principle(constitution: LoadedConstitution, seed: int, row_id: str) -> Principle:
    """The prompt's principle: the one labeller `judge` would judge the prompt's pair (0, 1) under."""
    return sample_principle(constitution, seed, row_id, [TOWARD, AWAY])


def _generate(engine: Engine, chats: list, config: Phase2Config) -> list[Completion]:
    completions = engine.generate(chats, policy_params(config)) if chats else []
    if len(completions) != len(chats):
        raise RuntimeError(f"engine returned {len(completions)} completions for {len(chats)} chats")
    return completions


def sample_contrastive(sources: Sequence[SourcePrompt], constitution: LoadedConstitution | ConstitutionPlan,
                       engine: Engine, config: Phase2Config, on_step: StepHook | None = None) -> list[SampledAnswers]:
    """Pass 1: per prompt an answer steered toward its sampled principle and one steered away, in two
    engine calls (all toward, then all away) with the same settings: request i has the same seed in both."""
    plan = ConstitutionPlan.of(constitution)
    constitutions = [phase2_constitution(plan, s.group) for s in sources]
    for c in {id(c): c for c in constitutions}.values():
        require_directions(c)
    principles = [contrast_principle(c, config.seed, phase2_id(s)) for c, s in zip(constitutions, sources)]
    chats = [with_system(answer_chat(s.messages), config.system_prompt) for s in sources]
    answers = []
    for side in ("toward", "away"):
        answers.append(_generate(engine, [steered_chat(chat, getattr(p.directions, side))
                                          for chat, p in zip(chats, principles)], config))
        if on_step and chats:
            on_step("sample", len(chats))
    rows = []
    for source, p, toward, away in zip(sources, principles, *answers):
        contrast = Contrast(principle_id=p.id, toward=p.directions.toward, away=p.directions.away,
                            template_hash=CONTRAST_TEMPLATE_HASH)
        row = sampled_row(source, answer_samples([toward, away]), engine.model)
        rows.append(row.model_copy(update={"contrast": contrast}))
    return rows


def label_contrastive(sampled: Sequence[SampledAnswers], constitution: LoadedConstitution | ConstitutionPlan,
                      judge_engine: Engine | None, config: Phase2Config,
                      on_step: StepHook | None = None) -> list[PreferenceRecord]:
    """Pass 2: each pair labelled by construction; labeller `both` also has the judge score it
    (toward shown as answer A in the first order) under the sampled principle's comparison question."""
    plan = ConstitutionPlan.of(constitution)
    judged: dict[int, Judgement] = {}
    if config.labeller == "both":
        if judge_engine is None:
            raise ValueError("labeller 'both' needs a judge engine")
        todo = [n for n, row in enumerate(sampled) if row.error is None]
        items = [_judge_item(sampled[n], phase2_constitution(plan, sampled[n].group)) for n in todo]
        if items:
            judged = dict(zip(todo, judge_pairs(judge_engine, items, config.judge)))
            if on_step:
                on_step("judge", len(items) * config.judge.orders)
    judge_ref = judge_engine.model if judge_engine is not None else None
    return [_contrast_record(row, judged.get(n), lineage_parts(
        phase2_constitution(plan, row.group), row.group, row.model, judge_ref, config))
        for n, row in enumerate(sampled)]


def _judge_item(row: SampledAnswers, constitution: LoadedConstitution) -> JudgeItem:
    principle = constitution.constitution.principle(row.contrast.principle_id)
    return JudgeItem.for_principle(row.prompt, row.answers[TOWARD].text, row.answers[AWAY].text, principle)


def _contrast_record(row: SampledAnswers, judged: Judgement | None, lineage: dict) -> PreferenceRecord:
    pid = row.contrast.principle_id if row.contrast else None
    if judged is not None and judged.ok:  # the mode it was judged in: a structured fallback has its own
        lineage = {**lineage, "template_hash": judge_template_hash(judged.mode)}
    base = dict(id=row.id, parent_ids=row.parent_ids, prompt=row.prompt, answers=row.answers, contrast=row.contrast,
                lineage=PreferenceLineage(principle_ids=[pid] if pid else [], **lineage))
    if row.error is not None:
        return PreferenceRecord(**base, error=row.error)
    label = Judgement(principle_id=pid, mode=CONSTRUCTION, p_a=1.0, confidence=1.0)
    return PreferenceRecord(
        **base, pair=(TOWARD, AWAY), chosen_index=TOWARD, rejected_index=AWAY, chosen=row.answers[TOWARD].text,
        rejected=row.answers[AWAY].text, score=1.0, margin=1.0, judgement=label,
        comparisons=[Comparison(a=TOWARD, b=AWAY, judgement=judged)] if judged is not None else [])


# ---- both passes, whichever the labeller ------------------------------------------------


def sample_pass(sources: Sequence[SourcePrompt], constitution: LoadedConstitution | ConstitutionPlan,
                engine: Engine, config: Phase2Config, on_step: StepHook | None = None) -> list[SampledAnswers]:
    """Phase 2's pass 1 for the config's labeller: K sampled answers (judge), or a steered pair."""
    if config.labeller == "judge":
        return sample_answers(sources, engine, config, on_step)
    return sample_contrastive(sources, constitution, engine, config, on_step)


def label_pass(sampled: Sequence[SampledAnswers], constitution: LoadedConstitution | ConstitutionPlan,
               judge_engine: Engine | None, config: Phase2Config,
               on_step: StepHook | None = None) -> list[PreferenceRecord]:
    """Phase 2's pass 2 for the config's labeller (the judge engine: None with labeller contrastive)."""
    if config.labeller == "judge":
        return judge_samples(sampled, constitution, judge_engine, config, on_step)
    return label_contrastive(sampled, constitution, judge_engine, config, on_step)


def run_labelled(sources: Sequence[SourcePrompt], constitution: LoadedConstitution | ConstitutionPlan,
                 policy_engine: Engine, judge_engine: Engine | None, config: Phase2Config,
                 on_step: StepHook | None = None) -> list[PreferenceRecord]:
    """Both passes on one batch, for callers holding both engines."""
    return label_pass(sample_pass(sources, constitution, policy_engine, config, on_step), constitution,
                      judge_engine, config, on_step)


# ---- data card ------------------------------------------------------------------------


def judge_judgement(record: PreferenceRecord) -> Judgement | None:
    """The judge's own judgement of a record's emitted pair: its label (labeller judge), the judge's
    score of a contrastive pair (both), or None (contrastive: no judge)."""
    j = record.judgement
    if j is None or j.mode != CONSTRUCTION:
        return j
    return record.comparisons[0].judgement if record.comparisons else None


class ContrastCounter:
    """Running counts for ContrastStats over a job's records (None for a labeller-judge job)."""

    def __init__(self) -> None:
        self.seen = False
        self.stats = ContrastStats()
        self.errors: Counter[str] = Counter()
        self.p_sum = 0.0

    def add(self, r: PreferenceRecord) -> None:
        if r.lineage.labeller == "judge":
            return
        self.seen = True
        if r.error is not None or r.judgement is None:
            return
        st = self.stats
        st.pairs += 1
        judged = judge_judgement(r)
        if judged is None:
            return
        if judged.error is not None:
            self.errors[judged.error.code.value] += 1
            return
        st.judge_scored += 1
        self.p_sum += judged.p_a
        if abs(judged.p_a - 0.5) < 1e-12:
            st.ties += 1
        elif judged.p_a > 0.5:
            st.agree += 1
        else:
            st.disagree += 1

    def result(self) -> ContrastStats | None:
        if not self.seen:
            return None
        st = self.stats.model_copy(update={"judge_errors": dict(sorted(self.errors.items()))})
        if st.judge_scored:
            hits = st.agree + st.ties / 2
            interval = wilson(hits, st.judge_scored)
            st.agreement, st.mean_p_toward = hits / st.judge_scored, self.p_sum / st.judge_scored
            st.agreement_low, st.agreement_high = interval.low, interval.high
        return st


def labelling_text(phase2: dict) -> str:
    """How a contrastive job's pairs were made and labelled (the data card's opening paragraph)."""
    judge = phase2.get("judge") or {}
    orders = "in both orders" if judge.get("orders", 2) == 2 else "in one order"
    also = ("" if phase2.get("labeller") != "both" else f""" The judge also compared each pair {orders} under
that principle's comparison question (mode `{judge.get('mode', 'logprob')}`); its P(toward preferred) is
`metadata.contrast.judge_p_toward`. It never changes a label or drops a pair.""")
    return f"""For each prompt one principle was sampled, and the policy
answered twice with the same sampling settings and seed: once with the principle's `toward` direction
appended to the user's last turn, once with its `away` direction (RLCD, Yang et al. 2023). The toward
answer is `chosen`, the away answer `rejected`: the label is by construction, a hard label, so
`score` = `margin` = 1.0 is not a measured probability (`metadata.labeller` = `{phase2.get('labeller')}`;
the directions are in `metadata.contrast`). The exported prompt never contains them.{also}"""


def agreement_section(stats: ContrastStats | None, labeller: str) -> str:
    """The data card's section on the judge's agreement with the construction (labeller both)."""
    if stats is None or labeller != "both":
        return ""
    if not stats.judge_scored:
        return f"""## Judge agreement with the construction

No pair was scored by the judge ({stats.pairs} contrastive pairs; judge errors: {stats.judge_errors or 'none'}).
"""
    return f"""## Judge agreement with the construction

The judge agrees with a pair's construction when its P(toward answer preferred), averaged over its
orders, is above 0.5; exactly 0.5 (a judge that always picks one position) counts one half.

| statistic | value |
| --- | --- |
| agreement with the construction | {stats.agreement:.3f} (95% Wilson interval {stats.agreement_low:.3f}–{stats.agreement_high:.3f}; n = {stats.judge_scored}) |
| agree / disagree / ties | {stats.agree} / {stats.disagree} / {stats.ties} |
| mean P(toward preferred) | {stats.mean_p_toward:.3f} |
| pairs the judge could not score | {sum(stats.judge_errors.values())} {stats.judge_errors or ''} |
"""
