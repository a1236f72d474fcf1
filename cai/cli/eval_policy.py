"""`cai eval policy`: the trained policy vs its SFT and base models, judged pairwise.

Registered by the CLI as `cai eval policy` (app.command("policy")(policy)).
Each model is loaded, answers both prompt sets, and is closed before the next
one loads; the judge loads last, so one model is in memory at a time.

`--judge` is the evaluation judge; `--training-judge` the model that labelled the
training pairs (the report's first line says whether they are one model), and
`--judge-report` a `cai eval judge` report.json of the evaluation judge, whose
agreement with human labels is printed next to the win rates. A judge report
of another model is refused before any model loads.

`--human-pairs` / `--human-choices` add the human-grounded measures (cai.human_eval):
each model's own log-probs on human-labelled data, scored with transformers after
that model's answers (its engine closed first), so they need local model folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cai.cli.common import EngineOpt, fail_on_user_error, parse_pairs
from cai.engine.models import EMBEDDED_ALIASES
from cai.errors import CaiError
from cai.judge import judge_modes_text
from cai.pipeline import build_engine
from cai.policy_eval import evaluate_policies, render_markdown, write_policy_report
from cai.policy_records import PolicyEvalConfig, PolicyEvalJob
from cai.policy_report import eval_judge, model_ref_of, read_judge_report
from cai.recipe import EngineSpec, JudgeConfig

NONE_WORDS = frozenset({"none", "no", "skip", "-"})


def default(model: type, field: str) -> Any:
    """A flag's default is the job model's: the CLI and a recipe cannot drift apart."""
    return model.model_fields[field].default


def human_scorers(specs: dict[str, str]) -> dict:
    """Log-prob scorers (cai.likelihood, transformers) of local models; a served model has no weights here."""
    from cai.likelihood import LogprobScorer

    remote = [f"{name} ({spec})" for name, spec in specs.items()
              if spec not in EMBEDDED_ALIASES and not Path(spec).expanduser().is_dir()]
    if remote:
        raise CaiError(f"--human-pairs / --human-choices score the models' own log-probs, so they need model "
                       f"folders; not a local folder: {', '.join(remote)}")
    return {name: (lambda spec=spec: LogprobScorer(spec)) for name, spec in specs.items()}


def run_policy_eval_job(job: PolicyEvalJob) -> None:
    """Answer, judge, write the report and print it (`cai eval policy` and `cai run JOB.json`)."""

    def factory(model: str | None):
        return lambda: build_engine(EngineSpec(backend=job.engine, model=model, options=job.engine_options))

    with fail_on_user_error():
        specs = {"final": job.policy, "sft": job.sft, "base": job.base}
        specs = {name: spec for name, spec in specs.items() if spec is not None}
        models = {name: factory(spec) for name, spec in specs.items()}
        scorers = human_scorers(specs) if job.config.human_pairs or job.config.human_choices else None
        agreements = [read_judge_report(p) for p in job.judge_reports]
        eval_judge(model_ref_of(job.judge, job.engine), job.training_judge, agreements)  # before any model loads
        report = evaluate_policies(models, factory(job.judge), job.config, training_judge=job.training_judge,
                                   judge_reports=agreements, scorers=scorers)
        paths = write_policy_report(report, job.out, job.train_logs)
    typer.echo(render_markdown(report))  # plain: rich would read "[bootstrap 95%]" as markup and wrap tables
    typer.echo(f"report: {', '.join(str(p) for p in paths)}")


def _model_or_none(spec: str | None) -> str | None:
    return None if spec is None or spec.lower() in NONE_WORDS else spec


def policy(
    policy: Annotated[str, typer.Option(help="the trained policy: a model folder (or served model name)")],
    out: Annotated[Path, typer.Option(help="report folder: report.json, report.md, winrates.png")],
    sft: Annotated[Optional[str], typer.Option(help="the SFT model folder; omitted: not compared")] = None,
    base: Annotated[str, typer.Option(help="the base model; default the embedded SmolLM2; 'none' to skip")] = default(PolicyEvalJob, "base"),
    judge: Annotated[Optional[str], typer.Option(help="the evaluation judge (grades the win rates); best another model than --training-judge; default: the embedded SmolLM2")] = None,
    training_judge: Annotated[Optional[str], typer.Option(help="the model that labelled the training pairs; the report's first line says whether --judge is that model")] = None,
    judge_report: Annotated[Optional[list[Path]], typer.Option("--judge-report", help="report.json (or job folder) of `cai eval judge` for the --judge model: its agreement with human labels is reported next to the win rates (repeatable)")] = None,
    engine: EngineOpt = default(PolicyEvalJob, "engine"),
    engine_option: Annotated[Optional[list[str]], typer.Option("--engine-option", help="KEY=VALUE for every engine")] = None,
    redteam: Annotated[str, typer.Option(help="red-team prompts (bundled name, JSONL or dataset folder)")] = default(PolicyEvalConfig, "redteam"),
    benign: Annotated[str, typer.Option(help="benign prompts (bundled name, JSONL or dataset folder)")] = default(PolicyEvalConfig, "benign"),
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="prompts seen in training, dropped from the eval sets (repeatable)")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="prompts per set")] = None,
    max_tokens: Annotated[int, typer.Option(min=1)] = default(PolicyEvalConfig, "max_tokens"),
    greedy: Annotated[bool, typer.Option("--greedy/--sample", help="greedy answers, or sampled at --temperature")] = default(PolicyEvalConfig, "greedy"),
    temperature: Annotated[float, typer.Option(min=0.01)] = default(PolicyEvalConfig, "temperature"),
    judge_mode: Annotated[str, typer.Option(help=judge_modes_text())] = default(JudgeConfig, "mode"),
    harmlessness_question: Annotated[str, typer.Option()] = default(PolicyEvalConfig, "harmlessness_question"),
    helpfulness_question: Annotated[str, typer.Option()] = default(PolicyEvalConfig, "helpfulness_question"),
    train_log: Annotated[Optional[list[str]], typer.Option("--train-log", help="STAGE=PATH of a log.jsonl: also plot training_curves.png (repeatable)")] = None,
    human_pairs: Annotated[Optional[str], typer.Option(help="human-labelled pairs (HH-RLHF transcripts, or prompt/chosen/rejected rows such as cai's prefs export): each model's likelihood preference for the chosen answer, and the implicit-reward accuracy of each policy vs its reference")] = None,
    human_choices: Annotated[Optional[str], typer.Option(help="two-option questions (prompt/corrects/incorrects, e.g. harmful_vs_ethical): each model's own P(correct option), both orders")] = None,
    human_limit: Annotated[Optional[int], typer.Option(min=1, help="pairs and questions read from each human file")] = None,
    refusal_judge: Annotated[bool, typer.Option("--refusal-judge/--no-refusal-judge", help="also ask the evaluation judge whether each answer declines (beside the phrase list)")] = default(PolicyEvalConfig, "refusal_judge"),
    seed: Annotated[int, typer.Option()] = default(PolicyEvalConfig, "seed"),
) -> None:
    """Win rates of the policy vs SFT and base (harmlessness on red-team, helpfulness on benign), refusal rates,
    and with --human-pairs / --human-choices the models' agreement with human labels (no AI judge)."""
    with fail_on_user_error():
        config = PolicyEvalConfig(
            redteam=redteam, benign=benign, exclude=exclude or [], limit=limit, max_tokens=max_tokens,
            greedy=greedy, temperature=temperature, judge=JudgeConfig(mode=judge_mode, seed=seed),
            harmlessness_question=harmlessness_question, helpfulness_question=helpfulness_question, seed=seed,
            refusal_judge=refusal_judge, human_pairs=human_pairs, human_choices=human_choices, human_limit=human_limit,
        )
        job = PolicyEvalJob(
            policy=policy, out=str(out), sft=_model_or_none(sft), base=_model_or_none(base), judge=judge,
            training_judge=training_judge, judge_reports=[str(p) for p in judge_report or []], engine=engine,
            engine_options=parse_pairs(engine_option, "--engine-option", "base_url=http://127.0.0.1:8000/v1"),
            train_logs=parse_pairs(train_log, "--train-log", "sft=runs/x/sft/log.jsonl", json_values=False),
            config=config,
        )
    run_policy_eval_job(job)
