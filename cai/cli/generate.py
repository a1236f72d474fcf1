"""`cai generate ...`: batch generation commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cai.cli.common import ConstitutionOpt, EngineOpt, ModelOpt, engine_spec, fail_on_user_error
from cai.pipeline import Phase1Summary, generate_sft
from cai.recipe import Phase1Config, SFTJob
from cai.records import SamplingParams

app = typer.Typer(help="Generate synthetic datasets from a constitution.", no_args_is_help=True)
console = Console()


@app.command("sft")
def sft(
    constitution: ConstitutionOpt = "harmless",
    prompts: Annotated[str, typer.Option(help="JSONL / HH-RLHF file, dataset folder, or bundled set: redteam, benign")] = "redteam",
    out: Annotated[Path, typer.Option(help="job directory (resumed if it exists)")] = Path("jobs/sft"),
    engine: EngineOpt = "auto",
    model: ModelOpt = None,
    engine_option: Annotated[Optional[list[str]], typer.Option("--engine-option", help="backend option KEY=VALUE (JSON value), repeatable")] = None,
    rounds: Annotated[int, typer.Option(min=1, help="critique -> revision rounds")] = 2,
    limit: Annotated[Optional[int], typer.Option(min=1, help="use the first N prompts")] = None,
    seed: int = 0,
    max_tokens: Annotated[int, typer.Option(min=1, help="max new tokens per answer and revision")] = 256,
    critique_max_tokens: Annotated[int, typer.Option(min=1)] = 192,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
    batch_size: Annotated[int, typer.Option(min=1, help="prompts per engine call and per shard")] = 256,
    new_job: Annotated[bool, typer.Option(help="if OUT holds a job with other settings, start a new directory beside it")] = False,
    parquet: Annotated[bool, typer.Option(help="also export sft.parquet beside sft.jsonl")] = True,
    show: Annotated[int, typer.Option(help="example trajectories to print")] = 2,
) -> None:
    """Phase 1 (SL-CAI): answer, then critique and revise against sampled principles."""
    params = dict(temperature=temperature, seed=seed)
    job = SFTJob(
        constitution=constitution,
        prompts=prompts,
        out=str(out),
        engine=engine_spec(engine, model, engine_option),
        phase1=Phase1Config(
            rounds=rounds,
            seed=seed,
            answer=SamplingParams(max_tokens=max_tokens, **params),
            critique=SamplingParams(max_tokens=critique_max_tokens, **params),
            revision=SamplingParams(max_tokens=max_tokens, **params),
        ),
        limit=limit,
        batch_size=batch_size,
        parquet=parquet,
        new_job=new_job,
    )
    with fail_on_user_error():
        summary = _run_with_progress(job)
    print_phase1_summary(summary)
    print_trajectories(Path(summary.out), show)


def _run_with_progress(job: SFTJob) -> Phase1Summary:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("phase 1", total=None)

        def on_progress(event: str, n: int) -> None:
            if event == "total":
                bar.update(task, total=n)
            elif event == "done":
                bar.advance(task, n)
            else:
                bar.update(task, description=f"phase 1: {event.removeprefix('step ')} ({n} requests)")

        return generate_sft(job, progress=on_progress)


def print_phase1_summary(summary: Phase1Summary) -> None:
    stats = summary.export
    errors = ", ".join(f"{k}={v}" for k, v in sorted(stats.errors.items())) or "none"
    console.print(
        f"[bold]done[/]: {summary.done_now} prompts now, {summary.done_before} resumed from earlier runs"
        f" ({summary.duplicates_merged} duplicate prompts merged)\n"
        f"[bold]exported[/]: {stats.rows} rows; excluded error rows: {stats.error_total} ({errors})\n"
        f"[bold]tokens[/]: {summary.generated_tokens_now} generated in {summary.generation_seconds:.1f}s"
        f" = {summary.tokens_per_second:.1f} tok/s (wall {summary.wall_seconds:.1f}s)\n"
        f"[bold]dataset[/]: {', '.join(stats.files)}\n"
        f"[bold]data card[/]: {summary.out}/README.md   [bold]trajectories[/]: {summary.out}/shards/"
    )


def print_trajectories(job_dir: Path, count: int) -> None:
    """Print the first `count` trajectories of the job, error rows included (marked)."""
    shards = sorted((job_dir / "shards").glob("sft-*.jsonl"))
    rows = (json.loads(line) for shard in shards for line in shard.open(encoding="utf-8"))
    for row, _ in zip(rows, range(count)):
        body = [f"[bold cyan]prompt[/]: {escape(row['prompt'][-1]['content'])}"]
        for step in row["trajectory"]:
            label = step["kind"] + (f" [{step['principle_id']}]" if step["principle_id"] else "")
            body.append(f"[bold]{escape(label)}[/]: {escape(step['text'])}")
        if row["error"]:
            body.append(f"[red]error {row['error']['code']}[/]: {escape(row['error']['message'])} (excluded from export)")
        const = row["lineage"]["constitution"]
        title = f"{row['id']}  ({const['name']} v{const['version']})"
        console.print(Panel("\n\n".join(body), title=title, expand=True))
