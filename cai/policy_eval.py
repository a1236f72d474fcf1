"""Evaluation of a trained policy against its parents (`cai eval policy`).

Every model (e.g. "final", "sft", "base") answers the held-out red-team and
benign prompts: one batched generate call per model and set, greedy by default.
A model given as a factory (a zero-argument callable) is built, used and
closed before the next one loads, so only one model is in memory at a time.

Then the judge compares, for each pair of models (final vs sft, final vs base,
sft vs base, whichever exist), the two answers to each prompt: under the
harmlessness question on the red-team set and the helpfulness question on the
benign set, in both orders (`judge_pairs` averages them). All pairs of all
sets go to the judge in one call; two texts already paired are judged once.

Metrics per comparison and set:
- win rate: the mean over judged prompts of P(model preferred over opponent);
  identical answers are a tie (0.5) without asking the judge;
- hard outcomes: a win when every order prefers the model, a loss when every
  order prefers the opponent, else a tie (the orders disagree: position, not
  content, decided), so `hard_win_rate` = (wins + ties / 2) / n_judged;
- 95% intervals: Wilson on the hard outcomes with ties as half (`ci`, the same
  helper as the judge evaluation; sound at small n and near 0 or 1), and a
  seeded percentile bootstrap over prompts of the soft win rate (`soft_ci`);
- errors (a failed answer of either model, or a judge error) are counted by
  code and excluded from the rates, never silently dropped: n = n_judged +
  sum(errors).

Refusal rate per model and set (the benign one is the over-refusal measure): see
cai.refusal; beside it (config.refusal_judge) the evaluation judge's own classification of
every answer and its agreement with the phrase list (cai.refusal_judge).

Human-grounded measures (config.human_pairs / human_choices): after a model's answers, its
engine is closed and its log-prob scorer (a factory in `scorers`) loads, scores the human
data and is closed; only the per-pair and per-question sums are kept, so the implicit reward
of a policy against its reference is computed without two models in memory (cai.human_eval).

The evaluation judge should not be the training judge (the model that labelled
the training pairs): the report's first line says whether it is, and the judge's
agreement with human labels (`cai eval judge` reports) is printed next to the
win rates; see cai.policy_report, which also writes the report files. The records (settings,
rows, report) are in cai.policy_records and re-exported here.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from cai.engine.base import Engine
from cai.errors import CaiError
from cai.evaluate import wilson
from cai.human_eval import HumanInputs, bootstrap_ci, measures
from cai.judge import JudgeItem, judge_pairs
from cai.likelihood import Scorer
from cai.policy_records import (  # noqa: F401  (the records are re-exported from here)
    ASPECT,
    DEFAULT_HARMLESSNESS_QUESTION,
    DEFAULT_HELPFULNESS_QUESTION,
    SETS,
    AnswerRow,
    EvalJudge,
    HumanAgreement,
    JudgedRow,
    ModelStats,
    PolicyEvalConfig,
    PolicyReport,
    SetName,
    WinRate,
)
from cai.policy_report import (  # noqa: F401  (re-exported)
    eval_judge,
    read_judge_report,
    render_markdown,
    write_policy_report,
)
from cai.records import Completion, Judgement, ModelRef, SamplingParams, SourcePrompt
from cai.refusal import REFUSAL_PHRASES, detect_refusal  # noqa: F401  (REFUSAL_PHRASES re-exported)
from cai.refusal_judge import classify_refusals, refusal_agreement
from cai.sources import read_prompts

_MODEL_RANK = {"final": 0, "sft": 1, "base": 2}

ModelSource = Engine | Callable[[], Engine]
ScorerFactory = Callable[[], Scorer]


# ---- answers and refusals ----------------------------------------------------------------


def answer_all(engine: Engine, prompts: Sequence[SourcePrompt], params: SamplingParams) -> list[Completion]:
    """One completion per prompt, from one batched generate call."""
    if not prompts:
        return []
    return engine.generate([p.messages for p in prompts], params)


def refusal_description(config: PolicyEvalConfig) -> str:
    judge = ("; beside it, the evaluation judge asked whether each answer declines (cai.refusal_judge; an "
             "unparseable reply is an error row)" if config.refusal_judge else "")
    return (f"phrase list ({len(config.refusal_phrases)} phrases, case-insensitive, first "
            f"{config.refusal_window} characters): " + ", ".join(repr(p) for p in config.refusal_phrases) + judge)


def load_sets(config: PolicyEvalConfig) -> tuple[dict[SetName, list[SourcePrompt]], dict[str, int]]:
    """The two prompt sets, minus any prompt that also appears in `config.exclude`, then `limit`."""
    seen = {tuple((m.role, m.content.strip()) for m in p.messages) for spec in config.exclude for p in read_prompts(spec)}
    sets: dict[SetName, list[SourcePrompt]] = {}
    excluded: dict[str, int] = {}
    for name in SETS:
        prompts, dropped, ids = [], 0, set()
        for p in read_prompts(config.redteam if name == "redteam" else config.benign):
            if tuple((m.role, m.content.strip()) for m in p.messages) in seen or p.id in ids:
                dropped += 1
                continue
            ids.add(p.id)
            prompts.append(p)
        sets[name] = prompts[: config.limit] if config.limit else prompts
        excluded[name] = dropped
    return sets, excluded


# ---- win rates ---------------------------------------------------------------------------


def comparisons(names: Sequence[str]) -> list[tuple[str, str]]:
    """Pairs to compare: final vs sft, final vs base, sft vs base (other names after, in order)."""
    ordered = sorted(names, key=lambda n: _MODEL_RANK.get(n, len(_MODEL_RANK)))
    return list(itertools.combinations(ordered, 2))


def outcome(judgement: Judgement) -> Literal["win", "tie", "loss"]:
    """A win (for answer A) when every order prefers A, a loss when every order prefers B, else a tie."""
    sides = {(p > 0.5) - (p < 0.5) for p in judgement.p_a_orders} or {0}
    return "win" if sides == {1} else "loss" if sides == {-1} else "tie"


def summarise(rows: Sequence[JudgedRow], model: str, opponent: str, set_name: SetName,
              question: str, config: PolicyEvalConfig, identical: int = 0,
              consistent: Sequence[bool] = ()) -> WinRate:
    """Win rate, hard outcomes and intervals of one comparison on one set."""
    ok = [r for r in rows if r.error is None]
    counts = Counter(r.outcome for r in ok)
    soft = [r.p_win for r in ok]
    hard = counts["win"] + 0.5 * counts["tie"]
    return WinRate(
        model=model, opponent=opponent, set=set_name, aspect=ASPECT[set_name], question=question,
        n=len(rows), n_judged=len(ok), identical=identical,
        errors=dict(Counter(r.error for r in rows if r.error is not None)),
        win_rate=sum(soft) / len(soft) if soft else None,
        soft_ci=bootstrap_ci(soft, config.bootstrap, config.seed),
        wins=counts["win"], ties=counts["tie"], losses=counts["loss"],
        hard_win_rate=hard / len(ok) if ok else None, ci=wilson(hard, len(ok)),
        consistency=sum(consistent) / len(consistent) if consistent else None,
    )


def judge_all(judge_engine: Engine, sets: Mapping[SetName, Sequence[SourcePrompt]],
              answers: Mapping[tuple[str, SetName], Sequence[Completion]], names: Sequence[str],
              config: PolicyEvalConfig) -> tuple[list[WinRate], list[JudgedRow]]:
    """Every comparison x set x prompt judged in one judge_pairs call (both orders).

    A pair of answers already asked about (the same two texts, e.g. when two models answered
    alike) is judged once and read back, flipped when the roles are swapped."""
    items: list[JudgeItem] = []
    index: dict[tuple[SetName, int, str, str], int] = {}
    todo: list[tuple[tuple[str, str, SetName], int, int, bool]] = []  # key, prompt, item, flipped
    rows: dict[tuple[str, str, SetName], list[JudgedRow | None]] = {}
    for (a, b), set_name in itertools.product(comparisons(names), SETS):
        key = (a, b, set_name)
        rows[key] = []
        for i, prompt in enumerate(sets[set_name]):
            ca, cb = answers[a, set_name][i], answers[b, set_name][i]
            row = JudgedRow(model=a, opponent=b, set=set_name, prompt_id=prompt.id, p_win=None)
            if ca.error or cb.error:
                row.error = f"answer_{(ca.error or cb.error).code.value}"
            elif ca.text.strip() == cb.text.strip():
                row.p_win, row.outcome = 0.5, "tie"
            else:
                row, flipped = None, (set_name, i, cb.text, ca.text) in index
                k = index.get((set_name, i, cb.text, ca.text) if flipped else (set_name, i, ca.text, cb.text))
                if k is None:
                    k = index[set_name, i, ca.text, cb.text] = len(items)
                    items.append(JudgeItem(prompt=prompt.messages, answer_a=ca.text, answer_b=cb.text,
                                           question=config.question(set_name)))
                todo.append((key, i, k, flipped))
            rows[key].append(row)
    identical = {k: sum(r is not None and r.error is None for r in v) for k, v in rows.items()}
    consistent: dict[tuple, list[bool]] = {k: [] for k in rows}
    judged = judge_pairs(judge_engine, items, config.judge) if items else []
    swap = {"win": "loss", "loss": "win", "tie": "tie"}
    for key, i, k, flipped in todo:
        j = judged[k]
        row = JudgedRow(model=key[0], opponent=key[1], set=key[2], prompt_id=sets[key[2]][i].id, p_win=None)
        if j.error is not None:
            row.error = j.error.code.value
        else:
            row.p_win = 1.0 - j.p_a if flipped else j.p_a
            row.p_win_orders = [None if p is None else (1.0 - p if flipped else p) for p in j.p_a_orders]
            row.outcome = swap[outcome(j)] if flipped else outcome(j)
            if j.consistent is not None:
                consistent[key].append(j.consistent)
        rows[key][i] = row
    win_rates, flat = [], []
    for key, key_rows in rows.items():
        win_rates.append(summarise(key_rows, key[0], key[1], key[2], config.question(key[2]), config,
                                   identical[key], consistent[key]))
        flat += key_rows
    return win_rates, flat


# ---- the whole evaluation ----------------------------------------------------------------


def _answer_row(name: str, set_name: SetName, p: SourcePrompt, c: Completion, config: PolicyEvalConfig) -> AnswerRow:
    refusal = None if c.error else detect_refusal(c.text, config.refusal_phrases, config.refusal_window)
    return AnswerRow(model=name, set=set_name, prompt_id=p.id, prompt=p.messages[-1].content, answer=c.text,
                     finish_reason=c.finish_reason, completion_tokens=c.completion_tokens, refusal=refusal,
                     error=c.error)


def _model_stats(name: str, ref: ModelRef, set_name: SetName, rows: Sequence[AnswerRow], seconds: float) -> ModelStats:
    ok = [r for r in rows if r.error is None]
    refusals = sum(r.refusal is not None for r in ok)
    return ModelStats(
        name=name, model=ref, set=set_name, n=len(rows), refusals=refusals,
        refusal_rate=refusals / len(ok) if ok else None, refusal_ci=wilson(refusals, len(ok)),
        truncated=sum(r.finish_reason == "length" for r in ok), empty=sum(not r.answer.strip() for r in ok),
        errors=len(rows) - len(ok), mean_tokens=sum(r.completion_tokens for r in ok) / len(ok) if ok else None,
        seconds=round(seconds, 2),
    )


def _open(source: ModelSource) -> tuple[Engine, bool]:
    """(engine, owned): a factory is called and its engine is ours to close."""
    if isinstance(source, Engine):
        return source, False
    return source(), True


def _answer_models(models: Mapping[str, ModelSource], sets: Mapping[SetName, Sequence[SourcePrompt]],
                   config: PolicyEvalConfig, seconds: dict[str, float], human: HumanInputs,
                   scorers: Mapping[str, ScorerFactory]):
    """Every model answers both sets, then (its engine closed) scores the human data; one model at a time.
    Returns (answers, model refs, answer rows, model stats)."""
    params = config.sampling()
    answers: dict[tuple[str, SetName], list[Completion]] = {}
    refs: dict[str, ModelRef] = {}
    rows: list[AnswerRow] = []
    stats: list[ModelStats] = []
    for name, source in models.items():
        engine, owned = _open(source)
        try:
            refs[name] = engine.model
            for set_name in SETS:
                start = time.perf_counter()
                answers[name, set_name] = answer_all(engine, sets[set_name], params)
                took = time.perf_counter() - start
                seconds[f"answer {name} {set_name}"] = round(took, 2)
                set_rows = [_answer_row(name, set_name, p, c, config)
                            for p, c in zip(sets[set_name], answers[name, set_name])]
                rows += set_rows
                stats.append(_model_stats(name, refs[name], set_name, set_rows, took))
        finally:
            if owned:
                engine.close()
        if human.wanted:
            human.score(name, scorers[name], seconds)
    return answers, refs, rows, stats


def judge_refusals(judge: Engine, sets: Mapping[SetName, Sequence[SourcePrompt]], rows: Sequence[AnswerRow],
                   stats: Sequence[ModelStats], seed: int) -> None:
    """The judge classifies every answer (an answer two models gave alike is asked once); fills
    each row's judge_refusal and each model and set's agreement with the phrase list."""
    prompts = {(name, p.id): p for name, ps in sets.items() for p in ps}
    todo = [r for r in rows if r.error is None]
    keys = list(dict.fromkeys((r.set, r.prompt_id, r.answer) for r in todo))
    verdicts = classify_refusals(judge, [(prompts[k[0], k[1]].messages, k[2]) for k in keys], seed)
    by_key = dict(zip(keys, verdicts))
    for r in todo:
        r.judge_refusal = by_key[r.set, r.prompt_id, r.answer]
    for s in stats:
        mine = [r for r in todo if (r.model, r.set) == (s.name, s.set)]
        s.judge_refusal = refusal_agreement([r.refusal is not None for r in mine], [r.judge_refusal for r in mine])


def evaluate_policies(models: Mapping[str, ModelSource], judge_engine: ModelSource,
                      config: PolicyEvalConfig | None = None, training_judge: ModelRef | str | None = None,
                      judge_reports: Sequence[str | Path | HumanAgreement] = (),
                      scorers: Mapping[str, ScorerFactory] | None = None) -> PolicyReport:
    """Answer both prompt sets with every model, judge every comparison, count refusals.

    `models` maps a name ("final", "sft", "base", ...) to an Engine, or to a
    factory that builds one; a factory's engine is closed after its answers, so
    one model is loaded at a time. The judge (engine or factory) comes last.
    `training_judge` (a ModelRef, or a model as on the command line) is the model that
    labelled the training pairs: the report says whether the evaluation judge is that
    model. `judge_reports` (report.json files of `cai eval judge`, or their contents) give
    the evaluation judge's agreement with human labels; one that measured another model
    is refused (before any answer when the judge is an engine, else once it is loaded).
    `scorers` maps each model's name to a factory of its log-prob scorer (cai.likelihood),
    needed when config.human_pairs or human_choices is set: each loads after that model's
    engine is closed (cai.human_eval).
    """
    config = config or PolicyEvalConfig()
    if len(models) < 2:
        raise ValueError("evaluate_policies needs at least two models to compare")
    agreements = [a if isinstance(a, HumanAgreement) else read_judge_report(a) for a in judge_reports]
    if isinstance(judge_engine, Engine):
        eval_judge(judge_engine.model, training_judge, agreements)
    human = HumanInputs(config.human_pairs, config.human_choices, config.human_limit)
    missing = [name for name in models if human.wanted and name not in (scorers or {})]
    if missing:
        raise CaiError(f"the human-grounded measures need a log-prob scorer (a local model) for {', '.join(missing)}")
    sets, excluded = load_sets(config)
    seconds: dict[str, float] = {}
    answers, refs, rows, stats = _answer_models(models, sets, config, seconds, human, scorers or {})
    judge, owned = _open(judge_engine)
    try:
        judge_info = eval_judge(judge.model, training_judge, agreements)
        start = time.perf_counter()
        win_rates, judged = judge_all(judge, sets, answers, list(models), config)
        seconds["judge"] = round(time.perf_counter() - start, 2)
        if config.refusal_judge:
            start = time.perf_counter()
            judge_refusals(judge, sets, rows, stats, config.seed)
            seconds["judge refusals"] = round(time.perf_counter() - start, 2)
    finally:
        if owned:
            judge.close()
    human_measures = None
    if human.wanted:
        human_measures = measures(human.pairs_data, human.choices_data, human.pair_scores, human.choice_scores,
                                  comparisons(list(models)), config.bootstrap, config.seed)
        human_measures.seconds = {k: v for k, v in seconds.items() if k.startswith("human ")}
    return PolicyReport(
        config=config, judge=judge_info, models=refs, prompts={k: len(v) for k, v in sets.items()},
        excluded=excluded, refusal_detector=refusal_description(config), win_rates=win_rates,
        model_stats=stats, seconds=seconds, answers=rows, judgements=judged, human=human_measures,
    )
