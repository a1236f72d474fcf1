"""`cai eval ...`: measure the judge against human labels (and, later, trained policies)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from cai.cli.common import (
    EngineOpt,
    ModelOpt,
    absolute_if_path,
    engine_spec,
    fail_on_user_error,
    stoppable_job,
)
from cai.cli.eval_policy import policy
from cai.cli.generate import (
    CpusOpt,
    ExecutorOpt,
    GpusOpt,
    RayAddressOpt,
    ReplicasOpt,
    _run_with_progress,
    executor_config,
)
from cai.cli.summaries import print_judge_eval_summary
from cai.judge import judge_modes_text
from cai.judge_eval import EvalJob
from cai.recipe import DEFAULT_BATCH_SIZE, JudgeConfig

app = typer.Typer(help="Evaluate the AI judge and trained policies.", no_args_is_help=True)
console = Console()
app.command("policy")(policy)


@app.command("judge")
def judge(
    data: Annotated[Path, typer.Option(help="two-option multiple-choice JSONL (prompt/corrects/incorrects) or HH-RLHF chosen/rejected pairs")],
    out: Annotated[Path, typer.Option(help="job directory: manifest.json, shards/, then report.json, report.md, reliability.png, predictions.jsonl")],
    judge: ModelOpt = None,
    engine: EngineOpt = "auto",
    engine_option: Annotated[Optional[list[str]], typer.Option("--engine-option")] = None,
    mode: Annotated[str, typer.Option(help=judge_modes_text())] = "logprob",
    orders: Annotated[int, typer.Option(min=1, max=2)] = 2,
    limit: Annotated[Optional[int], typer.Option(min=1)] = None,
    seed: Annotated[int, typer.Option(help="which answer of an HH pair is shown as A")] = 0,
    baseline: Annotated[bool, typer.Option(help="also run the one-order JSON-verdict baseline judge")] = True,
    batch_size: Annotated[int, typer.Option(min=1, help="pairs per engine call and per shard")] = DEFAULT_BATCH_SIZE,
    new_job: Annotated[bool, typer.Option("--new-job", help="if --out holds a job with other settings, start a new directory beside it")] = False,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    replicas: ReplicasOpt = 1,
    gpus_per_replica: GpusOpt = 0.0,
    cpus_per_replica: CpusOpt = 1.0,
) -> None:
    """Judge agreement with human labels: accuracy (95% CI), consistency, position and length bias, calibration.

    Resumable: rerunning the same command skips pairs already judged.
    """
    with fail_on_user_error():
        job = EvalJob(data=absolute_if_path(str(data)), out=str(out), engine=engine_spec(engine, judge, engine_option),
                      judge=JudgeConfig(mode=mode, orders=orders, seed=seed), limit=limit, seed=seed,
                      baseline=baseline, batch_size=batch_size, new_job=new_job,
                      executor=executor_config(executor, ray_address, replicas, gpus_per_replica, cpus_per_replica))
        with stoppable_job() as stop:
            summary = _run_with_progress(job, stop)
    print_judge_eval_summary(summary)
