"""`cai constitution ...`: validate, show and diff constitution files (paths or `path@REV`)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cai.constitution import (
    ConstitutionError,
    LoadedConstitution,
    load_constitution,
    validate_constitution,
)
from cai.constitution_diff import ConstitutionDiff, diff_constitutions

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


@app.command()
def validate(
    files: Annotated[list[str], typer.Argument(help="Constitution files (path or path@REV).")],
) -> None:
    """Check files: schema, unique ids, non-empty requests, and a version bump when wording changed vs git HEAD."""
    failed = 0
    for spec in files:
        errors = validate_constitution(spec)
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


def _print_diff(diff: ConstitutionDiff) -> None:
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
    if old.version == new.version:
        typer.echo(typer.style("! content changed but the version did not — bump it", fg="red"))


@app.command()
def diff(
    old: Annotated[str, typer.Argument(help="Old constitution (path or path@REV, e.g. constitutions/harmless.yaml@HEAD~1).")],
    new: Annotated[str, typer.Argument(help="New constitution (path or path@REV).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the diff as JSON.")] = False,
) -> None:
    """Principle-level diff: added, removed and reworded principles, tag changes."""
    result = diff_constitutions(_load_or_exit(old), _load_or_exit(new))
    if json_out:
        typer.echo(result.model_dump_json(indent=2))
    else:
        _print_diff(result)
