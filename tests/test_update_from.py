"""`--update-from OLD`: rows whose principles did not change are carried over (no engine call), the
others regenerated exactly as a full run under the new constitution writes them."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import HARMLESS, write_prompts
from typer.testing import CliRunner

from cai.engine.fake import FakeEngine
from cai.errors import CaiError
from cai.pipeline import JobCancelled, generate_prefs, generate_sft
from cai.recipe import Phase1Config, Phase2Config, PrefsJob, SFTJob
from cai.records import SamplingParams

QUESTIONS = [f"question number {i}" for i in range(12)]


def seeded(chat, params) -> str:
    """Names the request's seed and what it was asked, so a row shows its seed and its principle's text."""
    last = chat[-1].content
    return f"seed {params.seed} says {' '.join(last.split()[:12])}"


def constitution(tmp_path: Path, name: str, edit=None) -> str:
    """harmless.yaml with `edit(data)` applied and the version bumped, as a new file."""
    data = yaml.safe_load(Path(HARMLESS).read_text())
    if edit is not None:
        edit(data)
        data["version"] = "9.0.0"
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def reword(pid: str, field: str = "critique_request"):
    def edit(data):
        principle = next(p for p in data["principles"] if p["id"] == pid)
        principle[field] = principle[field].rstrip(".") + ", and be kinder about it."
    return edit


def remove(pid: str):
    def edit(data):
        data["principles"] = [p for p in data["principles"] if p["id"] != pid]
    return edit


def sft_job(tmp_path: Path, out: str, const: str, **kw) -> SFTJob:
    prompts = write_prompts(tmp_path / "p.jsonl", kw.pop("questions", QUESTIONS))
    params = SamplingParams(max_tokens=64, temperature=0.7, seed=100)
    return SFTJob(constitution=const, prompts=str(prompts), out=str(tmp_path / out), batch_size=4,
                  phase1=Phase1Config(rounds=2, answer=params, critique=params, revision=params), **kw)


def rows(job_dir: str, stage: str = "sft") -> dict[str, list[dict]]:
    """A job's rows by their prompt's text."""
    out: dict[str, list[dict]] = {}
    for shard in sorted((Path(job_dir) / "shards").glob(f"{stage}-*.jsonl")):
        for line in shard.read_text().splitlines():
            row = json.loads(line)
            out.setdefault(row["prompt"][-1]["content"], []).append(row)
    return out


def without_time(rows_of: list[dict]) -> list[dict]:
    return [{**r, "lineage": {k: v for k, v in r["lineage"].items() if k != "created_at"}} for r in rows_of]


def answered(engine: FakeEngine) -> list[str]:
    """The prompts the engine was asked to answer (the answer step's chats end with the prompt)."""
    return [chat[-1].content for batch in engine.batches for chat in batch if chat[-1].content in QUESTIONS]


def check_update(old: dict, new: dict, full: dict, regenerated: set[str]) -> None:
    assert new.keys() == full.keys() == old.keys()
    for pid in new:
        if pid in regenerated:
            assert without_time(new[pid]) == without_time(full[pid]), pid
        else:
            assert new[pid] == old[pid], pid  # carried over as it was, lineage and timestamp included


def test_a_reworded_principle_regenerates_only_its_rows(tmp_path):
    v1 = constitution(tmp_path, "v1")
    old = generate_sft(sft_job(tmp_path, "old", v1), engine=FakeEngine(seeded))
    old_rows = rows(old.out)
    changed = old_rows[QUESTIONS[0]][0]["lineage"]["principle_ids"][0]
    touched = {p for p, r in old_rows.items() if changed in r[0]["lineage"]["principle_ids"]}
    assert 0 < len(touched) < len(QUESTIONS)
    v2 = constitution(tmp_path, "v2", reword(changed))
    full = generate_sft(sft_job(tmp_path, "full", v2), engine=FakeEngine(seeded))
    engine = FakeEngine(seeded)
    new = generate_sft(sft_job(tmp_path, "new", v2, update_from=old.out), engine=engine)

    assert sorted(answered(engine)) == sorted(touched)
    assert sum(len(b) for b in engine.batches) == 5 * len(touched)  # answer + 2 x (critique, revision)
    check_update(old_rows, rows(new.out), rows(full.out), touched)
    report = json.loads((Path(new.out) / "update.json").read_text())
    assert report["reused"] == len(QUESTIONS) - len(touched) and report["regenerated"] == {"changed": len(touched)}
    assert report["by_principle"][changed] == {"reused": 0, "regenerated": len(touched)}
    assert all(c["regenerated"] == 0 for pid, c in report["by_principle"].items() if pid != changed)
    card = (Path(new.out) / "README.md").read_text()
    assert "## Updated from `old`" in card
    assert f"| {changed} | reworded | 0 | {len(touched)} |" in card and "critique_request" in card
    manifest = json.loads((Path(new.out) / "manifest.json").read_text())
    old_fingerprint = json.loads((Path(old.out) / "manifest.json").read_text())["fingerprint"]
    assert manifest["fingerprint_inputs"]["updated_from"]["fingerprint"] == old_fingerprint
    assert manifest["fingerprint_inputs"]["constitution"]["version"] == "9.0.0"
    assert manifest["recipe"]["update_from"] == old.out
    assert new.done_now == len(QUESTIONS) and len((Path(new.out) / "sft.jsonl").read_text().splitlines()) == 12
    new_rows = rows(new.out)  # the summary's tokens are this run's: the regenerated rows' alone
    regenerated_steps = [step for p in touched for step in new_rows[p][0]["trajectory"]]
    assert new.generated_tokens_now == sum(step["completion_tokens"] for step in regenerated_steps)


def test_a_removed_principle_regenerates_its_rows_and_the_rows_drawn_again(tmp_path):
    v1 = constitution(tmp_path, "v1")
    old = generate_sft(sft_job(tmp_path, "old", v1), engine=FakeEngine(seeded))
    old_rows = rows(old.out)
    gone = old_rows[QUESTIONS[3]][0]["lineage"]["principle_ids"][1]
    v2 = constitution(tmp_path, "v2", remove(gone))
    full = generate_sft(sft_job(tmp_path, "full", v2), engine=FakeEngine(seeded))
    engine = FakeEngine(seeded)
    new = generate_sft(sft_job(tmp_path, "new", v2, update_from=old.out), engine=engine)
    full_rows = rows(full.out)
    # regenerated: every row whose principles differ under v2 (the removed one's, and the draws it moved)
    drawn = lambda rows_of: rows_of[0]["lineage"]["principle_ids"]  # noqa: E731
    redone = {p for p in old_rows if drawn(old_rows[p]) != drawn(full_rows[p])}
    assert {p for p in old_rows if gone in old_rows[p][0]["lineage"]["principle_ids"]} <= redone
    check_update(old_rows, rows(new.out), full_rows, redone)
    assert sorted(answered(engine)) == sorted(redone)
    report = json.loads((Path(new.out) / "update.json").read_text())
    assert report["reused"] == len(QUESTIONS) - len(redone) and sum(report["regenerated"].values()) == len(redone)
    assert report["by_principle"][gone]["regenerated"] >= 1
    assert f"| {gone} | removed |" in (Path(new.out) / "README.md").read_text()


def test_error_rows_are_regenerated_and_an_unchanged_constitution_reuses_the_rest(tmp_path):
    def flaky(chat, params):
        return "word " * 80 if "number 5" in chat[-1].content else seeded(chat, params)

    v1 = constitution(tmp_path, "v1")
    old = generate_sft(sft_job(tmp_path, "old", v1), engine=FakeEngine(flaky))
    assert rows(old.out)[QUESTIONS[5]][0]["error"]["code"] == "truncated"
    engine = FakeEngine(seeded)
    new = generate_sft(sft_job(tmp_path, "new", v1, update_from=old.out), engine=engine)
    assert answered(engine) == ["question number 5"]
    assert rows(new.out)[QUESTIONS[5]][0]["error"] is None
    report = json.loads((Path(new.out) / "update.json").read_text())
    assert report["regenerated"] == {"error": 1} and report["reused"] == 11 and report["diffs"] == []


def test_an_update_stopped_midway_resumes_exactly_once(tmp_path):
    v1 = constitution(tmp_path, "v1")
    old = generate_sft(sft_job(tmp_path, "old", v1), engine=FakeEngine(seeded))
    changed = rows(old.out)[QUESTIONS[5]][0]["lineage"]["principle_ids"][0]
    v2 = constitution(tmp_path, "v2", reword(changed))
    reference = generate_sft(sft_job(tmp_path, "ref", v2, update_from=old.out), engine=FakeEngine(seeded))
    shards = tmp_path / "new" / "shards"
    with pytest.raises(JobCancelled):
        generate_sft(sft_job(tmp_path, "new", v2, update_from=old.out), engine=FakeEngine(seeded),
                     stop=lambda: any(shards.glob("sft-*.jsonl")))
    summary = generate_sft(sft_job(tmp_path, "new", v2, update_from=old.out), engine=FakeEngine(seeded))
    assert 0 < summary.done_before < len(QUESTIONS)
    got = rows(summary.out)
    assert all(len(r) == 1 for r in got.values()) and len(got) == len(QUESTIONS)
    assert {p: without_time(r) for p, r in got.items()} == {p: without_time(r) for p, r in rows(reference.out).items()}


def test_an_unrelated_old_job_is_refused(tmp_path):
    v1 = constitution(tmp_path, "v1")
    old = generate_sft(sft_job(tmp_path, "old", v1), engine=FakeEngine(seeded))
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(CaiError, match="changed: prompts"):
        generate_sft(sft_job(other, "new", v1, update_from=old.out, questions=["another question"]),
                     engine=FakeEngine(seeded))
    with pytest.raises(CaiError, match="changed: model"):
        generate_sft(sft_job(tmp_path, "new", v1, update_from=old.out), engine=FakeEngine(seeded, model_id="other"))
    with pytest.raises(CaiError, match="a sft job; a prefs update needs a prefs job"):
        generate_prefs(prefs_job(tmp_path, "new", v1, update_from=old.out), policy_engine=FakeEngine(seeded))
    with pytest.raises(CaiError, match="not a job directory"):
        generate_sft(sft_job(tmp_path, "new", v1, update_from=str(tmp_path / "nowhere")), engine=FakeEngine(seeded))
    assert not (tmp_path / "new").exists()  # refused before the new job was written


def test_the_old_constitution_comes_from_the_old_job_after_the_file_changed(tmp_path):
    v1 = constitution(tmp_path, "harmless")
    old = generate_sft(sft_job(tmp_path, "old", v1), engine=FakeEngine(seeded))
    changed = rows(old.out)[QUESTIONS[0]][0]["lineage"]["principle_ids"][0]
    constitution(tmp_path, "harmless", reword(changed))  # edited in place
    new = generate_sft(sft_job(tmp_path, "new", v1, update_from=old.out), engine=FakeEngine(seeded))
    assert json.loads((Path(new.out) / "update.json").read_text())["regenerated"].keys() == {"changed"}
    (Path(old.out) / "constitutions.json").unlink()  # a job made before jobs kept their constitutions
    with pytest.raises(CaiError, match="cannot find the text of constitution `harmless` v1.2.0"):
        generate_sft(sft_job(tmp_path, "again", v1, update_from=old.out), engine=FakeEngine(seeded))


def test_a_job_without_its_constitutions_finds_the_old_text_in_git_history(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = lambda *args: subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    const = constitution(repo, "mine")
    git("add", "mine.yaml")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "v1")
    old = generate_sft(sft_job(tmp_path, "old", const), engine=FakeEngine(seeded))
    (Path(old.out) / "constitutions.json").unlink()
    changed = rows(old.out)[QUESTIONS[0]][0]["lineage"]["principle_ids"][0]
    constitution(repo, "mine", reword(changed))  # edited in place, not committed: HEAD holds the old text
    new = generate_sft(sft_job(tmp_path, "new", const, update_from=old.out), engine=FakeEngine(seeded))
    report = json.loads((Path(new.out) / "update.json").read_text())
    assert report["regenerated"].keys() == {"changed"} and report["diffs"][0]["new"]["version"] == "9.0.0"


# ---------------------------------------------------------------- phase 2


def judged_by_question(chat, options, prefix):
    """Prefers the answer with the larger seed; less sure under a question asking for kindness."""
    text = chat[-1].content
    p = 0.7 if "kinder" in text else 0.9
    a, b = (int(text[text.index(f"({x})"):].split("seed ")[1].split()[0]) for x in "AB")
    return {"A": math.log(p if a > b else 1 - p), "B": math.log(1 - p if a > b else p)}


def prefs_job(tmp_path: Path, out: str, const: str, labeller: str = "judge", **kw) -> PrefsJob:
    prompts = write_prompts(tmp_path / "p.jsonl", QUESTIONS)
    config = Phase2Config(samples=2 if labeller != "judge" else 3, labeller=labeller,
                          policy=SamplingParams(temperature=0.8, max_tokens=64, seed=7))
    return PrefsJob(constitution=const, prompts=str(prompts), out=str(tmp_path / out), batch_size=4, phase2=config,
                    **kw)


def prefs_run(job: PrefsJob) -> tuple[FakeEngine, FakeEngine, object]:
    policy, judge = FakeEngine(seeded), FakeEngine(chooser=judged_by_question)
    summary = generate_prefs(job, policy_engine=policy, judge_engine=judge)
    return policy, judge, summary


def judged_prompts(judge: FakeEngine) -> set[str]:
    return {q for batch in judge.choice_batches for chat in batch for q in QUESTIONS if q in chat[-1].content}


@pytest.mark.parametrize("labeller, field", [("judge", "comparison_question"), ("contrastive", "directions")])
def test_prefs_update_rejudges_and_resamples_only_the_affected_prompts(tmp_path, labeller, field):
    v1 = constitution(tmp_path, "v1")
    _, _, old = prefs_run(prefs_job(tmp_path, "old", v1, labeller))
    old_rows = rows(old.out, "prefs")
    changed = old_rows[QUESTIONS[2]][0]["lineage"]["principle_ids"][0]

    def edit(data):
        principle = next(p for p in data["principles"] if p["id"] == changed)
        if field == "directions":
            principle["directions"]["toward"] += " Be kinder."
        else:
            principle[field] = principle[field].replace("?", ", the kinder one?")
    v2 = constitution(tmp_path, "v2", edit)
    _, _, full = prefs_run(prefs_job(tmp_path, "full", v2, labeller))
    policy, judge, new = prefs_run(prefs_job(tmp_path, "new", v2, labeller, update_from=old.out))

    touched = {p for p, r in old_rows.items() if any(changed in x["lineage"]["principle_ids"] for x in r)}
    assert 0 < len(touched) < len(QUESTIONS)
    check_update(old_rows, rows(new.out, "prefs"), rows(full.out, "prefs"), touched)
    asked = {q for batch in policy.batches for chat in batch for q in QUESTIONS if q in chat[-1].content}
    if labeller == "judge":  # answers use no principle: all carried over, only the judging is redone
        assert policy.batches == [] and judged_prompts(judge) == touched
        assert rows(new.out, "samples") == rows(old.out, "samples")
    else:
        assert asked == touched and judge.choice_batches == []
        assert {p: without_time(r) for p, r in rows(new.out, "prefs").items() if p in touched} != \
            {p: without_time(r) for p, r in old_rows.items() if p in touched}
    report = json.loads((Path(new.out) / "update.json").read_text())
    assert report["unit"] == "prompts" and report["regenerated"] == {"changed": len(touched)}
    assert report["resampled"] == (0 if labeller == "judge" else len(touched))
    assert "## Updated from" in (Path(new.out) / "README.md").read_text()


def test_cli_update_after_editing_one_principle_in_place(tmp_path):
    from cai.cli import app

    const = constitution(tmp_path, "mine")
    prompts = write_prompts(tmp_path / "p.jsonl", QUESTIONS)
    base = ["generate", "sft", "--engine", "fake", "--constitution", const, "--prompts", str(prompts),
            "--rounds", "1", "--show", "0", "--batch-size", "4"]
    first = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "old")])
    assert first.exit_code == 0, first.output
    old_rows = rows(str(tmp_path / "old"))
    changed = old_rows[QUESTIONS[0]][0]["lineage"]["principle_ids"][0]
    touched = sum(changed in r[0]["lineage"]["principle_ids"] for r in old_rows.values())
    constitution(tmp_path, "mine", reword(changed, "revision_request"))
    result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "new"), "--update-from", str(tmp_path / "old")])
    assert result.exit_code == 0, result.output
    assert f"{len(QUESTIONS) - touched} rows reused, {touched} regenerated" in " ".join(result.output.split())
    card = (tmp_path / "new" / "README.md").read_text()
    table = [line for line in card.splitlines() if line.startswith("| ") and " | reworded | " in line]
    assert table == [f"| {changed} | reworded | 0 | {touched} |"]
    assert "v1.2.0 → v9.0.0" in card and "revision_request" in card
