"""`cai run RECIPE`: the full two-phase Constitutional AI run from one recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from cai.cli.common import fail_on_user_error
from cai.runner import load_recipe, run_recipe

console = Console()


def run(
    recipe: Annotated[str, typer.Argument(help="recipe YAML file, or a shipped recipe: cpu-smollm2, gpu-7b")],
    out: Annotated[Optional[Path], typer.Option(help="run folder (default: runs/NAME); resumed if it exists")] = None,
) -> None:
    """Phase 1 data -> SFT -> phase 2 pairs -> DPO (or RM + PPO) -> evaluation, resuming at the first unfinished stage."""
    with fail_on_user_error():
        loaded = load_recipe(recipe)
    run_dir = out or Path("runs") / loaded.name
    try:
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
        console.print(report.read_text(encoding="utf-8"))
