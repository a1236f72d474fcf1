"""Sharing on the Hugging Face Hub: a finished job's dataset with its data card (a dataset repo), or a
trained model with a model card naming its constitution and data (a model repo), through huggingface_hub.

    cai push DIR REPO                       a job directory or a `cai train` output folder
    cai generate sft|prefs ... --push-to-hub REPO
    cai train sft|rm|dpo|ppo|grpo ... --push-to-hub REPO

The calls are huggingface_hub's: `create_repo(exist_ok=True)`, `create_branch(exist_ok=True)` for a
revision other than main, and one `create_commit` of the files and the README.md card (the library
validates the card's metadata and asks the Hub which files go by LFS before it commits). Only what
belongs is uploaded (cai.hub_cards): the exported data and its card; the weights, tokenizer and config
with the model card, not checkpoints or optimiser states unless asked.

The token is read from an environment variable (HF_TOKEN unless `token_env` names another) when the
push starts and handed to huggingface_hub in memory: it is never written to a file, a card, DIR/hub.json
or an error message. DIR/hub.json records each push (repo, revision, commit), so a model card can
name the Hub dataset its training data was pushed as.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator

from cai import __version__
from cai.files import atomic_write_json
from cai.hub_cards import PushTarget, dataset_target, is_training_output, model_target
from cai.hub_lineage import HUB_RECORD, HubError, hub_pushes
from cai.kinds import open_store
from cai.records import utc_now
from cai.stage_jobs import describe_errors
from cai.store import read_manifest

TOKEN_ENV = "HF_TOKEN"
REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
__all__ = ["HubError", "HubSettings", "PushResult", "check_push", "hub_settings", "push_dir", "push_job_dir",
           "push_model_dir"]


class HubSettings(BaseModel):
    """Where and how to push. `license`: a Hub license id (default: the card's, else `unknown`);
    `datasets` / `base_model`: Hub ids for the model card when the folder's lineage does not name them."""

    repo: str
    private: bool = False
    revision: str | None = None
    token_env: str = TOKEN_ENV
    license: str | None = None
    include_checkpoints: bool = False
    datasets: list[str] = Field(default_factory=list)
    base_model: str | None = None

    @field_validator("repo", "base_model")
    @classmethod
    def _repo_id(cls, repo: str | None) -> str | None:
        if repo is not None and (not REPO_ID.match(repo) or ".." in repo or repo.endswith((".git", "."))):
            raise ValueError(f"{repo!r} is not a Hub repo id: expected NAME or NAMESPACE/NAME "
                             "(letters, digits, '-', '_', '.')")
        return repo

    @field_validator("datasets")
    @classmethod
    def _dataset_ids(cls, repos: list[str]) -> list[str]:
        return [cls._repo_id(repo) for repo in repos]


class PushResult(BaseModel):
    """One push as DIR/hub.json records it (no token)."""

    repo_id: str
    repo_type: str
    revision: str
    url: str
    commit_url: str
    commit_oid: str
    files: list[str]
    pushed_at: str = Field(default_factory=utc_now)


def hub_token(env: str) -> str:
    """The token in $`env`; HubError naming the variable (never its value) when it is unset or empty."""
    token = os.environ.get(env, "").strip()
    if not token:
        raise HubError(f"no Hugging Face token: ${env} is not set. Set it to a token with write access "
                       "(https://huggingface.co/settings/tokens), or name another variable with --token-env")
    return token


def check_push(settings: HubSettings) -> None:
    """What can be checked before a long job or training: the repo id (by HubSettings) and the token."""
    hub_token(settings.token_env)


def hub_settings(repo: str, **options: Any) -> HubSettings:
    """The settings of a push (HubSettings' fields); HubError naming the field when one is not valid."""
    try:
        return HubSettings(repo=repo, **options)
    except ValidationError as exc:
        raise HubError(describe_errors(exc)) from None


def push_dir(path: str | Path, repo: str, *, endpoint: str | None = None, **options: Any) -> PushResult:
    """`cai push DIR REPO`: a job directory (manifest.json) as a dataset, a trained model folder as a
    model. `options`: HubSettings' fields; `endpoint`: the Hub's URL (default: $HF_ENDPOINT, else the Hub)."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return push_job_dir(path, repo, endpoint=endpoint, **options)
    if is_training_output(path):
        return push_model_dir(path, repo, endpoint=endpoint, **options)
    hint = " (a `cai run` directory: push one of its stages, e.g. RUN/01-sft-data or RUN/02-sft)" if (
        path / "run.json").is_file() else ""
    raise HubError(f"{path} is neither a cai job directory (no manifest.json) nor a trained model folder "
                   f"(config.json and weights){hint}")


def push_job_dir(job_dir: str | Path, repo: str, *, endpoint: str | None = None, **options: Any) -> PushResult:
    """A finished sft or prefs job's export and data card, as a Hub dataset (`cai generate --push-to-hub`).
    The job is locked meanwhile: no run rewrites the export while it uploads."""
    settings = hub_settings(repo, **options)
    check_push(settings)
    kind, store = open_store(job_dir)
    with store:
        return upload(dataset_target(store, kind, settings.license), settings, endpoint)


def push_model_dir(model_dir: str | Path, repo: str, *, endpoint: str | None = None, **options: Any) -> PushResult:
    """A `cai train` output folder (weights, tokenizer, config) with its model card, as a Hub model."""
    settings = hub_settings(repo, **options)
    check_push(settings)
    if (Path(model_dir) / "manifest.json").is_file():
        raise HubError(f"{model_dir} is a job directory of kind {read_manifest(model_dir).stage!r}, not a "
                       "trained model; push it as a dataset (`cai push DIR REPO`)")
    target = model_target(Path(model_dir), license=settings.license, include_checkpoints=settings.include_checkpoints,
                          datasets=settings.datasets, base_model=settings.base_model)
    return upload(target, settings, endpoint)


def upload(target: PushTarget, settings: HubSettings, endpoint: str | None = None) -> PushResult:
    """Create the repo (kept if it exists), the branch if asked, and commit the target's files and card."""
    from huggingface_hub import CommitOperationAdd, HfApi

    token = hub_token(settings.token_env)
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token,
                library_name="cai", library_version=__version__)
    revision = settings.revision or "main"
    with _online():
        with _hub_errors(token, settings.repo, target.repo_type):
            url = api.create_repo(settings.repo, repo_type=target.repo_type, private=settings.private or None,
                                  exist_ok=True)
            repo_id = url.repo_id or settings.repo  # a repo given without namespace: the Hub's answer names it
            if revision != "main":
                api.create_branch(repo_id, branch=revision, repo_type=target.repo_type, exist_ok=True)
        card = target.card_for(repo_id).encode("utf-8")
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(target.root / name))
                      for name in target.files]
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
        with _hub_errors(token, repo_id, target.repo_type):
            commit = api.create_commit(repo_id, operations, commit_message=f"{target.title} (cai {__version__})",
                                       repo_type=target.repo_type, revision=revision)
    result = PushResult(repo_id=repo_id, repo_type=target.repo_type, revision=revision, url=str(url),
                        commit_url=commit.commit_url, commit_oid=commit.oid, files=[*target.files, "README.md"])
    record_push(target.root, result)
    return result


def record_push(root: Path, result: PushResult) -> None:
    """Append the push to ROOT/hub.json (what a later model card reads to name the Hub dataset)."""
    atomic_write_json(root / HUB_RECORD, {"pushes": [*hub_pushes(root), result.model_dump(mode="json")]})


@contextmanager
def _online() -> Iterator[None]:
    """Lift huggingface_hub's offline mode for the push's own calls. cai sets HF_HUB_OFFLINE itself to
    load local models (the embedded model's conversion, vLLM) and it stays set in that process, which
    must not stop a push asked for after training there."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


@contextmanager
def _hub_errors(token: str, repo: str, repo_type: str) -> Iterator[None]:
    """Any failure of the Hub calls (HTTP status, a refused connection, invalid card metadata) as one
    HubError line, with the token masked should a message ever echo it."""
    try:
        yield
    except Exception as exc:  # the Hub client raises its HTTP library's own error types
        message = str(exc).replace(token, "<token>") or type(exc).__name__
        raise HubError(f"pushing to {repo_type} repo {repo!r} failed: {message}") from None
