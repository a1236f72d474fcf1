"""How a preference data card describes the judging: how pairs were made and labelled (from the job's
phase-2 settings and the judge modes actually used) and the label statistics that apply to its judge."""

from __future__ import annotations

from cai.contrastive import labelling_text
from cai.judge import JUDGE_MODE_SPECS
from cai.preferences import PreferenceStats


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _has_option_mass(mode: str) -> bool:
    """Whether a mode's orders record P(A) + P(B) (a mode this cai does not know: assumed so)."""
    spec = JUDGE_MODE_SPECS.get(mode)
    return spec is None or spec.option_mass


def label_rows(judge: dict, stats: PreferenceStats, labeller: str = "judge") -> str:
    """The label statistics that apply to the job's judge (no consistency with one order, no option
    mass for JSON verdicts; none without a judge). Labeller both: the judge's scores of the pairs."""
    rows = [] if labeller == "contrastive" else [("mean confidence (abs(P − 0.5)·2)", _fmt(stats.mean_confidence))]
    if rows and judge.get("orders", 2) == 2:
        rows.append(("consistency rate (both orders agree)", _fmt(stats.consistency_rate)))
    if rows:
        rows.append(("share of first-position wins (per order)", _fmt(stats.first_position_wins)))
    modes = stats.judge_modes or [judge.get("mode", "logprob")]
    if rows and any(_has_option_mass(mode) for mode in modes):
        rows.append(("mean P(A) + P(B) before normalising (per order; logprob and cot)", _fmt(stats.mean_option_mass)))
    rows += [("mean length chosen / rejected (chars, exported)",
              f"{_fmt(stats.mean_chosen_chars, '.0f')} / {_fmt(stats.mean_rejected_chars, '.0f')}"),
             ("chosen is the longer answer (exported)", _fmt(stats.chosen_longer))]
    return "\n".join(f"| {name} | {value} |" for name, value in rows)


def orders_phrase(judge: dict) -> str:
    return "both orders" if judge.get("orders", 2) == 2 else "one order"


def consistency_rule(judge: dict, require_consistent: bool) -> str:
    if judge.get("orders", 2) != 2:
        return "one order per pair, so no consistency check"
    return "both orders must agree" if require_consistent else "inconsistent pairs kept"


def _pairing(phase2: dict) -> str:
    samples = phase2.get("samples")
    if phase2.get("pairing", "best_worst") == "all":
        return f"every judged pair of the {samples} answers is a row"
    if samples == 2:
        return "the one pair of the two answers is the row"
    return (f"every pair of the {samples} answers was judged, and the best-vs-worst pair by soft win count "
            "is the row (one row per prompt)")


def fallback_text(mode: str, used: dict[str, int]) -> str:
    """The pairs judged in another mode than the job's `mode` (`used`: judged pairs per mode); "" when none."""
    return "".join(
        f" {n} judged pairs used mode `{m}` instead: the judge's backend could not score the options "
        "(it returned no log-probabilities, or its server does not continue the judge's answer prefix), "
        "so each of their orders is a hard vote, not a probability."
        for m, n in sorted(used.items()) if m != mode and n)


def judging_text(phase2: dict, stats: PreferenceStats) -> str:
    """How the pairs were made and labelled, from the job's phase-2 settings (and the modes actually used)."""
    if phase2.get("labeller", "judge") != "judge":
        return labelling_text(phase2) + fallback_text((phase2.get("judge") or {}).get("mode", "logprob"),
                                                      stats.judge_modes)
    judge = phase2.get("judge") or {}
    mode = judge.get("mode", "logprob")
    if judge.get("orders", 2) == 2:
        orders = ("in both orders (each answer shown first once). `score` is P(chosen preferred) averaged "
                  "over the two orders, so a judge that always picks the first position scores 0.5, a tie")
    else:
        orders = ("in one order (answer A shown first). `score` is that order's P(chosen preferred): position "
                  "bias is not averaged out, and `consistent` is null")
    how = JUDGE_MODE_SPECS.get(mode, JUDGE_MODE_SPECS["logprob"]).describe(judge)
    switched = fallback_text(mode, stats.judge_modes)
    return f"""For each prompt the policy sampled
{phase2.get('samples')} answers; {_pairing(phase2)}. The judge compared each pair under a sampled
principle's comparison question, {orders}. Per order, {how}.{switched}
`margin` = 2·score − 1."""
