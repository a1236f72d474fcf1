"""`cai jobs ...`: inspect and repair job directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cai.cli.common import fail_on_user_error, stoppable_job
from cai.cli.generate import (
    CpusOpt,
    ExecutorOpt,
    GpusOpt,
    RayAddressOpt,
    ReplicasOpt,
    executor_config,
)
from cai.cli.summaries import print_summary
from cai.files import atomic_write_jsonl
from cai.kinds import open_store, retry_errors
from cai.revision_pairs import revision_pairs

app = typer.Typer(help="Inspect and repair job directories.", no_args_is_help=True)
console = Console()


@app.command("status")
def status(job_dir: Path) -> None:
    """Counts of finished rows and errors by kind; unreadable lines are named (exit 1: `cai jobs repair`)."""
    with fail_on_user_error():
        kind, store = open_store(job_dir)
    stats = store.stats(kind.result_stage)
    console.print(json.dumps({"stage": stats.stage, "fingerprint": store.manifest.fingerprint, "rows": stats.rows,
                              "ok": stats.ok, "errors": stats.errors, "shards": stats.shards,
                              "unreadable": len(stats.unreadable)}, indent=2))
    if stats.unreadable:
        for path, number, problem in stats.unreadable[:20]:  # not rows: neither ok nor error rows
            typer.echo(f"unreadable: {path}:{number}: {problem}", err=True)
        typer.echo(f"{len(stats.unreadable)} unreadable lines: `cai jobs repair {job_dir}` moves them to "
                   f"{job_dir / 'quarantine'} so that a rerun generates their inputs again", err=True)
        raise typer.Exit(1)


@app.command("repair")
def repair(job_dir: Path) -> None:
    """Move unreadable shard lines (truncated, not UTF-8, not JSON, not a row of the stage) to
    DIR/quarantine/; readable rows are kept, and the next run generates the moved inputs again."""
    with fail_on_user_error():
        _, store = open_store(job_dir)
        with store:
            moved = store.repair()
    for shard, number, why in moved:
        typer.echo(f"quarantined {shard}:{number}: {why}")
    if moved:
        typer.echo(f"{len(moved)} unreadable lines moved to {job_dir / 'quarantine'}; rerun the job "
                   "(or `cai jobs retry-errors`) to generate their inputs again")
    else:
        typer.echo("no unreadable lines")


@app.command("retry-errors")
def retry(
    job_dir: Path,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    replicas: ReplicasOpt = 1,
    gpus_per_replica: GpusOpt = 0.0,
    cpus_per_replica: CpusOpt = 1.0,
) -> None:
    """Generate again only the rows that ended as errors (any stage); everything else is kept. A job
    made on Ray runs again wherever these flags say (the job directory is the same either way)."""
    where = executor_config(executor, ray_address, replicas, gpus_per_replica, cpus_per_replica)
    with fail_on_user_error(), stoppable_job() as stop:
        dropped, summary = retry_errors(job_dir, stop=stop, executor=where)
    console.print(f"retrying {sum(dropped.values())} error rows: {dropped or 'none'}")
    print_summary(summary)


@app.command("revision-pairs")
def revision_pairs_command(
    sft: Annotated[Path, typer.Argument(help="a phase-1 job folder (exported) or its sft.jsonl")],
    out: Annotated[Path, typer.Option(help="preference JSONL to write (`cai train dpo|rm --data OUT`)")],
) -> None:
    """Preference pairs from phase-1 trajectories: each final revision chosen over its initial answer
    (no engine, no judge); rows whose revision equals the answer or was cut off are skipped and counted."""
    with fail_on_user_error():
        rows, skipped = revision_pairs(sft)
        atomic_write_jsonl(out, rows)
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "none"
    typer.echo(f"{len(rows)} pairs written to {out}; skipped {sum(skipped.values())} ({reasons})")
