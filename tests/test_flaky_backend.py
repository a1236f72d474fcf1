"""A whole phase-1 job against a flaky OpenAI-compatible server on 127.0.0.1.

30% of calls get 429 with Retry-After, 5% get 503, some hang past the client
timeout, and prompts marked BAD get a 400. The job must complete with every
input exactly once, no 400 retried, waits honouring Retry-After, and never more
requests in flight than the configured concurrency.
"""

from __future__ import annotations

import json
import random
import threading

import pytest
from fakeserver import FakeServer, error_body, ok_body
from helpers import HARMLESS, ROOT, write_prompts

from cai.engine.openai_engine import OpenAIEngine
from cai.pipeline import EngineDown, generate_sft
from cai.recipe import Phase1Config, SFTJob
from cai.records import SamplingParams

pytestmark = pytest.mark.timeout(120)
CONCURRENCY = 4


class Waits:
    def __init__(self):
        self.seconds: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)


def flaky_script(seed: int = 7):
    rng = random.Random(seed)
    lock = threading.Lock()
    bad_calls: list[str] = []

    def script(body, call_no):
        text = body["messages"][0]["content"]
        if text.startswith("BAD"):
            with lock:
                bad_calls.append(text)
            return 400, {}, error_body("This model's maximum context length is 2048 tokens"), 0
        with lock:
            roll = rng.random()
        if roll < 0.30:
            return 429, {"Retry-After": "2"}, error_body("rate limited"), 0
        if roll < 0.35:
            return 503, {}, error_body("overloaded"), 0
        if roll < 0.38:
            return 200, {}, ok_body("late"), 1.5  # longer than the client timeout
        return 200, {}, ok_body(f"reply to {body['messages'][-1]['content'][:20]}"), 0.01

    return script, bad_calls


def test_flaky_server_job_completes_exactly_once(tmp_path):
    prompts = tmp_path / "p.jsonl"
    texts = [f"question {i}" for i in range(20)] + ["BAD one", "BAD two"]
    write_prompts(prompts, texts)
    script, bad_calls = flaky_script()
    with FakeServer(script) as server:
        engine = OpenAIEngine(
            "m", base_url=server.url, api_key="k", timeout=1.0, concurrency=CONCURRENCY, max_retries=12
        )
        waits = Waits()
        engine.sleep = waits
        params = SamplingParams(max_tokens=32)
        job = SFTJob(
            constitution=HARMLESS,
            prompts=str(prompts),
            out=str(tmp_path / "job"),
            phase1=Phase1Config(rounds=1, answer=params, critique=params, revision=params),
        )
        summary = generate_sft(job, engine=engine)

    assert server.max_in_flight <= CONCURRENCY
    assert sorted(bad_calls) == ["BAD one", "BAD two"]  # each 400 sent once, never retried
    assert summary.export.rows == 20
    assert summary.export.errors == {"context_length_exceeded": 2}
    assert 2.0 in waits.seconds  # Retry-After honoured
    rows = [json.loads(l) for s in (tmp_path / "job" / "shards").glob("*.jsonl") for l in s.open()]
    assert len({r["id"] for r in rows}) == len(rows) == 22


def test_dead_server_fails_the_job_instead_of_completing(tmp_path):
    prompts = tmp_path / "p.jsonl"
    write_prompts(prompts, ["hello"])
    with FakeServer(lambda body, n: (503, {}, error_body("down"), 0)) as server:
        engine = OpenAIEngine("m", base_url=server.url, api_key="k", timeout=1.0, max_retries=2)
        engine.sleep = Waits()
        job = SFTJob(constitution=HARMLESS, prompts=str(prompts), out=str(tmp_path / "job"))
        with pytest.raises(EngineDown):
            generate_sft(job, engine=engine)
    assert not list((tmp_path / "job" / "shards").glob("*.jsonl"))
    assert not (tmp_path / "job" / "sft.jsonl").exists()


def test_ctrl_c_stops_the_cli_after_its_batch_with_cancelled_rows_then_rerun_completes(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    prompts = tmp_path / "p.jsonl"
    write_prompts(prompts, [f"question {i}" for i in range(6)])
    shards = tmp_path / "job" / "shards"
    with FakeServer(lambda body, n: (200, {}, ok_body(f"answer {n}"), 0.3)) as server:
        args = [sys.executable, "-m", "cai", "generate", "sft", "--engine", "openai", "--model", "m",
                "--engine-option", f"base_url={server.url}", "--engine-option", "api_key=k",
                "--prompts", str(prompts), "--out", str(tmp_path / "job"), "--rounds", "1", "--batch-size", "1"]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 60
        while not list(shards.glob("sft-*.jsonl")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, output
        assert "stopping after the current batch" in output and "cancelled" in output
        rows = [json.loads(line) for s in sorted(shards.glob("*.jsonl")) for line in s.open()]
        assert len(rows) == len({r["id"] for r in rows}) == 6
        cancelled = [r for r in rows if r["error"] and r["error"]["code"] == "cancelled"]
        assert 1 <= len(cancelled) <= 5 and all(r["error"] is None for r in rows[:1])

        rerun = subprocess.run(args, capture_output=True, text=True, timeout=60,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    rows = [json.loads(line) for s in sorted(shards.glob("*.jsonl")) for line in s.open()]
    assert len(rows) == len({r["id"] for r in rows}) == 6 and not any(r["error"] for r in rows)
    assert len((tmp_path / "job" / "sft.jsonl").read_text().splitlines()) == 6


def test_a_judge_server_that_ignores_continue_final_message_switches_to_structured_verdicts(tmp_path):
    import subprocess
    import sys

    from fakeserver import chat_prompt_tokens

    def script(body, n):
        if body.get("logprobs"):  # the judge: a server that renders a new assistant turn after the prefix
            content = [{"token": "A", "logprob": -0.1, "bytes": None,
                        "top_logprobs": [{"token": "A", "logprob": -0.1, "bytes": None}]}]
            return 200, {}, ok_body("A", finish="length", logprobs={"content": content},
                                    prompt_tokens=chat_prompt_tokens(body, honours_continuation=False)), 0
        return 200, {}, ok_body(f"answer {n}"), 0

    prompts = tmp_path / "p.jsonl"
    write_prompts(prompts, ["question"])
    with FakeServer(script) as server:
        args = [sys.executable, "-m", "cai", "generate", "prefs", "--engine", "openai", "--policy", "m",
                "--engine-option", f"base_url={server.url}", "--engine-option", "api_key=k",
                "--prompts", str(prompts), "--out", str(tmp_path / "job")]
        result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    # No option log-prob is trusted after a new turn: the judge asks for structured verdicts instead, says so
    # once, and a reply that is no verdict ("answer 3") is an error row, never a default label.
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    [warning] = [line for line in result.stderr.splitlines() if "continue_final_message" in line]
    assert "structured verdicts" in warning
    assert "errors {'unparseable': 1}" in " ".join(result.stdout.split())
