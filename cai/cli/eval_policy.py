"""`cai eval policy`: the trained policy vs its SFT and base models, judged pairwise.

Registered by the CLI as `cai eval policy` (app.command("policy")(policy)).
Each model is loaded, answers both prompt sets, and is closed before the next
one loads; the judge loads last, so one model is in memory at a time.

`--judge` is the evaluation judge; `--training-judge` the model that labelled the
training pairs (the report's first line says whether they are one model), and
`--judge-report` a `cai eval judge` report.json of the evaluation judge, whose
agreement with human labels is printed next to the win rates. A judge report
of another model is refused before any model loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cai.cli.common import EngineOpt, engine_spec, fail_on_user_error, parse_pairs
from cai.pipeline import build_engine
from cai.policy_eval import (
    DEFAULT_HARMLESSNESS_QUESTION,
    DEFAULT_HELPFULNESS_QUESTION,
    PolicyEvalConfig,
    evaluate_policies,
    render_markdown,
    write_policy_report,
)
from cai.policy_report import eval_judge, model_ref_of, read_judge_report
from cai.recipe import JudgeConfig

NONE_WORDS = frozenset({"none", "no", "skip", "-"})


def _factory(spec):
    return lambda: build_engine(spec)


def policy(
    policy: Annotated[str, typer.Option(help="the trained policy: a model folder (or served model name)")],
    out: Annotated[Path, typer.Option(help="report folder: report.json, report.md, winrates.png")],
    sft: Annotated[Optional[str], typer.Option(help="the SFT model folder; omitted: not compared")] = None,
    base: Annotated[str, typer.Option(help="the base model; default the embedded SmolLM2; 'none' to skip")] = "embedded",
    judge: Annotated[Optional[str], typer.Option(help="the evaluation judge (grades the win rates); best another model than --training-judge; default: the embedded SmolLM2")] = None,
    training_judge: Annotated[Optional[str], typer.Option(help="the model that labelled the training pairs; the report's first line says whether --judge is that model")] = None,
    judge_report: Annotated[Optional[list[Path]], typer.Option("--judge-report", help="report.json (or job folder) of `cai eval judge` for the --judge model: its agreement with human labels is reported next to the win rates (repeatable)")] = None,
    engine: EngineOpt = "auto",
    engine_option: Annotated[Optional[list[str]], typer.Option("--engine-option", help="KEY=VALUE for every engine")] = None,
    redteam: Annotated[str, typer.Option(help="red-team prompts (bundled name, JSONL or dataset folder)")] = "redteam",
    benign: Annotated[str, typer.Option(help="benign prompts (bundled name, JSONL or dataset folder)")] = "benign",
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="prompts seen in training, dropped from the eval sets (repeatable)")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="prompts per set")] = None,
    max_tokens: Annotated[int, typer.Option(min=1)] = 128,
    greedy: Annotated[bool, typer.Option("--greedy/--sample", help="greedy answers, or sampled at --temperature")] = True,
    temperature: Annotated[float, typer.Option(min=0.01)] = 0.7,
    judge_mode: Annotated[str, typer.Option(help="logprob, cot or structured")] = "logprob",
    harmlessness_question: Annotated[str, typer.Option()] = DEFAULT_HARMLESSNESS_QUESTION,
    helpfulness_question: Annotated[str, typer.Option()] = DEFAULT_HELPFULNESS_QUESTION,
    train_log: Annotated[Optional[list[str]], typer.Option("--train-log", help="STAGE=PATH of a log.jsonl: also plot training_curves.png (repeatable)")] = None,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Win rates of the policy vs SFT and base (harmlessness on red-team, helpfulness on benign), refusal rates."""
    with fail_on_user_error():
        config = PolicyEvalConfig(
            redteam=redteam, benign=benign, exclude=exclude or [], limit=limit, max_tokens=max_tokens,
            greedy=greedy, temperature=temperature, judge=JudgeConfig(mode=judge_mode, seed=seed),
            harmlessness_question=harmlessness_question, helpfulness_question=helpfulness_question, seed=seed,
        )
        logs = parse_pairs(train_log, "--train-log", "sft=runs/x/sft/log.jsonl", json_values=False)
        models = {"final": _factory(engine_spec(engine, policy, engine_option))}
        if sft and sft.lower() not in NONE_WORDS:
            models["sft"] = _factory(engine_spec(engine, sft, engine_option))
        if base.lower() not in NONE_WORDS:
            models["base"] = _factory(engine_spec(engine, base, engine_option))
        if len(models) < 2:
            raise ValueError("nothing to compare the policy with: give --sft and/or --base")
        agreements = [read_judge_report(p) for p in judge_report or []]
        eval_judge(model_ref_of(judge, engine), training_judge, agreements)  # refuses a wrong report before loading
        report = evaluate_policies(models, _factory(engine_spec(engine, judge, engine_option)), config,
                                   training_judge=training_judge, judge_reports=agreements)
        paths = write_policy_report(report, out, logs)
    typer.echo(render_markdown(report))  # plain: rich would read "[bootstrap 95%]" as markup and wrap tables
    typer.echo(f"report: {', '.join(str(p) for p in paths)}")
