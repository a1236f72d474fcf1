"""`cai push DIR REPO`, and the `--push-to-hub REPO` options `cai generate` and `cai train` share."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from cai.cli.common import fail_on_user_error
from cai.hub import (
    TOKEN_ENV,
    HubSettings,
    PushResult,
    check_push,
    hub_settings,
    push_dir,
)

console = Console()

PushToHubOpt = Annotated[Optional[str], typer.Option(
    "--push-to-hub", metavar="REPO", help="when done, push the result to this Hugging Face Hub repo "
    "(NAMESPACE/NAME): a dataset with its data card, or a model with its model card")]
HubPrivateOpt = Annotated[bool, typer.Option("--hub-private", help="--push-to-hub: create the repo private")]
TokenEnvOpt = Annotated[str, typer.Option(
    "--token-env", help="environment variable holding the Hugging Face token (read, never written anywhere)")]


def hub_push_settings(repo: str | None, private: bool = False, token_env: str = TOKEN_ENV) -> HubSettings | None:
    """--push-to-hub's settings, checked (repo id, token) before any long work; None without the flag."""
    if repo is None:
        return None
    with fail_on_user_error():
        settings = hub_settings(repo, private=private, token_env=token_env)
        check_push(settings)
    return settings


def push_result(path: str | Path, settings: HubSettings) -> PushResult:
    """Push a finished job or model folder as `--push-to-hub` asked, and say where it went."""
    with fail_on_user_error():
        result = push_dir(path, **settings.model_dump())
    print_push(result)
    return result


def print_push(result: PushResult) -> None:
    console.print(f"[bold]pushed[/]: {result.repo_type} {result.repo_id} ({result.revision}), "
                  f"{len(result.files)} files: {result.commit_url}")


def push(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="a finished job directory or a `cai train` output folder")],
    repo: Annotated[str, typer.Argument(metavar="REPO", help="Hub repo id, NAMESPACE/NAME (created if missing)")],
    private: Annotated[bool, typer.Option("--private", help="create the repo private")] = False,
    revision: Annotated[Optional[str], typer.Option("--revision", "--branch", help="branch to commit to (created if missing); default: main")] = None,
    token_env: TokenEnvOpt = TOKEN_ENV,
    license: Annotated[Optional[str], typer.Option(help="Hub license id for the card, e.g. apache-2.0; default: the card's, else unknown")] = None,
    dataset: Annotated[Optional[list[str]], typer.Option("--dataset", help="model: Hub dataset that trained it, repeatable; default: the one its data job was pushed as")] = None,
    base_model: Annotated[Optional[str], typer.Option(help="model: Hub id of the model it was trained from, when the folder's lineage does not say")] = None,
    include_checkpoints: Annotated[bool, typer.Option("--include-checkpoints", help="model: also upload checkpoint-*/ (optimiser and scheduler states)")] = False,
) -> None:
    """Share a finished job's dataset (with its data card) or a trained model (with a model card naming
    the constitution version and the data that trained it) on the Hugging Face Hub."""
    options: dict[str, Any] = dict(private=private, revision=revision, token_env=token_env, license=license,
                                   datasets=dataset or [], base_model=base_model, include_checkpoints=include_checkpoints)
    with fail_on_user_error():
        result = push_dir(directory, repo, **options)
    print_push(result)
