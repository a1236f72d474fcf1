"""Human-grounded policy measures of `cai eval policy`: no AI judge decides them.

Per model (base, SFT, final), from its own token log-probabilities (cai.likelihood), on
human-labelled data (cai.human_data):
- likelihood preference: the share of pairs where the model gives the human-chosen final turn a
  higher MEAN token log-probability than the rejected one (the mean, so a longer answer is not
  penalised for its length); also the mean margin (chosen minus rejected mean log-prob);
- implicit-reward accuracy of a policy against a reference (the DPO reward, up to beta): the share
  of pairs where log pi/pi_ref of the chosen turn, summed over its tokens, exceeds that of the
  rejected turn. Each model's summed log-probs are kept per pair, so the two models are never in
  memory together;
- multiple-choice preference on two-option questions: the model's probability of the correct
  option, normalised over the two (P(correct) = sigmoid(log p(correct) - log p(incorrect))), in
  both orders (the option texts exchanged); per question the mean over the orders. Reported as
  the mean P(correct) and the accuracy (the share of orders whose P(correct) > 0.5), with the
  position consistency (both orders pick the same text).

Ties: a difference within TIE_TOLERANCE nats counts as half right, as a tie does everywhere in
cai (a policy compared with itself scores exactly 0.5, all ties). Errors (a row the model cannot
score: too long, empty) are excluded from the shares and counted by code.

Intervals (95%): Wilson for shares (ties as half; cai.evaluate.wilson), a seeded percentile
bootstrap over pairs / questions for means; n is reported with each.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

from pydantic import BaseModel, Field

from cai.errors import CaiError
from cai.evaluate import Interval, wilson
from cai.human_data import (
    ChoiceItem,
    HumanData,
    HumanPair,
    read_choice_items,
    read_human_pairs,
)
from cai.likelihood import Scorer, ScoreRequest, SeqScore

TIE_TOLERANCE = 1e-6
METHOD = (
    "Likelihood preference: share of pairs where the human-chosen final turn has the higher mean token "
    "log-prob. Implicit reward (DPO): share of pairs where log pi/pi_ref summed over the chosen turn's "
    "tokens exceeds the rejected turn's. Multiple choice: P(correct) normalised over the two options, "
    "both orders, mean per question; accuracy = share of orders with P(correct) > 0.5. A difference "
    f"within {TIE_TOLERANCE:g} nats is a tie and counts as half. Errors are excluded and counted. "
    "Intervals: Wilson 95% for shares, percentile bootstrap 95% for means."
)


# ---- records -----------------------------------------------------------------------------


class PairScore(BaseModel):
    """One model's summed log-probs of both answers of one pair."""

    model: str
    source: str
    chosen_logp: float | None = None
    chosen_tokens: int = 0
    rejected_logp: float | None = None
    rejected_tokens: int = 0
    error: str | None = None

    def margin(self) -> float | None:
        """Mean token log-prob of chosen minus rejected."""
        if self.error is not None:
            return None
        return self.chosen_logp / self.chosen_tokens - self.rejected_logp / self.rejected_tokens


class ChoiceScore(BaseModel):
    model: str
    source: str
    p_correct: list[float] = Field(default_factory=list, description="per order, normalised over the two options")
    error: str | None = None


class ShareStats(BaseModel):
    """Outcomes of a per-row comparison: wins (right), ties (half), losses, errors."""

    n: int
    scored: int
    errors: dict[str, int] = Field(default_factory=dict)
    wins: int = 0
    ties: int = 0
    losses: int = 0
    share: float | None = Field(None, description="(wins + ties / 2) / scored")
    ci: Interval | None = Field(None, description="Wilson 95%, ties as half")
    mean_margin: float | None = None
    margin_ci: Interval | None = Field(None, description="percentile bootstrap 95% over rows")


class LikelihoodPreference(ShareStats):
    model: str


class ImplicitRewardAccuracy(ShareStats):
    model: str
    reference: str


class LikelihoodShift(BaseModel):
    """A trained model's likelihood preference minus its reference's, paired over the same pairs."""

    model: str
    reference: str
    scored: int = Field(description="pairs both models scored")
    delta_share: float | None = None
    ci: Interval | None = Field(None, description="paired percentile bootstrap 95% over pairs")
    delta_margin: float | None = Field(None, description="mean margin difference, nats/token")
    margin_ci: Interval | None = None


class ChoicePreference(BaseModel):
    model: str
    n: int
    scored: int
    errors: dict[str, int] = Field(default_factory=dict)
    mean_p_correct: float | None = None
    p_ci: Interval | None = Field(None, description="percentile bootstrap 95% over questions")
    accuracy: float | None = Field(None, description="share of orders with P(correct) > 0.5, ties half")
    ci: Interval | None = Field(None, description="Wilson 95% over questions (each worth its share of orders)")
    consistency: float | None = Field(None, description="share of questions whose two orders pick the same text")


class HumanMeasures(BaseModel):
    pairs: HumanData | None = None
    choices: HumanData | None = None
    likelihood: list[LikelihoodPreference] = Field(default_factory=list)
    implicit_reward: list[ImplicitRewardAccuracy] = Field(default_factory=list)
    shift: list[LikelihoodShift] = Field(default_factory=list)
    choice: list[ChoicePreference] = Field(default_factory=list)
    method: str = METHOD
    seconds: dict[str, float] = Field(default_factory=dict)
    pair_scores: list[PairScore] = Field(default_factory=list)
    choice_scores: list[ChoiceScore] = Field(default_factory=list)


# ---- intervals ---------------------------------------------------------------------------


def bootstrap_ci(values: Sequence[float], resamples: int, seed: int) -> Interval | None:
    """95% percentile bootstrap interval of the mean."""
    if not values or resamples <= 0:
        return None
    rng, n = random.Random(seed), len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    return Interval(low=means[int(0.025 * (resamples - 1))], high=means[int(0.975 * (resamples - 1))])


def _code(error: str) -> str:
    return error.split(":", 1)[0]


def share_stats(margins: Sequence[float | None], errors: Sequence[str | None], resamples: int,
                seed: int) -> dict:
    """Fields of ShareStats: a margin > tolerance is right, within it a tie, None an error."""
    ok = [m for m in margins if m is not None]
    wins = sum(m > TIE_TOLERANCE for m in ok)
    ties = sum(abs(m) <= TIE_TOLERANCE for m in ok)
    right = wins + 0.5 * ties
    return {"n": len(margins), "scored": len(ok), "errors": dict(Counter(_code(e) for e in errors if e)),
            "wins": wins, "ties": ties, "losses": len(ok) - wins - ties,
            "share": right / len(ok) if ok else None, "ci": wilson(right, len(ok)),
            "mean_margin": sum(ok) / len(ok) if ok else None, "margin_ci": bootstrap_ci(ok, resamples, seed)}


# ---- scoring (one model at a time) ----------------------------------------------------------


def score_pairs(scorer: Scorer, model: str, pairs: Sequence[HumanPair]) -> list[PairScore]:
    """Both answers of every pair, in one scorer call."""
    requests = [ScoreRequest(p.prompt, answer, group=p.source) for p in pairs for answer in (p.chosen, p.rejected)]
    scores = scorer.score(requests) if requests else []
    out = []
    for k, pair in enumerate(pairs):
        c, r = scores[2 * k], scores[2 * k + 1]
        out.append(PairScore(model=model, source=pair.source, chosen_logp=c.logp, chosen_tokens=c.tokens,
                             rejected_logp=r.logp, rejected_tokens=r.tokens, error=c.error or r.error))
    return out


def _p_first(a: SeqScore, b: SeqScore) -> float:
    return 1.0 / (1.0 + math.exp(b.logp - a.logp))


def score_choices(scorer: Scorer, model: str, items: Sequence[ChoiceItem]) -> list[ChoiceScore]:
    """Both labels in both orders of every question, in one scorer call."""
    requests = [ScoreRequest(o.chat, label, o.prefix, group=it.source) for it in items for o in it.orders
                for label in (o.correct, o.incorrect)]
    scores = scorer.score(requests) if requests else []
    out, k = [], 0
    for item in items:
        row = ChoiceScore(model=model, source=item.source)
        for _ in item.orders:
            correct, incorrect = scores[k], scores[k + 1]
            k += 2
            if correct.error or incorrect.error:
                row.error = row.error or correct.error or incorrect.error
            else:
                row.p_correct.append(_p_first(correct, incorrect))
        if row.error:
            row.p_correct = []
        out.append(row)
    return out


class HumanInputs:
    """The human-labelled data of one evaluation, read before any model loads, and each model's scores."""

    def __init__(self, pairs: str | None = None, choices: str | None = None, limit: int | None = None):
        self.pairs_data: HumanData | None = None
        self.choices_data: HumanData | None = None
        self.pairs: list[HumanPair] = []
        self.items: list[ChoiceItem] = []
        if pairs:
            self.pairs_data, self.pairs = read_human_pairs(pairs, limit)
        if choices:
            self.choices_data, self.items = read_choice_items(choices, limit)
        for data in (self.pairs_data, self.choices_data):
            if data is not None and data.n == 0:
                raise CaiError(f"{data.path}: no usable {data.format} rows (skipped: {data.skipped or 'none'}); "
                               "check the file's format")
        self.pair_scores: dict[str, list[PairScore]] = {}
        self.choice_scores: dict[str, list[ChoiceScore]] = {}

    @property
    def wanted(self) -> bool:
        return self.pairs_data is not None or self.choices_data is not None

    def score(self, name: str, factory: Callable[[], Scorer], seconds: dict[str, float]) -> None:
        """Load one model's scorer, score every pair and question, close it."""
        start = time.perf_counter()
        scorer = factory()
        try:
            if self.pairs_data is not None:
                self.pair_scores[name] = score_pairs(scorer, name, self.pairs)
            if self.choices_data is not None:
                self.choice_scores[name] = score_choices(scorer, name, self.items)
        finally:
            scorer.close()
        seconds[f"human {name}"] = round(time.perf_counter() - start, 2)


# ---- measures ------------------------------------------------------------------------------


def likelihood_preference(model: str, scores: Sequence[PairScore], resamples: int = 2000,
                          seed: int = 0) -> LikelihoodPreference:
    return LikelihoodPreference(model=model, **share_stats([s.margin() for s in scores],
                                                           [s.error for s in scores], resamples, seed))


def implicit_reward(policy: str, reference: str, policy_scores: Sequence[PairScore],
                    reference_scores: Sequence[PairScore], resamples: int = 2000,
                    seed: int = 0) -> ImplicitRewardAccuracy:
    """log pi/pi_ref(chosen) - log pi/pi_ref(rejected) per pair; the scores are aligned by pair."""
    margins, errors = [], []
    for p, r in zip(policy_scores, reference_scores, strict=True):
        error = p.error or r.error
        errors.append(error)
        margins.append(None if error else (p.chosen_logp - r.chosen_logp) - (p.rejected_logp - r.rejected_logp))
    return ImplicitRewardAccuracy(model=policy, reference=reference,
                                  **share_stats(margins, errors, resamples, seed))


def _right_of(margin: float) -> float:
    return 1.0 if margin > TIE_TOLERANCE else 0.5 if abs(margin) <= TIE_TOLERANCE else 0.0


def likelihood_shift(model: str, reference: str, model_scores: Sequence[PairScore],
                     reference_scores: Sequence[PairScore], resamples: int = 2000, seed: int = 0) -> LikelihoodShift:
    """Per pair: right(model) - right(reference) and margin(model) - margin(reference); a pair either
    model could not score is left out. Paired, so the interval is of the change, not of two shares."""
    both = [(m.margin(), r.margin()) for m, r in zip(model_scores, reference_scores, strict=True)
            if m.error is None and r.error is None]
    rights = [_right_of(a) - _right_of(b) for a, b in both]
    margins = [a - b for a, b in both]
    return LikelihoodShift(
        model=model, reference=reference, scored=len(both),
        delta_share=sum(rights) / len(both) if both else None, ci=bootstrap_ci(rights, resamples, seed),
        delta_margin=sum(margins) / len(both) if both else None, margin_ci=bootstrap_ci(margins, resamples, seed))


def _right(p: float) -> float:
    return 1.0 if p > 0.5 + TIE_TOLERANCE else 0.5 if abs(p - 0.5) <= TIE_TOLERANCE else 0.0


def choice_preference(model: str, scores: Sequence[ChoiceScore], resamples: int = 2000,
                      seed: int = 0) -> ChoicePreference:
    ok = [s for s in scores if s.error is None and s.p_correct]
    means = [sum(s.p_correct) / len(s.p_correct) for s in ok]
    right = [sum(_right(p) for p in s.p_correct) / len(s.p_correct) for s in ok]
    paired = [s for s in ok if len(s.p_correct) == 2]
    same = [(s.p_correct[0] - 0.5) * (s.p_correct[1] - 0.5) > 0 for s in paired]
    return ChoicePreference(
        model=model, n=len(scores), scored=len(ok),
        errors=dict(Counter(_code(s.error) for s in scores if s.error)),
        mean_p_correct=sum(means) / len(ok) if ok else None, p_ci=bootstrap_ci(means, resamples, seed),
        accuracy=sum(right) / len(ok) if ok else None, ci=wilson(sum(right), len(ok)),
        consistency=sum(same) / len(same) if same else None,
    )


def measures(pairs: HumanData | None, choices: HumanData | None, pair_scores: Mapping[str, list[PairScore]],
             choice_scores: Mapping[str, list[ChoiceScore]], comparisons: Sequence[tuple[str, str]],
             resamples: int = 2000, seed: int = 0) -> HumanMeasures:
    """Every measure from every model's kept scores; `comparisons`: (policy, reference) pairs."""
    return HumanMeasures(
        pairs=pairs, choices=choices,
        likelihood=[likelihood_preference(m, s, resamples, seed) for m, s in pair_scores.items()],
        implicit_reward=[implicit_reward(a, b, pair_scores[a], pair_scores[b], resamples, seed)
                         for a, b in comparisons if a in pair_scores and b in pair_scores],
        shift=[likelihood_shift(a, b, pair_scores[a], pair_scores[b], resamples, seed)
               for a, b in comparisons if a in pair_scores and b in pair_scores],
        choice=[choice_preference(m, s, resamples, seed) for m, s in choice_scores.items()],
        pair_scores=[s for rows in pair_scores.values() for s in rows],
        choice_scores=[s for rows in choice_scores.values() for s in rows],
    )


# ---- report --------------------------------------------------------------------------------


def _f(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _signed(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:+.{digits}f}"


def _ci(ci: Interval | None) -> str:
    return f" [{ci.low:.3f}, {ci.high:.3f}]" if ci else ""


def _errors(errors: Mapping[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "0"


def _data_line(kind: str, data: HumanData) -> str:
    skipped = f" (skipped: {_errors(data.skipped)})" if data.skipped else ""
    return f"{kind}: `{data.path}` ({data.format}), {data.n} used{skipped}."


def _share_row(label: str, s: ShareStats, margin_digits: int) -> str:
    return (f"| {label} | {_f(s.share)}{_ci(s.ci)} | {s.wins} / {s.ties} / {s.losses} | {s.scored} / {s.n} "
            f"| {_f(s.mean_margin, margin_digits)}{_ci(s.margin_ci)} | {_errors(s.errors)} |")


def markdown_lines(h: HumanMeasures) -> list[str]:
    """The human-grounded section of the policy report."""
    lines = ["## Human-grounded measures (the models' own log-probs on human labels; no AI judge)", ""]
    if h.pairs is not None:
        lines += [_data_line("Human-labelled pairs", h.pairs), "",
                  ("| model | likelihood preference [Wilson 95%] | W / T / L | scored / n "
                  "| mean margin, nats/token [bootstrap 95%] | errors |"), "|---|---|---|---|---|---|"]
        lines += [_share_row(s.model, s, 4) for s in h.likelihood]
        if h.implicit_reward:
            lines += ["", ("| policy vs reference | implicit-reward accuracy [Wilson 95%] | W / T / L | scored / n "
                      "| mean reward margin, nats [bootstrap 95%] | errors |"), "|---|---|---|---|---|---|"]
            lines += [_share_row(f"{s.model} vs {s.reference}", s, 3) for s in h.implicit_reward]
        if h.shift:
            lines += ["", ("| model vs reference | change in likelihood preference [paired bootstrap 95%] "
                      "| change in mean margin, nats/token [paired bootstrap 95%] | pairs |"), "|---|---|---|---|"]
            lines += [f"| {s.model} vs {s.reference} | {_signed(s.delta_share)}{_ci(s.ci)} "
                      f"| {_signed(s.delta_margin, 4)}{_ci(s.margin_ci)} | {s.scored} |" for s in h.shift]
        lines.append("")
    if h.choices is not None:
        lines += [_data_line("Two-option questions (both orders)", h.choices), "",
                  ("| model | mean P(correct) [bootstrap 95%] | accuracy [Wilson 95%] | position consistency "
                  "| scored / n | errors |"), "|---|---|---|---|---|---|"]
        lines += [f"| {c.model} | {_f(c.mean_p_correct)}{_ci(c.p_ci)} | {_f(c.accuracy)}{_ci(c.ci)} "
                  f"| {_f(c.consistency)} | {c.scored} / {c.n} | {_errors(c.errors)} |" for c in h.choice]
        lines.append("")
    return lines + [h.method]
