"""Phase 1 on the scripted fake engine: batching, sampling, error rows, resume, export."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from helpers import HARMLESS, write_prompts

from cai.constitution import load_constitution
from cai.critique import run_phase1
from cai.engine.fake import FakeEngine
from cai.pipeline import generate_sft
from cai.recipe import Phase1Config, SFTJob
from cai.records import Completion, Message, SamplingParams, SourcePrompt
from cai.store import JobError


def scripted(chat, params) -> str:
    last = chat[-1].content
    if last.startswith("Critique request:"):
        return "CRITIQUE of: " + chat[-2].content[:30]
    if last.startswith("Revision request:"):
        return "REVISED: " + chat[-3].content[:30]
    return "ANSWER to " + last


def make_job(tmp_path: Path, prompts: Path, **kw) -> SFTJob:
    return SFTJob(constitution=HARMLESS, prompts=str(prompts), out=str(tmp_path / "job"), **kw)


def test_one_engine_batch_per_step(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [f"question {i}" for i in range(7)])
    engine = FakeEngine(scripted)
    summary = generate_sft(make_job(tmp_path, prompts, phase1=Phase1Config(rounds=3)), engine=engine)
    # answer + (critique, revision) x 3 rounds, each step one call with all 7 prompts
    assert [len(b) for b in engine.batches] == [7] * 7
    assert summary.export.rows == 7
    row = json.loads((Path(summary.out) / "sft.jsonl").read_text().splitlines()[0])
    kinds = [s["kind"] for s in row["metadata"]["trajectory"]]
    assert kinds == ["answer"] + ["critique", "revision"] * 3
    assert row["messages"][-1] == {"role": "assistant", "content": row["metadata"]["trajectory"][-1]["text"]}
    assert len(row["metadata"]["principle_ids"]) == 3


def test_revision_sees_its_critique_and_principle(tmp_path):
    constitution = load_constitution(HARMLESS)
    engine = FakeEngine(scripted)
    source = SourcePrompt(id="s1", messages=[Message(role="user", content="hi")], source="t")
    [record] = run_phase1([source], constitution, engine, Phase1Config(rounds=1))
    critique_chat, revision_chat = engine.batches[1][0], engine.batches[2][0]
    principle = constitution.constitution.principle(record.lineage.principle_ids[0])
    assert critique_chat[-1].content.endswith(principle.critique_request)
    assert critique_chat[-2].content == "ANSWER to hi"
    assert revision_chat[-2].content == record.trajectory[1].text
    assert principle.revision_request in revision_chat[-1].content


def test_principle_sampling_is_seeded_and_order_independent(tmp_path):
    constitution = load_constitution(HARMLESS)
    sources = [
        SourcePrompt(id=f"s{i}", messages=[Message(role="user", content=f"q{i}")], source="t") for i in range(12)
    ]
    cfg = Phase1Config(rounds=2, seed=7)
    a = run_phase1(sources, constitution, FakeEngine(scripted), cfg)
    b = run_phase1(list(reversed(sources)), constitution, FakeEngine(scripted), cfg)
    by_id = {r.id: r.lineage.principle_ids for r in b}
    assert all(by_id[r.id] == r.lineage.principle_ids for r in a)
    c = run_phase1(sources, constitution, FakeEngine(scripted), Phase1Config(rounds=2, seed=8))
    assert [r.lineage.principle_ids for r in a] != [r.lineage.principle_ids for r in c]
    assert len({p for r in a for p in r.lineage.principle_ids}) > 4


def test_error_rows_keep_raw_text_and_are_excluded(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", ["fine", "long one", "empty one", "broken"])

    def responder(chat, params):
        first = chat[0].content if len(chat) == 1 else ""
        if first == "long one":
            return Completion(text="went on and on", finish_reason="length", completion_tokens=params.max_tokens)
        if first == "empty one":
            return "   "
        if chat[-1].content.startswith("Critique request") and chat[-2].content == "ANSWER to broken":
            return Completion(
                finish_reason="error",
                error={"code": "backend_unavailable", "message": "503 after 6 tries", "raw": "<html>503</html>"},
            )
        return scripted(chat, params)

    summary = generate_sft(make_job(tmp_path, prompts), engine=FakeEngine(responder))
    assert summary.export.rows == 1
    assert summary.export.errors == {"truncated": 1, "empty": 1, "backend_unavailable": 1}
    shard_rows = [json.loads(l) for p in (Path(summary.out) / "shards").glob("*.jsonl") for l in p.open()]
    assert len(shard_rows) == 4
    truncated = next(r for r in shard_rows if r["error"] and r["error"]["code"] == "truncated")
    assert truncated["error"]["raw"] == "went on and on" and truncated["final"] is None
    broken = next(r for r in shard_rows if r["error"] and r["error"]["code"] == "backend_unavailable")
    assert [s["kind"] for s in broken["trajectory"]] == ["answer", "critique"]
    card = (Path(summary.out) / "README.md").read_text()
    assert "| truncated | 1 |" in card and "harmless" in card


def test_resume_skips_done_prompts_and_merges_duplicates(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [f"q{i}" for i in range(5)] + ["q0"])
    first = FakeEngine(scripted)
    s1 = generate_sft(make_job(tmp_path, prompts, limit=3), engine=first)
    assert s1.done_now == 3 and s1.export.rows == 3
    second = FakeEngine(scripted)
    s2 = generate_sft(make_job(tmp_path, prompts), engine=second)
    assert (s2.done_before, s2.done_now, s2.duplicates_merged) == (3, 2, 1)
    assert len(second.batches[0]) == 2
    third = FakeEngine(scripted)
    s3 = generate_sft(make_job(tmp_path, prompts), engine=third)
    assert third.batches == [] and s3.done_now == 0 and s3.export.rows == 5
    ids = [json.loads(l)["metadata"]["id"] for l in (Path(s3.out) / "sft.jsonl").open()]
    assert len(ids) == len(set(ids)) == 5


def test_changed_settings_are_refused_or_get_a_new_job(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", ["a", "b"])
    generate_sft(make_job(tmp_path, prompts), engine=FakeEngine(scripted))
    with pytest.raises(JobError, match="phase1"):
        generate_sft(make_job(tmp_path, prompts, phase1=Phase1Config(rounds=3)), engine=FakeEngine(scripted))
    s = generate_sft(
        make_job(tmp_path, prompts, phase1=Phase1Config(rounds=3), new_job=True), engine=FakeEngine(scripted)
    )
    assert s.out != str(tmp_path / "job") and s.export.rows == 2


def test_batches_are_shards_and_exports_load_with_datasets(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [f"q{i}" for i in range(5)])
    summary = generate_sft(make_job(tmp_path, prompts, batch_size=2), engine=FakeEngine(scripted))
    assert len(list((Path(summary.out) / "shards").glob("sft-*.jsonl"))) == 3
    for kind, name in [("json", "sft.jsonl"), ("parquet", "sft.parquet")]:
        ds = datasets.load_dataset(kind, data_files=str(Path(summary.out) / name), split="train")
        assert ds.num_rows == 5
        meta = ds[0]["metadata"]
        assert meta["constitution"]["name"] == "harmless"
        assert len(meta["constitution"]["sha256"]) == 64
        assert meta["model"]["id"] == "fake-model"
        assert meta["sampling"]["revision"]["max_tokens"] == 256
        assert ds[0]["messages"][0]["role"] == "user"


def test_max_tokens_is_set_on_every_request(tmp_path):
    seen: list[SamplingParams] = []

    def responder(chat, params):
        seen.append(params)
        return scripted(chat, params)

    prompts = write_prompts(tmp_path / "p.jsonl", ["a"])
    generate_sft(make_job(tmp_path, prompts), engine=FakeEngine(responder))
    assert seen and all(p.max_tokens >= 1 for p in seen)
    assert {p.max_tokens for p in seen} == {256, 192}


def test_retry_errors_redoes_only_error_rows(tmp_path):
    from cai.kinds import retry_errors

    prompts = write_prompts(tmp_path / "p.jsonl", ["ok1", "flaky", "ok2"])

    def flaky(chat, params):
        if chat[0].content == "flaky" and len(chat) == 1:
            return Completion(finish_reason="error", error={"code": "backend_unavailable", "message": "503"})
        return scripted(chat, params)

    first = generate_sft(make_job(tmp_path, prompts), engine=FakeEngine(flaky))
    assert first.export.errors == {"backend_unavailable": 1}
    engine = FakeEngine(scripted)
    dropped, second = retry_errors(first.out, engine=engine)
    assert dropped == {"backend_unavailable": 1}
    assert len(engine.batches[0]) == 1 and engine.batches[0][0][0].content == "flaky"
    assert second.export.rows == 3 and second.export.errors == {}
    rows = [json.loads(l) for p in (Path(first.out) / "shards").glob("*.jsonl") for l in p.open()]
    assert sorted(r["prompt"][0]["content"] for r in rows) == ["flaky", "ok1", "ok2"]


def test_dead_engine_stops_the_job_without_writing_error_rows(tmp_path):
    from cai.pipeline import EngineDown

    prompts = write_prompts(tmp_path / "p.jsonl", ["a", "b"])
    dead = FakeEngine(
        lambda chat, params: Completion(
            finish_reason="error", error={"code": "backend_unavailable", "message": "connection refused"}
        )
    )
    with pytest.raises(EngineDown, match="connection refused"):
        generate_sft(make_job(tmp_path, prompts), engine=dead)
    assert list((tmp_path / "job" / "shards").glob("*.jsonl")) == []
    summary = generate_sft(make_job(tmp_path, prompts), engine=FakeEngine(scripted))
    assert summary.done_now == 2


def test_cli_validate_generate_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from cai.cli import app

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"oops": 1}\n')
    result = CliRunner().invoke(app, ["generate", "sft", "--prompts", str(bad), "--out", str(tmp_path / "j")])
    assert result.exit_code == 2
    assert "bad.jsonl:2" in result.output and "Traceback" not in result.output


def shard_rows(job_dir: Path) -> list[dict]:
    return [json.loads(line) for p in sorted((job_dir / "shards").glob("*.jsonl")) for line in p.open()]


def test_stop_writes_cancelled_rows_for_unstarted_inputs_and_rerun_redoes_them(tmp_path):
    from cai.pipeline import JobCancelled

    prompts = write_prompts(tmp_path / "p.jsonl", [f"q{i}" for i in range(7)])
    engine = FakeEngine(scripted)
    with pytest.raises(JobCancelled, match="5 inputs not started"):
        generate_sft(make_job(tmp_path, prompts, batch_size=2), engine=engine, stop=lambda: len(engine.batches) >= 5)
    rows = shard_rows(tmp_path / "job")
    assert len(rows) == len({r["id"] for r in rows}) == 7  # every input: one row
    cancelled = [r for r in rows if r["error"] and r["error"]["code"] == "cancelled"]
    assert [r["prompt"][0]["content"] for r in cancelled] == ["q2", "q3", "q4", "q5", "q6"]
    assert all(r["lineage"]["model"]["id"] == engine.model.id for r in cancelled)

    rerun_engine = FakeEngine(scripted)
    summary = generate_sft(make_job(tmp_path, prompts, batch_size=2), engine=rerun_engine)
    assert (summary.done_before, summary.done_now) == (2, 5)
    first_user_turns = {chat[0].content for batch in rerun_engine.batches for chat in batch}
    assert {f"q{i}" for i in range(7)} & first_user_turns == {"q2", "q3", "q4", "q5", "q6"}
    rows = shard_rows(tmp_path / "job")
    assert len(rows) == len({r["id"] for r in rows}) == 7
    assert not any(r["error"] for r in rows) and summary.export.rows == 7


def test_system_prompt_reaches_every_request_but_not_the_export(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", ["q1", "q2"])
    engine = FakeEngine(scripted)
    cfg = Phase1Config(rounds=1, system_prompt="Be brief.")
    summary = generate_sft(make_job(tmp_path, prompts, phase1=cfg), engine=engine)
    assert all(chat[0].role == "system" and chat[0].content == "Be brief." for b in engine.batches for chat in b)
    row = json.loads((Path(summary.out) / "sft.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]


def test_near_duplicates_are_merged_only_when_asked(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", ["How do I pick a lock?", "how do i pick a LOCK", "  How do I pick a lock!", "Other"])
    exact = generate_sft(make_job(tmp_path, prompts), engine=FakeEngine(scripted))
    assert (exact.done_now, exact.duplicates_merged) == (4, 0)
    near = generate_sft(
        SFTJob(constitution=HARMLESS, prompts=str(prompts), out=str(tmp_path / "near"), drop_near_duplicates=True),
        engine=FakeEngine(scripted),
    )
    assert (near.done_now, near.duplicates_merged) == (2, 2)


def test_second_ctrl_c_aborts_with_130_and_the_sigint_handler_is_restored():
    import os
    import signal

    import typer

    from cai.cli.common import stoppable_job

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(typer.Exit) as stopped:
        with stoppable_job() as stop:
            assert not stop()
            os.kill(os.getpid(), signal.SIGINT)
            assert stop()  # first Ctrl-C: only a request to stop after the batch
            os.kill(os.getpid(), signal.SIGINT)  # second: abort now
            raise AssertionError("not reached")
    assert stopped.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is before
