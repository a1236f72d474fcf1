"""Options and error handling shared by the CLI commands."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic import ValidationError
from rich.console import Console

from cai.engine import EngineConfigError, backend_names, check_engine_spec
from cai.errors import CaiError
from cai.interrupt import sigint_handler
from cai.pipeline import EngineDown, JobCancelled
from cai.recipe import EngineSpec

err_console = Console(stderr=True)

ConstitutionOpt = Annotated[
    str, typer.Option(help="constitution YAML file, FILE@GIT_REV, or a name under constitutions/")
]
EngineOpt = Annotated[
    str, typer.Option(help="auto (vllm if installed, else transformers), " + ", ".join(backend_names())
                      + "; fake answers with canned text and loads no model (a dry run)")
]
ModelOpt = Annotated[
    Optional[str],
    typer.Option(help="model folder or served model name; default: embedded SmolLM2-135M-Instruct"),
]


def absolute_if_path(spec: str) -> str:
    """A file or folder argument as an absolute path (names and FILE@REV stay as given), so the recipe
    in manifest.json still resolves when `cai jobs retry-errors DIR` runs from another folder."""
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


def parse_pairs(items: list[str] | None, flag: str, example: str, json_values: bool = True) -> dict[str, Any]:
    """Repeated KEY=VALUE flags -> dict; with `json_values`, VALUE is JSON when it parses
    (2e-5, true, ["a"]), else the string as given."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{flag} {item!r}: expected KEY=VALUE, e.g. {example}")
        try:
            out[key.strip()] = json.loads(value) if json_values else value
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def engine_spec(backend: str, model: str | None, options: list[str] | None) -> EngineSpec:
    """Build an EngineSpec from CLI flags; `--engine-option k=v` values are parsed as JSON when they can be.
    The backend and its options are checked here (cai.engine.check_engine_spec), before any model
    loads: a typo ends the command with exit code 2 naming the option and the valid ones."""
    parsed = parse_pairs(options, "--engine-option", "base_url=http://127.0.0.1:8000/v1")
    try:
        return check_engine_spec(EngineSpec(backend=backend, model=model, options=parsed))
    except EngineConfigError as exc:
        raise typer.BadParameter(str(exc)) from None


@contextmanager
def fail_on_user_error() -> Iterator[None]:
    """Turn errors caused by input or by an engine unable to do what was asked (CaiError: an old vLLM, a
    server that ignores `continue_final_message`, a tokenizer that cannot spell an option, a bad file)
    into a one-line message and exit code 2, without a traceback. Any other exception is a bug and
    keeps its traceback."""
    try:
        yield
    except (CaiError, FileNotFoundError, ValidationError, RecursionError) as exc:  # RecursionError: too deeply nested
        if os.environ.get("CAI_DEBUG"):
            raise
        err_console.print(f"[red]error:[/] {exc}  (CAI_DEBUG=1 shows the traceback)")
        raise typer.Exit(2) from None


@contextmanager
def stoppable_job() -> Iterator[Callable[[], bool]]:
    """Yield a `stop()` for the pipeline: the first Ctrl-C asks the job to stop after its current
    batch, or sooner inside it at a judge retry or an OpenAI-server request (cai.engine.base.stop_scope:
    the batch in flight and unstarted inputs become `cancelled` rows, a rerun resumes); a second one
    aborts at once.
    Both exit 130; a dead engine ends the command with one line and exit 1."""
    requested = threading.Event()

    def on_interrupt(signum, frame) -> None:
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        err_console.print("[yellow]stopping after the current batch[/] or at its next retry or server request "
                          "(Ctrl-C again to abort now)")

    try:
        with sigint_handler(on_interrupt):
            yield requested.is_set
    except JobCancelled as exc:
        err_console.print(f"[yellow]stopped:[/] {exc}")
        raise typer.Exit(130) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]aborted:[/] the batch in flight is lost; rerun the command to resume")
        raise typer.Exit(130) from None
    except EngineDown as exc:
        err_console.print(f"[red]engine down:[/] {exc}. Finished batches are kept; rerun the command to resume.")
        raise typer.Exit(1) from None
