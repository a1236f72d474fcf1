"""Constitution loading, validation errors (file:line:field), hashing, sampling, diff, git, CLI."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import CONSTITUTIONS, ROOT
from typer.testing import CliRunner

from cai.cli.constitution import app as constitution_app
from cai.constitution import (
    Constitution,
    ConstitutionError,
    Principle,
    load_constitution,
    sample_principle,
    validate_constitution,
)
from cai.constitution_diff import diff_constitutions

SHIPPED = [CONSTITUTIONS / "harmless.yaml", CONSTITUTIONS / "helpful.yaml"]

GOOD = """\
# a comment
name: tiny
version: "1.0.0"
description: A tiny test constitution.
principles:
  - id: alpha
    critique_request: Point out anything harmful.
    revision_request: Rewrite it to be harmless.
    comparison_question: Which of these responses is less harmful?
    tags: [harm]
  - id: beta
    critique_request: Point out anything false.
    revision_request: Rewrite it to be true.
    comparison_question: Which of these responses is more accurate?
  - id: gamma
    critique_request: Point out anything rude.
    revision_request: Rewrite it politely.
    comparison_question: Which of these responses is more polite?
"""

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based line number of the nth line containing `needle`."""
    hits = [i + 1 for i, line in enumerate(text.splitlines()) if needle in line]
    return hits[nth - 1]


def only_error(path: Path) -> ConstitutionError:
    errors = validate_constitution(path)
    assert len(errors) == 1, [str(e) for e in errors]
    with pytest.raises(ConstitutionError) as raised:
        load_constitution(path)
    assert str(raised.value) == str(errors[0])
    return errors[0]


# --------------------------------------------------------------------------- shipped files


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_constitutions_validate(path: Path) -> None:
    assert validate_constitution(path) == []
    loaded = load_constitution(path)
    c = loaded.constitution
    assert c.version == "1.2.0"
    assert loaded.ref.name == c.name == path.stem
    assert len(loaded.ref.sha256) == 64
    assert len(c.principles) >= (12 if c.name == "harmless" else 8)
    for p in c.principles:
        assert p.comparison_question.startswith("Which of these responses")
        assert p.comparison_question.endswith("?")
        assert p.tags
    assert all(p.examples for p in c.principles)


def test_principle_lookup(tmp_path: Path) -> None:
    c = load_constitution(write(tmp_path / "c.yaml", GOOD)).constitution
    assert c.principle("beta").revision_request == "Rewrite it to be true."
    with pytest.raises(KeyError, match="alpha, beta, gamma"):
        c.principle("delta")


def test_strings_are_stripped(tmp_path: Path) -> None:
    text = GOOD.replace("Point out anything false.", "'  Point out anything false.  '")
    c = load_constitution(write(tmp_path / "c.yaml", text)).constitution
    assert c.principle("beta").critique_request == "Point out anything false."


# --------------------------------------------------------------------------- hashing


def test_sha_stable_under_reformatting_and_key_order(tmp_path: Path) -> None:
    base = load_constitution(write(tmp_path / "a.yaml", GOOD)).ref.sha256
    data = yaml.safe_load(GOOD)
    data = {k: data[k] for k in reversed(list(data))}
    data["principles"] = [{k: p[k] for k in sorted(p, reverse=True)} for p in data["principles"]]
    flow = json.dumps(data, indent=1)  # JSON is YAML: different layout, no comments, other key order
    assert load_constitution(write(tmp_path / "b.yaml", flow)).ref.sha256 == base
    explicit_defaults = GOOD.replace("    comparison_question: Which of these responses is more polite?",
                                     "    comparison_question: Which of these responses is more polite?\n    tags: []")
    assert load_constitution(write(tmp_path / "c.yaml", explicit_defaults)).ref.sha256 == base


def test_sha_changes_with_wording(tmp_path: Path) -> None:
    base = load_constitution(write(tmp_path / "a.yaml", GOOD)).ref.sha256
    reworded = GOOD.replace("Rewrite it politely.", "Rewrite it kindly.")
    assert load_constitution(write(tmp_path / "b.yaml", reworded)).ref.sha256 != base


# --------------------------------------------------------------------------- errors


def test_malformed_yaml_reports_line(tmp_path: Path) -> None:
    text = GOOD.replace("    tags: [harm]", "    tags: [harm\n    oops: : :")
    path = write(tmp_path / "bad.yaml", text)
    err = only_error(path)
    assert err.file == str(path)
    assert err.line is not None and line_of(text, "tags: [harm") <= err.line <= line_of(text, "oops")
    assert "invalid YAML" in err.message and "fix" in err.message


def test_non_mapping_file(tmp_path: Path) -> None:
    err = only_error(write(tmp_path / "list.yaml", "- a\n- b\n"))
    assert "expected a mapping" in err.message
    err = only_error(write(tmp_path / "empty.yaml", "# nothing\n"))
    assert "empty file" in err.message


def test_unknown_key(tmp_path: Path) -> None:
    text = GOOD.replace("    revision_request: Rewrite it to be true.",
                        "    revision_request: Rewrite it to be true.\n    critque_request: typo")
    path = write(tmp_path / "unknown.yaml", text)
    err = only_error(path)
    assert (err.file, err.line, err.field) == (str(path), line_of(text, "critque_request"), "principles[1].critque_request")
    assert "unknown key" in err.message and "critique_request" in err.message
    assert str(err).startswith(f"{path}:{err.line}: principles[1].critque_request: unknown key")


def test_unknown_top_level_key(tmp_path: Path) -> None:
    text = GOOD.replace("description:", "author: me\ndescription:")
    err = only_error(write(tmp_path / "top.yaml", text))
    assert (err.line, err.field) == (line_of(text, "author"), "author")


def test_missing_field_points_at_principle(tmp_path: Path) -> None:
    text = GOOD.replace("    comparison_question: Which of these responses is more accurate?\n", "")
    err = only_error(write(tmp_path / "missing.yaml", text))
    assert (err.line, err.field) == (line_of(text, "id: beta"), "principles[1].comparison_question")
    assert "missing" in err.message and "Which of these responses" in err.message


def test_wrong_type(tmp_path: Path) -> None:
    text = GOOD.replace("tags: [harm]", "tags: harm")
    err = only_error(write(tmp_path / "type.yaml", text))
    assert (err.line, err.field) == (line_of(text, "tags: harm"), "principles[0].tags")
    assert "expected a list" in err.message


def test_duplicate_principle_id(tmp_path: Path) -> None:
    text = GOOD.replace("id: gamma", "id: alpha")
    path = write(tmp_path / "dup.yaml", text)
    err = only_error(path)
    assert (err.file, err.line, err.field) == (str(path), line_of(text, "id: alpha", 2), "principles[2].id")
    assert "duplicate principle id 'alpha'" in err.message and "unique" in err.message


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    text = GOOD.replace("    tags: [harm]", "    tags: [harm]\n    tags: [other]")
    err = only_error(write(tmp_path / "dupkey.yaml", text))
    assert (err.line, err.field) == (line_of(text, "tags: [other]"), "principles[0].tags")
    assert "duplicate key" in err.message


DIRECTED = GOOD.replace("    tags: [harm]\n", "    directions:\n      toward: Answer harmlessly.\n"
                        "      away: Answer without caring about harm.\n    tags: [harm]\n")


def test_directions_are_optional_and_checked(tmp_path: Path) -> None:
    c = load_constitution(write(tmp_path / "d.yaml", DIRECTED)).constitution
    assert c.principle("alpha").directions.away == "Answer without caring about harm."
    assert c.principle("beta").directions is None
    same = DIRECTED.replace("away: Answer without caring about harm.", "away: Answer harmlessly.")
    err = only_error(write(tmp_path / "same.yaml", same))
    assert (err.line, err.field) == (line_of(same, "directions:"), "principles[0].directions")
    assert "toward and away are the same text" in err.message
    missing = DIRECTED.replace("      away: Answer without caring about harm.\n", "")
    err = only_error(write(tmp_path / "missing.yaml", missing))
    assert err.field == "principles[0].directions.away" and "opposite behaviour" in err.message
    typo = DIRECTED.replace("away:", "awya:")
    missing_away, unknown = validate_constitution(write(tmp_path / "typo.yaml", typo))
    assert missing_away.field == "principles[0].directions.away"
    assert unknown.field == "principles[0].directions.awya" and "allowed keys: toward, away" in unknown.message


def test_sha_without_directions_is_the_hash_before_they_existed(tmp_path: Path) -> None:
    loaded = load_constitution(write(tmp_path / "a.yaml", GOOD))
    payload = loaded.constitution.model_dump(mode="json")
    assert [p.pop("directions") for p in payload["principles"]] == [None, None, None]
    old = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    assert loaded.ref.sha256 == hashlib.sha256(old.encode()).hexdigest()
    assert load_constitution(write(tmp_path / "d.yaml", DIRECTED)).ref.sha256 != loaded.ref.sha256


@pytest.mark.parametrize("empty", ['""', "'   '"])
def test_empty_request(tmp_path: Path, empty: str) -> None:
    text = GOOD.replace("critique_request: Point out anything rude.", f"critique_request: {empty}")
    path = write(tmp_path / "empty.yaml", text)
    err = only_error(path)
    assert (err.line, err.field) == (line_of(text, f"critique_request: {empty}"), "principles[2].critique_request")
    assert str(err) == (
        f"{path}:{err.line}: principles[2].critique_request: must not be empty"
        " — write the request the model should critique against"
    )


@pytest.mark.parametrize("version", ['"1.0"', "1.0", '"v1.0.0"', '"01.0.0"', "2024-01-01"])
def test_bad_version(tmp_path: Path, version: str) -> None:
    text = GOOD.replace('version: "1.0.0"', f"version: {version}")
    err = only_error(write(tmp_path / "version.yaml", text))
    assert (err.line, err.field) == (line_of(text, "version:"), "version")
    assert '"1.0.0"' in err.message  # says what to write


def test_bad_slug_and_no_principles(tmp_path: Path) -> None:
    text = GOOD.replace("id: beta", "id: Beta_2")
    err = only_error(write(tmp_path / "slug.yaml", text))
    assert (err.line, err.field) == (line_of(text, "Beta_2"), "principles[1].id")
    assert "slug" in err.message
    err = only_error(write(tmp_path / "none.yaml", GOOD.split("principles:")[0] + "principles: []\n"))
    assert err.field == "principles" and "at least one principle" in err.message


def test_all_errors_reported_in_line_order(tmp_path: Path) -> None:
    text = GOOD.replace('"1.0.0"', '"1"').replace("id: beta", "id: BETA").replace("Rewrite it politely.", "''")
    errors = validate_constitution(write(tmp_path / "many.yaml", text))
    assert [e.field for e in errors] == ["version", "principles[1].id", "principles[2].revision_request"]
    assert [e.line for e in errors] == sorted(e.line for e in errors)


def test_missing_file(tmp_path: Path) -> None:
    errors = validate_constitution(tmp_path / "nope.yaml")
    assert len(errors) == 1 and "no such file" in errors[0].message


def test_model_rejects_duplicates_directly() -> None:
    p = Principle(id="a", critique_request="c", revision_request="r", comparison_question="q")
    with pytest.raises(ValueError, match="duplicate principle id"):
        Constitution(name="x", version="1.0.0", description="d", principles=[p, p])


# --------------------------------------------------------------------------- sampling


def test_sampling_deterministic_and_order_independent(tmp_path: Path) -> None:
    c = load_constitution(write(tmp_path / "c.yaml", GOOD)).constitution
    first = [sample_principle(c, 7, "prompt-1", r).id for r in range(20)]
    backwards = [sample_principle(c, 7, "prompt-1", r).id for r in reversed(range(20))][::-1]
    assert first == backwards
    assert [sample_principle(c, 8, "prompt-1", r).id for r in range(20)] != first


def test_sampling_independent_of_hash_seed() -> None:
    code = (
        "from cai.constitution import load_constitution, sample_principle;"
        "c = load_constitution('constitutions/harmless.yaml');"
        "print([sample_principle(c, 3, 'p', i).id for i in range(10)])"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2", "random")
    }
    assert len(outs) == 1


def test_sampling_roughly_uniform(tmp_path: Path) -> None:
    c = load_constitution(write(tmp_path / "c.yaml", GOOD)).constitution
    counts = collections.Counter(sample_principle(c, 0, "prompt", i).id for i in range(3000))
    assert set(counts) == {"alpha", "beta", "gamma"}
    assert all(900 <= n <= 1100 for n in counts.values()), counts


# --------------------------------------------------------------------------- diff


def test_diff_added_removed_reworded(tmp_path: Path) -> None:
    old = load_constitution(write(tmp_path / "old.yaml", GOOD))
    new_text = (
        GOOD.replace('"1.0.0"', '"1.1.0"')
        .replace("Rewrite it to be true.", "Rewrite it so every claim is true.")
        .replace("tags: [harm]", "tags: [harm, safety]")
        .replace("id: gamma", "id: delta")
    )
    new = load_constitution(write(tmp_path / "new.yaml", new_text))
    d = diff_constitutions(old, new)
    assert (d.added, d.removed) == (["delta"], ["gamma"])
    assert [(r.id, [(c.field, c.old, c.new) for c in r.changes]) for r in d.reworded] == [
        ("beta", [("revision_request", "Rewrite it to be true.", "Rewrite it so every claim is true.")])
    ]
    assert [(t.id, t.added, t.removed) for t in d.retagged] == [("alpha", ["safety"], [])]
    assert (d.old.version, d.new.version) == ("1.0.0", "1.1.0")
    assert d.old.sha256 != d.new.sha256 and not d.empty
    assert diff_constitutions(old, old).empty


# --------------------------------------------------------------------------- git


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", *args],
        cwd=repo, capture_output=True, text=True, check=True,
    ).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    repo = tmp_path / "repo"
    (repo / "constitutions").mkdir(parents=True)
    git(repo, "init", "-q")
    write(repo / "constitutions" / "tiny.yaml", GOOD)
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "v1")
    return repo


@needs_git
def test_git_commit_set_for_tracked_clean_file(repo: Path) -> None:
    path = repo / "constitutions" / "tiny.yaml"
    assert load_constitution(path).ref.git_commit == git(repo, "rev-parse", "HEAD")
    write(path, GOOD + "# only a comment\n")
    assert load_constitution(path).ref.git_commit is None  # modified: no commit claimed
    assert validate_constitution(path) == []  # content unchanged: no bump needed


@needs_git
def test_untracked_file_has_no_commit_and_skips_bump_check(repo: Path) -> None:
    path = write(repo / "constitutions" / "new.yaml", GOOD)
    assert load_constitution(path).ref.git_commit is None
    assert validate_constitution(path) == []


@needs_git
def test_wording_change_without_bump_fails(repo: Path) -> None:
    path = repo / "constitutions" / "tiny.yaml"
    write(path, GOOD.replace("Rewrite it politely.", "Rewrite it kindly."))
    errors = validate_constitution(path)
    assert len(errors) == 1, [str(e) for e in errors]
    e = errors[0]
    assert (e.file, e.line, e.field) == (str(path), line_of(GOOD, "version:"), "version")
    assert "bump" in e.message and "1.1.0" in e.message
    load_constitution(path)  # still loadable: only validation enforces the bump

    write(path, GOOD.replace("Rewrite it politely.", "Rewrite it kindly.").replace('"1.0.0"', '"1.0.1"'))
    assert validate_constitution(path) == []


@needs_git
def test_load_at_revision_and_diff_between_revisions(repo: Path) -> None:
    path = repo / "constitutions" / "tiny.yaml"
    v1_commit = git(repo, "rev-parse", "HEAD")
    write(path, GOOD.replace("Rewrite it politely.", "Rewrite it kindly.").replace('"1.0.0"', '"1.1.0"'))
    git(repo, "commit", "-q", "-am", "v1.1")
    git(repo, "commit", "-q", "--allow-empty", "-m", "unrelated")

    old = load_constitution(f"{path}@HEAD~2")
    assert old.constitution.version == "1.0.0"
    assert old.ref.git_commit == v1_commit
    assert old.ref.path == f"{path}@HEAD~2"
    new = load_constitution(path)
    assert new.ref.git_commit == git(repo, "rev-parse", "HEAD~1")  # last commit touching the file
    d = diff_constitutions(old, new)
    assert [r.id for r in d.reworded] == ["gamma"]
    assert (d.old.version, d.new.version) == ("1.0.0", "1.1.0")

    relative = Path(os.path.relpath(path))
    assert load_constitution(f"{relative}@HEAD~2").ref.sha256 == old.ref.sha256


@needs_git
def test_bad_revision(repo: Path) -> None:
    path = repo / "constitutions" / "tiny.yaml"
    errors = validate_constitution(f"{path}@nope")
    assert len(errors) == 1 and "check the revision" in errors[0].message
    assert errors[0].file == f"{path}@nope"


# --------------------------------------------------------------------------- CLI

runner = CliRunner()


def test_cli_validate_ok() -> None:
    result = runner.invoke(constitution_app, ["validate", *map(str, SHIPPED)])
    assert result.exit_code == 0, result.output
    assert result.output.count("OK ") == 2 and "harmless v1.2.0" in result.output


def test_cli_validate_errors(tmp_path: Path) -> None:
    text = GOOD.replace("critique_request: Point out anything rude.", 'critique_request: ""').replace("id: beta", "id: alpha")
    bad = write(tmp_path / "bad.yaml", text)
    result = runner.invoke(constitution_app, ["validate", str(SHIPPED[0]), str(bad)])
    assert result.exit_code == 1
    assert "OK " in result.output
    assert f"{bad}:{line_of(text, 'id: alpha', 2)}: principles[1].id: duplicate principle id 'alpha'" in result.output
    empty_line = line_of(text, 'critique_request: ""')
    assert f"{bad}:{empty_line}: principles[2].critique_request: must not be empty" in result.output
    assert "1 of 2 file(s) failed" in result.output


def test_cli_show() -> None:
    result = runner.invoke(constitution_app, ["show", str(SHIPPED[0])], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    harmless = load_constitution(SHIPPED[0])
    assert "harmless" in result.output and "v1.2.0" in result.output
    assert harmless.ref.sha256[:12] in result.output
    for p in harmless.constitution.principles:
        assert p.id in result.output


def test_cli_show_bad_file(tmp_path: Path) -> None:
    result = runner.invoke(constitution_app, ["show", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1 and "no such file" in result.output


def test_cli_diff(tmp_path: Path) -> None:
    old = write(tmp_path / "old.yaml", GOOD)
    new = write(tmp_path / "new.yaml", GOOD.replace("Rewrite it politely.", "Rewrite it kindly.").replace("id: alpha", "id: omega"))
    result = runner.invoke(constitution_app, ["diff", str(old), str(new)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "+ added    omega" in out and "- removed  alpha" in out and "~ reworded gamma" in out
    assert "- Rewrite it politely." in out and "+ Rewrite it kindly." in out
    assert "version did not" in out
    as_json = runner.invoke(constitution_app, ["diff", "--json", str(old), str(new)])
    assert json.loads(as_json.output)["added"] == ["omega"]


@needs_git
def test_cli_diff_revisions(repo: Path) -> None:
    path = repo / "constitutions" / "tiny.yaml"
    write(path, GOOD.replace("id: gamma", "id: delta").replace('"1.0.0"', '"2.0.0"'))
    git(repo, "commit", "-q", "-am", "v2")
    result = runner.invoke(constitution_app, ["diff", f"{path}@HEAD~1", f"{path}@HEAD"])
    assert result.exit_code == 0, result.output
    assert "+ added    delta" in result.output and "- removed  gamma" in result.output
    assert "v1.0.0" in result.output and "v2.0.0" in result.output


# --------------------------------------------------------------------------- shipped constitutions

SHIPPED_ALL = sorted(CONSTITUTIONS.glob("*.yaml"))
EXAMPLE_WORD_LIMIT = 120  # prompt + answer + critique + revision, in words


def test_shipped_list_covers_harmless_and_helpful() -> None:
    assert set(SHIPPED) <= set(SHIPPED_ALL)


@pytest.mark.parametrize("path", SHIPPED_ALL, ids=lambda p: p.name)
def test_shipped_every_principle_has_short_example(path: Path) -> None:
    c = load_constitution(path).constitution
    missing = [p.id for p in c.principles if not p.examples]
    assert missing == [], f"{path.name}: principles without a few-shot example: {missing}"
    for p in c.principles:
        for ex in p.examples:
            words = sum(len(text.split()) for text in (ex.prompt, ex.answer, ex.critique, ex.revision))
            assert words < EXAMPLE_WORD_LIMIT, f"{path.name}: {p.id} example has {words} words"


def test_harmless_comparison_questions_penalise_evasive_answers() -> None:
    c = load_constitution(CONSTITUTIONS / "harmless.yaml").constitution
    for p in c.principles:
        q = p.comparison_question
        assert "evasive or preachy" in q, f"{p.id}: {q!r} does not ask against evasive or preachy answers"
        assert q.startswith("Which of these responses") and q.endswith("?") and q.count("?") == 1, (p.id, q)
