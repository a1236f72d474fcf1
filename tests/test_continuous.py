"""Trajectory-level continuous batching of phase 1 (Phase1Config.schedule): the same records as the
step-batched schedule whatever order requests finish in, the same error rows, resume and cancel."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from helpers import HARMLESS, write_prompts

from cai.constitution import load_constitution
from cai.critique import run_phase1
from cai.engine.base import EngineContractError
from cai.engine.fake import FakeEngine
from cai.engine.stream import open_stream
from cai.pipeline import JobCancelled, generate_sft
from cai.recipe import Phase1Config, SFTJob
from cai.records import Message, SamplingParams, SourcePrompt


def seeded(chat, params) -> str:
    """Names the request's seed; "long" prompts overrun their answer, "wordy" ones their revision."""
    last, everything = chat[-1].content, " ".join(m.content for m in chat)
    if last.startswith("Critique request:"):
        return f"critique seed {params.seed}"
    if last.startswith("Revision request:"):
        return f"revision seed {params.seed}" + (" word" * 50 if "wordy q" in everything else "")
    return f"answer seed {params.seed} to {last}" + (" word" * 50 if "long" in last else "")


def step_kinds(chats) -> set[str]:
    return {c[-1].content.split(" request:")[0] if " request:" in c[-1].content else "answer" for c in chats}


def sources(texts) -> list[SourcePrompt]:
    return [SourcePrompt(id=f"s{i}", messages=[Message(role="user", content=t)], source="t") for i, t in enumerate(texts)]


def config(schedule: str, rounds: int = 2) -> Phase1Config:
    params = SamplingParams(max_tokens=20, temperature=0.7, seed=100)
    return Phase1Config(rounds=rounds, answer=params, critique=params, revision=params, schedule=schedule)


def records(engine, schedule: str, texts) -> list[dict]:
    out = run_phase1(sources(texts), load_constitution(HARMLESS), engine, config(schedule))
    return [r.model_dump(mode="json", exclude={"lineage": {"created_at"}}) for r in out]


TEXTS = ["q0", "long q1", "q2", "wordy q3", "q4", "long q5", "q6", "q7"]


def test_continuous_records_equal_step_batched_records_whatever_the_finish_order():
    stepped = records(FakeEngine(seeded), "steps", TEXTS)
    for order_seed in (0, 1, 2):
        engine = FakeEngine(seeded, finish_order_seed=order_seed)
        assert records(engine, "continuous", TEXTS) == stepped
        # The test means something only if steps overlapped: some wait finished an answer beside a critique.
        assert any(len(step_kinds(batch)) > 1 for batch in engine.batches)
    errors = {r["parent_ids"][0]: r["error"]["code"] for r in stepped if r["error"]}
    assert errors == {"s1": "truncated", "s3": "truncated", "s5": "truncated"}


def test_a_request_seed_comes_from_its_prompts_place_in_the_batch_not_from_which_prompts_are_left():
    rows = records(FakeEngine(seeded, finish_order_seed=5), "continuous", TEXTS)
    for i, row in enumerate(rows):
        assert row["trajectory"][0]["text"].startswith(f"answer seed {100 + i} ")
        for step in row["trajectory"][1:]:  # s2's critique keeps seed 102 though s1 ended before it
            assert step["text"].startswith(f"{step['kind']} seed {100 + i}")


def test_the_step_schedule_waits_for_every_request_of_a_step():
    engine = FakeEngine(seeded, finish_order_seed=4)
    records(engine, "steps", TEXTS)
    assert all(len(step_kinds(batch)) == 1 for batch in engine.batches)
    assert len(engine.batches) > 5  # the stream finished each step in more than one share


def job(tmp_path: Path, schedule: str, name: str) -> SFTJob:
    prompts = write_prompts(tmp_path / "p.jsonl", [f"question {i}" for i in range(9)])
    return SFTJob(constitution=HARMLESS, prompts=str(prompts), out=str(tmp_path / name), batch_size=4,
                  phase1=config(schedule))


def export(job_dir: str) -> list[dict]:
    rows = [json.loads(line) for line in (Path(job_dir) / "sft.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "metadata"} | {"trajectory": row["metadata"]["trajectory"]}
            for row in rows]


def test_a_continuous_job_stopped_mid_batch_resumes_to_the_step_batched_export(tmp_path):
    reference = generate_sft(job(tmp_path, "steps", "stepped"), engine=FakeEngine(seeded))
    engine = FakeEngine(seeded, finish_order_seed=7)
    shards = tmp_path / "cont" / "shards"
    with pytest.raises(JobCancelled):  # stops inside the second batch, at its first wait
        generate_sft(job(tmp_path, "continuous", "cont"), engine=engine, stop=lambda: any(shards.glob("*.jsonl")))
    rows = [json.loads(line) for p in (tmp_path / "cont" / "shards").glob("*.jsonl") for line in p.open()]
    assert len(rows) == len({r["id"] for r in rows}) == 9
    cancelled = [r for r in rows if r["error"] and r["error"]["code"] == "cancelled"]
    assert 0 < len(cancelled) < 9
    # The schedule is not in the fingerprint (the records are the same): a rerun step-batched resumes it.
    summary = generate_sft(job(tmp_path, "steps", "cont"), engine=FakeEngine(seeded))
    assert summary.done_now == len(cancelled) and summary.out == str(tmp_path / "cont")
    assert export(summary.out) == export(reference.out)


class _BrokenStream:
    def __init__(self):
        self.keys = []

    def submit(self, key, chat, params):
        self.keys.append(key)

    def wait(self):
        return [("not-a-key", None)]

    def close(self):
        pass


def test_a_stream_returning_an_unknown_key_is_a_contract_error():
    engine = FakeEngine(seeded)
    engine.open_stream = _BrokenStream
    with pytest.raises(EngineContractError, match="stream contract"):
        run_phase1(sources(["q"]), load_constitution(HARMLESS), engine, config("continuous"))


def openai_engine(url: str, **options):
    from cai.engine.openai_engine import OpenAIEngine

    return OpenAIEngine(model="stub", base_url=url, api_key="EMPTY", **options)


def test_openai_stream_runs_phase1_with_the_same_records_as_step_batches():
    from cai.engine.stub_server import StubChatServer

    with StubChatServer(latency=0.01) as server:
        engine = openai_engine(server.url, concurrency=4)
        try:
            stepped = records(engine, "steps", ["q0", "q1", "q2"])
            continuous = records(engine, "continuous", ["q0", "q1", "q2"])
        finally:
            engine.close()
    assert continuous == stepped and all(r["final"] for r in stepped)
    assert server.requests == 2 * 3 * 5  # two runs, three prompts, answer + 2 x (critique, revision)


def test_closing_an_openai_stream_abandons_its_pending_requests_at_once():
    from cai.engine.stub_server import StubChatServer

    with StubChatServer(latency=5.0) as server:
        engine = openai_engine(server.url, concurrency=2)
        try:
            stream = open_stream(engine)
            for i in range(4):
                stream.submit(i, [Message(role="user", content="q")], SamplingParams(max_tokens=4))
            started = time.perf_counter()
            stream.close()
            assert stream.wait() == [] and time.perf_counter() - started < 2
        finally:
            engine.close()
