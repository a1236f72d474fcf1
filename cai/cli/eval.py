"""`cai eval ...`: measure the judge against human labels (and, later, trained policies)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from cai.cli.common import EngineOpt, ModelOpt, engine_spec, fail_on_user_error
from cai.cli.eval_policy import policy
from cai.evaluate import evaluate_judge, read_eval_items, render_markdown, write_report
from cai.pipeline import build_engine
from cai.recipe import JudgeConfig

app = typer.Typer(help="Evaluate the AI judge and trained policies.", no_args_is_help=True)
console = Console()
app.command("policy")(policy)


@app.command("judge")
def judge(
    data: Annotated[Path, typer.Option(help="two-option multiple-choice JSONL (prompt/corrects/incorrects) or HH-RLHF chosen/rejected pairs")],
    out: Annotated[Path, typer.Option(help="report folder: report.json, report.md, reliability.png, predictions.jsonl")],
    judge: ModelOpt = None,
    engine: EngineOpt = "auto",
    engine_option: Annotated[Optional[list[str]], typer.Option("--engine-option")] = None,
    mode: Annotated[str, typer.Option(help="logprob, cot or structured")] = "logprob",
    orders: Annotated[int, typer.Option(min=1, max=2)] = 2,
    limit: Annotated[Optional[int], typer.Option(min=1)] = None,
    seed: Annotated[int, typer.Option(help="which answer of an HH pair is shown as A")] = 0,
    baseline: Annotated[bool, typer.Option(help="also run the one-order JSON-verdict baseline judge")] = True,
) -> None:
    """Judge agreement with human labels: accuracy (95% CI), consistency, position and length bias, calibration."""
    with fail_on_user_error():
        config = JudgeConfig(mode=mode, orders=orders, seed=seed)
        items = read_eval_items(data, limit=limit, seed=seed)
        eng = build_engine(engine_spec(engine, judge, engine_option))
        report = evaluate_judge(eng, items, config, baseline=baseline)
        paths = write_report(report, out)
    console.print(render_markdown(report))
    console.print(f"report: {', '.join(str(p) for p in paths)}")
