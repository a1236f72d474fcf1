"""`cai jobs ...`: inspect and repair job directories."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import typer
from rich.console import Console

from cai.cli.common import fail_on_user_error, stoppable_job
from cai.cli.generate import print_phase1_summary, print_phase2_summary
from cai.evaluate import render_markdown
from cai.pipeline import Phase1Summary, Phase2Summary, read_manifest, retry_errors
from cai.store import JobStore, scan_shard, stage_schema

app = typer.Typer(help="Inspect and repair job directories.", no_args_is_help=True)
console = Console()


@app.command("status")
def status(job_dir: Path) -> None:
    """Counts of finished rows and errors by kind; unreadable lines are named (exit 1: `cai jobs repair`)."""
    with fail_on_user_error():
        manifest = read_manifest(job_dir)
    store = JobStore(job_dir, manifest)
    schema = stage_schema(manifest.stage)
    rows, errors, unreadable = 0, Counter(), []
    for shard in store.shard_paths(manifest.stage):
        for line in scan_shard(shard, schema, missing_ok=True):
            if line.problem is not None:  # not a row: neither ok nor an error row
                unreadable.append(f"{shard}:{line.number}: {line.problem}")
                continue
            rows += 1
            if line.row["error"]:
                errors[line.row["error"]["code"]] += 1
    console.print(
        json.dumps(
            {
                "stage": manifest.stage,
                "fingerprint": manifest.fingerprint,
                "rows": rows,
                "ok": rows - sum(errors.values()),
                "errors": dict(errors),
                "shards": len(store.shard_paths(manifest.stage)),
                "unreadable": len(unreadable),
            },
            indent=2,
        )
    )
    if unreadable:
        for where in unreadable[:20]:
            typer.echo(f"unreadable: {where}", err=True)
        typer.echo(f"{len(unreadable)} unreadable lines: `cai jobs repair {job_dir}` moves them to "
                   f"{job_dir / 'quarantine'} so that a rerun generates their inputs again", err=True)
        raise typer.Exit(1)


@app.command("repair")
def repair(job_dir: Path) -> None:
    """Move unreadable shard lines (truncated, not UTF-8, not JSON, not a row of the stage) to
    DIR/quarantine/; readable rows are kept, and the next run generates the moved inputs again."""
    with fail_on_user_error(), JobStore(job_dir, read_manifest(job_dir)) as store:
        moved = store.repair()
    for shard, number, why in moved:
        typer.echo(f"quarantined {shard}:{number}: {why}")
    if moved:
        typer.echo(f"{len(moved)} unreadable lines moved to {job_dir / 'quarantine'}; rerun the job "
                   "(or `cai jobs retry-errors`) to generate their inputs again")
    else:
        typer.echo("no unreadable lines")


@app.command("retry-errors")
def retry(job_dir: Path) -> None:
    """Generate again only the rows that ended as errors (any stage); everything else is kept."""
    with fail_on_user_error(), stoppable_job() as stop:
        dropped, summary = retry_errors(job_dir, stop=stop)
    console.print(f"retrying {sum(dropped.values())} error rows: {dropped or 'none'}")
    if isinstance(summary, Phase1Summary):
        print_phase1_summary(summary)
    elif isinstance(summary, Phase2Summary):
        print_phase2_summary(summary)
    else:
        console.print(render_markdown(summary.report))
