"""`cai constitution ...`: validate, show and diff constitution files (paths or `path@REV`)."""

from __future__ import annotations

import json
import os
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cai.constitution import (
    ConstitutionError,
    LoadedConstitution,
    load_constitution,
)
from cai.constitution_diff import ConstitutionDiff, diff_constitutions
from cai.constitution_review import (
    JobImpact,
    diff_markdown,
    impact_lines,
    validate_against,
)
from cai.errors import CaiError

app = typer.Typer(
    help="Check, inspect and compare constitution files. FILE may be a path or path@REV (a git revision).",
    no_args_is_help=True,
)


def _load_or_exit(spec: str) -> LoadedConstitution:
    try:
        return load_constitution(spec)
    except ConstitutionError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if width <= 0 or len(text) <= width else text[: width - 1].rstrip() + "…"


def _base_revision(against: str | None) -> str:
    """--against, else the base pre-commit gives in its pre-push / `run --from-ref` stages, else HEAD."""
    return against or os.environ.get("PRE_COMMIT_FROM_REF") or "HEAD"


@app.command()
def validate(
    files: Annotated[list[str], typer.Argument(help="Constitution files (path or path@REV).")],
    against: Annotated[str | None, typer.Option(
        "--against", metavar="REV",
        help="Git revision for the version-bump check (e.g. origin/main). Default: $PRE_COMMIT_FROM_REF "
             "when pre-commit sets it, else HEAD.")] = None,
) -> None:
    """Check files: schema, unique ids, non-empty requests, and a version bump when wording changed
    since a git revision (HEAD by default). Used by the pre-commit hook in .pre-commit-hooks.yaml."""
    rev = _base_revision(against)
    failed = 0
    for spec in files:
        errors = validate_against(spec, rev)
        if errors:
            failed += 1
            for error in errors:
                typer.echo(str(error))
            continue
        ref = load_constitution(spec).ref
        commit = f", commit {ref.git_commit[:12]}" if ref.git_commit else ""
        typer.echo(f"OK {spec}: {ref.name} v{ref.version} (sha256 {ref.sha256[:12]}{commit})")
    if failed:
        typer.echo(f"{failed} of {len(files)} file(s) failed validation", err=True)
        raise typer.Exit(1)


@app.command()
def show(
    file: Annotated[str, typer.Argument(help="Constitution file (path or path@REV).")],
    full: Annotated[bool, typer.Option("--full", help="Do not shorten the requests.")] = False,
) -> None:
    """Print the header and a table of principles."""
    loaded = _load_or_exit(file)
    c, ref = loaded.constitution, loaded.ref
    console = Console()
    commit = ref.git_commit[:12] if ref.git_commit else "none (untracked or modified)"
    console.print(Text.assemble(
        (f"{c.name} ", "bold"), f"v{c.version}  sha256 {ref.sha256[:12]}  git {commit}  ({ref.path})"
    ))
    console.print(Text(" ".join(c.description.split()), style="dim"))
    width = 0 if full else 60
    table = Table(show_lines=full)
    table.add_column("id", no_wrap=True)
    table.add_column("tags", max_width=18)
    table.add_column("critique request", overflow="fold", ratio=1)
    table.add_column("revision request", overflow="fold", ratio=1)
    for p in c.principles:
        table.add_row(
            Text(p.id + (f" ({len(p.examples)} ex.)" if p.examples else "")),
            Text(", ".join(p.tags)),
            Text(_shorten(p.critique_request, width)),
            Text(_shorten(p.revision_request, width)),
        )
    console.print(table)
    console.print(f"{len(c.principles)} principles")


def _print_diff(diff: ConstitutionDiff, impact: JobImpact | None) -> None:
    old, new = diff.old, diff.new
    typer.echo(f"--- {old.path}  {old.name} v{old.version}  sha256 {old.sha256[:12]}")
    typer.echo(f"+++ {new.path}  {new.name} v{new.version}  sha256 {new.sha256[:12]}")
    if diff.empty:
        typer.echo("no content changes")
        return
    for change in diff.metadata:
        typer.echo(f"~ {change.field}:\n    - {change.old}\n    + {change.new}")
    for pid in diff.added:
        typer.echo(typer.style(f"+ added    {pid}", fg="green"))
    for pid in diff.removed:
        typer.echo(typer.style(f"- removed  {pid}", fg="red"))
    for item in diff.reworded:
        typer.echo(typer.style(f"~ reworded {item.id}", fg="yellow"))
        for change in item.changes:
            typer.echo(f"    {change.field}:")
            typer.echo(typer.style(f"      - {change.old}", fg="red"))
            typer.echo(typer.style(f"      + {change.new}", fg="green"))
    for tags in diff.retagged:
        parts = [f"+{t}" for t in tags.added] + [f"-{t}" for t in tags.removed]
        typer.echo(f"~ retagged {tags.id}: {' '.join(parts)}")
    if diff.reordered:
        typer.echo("~ principles were reordered")
    if impact is not None:
        for line in impact_lines(diff, impact):
            typer.echo(line)
        for pid in [*diff.removed, *(item.id for item in diff.reworded)]:
            typer.echo(f"    {pid}: {impact.by_principle.get(pid, 0)} rows")
    if old.version == new.version:
        typer.echo(typer.style("! content changed but the version did not — bump it", fg="red"))


class DiffFormat(str, Enum):
    text = "text"
    json = "json"
    markdown = "markdown"


@app.command()
def diff(
    old: Annotated[str, typer.Argument(help="Old constitution (path or path@REV, e.g. constitutions/harmless.yaml@HEAD~1).")],
    new: Annotated[str, typer.Argument(help="New constitution (path or path@REV).")],
    fmt: Annotated[DiffFormat, typer.Option("--format", help="text, json, or markdown (a pull-request comment).")]
        = DiffFormat.text,
    json_out: Annotated[bool, typer.Option("--json", help="Same as --format json.")] = False,
    job: Annotated[Path | None, typer.Option(
        "--job", metavar="DIR",
        help="A cai sft or prefs job directory: count how many of its rows each changed principle touches.")] = None,
) -> None:
    """Principle-level diff: added, removed and reworded principles, tag changes; with --job, rows touched."""
    result = diff_constitutions(_load_or_exit(old), _load_or_exit(new))
    impact = None
    if job is not None:
        # reads job stores (cai.kinds and its pipelines): imported only when asked
        from cai.constitution_impact import job_impact

        try:
            impact = job_impact(job, result)
        except CaiError as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(1) from None
    if json_out or fmt is DiffFormat.json:
        payload = result.model_dump(mode="json")
        if impact is not None:
            payload["impact"] = impact.model_dump(mode="json")
        typer.echo(json.dumps(payload, indent=2, ensure_ascii=False))
    elif fmt is DiffFormat.markdown:
        typer.echo(diff_markdown(result, impact), nl=False)
    else:
        _print_diff(result, impact)
