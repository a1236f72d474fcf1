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
from cai.store import JobStore

app = typer.Typer(help="Inspect and repair job directories.", no_args_is_help=True)
console = Console()


@app.command("status")
def status(job_dir: Path) -> None:
    """Counts of finished rows and errors by kind."""
    with fail_on_user_error():
        manifest = read_manifest(job_dir)
    store = JobStore(job_dir, manifest)
    rows, errors = 0, Counter()
    for row in store.read(manifest.stage):
        rows += 1
        if row.get("error"):
            errors[row["error"]["code"]] += 1
    console.print(
        json.dumps(
            {
                "stage": manifest.stage,
                "fingerprint": manifest.fingerprint,
                "rows": rows,
                "ok": rows - sum(errors.values()),
                "errors": dict(errors),
                "shards": len(store.shard_paths(manifest.stage)),
            },
            indent=2,
        )
    )


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
