"""The openai_batch backend against a local fake Batch API (tests/batchapi_fake.py)."""

from __future__ import annotations

import json

import pytest
from batchapi_fake import BatchPlan, FakeBatchAPI
from typer.testing import CliRunner

from cai.engine import NoLogprobs, build_engine
from cai.engine.base import StopRequested, stop_scope
from cai.engine.openai_batch import (
    STATE_FILE,
    BatchUsage,
    OpenAIBatchEngine,
    OpenAIBatchOptions,
    estimate_cost,
    with_state_dir,
)
from cai.recipe import EngineSpec
from cai.records import ErrorCode, Message, SamplingParams

SECRET = "sk-batch-sEcReT-42"
PARAMS = SamplingParams(max_tokens=16, temperature=0.0, seed=3)


def chats(*texts: str):
    return [[Message(role="user", content=t)] for t in texts]


def engine(api: FakeBatchAPI, state_dir, **options) -> OpenAIBatchEngine:
    opts = OpenAIBatchOptions(base_url=api.url, state_dir=str(state_dir), poll_initial=0.01, poll_max=0.02,
                              max_retries=0, **options)
    return OpenAIBatchEngine("m", opts)


def test_completions_map_back_by_custom_id_in_any_output_order(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    texts = [f"question {i} {'x ' * i}" for i in range(7)]
    with FakeBatchAPI(plan=lambda n, ids: BatchPlan(shuffle=True)) as api:
        eng = build_engine(EngineSpec(backend="openai_batch", model="m", options={
            "base_url": api.url, "state_dir": str(tmp_path), "poll_initial": 0.01, "poll_max": 0.02}))
        out = eng.generate(chats(*texts), PARAMS)
        assert [c.text for c in out] == [f"reply to: {t}" for t in texts]
        assert len(api.created) == 1 and api.created[0]["endpoint"] == "/v1/chat/completions"
        assert api.created[0]["completion_window"] == "24h"
        assert api.polls == 2  # validating -> in_progress -> completed
        assert api.auth == {f"Bearer {SECRET}"}
        lines = [json.loads(x) for x in api.files["file-1"].decode().splitlines()]
        assert [line["body"]["seed"] for line in lines] == [3, 4, 5, 6, 7, 8, 9]  # derive_seed per request
        assert len({line["custom_id"] for line in lines}) == 7
    # usage: prompt tokens = words of each question; completion = words of "reply to: <q>"
    prompt = sum(len(t.split()) for t in texts)
    assert eng.usage.prompt_tokens == prompt and eng.usage.completion_tokens == prompt + 2 * 7
    assert (eng.usage.requests, eng.usage.batches, eng.usage.polls) == (7, 1, 2)
    assert out[3].prompt_tokens == 5 and out[3].completion_tokens == 7
    assert SECRET not in (tmp_path / STATE_FILE).read_text()


def test_expired_batch_turns_missing_requests_into_error_rows(tmp_path):
    def plan(n, ids):
        return BatchPlan(final="expired", drop={ids[1], ids[3]}, fail={ids[2]}) if n == 0 else BatchPlan()

    with FakeBatchAPI(plan=plan) as api:
        eng = engine(api, tmp_path)
        first = eng.generate(chats("a", "b", "c", "d"), PARAMS)
        assert [c.finish_reason for c in first] == ["stop", "error", "error", "error"]
        for row in (first[1], first[3]):
            assert row.error.code == ErrorCode.CANCELLED
            assert "batch batch_1 (expired)" in row.error.message
        assert first[2].error.code == ErrorCode.BAD_REQUEST and "scripted bad request" in first[2].error.raw
        # the expired batch is forgotten: the same requests again are submitted anew (a retry)
        assert json.loads((tmp_path / STATE_FILE).read_text())["batches"] == {}
        again = eng.generate(chats("a", "b", "c", "d"), PARAMS)
        assert len(api.created) == 2 and all(c.finish_reason == "stop" for c in again)


def test_failed_batch_gives_bad_request_rows_naming_the_batch(tmp_path):
    with FakeBatchAPI(plan=lambda n, ids: BatchPlan(final="failed")) as api:
        out = engine(api, tmp_path).generate(chats("a", "b"), PARAMS)
    assert [c.error.code for c in out] == [ErrorCode.BAD_REQUEST] * 2
    assert "batch batch_1 (failed)" in out[0].error.message and "scripted failure" in out[0].error.message


def test_killed_process_resumes_by_polling_the_submitted_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    stop = {"now": False}
    with FakeBatchAPI(plan=lambda n, ids: BatchPlan(statuses=["validating"] + ["in_progress"] * 5)) as api:
        api.on_poll = lambda batch_id: stop.update(now=True)
        with stop_scope(lambda: stop["now"]), pytest.raises(StopRequested):
            engine(api, tmp_path).generate(chats("a", "b", "c"), PARAMS)
        state = (tmp_path / STATE_FILE).read_text()
        assert json.loads(state)["batches"].popitem()[1]["batch_id"] == "batch_1"
        assert SECRET not in state and api.polls == 1
        # a new process, same requests: polls batch_1 and submits nothing
        api.on_poll = None
        second = engine(api, tmp_path)
        out = second.generate(chats("a", "b", "c"), PARAMS)
        assert [c.text for c in out] == ["reply to: a", "reply to: b", "reply to: c"]
        assert len(api.created) == 1 and api.uploads == 2  # one input file, one output file
        assert second.usage.resumed_batches == 1
        # a third process (killed before it wrote its rows) reads the completed batch again, still one batch
        assert [c.text for c in engine(api, tmp_path).generate(chats("a", "b", "c"), PARAMS)] == [c.text for c in out]
        assert len(api.created) == 1
        # the same process asking again wants new samples: a new batch
        second.generate(chats("a", "b", "c"), PARAMS)
        assert len(api.created) == 2


def test_batches_split_at_max_requests_and_scoring_without_prefix(tmp_path):
    with FakeBatchAPI() as api:
        eng = engine(api, tmp_path, max_requests_per_batch=2)
        out = eng.generate(chats("a", "b", "c", "d", "e"), PARAMS)
        assert [c.text for c in out] == [f"reply to: {t}" for t in "abcde"] and len(api.created) == 3
        scores = eng.choice_logprobs(chats("q"), ["A", "B", "C"])
        assert scores[0].logprobs == {"A": -0.1, "B": -2.5, "C": -2.5} and scores[0].bounded == ["C"]
        with pytest.raises(NoLogprobs, match="structured verdicts"):
            eng.choice_logprobs(chats("q"), ["A", "B"], prefix="The answer is: (")


def test_a_job_directory_becomes_the_state_dir_unless_one_is_given(tmp_path):
    spec = EngineSpec(backend="openai_batch", model="m", options={"base_url": "http://127.0.0.1:9/v1"})
    assert with_state_dir(spec, tmp_path).options["state_dir"] == str(tmp_path / "openai-batch")
    given = spec.model_copy(update={"options": {**spec.options, "state_dir": "elsewhere"}})
    assert with_state_dir(given, tmp_path) is given
    other = EngineSpec(backend="openai", model="m")
    assert with_state_dir(other, tmp_path) is other


def test_cost_estimate_at_the_batch_discount():
    usage = BatchUsage(prompt_tokens=2_000_000, completion_tokens=500_000)
    # list prices $2.50 in, $10 out per million: 5 + 5 = 10 synchronous, 5 in the batch
    assert estimate_cost(usage, 2.5, 10.0) == {"batch_usd": 5.0, "synchronous_usd": 10.0}


def test_generate_sft_end_to_end_against_the_fake(tmp_path, monkeypatch):
    from cai.cli import app

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(6)))
    job, state = tmp_path / "job", tmp_path / "state"
    with FakeBatchAPI() as api:
        args = ["generate", "sft", "--engine", "openai_batch", "--model", "m", "--engine-option", f"base_url={api.url}",
                "--engine-option", f"state_dir={state}", "--engine-option", "poll_initial=0.01",
                "--prompts", str(prompts), "--out", str(job), "--rounds", "1", "--limit", "4", "--show", "0"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        batches = len(api.created)
        sizes = [len(api.files[b["input_file_id"]].decode().splitlines()) for b in api.created]
        again = CliRunner().invoke(app, args)
        assert again.exit_code == 0, again.output
        assert len(api.created) == batches  # a finished job submits nothing
    rows = [json.loads(line) for s in sorted((job / "shards").glob("sft-*.jsonl")) for line in s.open()]
    assert len(rows) == 4 and not any(r["error"] for r in rows)
    assert batches >= 3 and sizes[0] == 4  # answer, critique, revision: one batch per step of 4 requests
    for path in [*job.rglob("*"), *state.rglob("*")]:
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path
