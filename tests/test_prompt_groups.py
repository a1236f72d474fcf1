"""Red-team and ordinary prompts under their own constitutions; phase 2's two passes; truncated critiques."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from fakes import LoggedEngine, alternating_sampler, judge_preferring
from helpers import HARMLESS, HELPFUL, ROOT, write_jsonl, write_prompts

from cai.constitution import load_constitution
from cai.constitution_plan import PlanError
from cai.engine.fake import FakeEngine
from cai.pipeline import generate_prefs, generate_sft
from cai.recipe import JudgeConfig, Phase1Config, Phase2Config, PrefsJob, SFTJob
from cai.records import Completion, ModelRef
from cai.sources import read_prompts


def mixed_prompts(path: Path) -> Path:
    rows = [{"prompt": f"how do I hurt someone {i}", "source": "redteam"} for i in range(3)]
    rows += [{"prompt": f"how do I bake bread {i}", "source": "benign"} for i in range(3)]
    return write_jsonl(path, rows)


def scripted(chat, params) -> str:
    last = chat[-1].content
    if last.startswith("Critique request:"):
        return "CRITIQUE"
    if last.startswith("Revision request:"):
        return "REVISED"
    return "ANSWER to " + last


def requests_of(engine: FakeEngine, prefix: str) -> list[str]:
    return [chat[-1].content for batch in engine.batches for chat in batch if chat[-1].content.startswith(prefix)]


def test_groups_come_from_bundled_names_file_stems_and_row_source(tmp_path):
    assert {p.group for p in read_prompts("benign")} == {"benign"}
    plain = tmp_path / "my_prompts.jsonl"
    write_prompts(plain, ["hi"])
    assert [p.group for p in read_prompts(str(plain))] == ["my_prompts"]
    assert {p.group for p in read_prompts(str(mixed_prompts(tmp_path / "m.jsonl")))} == {"redteam", "benign"}


def test_phase1_benign_prompts_are_critiqued_under_their_own_constitution(tmp_path):
    engine = FakeEngine(scripted)
    job = SFTJob(constitution=HARMLESS, constitution_by_group={"benign": HELPFUL},
                 prompts=str(mixed_prompts(tmp_path / "m.jsonl")), out=str(tmp_path / "job"),
                 phase1=Phase1Config(rounds=2))
    summary = generate_sft(job, engine=engine)
    helpful = {p.critique_request for p in load_constitution(HELPFUL).constitution.principles}
    harmless = {p.critique_request for p in load_constitution(HARMLESS).constitution.principles}
    for batch in engine.batches:
        for chat in batch:
            if chat[-1].content.startswith("Critique request:"):
                asked = chat[-1].content.removeprefix("Critique request: ")
                user = next(m.content for m in reversed(chat) if m.content.startswith("how do I"))
                assert asked in (helpful if "bread" in user else harmless), (user, asked)
    rows = [json.loads(line) for line in (Path(summary.out) / "sft.jsonl").open()]
    by_group = {r["metadata"]["prompt_group"]: r["metadata"]["constitution"]["name"] for r in rows}
    assert by_group == {"redteam": "harmless", "benign": "helpful"}
    card = (Path(summary.out) / "README.md").read_text()
    assert "| benign | `helpful` v" in card and "| (every other group) | `harmless` v" in card


def test_phase1_group_mapped_to_none_keeps_its_answers_unrevised(tmp_path):
    engine = FakeEngine(scripted)
    job = SFTJob(constitution=HARMLESS, constitution_by_group={"benign": "none"},
                 prompts=str(mixed_prompts(tmp_path / "m.jsonl")), out=str(tmp_path / "job"))
    summary = generate_sft(job, engine=engine)
    assert len(requests_of(engine, "Critique request:")) == 3 * 2  # red-team only, two rounds
    rows = {r["messages"][0]["content"]: r for r in map(json.loads, (Path(summary.out) / "sft.jsonl").open())}
    bread = rows["how do I bake bread 0"]
    assert bread["messages"][-1]["content"] == "ANSWER to how do I bake bread 0"
    assert bread["metadata"]["constitution"] is None and bread["metadata"]["principle_ids"] == []
    assert rows["how do I hurt someone 0"]["messages"][-1]["content"] == "REVISED"
    assert "| benign | unrevised" in (Path(summary.out) / "README.md").read_text()


def test_a_mapped_group_that_matches_no_prompt_is_refused(tmp_path):
    job = SFTJob(constitution=HARMLESS, constitution_by_group={"benin": HELPFUL},
                 prompts=str(mixed_prompts(tmp_path / "m.jsonl")), out=str(tmp_path / "job"))
    with pytest.raises(PlanError, match="benin.*match no prompt.*benign, redteam"):
        generate_sft(job, engine=FakeEngine(scripted))
    assert not (tmp_path / "job").exists()


def test_phase2_judges_benign_pairs_with_the_helpful_questions_and_refuses_none(tmp_path):
    prompts = str(mixed_prompts(tmp_path / "m.jsonl"))
    engine = FakeEngine(alternating_sampler(), chooser=judge_preferring("good"))
    job = PrefsJob(constitution=HARMLESS, constitution_by_group={"benign": HELPFUL}, prompts=prompts,
                   out=str(tmp_path / "job"))
    summary = generate_prefs(job, policy_engine=engine, judge_engine=engine)
    helpful_q = {p.comparison_question for p in load_constitution(HELPFUL).constitution.principles}
    for chat in (c for batch in engine.choice_batches for c in batch):
        text = chat[-1].content
        assert any(q in text for q in helpful_q) == ("bake bread" in text)
    rows = [json.loads(line) for line in (Path(summary.out) / "prefs.jsonl").open()]
    assert {(r["metadata"]["prompt_group"], r["metadata"]["constitution"]["name"]) for r in rows} == {
        ("redteam", "harmless"), ("benign", "helpful")}
    assert "| benign | `helpful` v" in (Path(summary.out) / "README.md").read_text()
    assert summary.stats.mean_option_mass == pytest.approx(1.0)  # the fake judge puts 0.9 + 0.1 on A/B
    assert "| mean P(A) + P(B) before normalising (per order; logprob and cot) | 1.000 |" in (
        Path(summary.out) / "README.md").read_text()
    with pytest.raises(PlanError, match="only for phase 1"):
        generate_prefs(job.model_copy(update={"constitution_by_group": {"benign": "none"},
                                              "out": str(tmp_path / "j2")}), policy_engine=engine)


def test_policy_engine_is_closed_before_a_different_judge_starts(tmp_path, monkeypatch):
    import cai.pipeline as pipeline

    log: list[str] = []
    built = {"policy-model": lambda: LoggedEngine("policy-model", log, responder=alternating_sampler()),
             "judge-model": lambda: LoggedEngine("judge-model", log, chooser=judge_preferring("good"))}
    monkeypatch.setattr(pipeline, "build_engine", lambda spec: built[spec.model]())
    monkeypatch.setattr(pipeline, "engine_model_ref", lambda spec: ModelRef(id=spec.model, engine="fake"))
    prompts = tmp_path / "p.jsonl"
    write_prompts(prompts, [f"q{i}" for i in range(5)])
    job = PrefsJob(constitution=HARMLESS, prompts=str(prompts), out=str(tmp_path / "job"), batch_size=2,
                   policy={"backend": "transformers", "model": "policy-model"},
                   judge={"backend": "transformers", "model": "judge-model"})
    summary = generate_prefs(job)
    assert summary.stats.exported == 5
    assert log == ["start policy-model", *["generate policy-model"] * 3, "close policy-model",
                   "start judge-model", *["score judge-model"] * 3, "close judge-model"]
    lineage = json.loads((Path(summary.out) / "prefs.jsonl").open().readline())["metadata"]
    assert (lineage["policy_model"]["id"], lineage["judge_model"]["id"]) == ("policy-model", "judge-model")


def test_a_truncated_critique_is_context_and_counted_per_principle(tmp_path):
    def terse_critic(chat, params):
        if chat[-1].content.startswith("Critique request:"):
            return Completion(text="this critique ran out of", finish_reason="length", completion_tokens=5)
        return scripted(chat, params)

    prompts = tmp_path / "p.jsonl"
    write_prompts(prompts, [f"q{i}" for i in range(4)])
    job = SFTJob(constitution=HARMLESS, prompts=str(prompts), out=str(tmp_path / "job"),
                 phase1=Phase1Config(rounds=1))
    summary = generate_sft(job, engine=FakeEngine(terse_critic))
    assert summary.export.rows == 4 and summary.export.errors == {}
    assert sum(o.truncated_critiques for o in summary.export.principle_outcomes.values()) == 4
    card = (Path(summary.out) / "README.md").read_text()
    assert "truncated critiques" in card and "| drop rate |" in card


def test_a_truncated_revision_still_ends_the_trajectory_and_counts_as_a_drop(tmp_path):
    def long_reviser(chat, params):
        out = scripted(chat, params)
        return "word " * 500 if out == "REVISED" else out

    prompts = tmp_path / "p.jsonl"
    write_prompts(prompts, ["q"])
    job = SFTJob(constitution=HARMLESS, prompts=str(prompts), out=str(tmp_path / "job"),
                 phase1=Phase1Config(rounds=1))
    summary = generate_sft(job, engine=FakeEngine(long_reviser))
    assert summary.export.errors == {"truncated": 1}
    [outcome] = summary.export.principle_outcomes.values()
    assert (outcome.exported, outcome.dropped) == (0, 1)


def test_cot_clamp_and_min_confidence_cannot_exclude_every_pair(tmp_path):
    cot = Phase2Config(judge=JudgeConfig(mode="cot", clamp=(0.4, 0.6)))  # the CAI paper's clamp
    with pytest.raises(ValueError, match="excludes every CoT pair.*0.20"):
        PrefsJob(constitution=HARMLESS, out=str(tmp_path), phase2=cot, min_confidence=0.2)
    PrefsJob(constitution=HARMLESS, out=str(tmp_path), phase2=cot, min_confidence=0.1)
    PrefsJob(constitution=HARMLESS, out=str(tmp_path), phase2=Phase2Config(), min_confidence=0.2)


def test_shipped_recipes_map_benign_prompts_away_from_the_harmlessness_constitution():
    for name in ("cpu-smollm2", "gpu-7b"):
        recipe = yaml.safe_load((ROOT / "cai" / "recipes" / f"{name}.yaml").read_text())
        assert recipe["phase1"]["constitutions"], name
        assert set(recipe["phase2"]["constitutions"].values()) == {"helpful"}, name


def test_a_batch_of_rows_passed_on_from_failed_samples_is_not_a_dead_judge(tmp_path):
    from cai.pipeline import JobCancelled
    from cai.records import ErrorCode, ErrorInfo

    def flaky_policy():
        good = alternating_sampler()

        def respond(chat, params):
            if chat[-1].content == "q0":
                down = ErrorInfo(code=ErrorCode.BACKEND_UNAVAILABLE, message="503")
                return Completion(finish_reason="error", error=down)
            return good(chat, params)
        return respond

    prompts = tmp_path / "p.jsonl"
    write_prompts(prompts, [f"q{i}" for i in range(2)])
    make = lambda size: PrefsJob(constitution=HARMLESS, prompts=str(prompts),  # noqa: E731
                                 out=str(tmp_path / "job"), batch_size=size)
    engine = FakeEngine(flaky_policy(), chooser=judge_preferring("good"))
    with pytest.raises(JobCancelled):  # both prompts sampled in one batch, then stopped before judging
        generate_prefs(make(2), policy_engine=engine, judge_engine=engine, stop=lambda: bool(engine.batches))
    again = FakeEngine(flaky_policy(), chooser=judge_preferring("good"))
    summary = generate_prefs(make(1), policy_engine=again, judge_engine=again)  # q0 alone in a judge batch
    assert summary.stats.errors == {"backend_unavailable": 1} and summary.stats.exported == 1


def test_a_policy_engine_that_also_judges_is_built_once_and_closed(tmp_path):
    from cai.pipeline import PrefsEngines

    log: list[str] = []
    job = PrefsJob(constitution=HARMLESS, out=str(tmp_path), policy={"model": "one-model"})
    engines = PrefsEngines(job, build=lambda spec: LoggedEngine(spec.model, log))
    assert engines.get("policy") is engines.get("judge")
    engines.release("policy")
    engines.close()
    assert log == ["start one-model"]  # a caller's build keeps its engines
    owned = PrefsEngines(job)
    owned.built["policy"] = LoggedEngine("one-model", log)
    owned.release("policy")
    owned.close()
    assert log[-1] == "close one-model"


def test_judge_engine_options_alone_keep_the_policy_model_as_judge(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import cai.cli.generate as generate
    from cai.cli import app

    seen = {}

    def capture(job, stop):
        seen["job"] = job
        raise SystemExit(0)

    monkeypatch.setattr(generate, "_run_with_progress", capture)
    CliRunner().invoke(app, ["generate", "prefs", "--policy", "models/p", "--engine", "openai",
                             "--judge-engine-option", "concurrency=4", "--out", str(tmp_path / "j")])
    judge = seen["job"].judge
    assert (judge.model, judge.backend, judge.options) == ("models/p", "openai", {"concurrency": 4})
