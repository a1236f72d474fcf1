"""`cai run RECIPE | JOB.json`: the full two-phase Constitutional AI run from one recipe, or one job.

A recipe (YAML, or a shipped name) runs every stage, each as `cai run RUN/<stage>/job.json` in
its own process. A job file (`{"kind": ..., "job": {...}}`, e.g. one of those) runs that one job
in this process, with the progress, Ctrl-C handling and summary of the matching command.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from cai.cli.common import fail_on_user_error
from cai.cli.eval_policy import run_policy_eval_job
from cai.cli.generate import run_job
from cai.cli.train import run_train_job
from cai.kinds import KINDS
from cai.runner import load_recipe, run_recipe
from cai.stage_jobs import kind_of, read_job_file
from cai.train.jobs import TRAIN_JOBS

console = Console()


# Every generation job kind (cai.kinds) runs as its own command runs it.
GENERATION_RUNNERS: dict[str, Callable[[Any], None]] = dict.fromkeys(KINDS, run_job)
JOB_RUNNERS: dict[str, Callable[[Any], None]] = {
    **GENERATION_RUNNERS, **dict.fromkeys(TRAIN_JOBS, run_train_job), "eval-policy": run_policy_eval_job,
}


def run_job_file(path: Path) -> None:
    """Run the job in a job file, by its kind."""
    with fail_on_user_error():
        job = read_job_file(path)
    JOB_RUNNERS[kind_of(job)](job)


def run(
    spec: Annotated[str, typer.Argument(
        metavar="RECIPE_OR_JOB",
        help="recipe YAML file, a shipped recipe (cpu-smollm2, gpu-7b), or one stage's job file (RUN/<stage>/job.json)")],
    out: Annotated[Optional[Path], typer.Option(help="run folder (default: runs/NAME); resumed if it exists")] = None,
) -> None:
    """Phase 1 data -> SFT -> phase 2 pairs -> DPO (or RM + PPO) -> evaluation, resuming at the first unfinished
    stage; or one job file."""
    if Path(spec).suffix == ".json":
        if out is not None:
            raise typer.BadParameter("--out is for a recipe; a job file names its own folders")
        run_job_file(Path(spec))
        return
    with fail_on_user_error():
        loaded = load_recipe(spec)
    run_dir = out or Path("runs") / loaded.name
    try:
        with fail_on_user_error():
            results = run_recipe(loaded, run_dir, log=console.print)
    except RuntimeError as exc:
        console.print(f"[red]error:[/] {exc}\nFix the cause and run the same command again: finished stages are kept.")
        raise typer.Exit(1) from None
    table = Table(title=f"{loaded.name}: {run_dir}")
    for col in ("stage", "seconds", "peak RSS (MB)"):
        table.add_column(col)
    for r in results:
        table.add_row(r.name, f"{r.seconds:.0f}", f"{r.peak_rss_mb:.0f}")
    console.print(table)
    report = run_dir / "07-eval" / "report.md"
    if report.exists():
        typer.echo(report.read_text(encoding="utf-8"))  # plain: rich would read "[bootstrap 95%]" as markup
