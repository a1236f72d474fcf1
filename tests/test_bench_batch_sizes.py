"""`cai bench --batch-size ... --stub-latency-ms ...`: phase 1 prompts/s by batch size, against a
local OpenAI-compatible stub server."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cai.bench import cycled
from cai.engine.openai_engine import OpenAIEngine
from cai.engine.stub_server import STUB_REPLY, StubChatServer
from cai.records import Message, SamplingParams, SourcePrompt

pytestmark = pytest.mark.timeout(120)


def test_cycled_repeats_the_source_with_distinct_ids():
    sources = [SourcePrompt(id=f"s{i}", messages=[Message(role="user", content=f"q{i}")], source="t") for i in range(3)]
    out = cycled(sources, 7)
    assert [s.id for s in out] == ["s0", "s1", "s2", "s0~1", "s1~1", "s2~1", "s0~2"]
    assert [s.messages[0].content for s in out] == ["q0", "q1", "q2", "q0", "q1", "q2", "q0"]
    assert [s.id for s in cycled(sources, 2)] == ["s0", "s1"]


def test_stub_server_answers_like_an_openai_server_after_its_latency():
    with StubChatServer(latency=0.2) as server:
        engine = OpenAIEngine("stub", base_url=server.url, api_key="k", timeout=10)
        [out] = engine.generate([[Message(role="user", content="hi there")]], SamplingParams(max_tokens=8))
        engine.close()
    assert out.error is None and out.text == STUB_REPLY and out.finish_reason == "stop"
    assert out.completion_tokens == len(STUB_REPLY.split()) and out.prompt_tokens > 0
    assert server.requests == 1


def test_cli_compares_batch_sizes_against_the_stub(tmp_path):
    from cai.cli import app

    report = tmp_path / "bench.json"
    result = CliRunner().invoke(app, [
        "bench", "--stub-latency-ms", "1", "--engine-option", "concurrency=4", "--limit", "40", "--rounds", "1",
        "--batch-size", "8", "--batch-size", "40", "--schedule", "continuous", "--out", str(report)])
    assert result.exit_code == 0, result.output
    assert "slowest / fastest prompts/s" in result.output
    data = json.loads(report.read_text())
    assert (data["backend"], data["model"], data["rounds"]) == ("openai", "stub", 1)
    # Continuous counts requests; step-batched (the default), one engine call per step of a batch.
    assert [(r["batch_size"], r["prompts"], r["calls"]) for r in data["runs"]] == [(8, 40, 120), (40, 40, 120)]
    stepped = CliRunner().invoke(app, [
        "bench", "--stub-latency-ms", "0", "--limit", "40", "--batch-size", "8", "--batch-size", "40",
        "--out", str(report)])
    assert stepped.exit_code == 0, stepped.output
    assert [r["calls"] for r in json.loads(report.read_text())["runs"]] == [15, 3]
    assert all(r["seconds"] > 0 and r["prompts_per_second"] > 0 for r in data["runs"])
    assert 0 < data["slowest_vs_fastest"] <= 1
