"""`cai constitution diff --format markdown [--job DIR]`: a pull-request comment with principle-level
changes, the version change and how many rows of a job each changed principle touches."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from fakes import alternating_sampler, judge_preferring
from helpers import write_prompts
from typer.testing import CliRunner

from cai.cli import app
from cai.engine.fake import FakeEngine
from cai.pipeline import generate_prefs
from cai.recipe import PrefsJob


def principle(pid: str, critique: str, toward: str | None = None) -> str:
    text = (f"  - id: {pid}\n    critique_request: {critique}\n    revision_request: Rewrite it for {pid}.\n"
            f"    comparison_question: Which answer is better for {pid}?\n")
    if toward:
        text += f"    directions:\n      toward: {toward}\n      away: Ignore {pid}.\n"
    return text


def constitution(path: Path, version: str, *principles: str) -> str:
    path.write_text(f'name: team\nversion: "{version}"\ndescription: Review test.\nprinciples:\n'
                    + "".join(principles))
    return str(path)


@pytest.fixture
def old_new(tmp_path: Path) -> tuple[str, str]:
    old = constitution(tmp_path / "old.yaml", "1.0.0",
                       principle("alpha", "Find alpha problems.", "Be alpha."),
                       principle("beta", "Find beta problems."),
                       principle("gamma", "Find gamma problems."))
    new = constitution(tmp_path / "new.yaml", "1.1.0",
                       principle("alpha", "Find alpha problems.", "Be very alpha."),  # directions reworded
                       principle("gamma", "Find gamma | problems."),  # critique reworded, a pipe to escape
                       principle("delta", "Find delta problems."))  # added; beta removed
    return old, new


@pytest.fixture
def prefs_job(tmp_path: Path, old_new) -> tuple[Path, Counter]:
    """A prefs job on the old constitution: one pair (so one principle) per prompt; the principle of
    each exported row counted from its metadata."""
    prompts = write_prompts(tmp_path / "p.jsonl", [f"question {i}" for i in range(8)])
    job = PrefsJob(constitution=old_new[0], prompts=str(prompts), out=str(tmp_path / "job"))
    engine = FakeEngine(alternating_sampler(), chooser=judge_preferring("good", 0.9))
    summary = generate_prefs(job, policy_engine=engine, judge_engine=engine)
    rows = [json.loads(line) for line in (Path(summary.out) / "prefs.jsonl").open()]
    assert len(rows) == 8 and all(r["metadata"]["principle_ids"] == [r["metadata"]["principle_id"]] for r in rows)
    return Path(summary.out), Counter(r["metadata"]["principle_id"] for r in rows)


def diff(*args: str) -> str:
    result = CliRunner().invoke(app, ["constitution", "diff", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_markdown_without_job(old_new):
    md = diff(*old_new, "--format", "markdown")
    assert md.startswith("### Constitution `team`: v1.0.0 → v1.1.0\n")
    assert "| change | principle | what |\n|---|---|---|\n" in md
    assert "| added | `delta` |  |" in md and "| removed | `beta` |  |" in md
    assert "| reworded | `alpha` | directions |" in md and "| reworded | `gamma` | critique_request |" in md
    assert "```diff\n- Find gamma problems.\n+ Find gamma | problems.\n```" in md
    assert '"toward": "Be very alpha."' in md and "<details><summary><code>alpha</code>" in md
    assert "WARNING" not in md and "rows in job" not in md


def test_markdown_warns_on_missing_bump(tmp_path, old_new):
    same = constitution(tmp_path / "same.yaml", "1.0.0", principle("alpha", "Reworded.", "Be alpha."))
    md = diff(old_new[0], same, "--format=markdown")
    assert "> [!WARNING]\n> The content changed but the version did not: bump it." in md


def test_markdown_and_text_count_job_rows(old_new, prefs_job):
    job_dir, used = prefs_job
    assert sum(used.values()) == 8 and len(used) >= 2  # 8 rows spread over the three principles
    touched = used["alpha"] + used["beta"] + used["gamma"]  # every old principle was reworded or removed
    md = diff(*old_new, "--format", "markdown", "--job", str(job_dir))
    assert "| change | principle | what | rows in job |" in md
    assert "| added | `delta` |  | — |" in md
    assert f"| removed | `beta` |  | {used['beta']} |" in md
    assert f"| reworded | `alpha` | directions | {used['alpha']} |" in md
    assert f"| reworded | `gamma` | critique_request | {used['gamma']} |" in md
    assert "job job (prefs): 8 rows, 8 made with team (v1.0.0: 8)." in md
    assert f"{touched} of 8 rows (100%) use a removed or reworded principle." in md

    text = diff(*old_new, "--job", str(job_dir))
    assert f"    beta: {used['beta']} rows" in text and f"    gamma: {used['gamma']} rows" in text
    assert "8 of 8 rows (100%) use a removed or reworded principle" in text

    payload = json.loads(diff(*old_new, "--json", "--job", str(job_dir)))
    assert payload["impact"]["by_principle"] == dict(used) and payload["impact"]["touched"] == 8


def test_only_reworded_principles_touch_rows(tmp_path, old_new, prefs_job):
    job_dir, used = prefs_job
    only_beta = constitution(tmp_path / "b.yaml", "1.0.1",
                             principle("alpha", "Find alpha problems.", "Be alpha."),
                             principle("beta", "Find beta problems, reworded."),
                             principle("gamma", "Find gamma problems."))
    md = diff(old_new[0], only_beta, "--format", "markdown", "--job", str(job_dir))
    share = f"{used['beta'] / 8:.0%}"
    assert f"{used['beta']} of 8 rows ({share}) use a removed or reworded principle." in md
    assert "`alpha`" not in md.split("<details>")[0]


def test_job_that_is_not_a_job(tmp_path, old_new):
    result = CliRunner().invoke(app, ["constitution", "diff", *old_new, "--job", str(tmp_path)])
    assert result.exit_code == 1 and str(tmp_path) in result.output
