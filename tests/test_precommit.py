"""The pre-commit hook in .pre-commit-hooks.yaml: `cai constitution validate` on changed constitution
files, with the version-bump check against HEAD, $PRE_COMMIT_FROM_REF or --against REV."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml
from helpers import ROOT
from typer.testing import CliRunner

from cai.cli import app

HOOK_ID = "cai-constitution-validate"
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}

TEMPLATE = """\
name: team
version: "{version}"
description: A team's constitution under review.
principles:
  - id: no-harm
    critique_request: "{critique}"
    revision_request: Rewrite the answer without the harmful parts.
    comparison_question: Which answer is less harmful?
  - id: honest
    critique_request: Point out claims in the answer that are not true.
    revision_request: Rewrite the answer so every claim is true.
    comparison_question: Which answer is more honest?
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, env={**os.environ, **GIT_ENV}, check=True,
                          capture_output=True, text=True).stdout.strip()


def write(repo: Path, version: str, critique: str, name: str = "team.yaml") -> str:
    path = repo / "constitutions" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(TEMPLATE.format(version=version, critique=critique))
    return f"constitutions/{name}"


@pytest.fixture
def team_repo(tmp_path: Path) -> Path:
    """A team's repository with constitutions/team.yaml v1.0.0 committed."""
    repo = tmp_path / "team"
    repo.mkdir()
    git(repo, "init", "-q")
    write(repo, "1.0.0", "Point out anything harmful in the answer.")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "constitution 1.0.0")
    return repo


def hook() -> dict:
    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    return next(h for h in hooks if h["id"] == HOOK_ID)


def run_hook(repo: Path, files: list[str], monkeypatch, from_ref: str | None = None, args: list[str] = ()):
    """The hook's entry with its args and the filenames, as pre-commit runs it (in the repo's root)."""
    entry = shlex.split(hook()["entry"])
    assert entry[:1] == ["cai"]
    monkeypatch.chdir(repo)
    if from_ref is None:
        monkeypatch.delenv("PRE_COMMIT_FROM_REF", raising=False)
    else:
        monkeypatch.setenv("PRE_COMMIT_FROM_REF", from_ref)
    return CliRunner().invoke(app, [*entry[1:], *args, *files])


def test_hook_manifest_matches_constitution_files():
    h = hook()
    assert h["language"] == "python" and h["entry"] == "cai constitution validate"
    assert h.get("pass_filenames", True)
    pattern = re.compile(h["files"])
    assert pattern.search("constitutions/harmless.yaml") and not pattern.search("recipes/cpu.yaml")


def test_reword_without_bump_fails_naming_file_and_bump(team_repo, monkeypatch):
    spec = write(team_repo, "1.0.0", "Point out anything harmful or dangerous in the answer.")
    result = run_hook(team_repo, [spec], monkeypatch)
    assert result.exit_code == 1
    # the file, the line of `version:` (line 2), the base version and the bump to make
    assert f"{spec}:2: version: content changed since HEAD (version 1.0.0) but version is 1.0.0" in result.output
    assert 'bump it, e.g. to "1.1.0"' in result.output

    write(team_repo, "1.1.0", "Point out anything harmful or dangerous in the answer.")
    result = run_hook(team_repo, [spec], monkeypatch)
    assert result.exit_code == 0, result.output
    assert f"OK {spec}: team v1.1.0" in result.output


def test_several_files_each_reported(team_repo, monkeypatch):
    bad = write(team_repo, "1.0.0", "Reworded without a bump.")
    new = write(team_repo, "0.1.0", "A new file needs no bump.", name="new.yaml")
    result = run_hook(team_repo, [new, bad], monkeypatch)
    assert result.exit_code == 1
    assert f"OK {new}: team v0.1.0" in result.output and f"{bad}:2: version" in result.output
    assert "1 of 2 file(s) failed validation" in result.output


def test_base_revision_from_pre_commit_or_args(team_repo, monkeypatch):
    """A branch bumps once (1.1.0) then rewords again: against HEAD that is a missing bump, against the
    branch's base (pre-push's PRE_COMMIT_FROM_REF, or args: [--against, REV]) it is fine."""
    base = git(team_repo, "rev-parse", "HEAD")
    spec = write(team_repo, "1.1.0", "First rewording.")
    git(team_repo, "commit", "-qam", "1.1.0")
    write(team_repo, "1.1.0", "Second rewording, same pull request.")
    assert run_hook(team_repo, [spec], monkeypatch).exit_code == 1
    assert run_hook(team_repo, [spec], monkeypatch, from_ref=base).exit_code == 0
    assert run_hook(team_repo, [spec], monkeypatch, args=["--against", base]).exit_code == 0
    # --against wins over the environment; against the base the version must still exceed 1.0.0
    write(team_repo, "1.0.0", "Second rewording, same pull request.")
    result = run_hook(team_repo, [spec], monkeypatch, from_ref="HEAD", args=["--against", base])
    assert result.exit_code == 1
    assert f"content changed since {base[:12]} (version 1.0.0) but version is 1.0.0" in result.output


def test_schema_errors_still_reported_with_a_base_revision(team_repo, monkeypatch):
    base = git(team_repo, "rev-parse", "HEAD")
    path = team_repo / "constitutions" / "team.yaml"
    path.write_text(path.read_text().replace("id: honest", "id: no-harm"))
    result = run_hook(team_repo, ["constitutions/team.yaml"], monkeypatch, args=["--against", base])
    assert result.exit_code == 1 and "no-harm" in result.output and "version" not in result.output


def _hook_repo(tmp_path: Path) -> Path:
    """cai's working tree as a committed repository (try-repo clones a commit: untracked files such as
    a new .pre-commit-hooks.yaml would be left out of a shadow copy of this checkout)."""
    repo = tmp_path / "cai-hook"
    repo.mkdir()
    for name in ("pyproject.toml", "README.md", ".pre-commit-hooks.yaml"):
        shutil.copy2(ROOT / name, repo / name)
    for package in ("cai", "serve"):
        shutil.copytree(ROOT / package, repo / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "cai")
    return repo


@pytest.mark.timeout(600)
def test_pre_commit_try_repo(team_repo, tmp_path):
    """pre-commit's own try-repo: it installs cai into a fresh virtualenv (`pip install .`) and runs the
    hook on the file. cai's dependencies are made visible through PYTHONPATH so pip finds them
    satisfied instead of downloading torch and the rest into pre-commit's cache (~35 s, not many minutes)."""
    pre_commit = shutil.which("pre-commit", path=str(Path(sys.executable).parent))
    if pre_commit is None:
        pytest.skip("pre-commit is not installed (pip install pre-commit)")
    hook_repo = _hook_repo(tmp_path)
    env = {**os.environ, **GIT_ENV, "PRE_COMMIT_HOME": str(tmp_path / "pc-cache"),
           "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    env.pop("PRE_COMMIT_FROM_REF", None)
    spec = write(team_repo, "1.0.0", "Point out anything harmful or dangerous in the answer.")

    def try_repo():
        return subprocess.run([pre_commit, "try-repo", str(hook_repo), HOOK_ID, "--files", spec, "--verbose"],
                              cwd=team_repo, env=env, capture_output=True, text=True, timeout=540)

    failed = try_repo()
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "Failed" in failed.stdout
    assert f"{spec}:2: version: content changed since HEAD (version 1.0.0) but version is 1.0.0" in failed.stdout
    write(team_repo, "1.1.0", "Point out anything harmful or dangerous in the answer.")
    passed = try_repo()
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "Passed" in passed.stdout and f"OK {spec}: team v1.1.0" in passed.stdout
