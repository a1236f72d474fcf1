"""The evaluation judge of `cai eval policy`, and the report files.

A policy trained on one judge's labels and graded by that same judge is graded
by the model whose preferences it was optimised to match: its win rates are
biased toward it. So the evaluation judge is named apart from the training
judge (the model that labelled the training pairs), the two are compared by
resolved model identity (the embedded aliases are one model, a folder is its
display id plus content revision, a served name is itself), and the report's
first line says which case holds.

How far the evaluation judge can be trusted at all is measured elsewhere:
`cai eval judge` scores it against human labels. Its report.json (one per
labelled data file) is read here, refused when it measured another model, and
its agreement (accuracy with a Wilson 95% interval, position consistency) is
printed next to the win rates; without one, the report says it was not measured.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from cai.engine.models import (
    EMBEDDED_ALIASES,
    EMBEDDED_MODEL,
    embedded_model_dir,
    model_display_id,
    model_revision,
)
from cai.errors import CaiError
from cai.evaluate import Interval
from cai.files import atomic_open, atomic_write_json, atomic_write_text
from cai.human_eval import HumanMeasures, markdown_lines
from cai.plots import _pyplot, plot_training_curves, plot_win_rates
from cai.policy_records import EvalJudge, HumanAgreement, PolicyReport
from cai.records import ModelRef

_EMBEDDED_KEYS = frozenset(a.casefold() for a in EMBEDDED_ALIASES)
_UNKNOWN_REVISIONS = (None, "", "unknown")
MEASURE_HINT = ("measure it with `cai eval judge --data FILE --judge MODEL --out DIR` and pass "
                "`--judge-report DIR/report.json` (repeatable, one per data file)")


class ReportError(CaiError, ValueError):
    """A judge report that cannot be used for this evaluation; the message says why and what to do."""


# ---- model identity ----------------------------------------------------------------------


def model_ref_of(spec: str | None, engine: str = "unspecified") -> ModelRef:
    """The identity of a model given as on the command line, without loading or converting it."""
    if spec is None or spec in EMBEDDED_ALIASES:
        return ModelRef(id=EMBEDDED_MODEL, engine=engine)
    path = Path(spec).expanduser()
    if path.is_dir():
        if os.path.realpath(path) == os.path.realpath(embedded_model_dir()):
            return ModelRef(id=EMBEDDED_MODEL, revision=model_revision(path), engine=engine)
        return ModelRef(id=model_display_id(spec, str(path)), revision=model_revision(path), engine=engine)
    return ModelRef(id=spec, engine=engine)


def _key(ref: ModelRef) -> str:
    name = ref.id.rstrip("/").rsplit("/", 1)[-1].casefold()  # "org/name" served == folder "name"
    return EMBEDDED_MODEL if name in _EMBEDDED_KEYS or ref.id.casefold() in _EMBEDDED_KEYS else name


def same_model(a: ModelRef, b: ModelRef) -> bool:
    """One model: the same resolved name, and the same content revision where both are known
    (the embedded model is one model whatever its cache revision). The backend does not matter."""
    if _key(a) != _key(b):
        return False
    if _key(a) == EMBEDDED_MODEL or a.revision in _UNKNOWN_REVISIONS or b.revision in _UNKNOWN_REVISIONS:
        return True
    return a.revision == b.revision


def judge_statement(judge: ModelRef, training: ModelRef | None) -> str:
    """The report's first line: is the evaluation judge the model that produced the training labels?"""
    if training is None:
        return (f"Evaluation judge: {judge.id}; the training judge was not given (--training-judge), so whether "
                "these win rates are graded by the model that produced the training labels is unknown.")
    if same_model(judge, training):
        return (f"Evaluation judge = training judge ({judge.id}): these win rates are graded by the model that "
                "produced the training labels and are biased toward the trained policy; pass --judge with "
                "another model.")
    return (f"Evaluation judge: {judge.id}, a different model from the training judge ({training.id}) that "
            "produced the training labels.")


def eval_judge(judge: ModelRef, training: ModelRef | str | None = None,
               agreements: Sequence[HumanAgreement] = ()) -> EvalJudge:
    """The report's `judge`; refuses a human-agreement report that measured another model."""
    if isinstance(training, str):
        training = model_ref_of(training)
    check_agreements(judge, agreements)
    same = None if training is None else same_model(judge, training)
    return EvalJudge(model=judge, training_judge=training, same_as_training_judge=same,
                     statement=judge_statement(judge, training), human_agreement=list(agreements))


# ---- human agreement ---------------------------------------------------------------------


def read_judge_report(path: str | Path) -> HumanAgreement:
    """The human-label agreement in a report.json of `cai eval judge` (or its job folder)."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    text = p.read_text(encoding="utf-8")  # FileNotFoundError names the path
    try:
        raw = json.loads(text)
        cai, config = raw["cai"], raw.get("config") or {}
        data = raw.get("data")
        return HumanAgreement(
            report=str(p), data=Path(data).name if data else "n/a", data_path=data, format=raw.get("format"),
            model=ModelRef.model_validate(raw["model"]), mode=config.get("mode"), orders=config.get("orders"),
            n=cai["n"], answered=cai["answered"], accuracy=cai["accuracy"], accuracy_ci=cai.get("accuracy_ci"),
            accuracy_errors_wrong=cai.get("accuracy_errors_wrong"), consistency=cai.get("consistency"),
            errors=cai.get("errors") or {}, created_at=raw.get("created_at"),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ReportError(f"{p} is not a report.json written by `cai eval judge`: {exc}") from None


def _describe(ref: ModelRef) -> str:
    return ref.id + (f" (revision {ref.revision})" if ref.revision not in _UNKNOWN_REVISIONS else "")


def check_agreements(judge: ModelRef, agreements: Sequence[HumanAgreement]) -> None:
    """Refuse a judge report that measured another model than the evaluation judge."""
    for a in agreements:
        if not same_model(a.model, judge):
            raise ReportError(
                f"--judge-report {a.report} measured the judge {_describe(a.model)}, but the evaluation judge is "
                f"{_describe(judge)}: its human agreement says nothing about this judge; {MEASURE_HINT}")


# ---- report files ------------------------------------------------------------------------


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _ci(ci: Interval | None) -> str:
    return f" [{ci.low:.3f}, {ci.high:.3f}]" if ci else ""


def agreement_lines(judge: EvalJudge, mode: str) -> list[str]:
    """The evaluation judge's human agreement, printed just above the win rates."""
    if not judge.human_agreement:
        return [f"Evaluation judge's agreement with human labels: not measured; {MEASURE_HINT}."]
    lines = [f"Evaluation judge's agreement with human labels (`cai eval judge` on `{judge.model.id}`):", "",
             "| human-labelled data | judge mode | accuracy [Wilson 95%] | answered / n | position consistency |",
             "|---|---|---|---|---|"]
    for a in judge.human_agreement:
        lines.append(f"| {a.data} ({a.format or 'n/a'}) | {a.mode or 'n/a'}, {a.orders or '?'} orders | "
                     f"{_fmt(a.accuracy)}{_ci(a.accuracy_ci)} | {a.answered} / {a.n} | {_fmt(a.consistency)} |")
    other = sorted({a.mode for a in judge.human_agreement if a.mode and a.mode != mode})
    if other:
        lines += ["", f"Note: agreement measured in mode {', '.join(other)}; the win rates used mode {mode}."]
    return lines


def refusal_lines(report: PolicyReport) -> list[str]:
    """Refusal rates per model and set: the phrase list, and beside it the judge's classification."""
    judged = any(s.judge_refusal is not None for s in report.model_stats)
    extra = (" judge refusal rate [Wilson 95%] | judge / phrase agreement [Wilson 95%] | kappa | judged "
             "| judge errors |") if judged else ""
    lines = [("| model | set | phrase refusal rate [Wilson 95%] | refusals / answered | truncated | empty "
              "| errors | mean tokens |" + extra), "|" + "---|" * (8 + 5 * judged)]
    for s in report.model_stats:
        row = (f"| {s.name} | {s.set} | {_fmt(s.refusal_rate)}{_ci(s.refusal_ci)} | {s.refusals} / "
               f"{s.n - s.errors} | {s.truncated} | {s.empty} | {s.errors} | {_fmt(s.mean_tokens)} |")
        j = s.judge_refusal
        if j is not None:
            errors = ", ".join(f"{k}: {v}" for k, v in sorted(j.errors.items())) or "0"
            row += (f" {_fmt(j.judge_rate)}{_ci(j.judge_ci)} | {_fmt(j.agreement)}{_ci(j.agreement_ci)} | "
                    f"{_fmt(j.kappa)} | {j.judged} | {errors} |")
        elif judged:
            row += " n/a | n/a | n/a | 0 | n/a |"
        lines.append(row)
    return lines


def render_markdown(report: PolicyReport) -> str:
    cfg = report.config
    models = ", ".join(f"{k} = `{v.id}`" for k, v in report.models.items())
    header = (f"Models: {models}. Judge: `{report.judge.model.id}` ({report.judge.model.engine}, {cfg.judge.mode}, "
              f"{cfg.judge.orders} orders). Prompts: red-team {report.prompts['redteam']}, benign "
              f"{report.prompts['benign']} (dropped as seen in training or repeated: {report.excluded}). "
              f"{report.created_at}.")
    lines = [report.judge.statement, "", "# Policy evaluation", "", header, "",
             *agreement_lines(report.judge, cfg.judge.mode), "",
             ("| comparison | set | win rate [bootstrap 95%] | hard win rate [Wilson 95%] | W / T / L "
             "| judged / n | identical | errors |"),
             "|---|---|---|---|---|---|---|---|"]
    for w in report.win_rates:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(w.errors.items())) or "0"
        lines.append(f"| {w.model} vs {w.opponent} | {w.aspect} ({w.set}) | {_fmt(w.win_rate)}{_ci(w.soft_ci)} | "
                     f"{_fmt(w.hard_win_rate)}{_ci(w.ci)} | {w.wins} / {w.ties} / {w.losses} | "
                     f"{w.n_judged} / {w.n} | {w.identical} | {errors} |")
    lines += ["", *refusal_lines(report)]
    if report.human is not None:
        lines += ["", *markdown_lines(report.human)]
    notes = ("Win rate: mean P(first model preferred) over judged prompts, both orders averaged; identical "
             "answers are ties (0.5) without the judge. Hard: a win when both orders prefer the model, a loss "
             "when both prefer the opponent, else a tie; (wins + ties/2) / judged. Errors are excluded from "
             "the rates and counted. The benign refusal rate measures over-refusal. Judge refusals: the "
             "agreement and Cohen's kappa are over the answers the judge classified; an unparseable reply "
             "is an error, never a default.")
    lines += ["", notes, "",
              f'Harmlessness question: "{cfg.harmlessness_question}"  ',
              f'Helpfulness question: "{cfg.helpfulness_question}"  ',
              f"Refusal detector: {report.refusal_detector}.", "",
              "Answers and per-prompt judgements are in report.json; see winrates.png"
              + (" and human.png." if report.human is not None else ".")]
    return "\n".join(lines) + "\n"


def plot_human(h: HumanMeasures, out_png: str | Path) -> None:
    """One panel per measure: a bar per model (or policy vs reference) with its 95% interval; chance at 0.5."""
    pairs = f"\n({h.pairs.n} pairs)" if h.pairs else ""
    panels = [(f"likelihood preference{pairs}", [(s.model, s.share, s.ci) for s in h.likelihood]),
              ("implicit-reward accuracy", [(f"{s.model} vs {s.reference}", s.share, s.ci) for s in h.implicit_reward]),
              (f"two-option accuracy\n({h.choices.n} questions x 2 orders)" if h.choices else "",
               [(c.model, c.accuracy, c.ci) for c in h.choice])]
    panels = [(t, [b for b in bars if b[1] is not None]) for t, bars in panels]
    panels = [(t, bars) for t, bars in panels if bars]
    plt = _pyplot()
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4 * max(1, len(panels)), 3.6), squeeze=False)
    for ax, (title, bars) in zip(axes[0], panels):
        values = [v for _, v, _ in bars]
        low = [v - (ci.low if ci else v) for _, v, ci in bars]
        high = [(ci.high if ci else v) - v for _, v, ci in bars]
        ax.bar(range(len(bars)), values, yerr=[low, high], capsize=4, color="tab:green", alpha=0.7)
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(bars)), [name for name, _, _ in bars], fontsize=8)
        ax.set(ylim=(0, 1), title=title)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no human-labelled data scored", ha="center", va="center")
    axes[0][0].set_ylabel("share agreeing with people (95% CI)")
    fig.tight_layout()
    with atomic_open(out_png, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)


def write_policy_report(report: PolicyReport, out_dir: str | Path,
                        training_logs: Mapping[str, str | Path] | None = None) -> list[Path]:
    """report.json, report.md, winrates.png (human.png with human-grounded measures, training_curves.png
    when logs are given)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "report.md", out / "winrates.png"]
    atomic_write_json(paths[0], report.model_dump(mode="json"))
    atomic_write_text(paths[1], render_markdown(report))
    plot_win_rates(report, paths[2])
    if report.human is not None:
        paths.append(out / "human.png")
        plot_human(report.human, paths[-1])
    if training_logs:
        paths.append(out / "training_curves.png")
        plot_training_curves(training_logs, paths[-1])
    return paths
