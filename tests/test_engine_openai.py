"""OpenAIEngine against a real local HTTP server imitating /v1/chat/completions."""

from __future__ import annotations

import time
from email.utils import formatdate

import pytest
from fakeserver import FakeServer, chat_prompt_tokens, error_body, ok_body

from cai.engine.base import EngineCapabilityError
from cai.engine.openai_engine import OpenAIEngine, retry_after_seconds
from cai.records import ErrorCode, Message, SamplingParams

pytestmark = pytest.mark.timeout(60)


def chat(text: str) -> list[Message]:
    return [Message(role="user", content=text)]


class SleepRecorder:
    def __init__(self):
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def make(server: FakeServer, **kw) -> tuple[OpenAIEngine, SleepRecorder]:
    engine = OpenAIEngine("m", base_url=server.url, api_key="k", timeout=10, **kw)
    engine.sleep = SleepRecorder()
    return engine, engine.sleep


def last_user(body: dict) -> str:
    return body["messages"][-1]["content"]


def test_429_retry_after_seconds_is_honoured():
    def script(body, n):
        if n == 0:
            return 429, {"Retry-After": "7"}, error_body("slow down"), 0
        return 200, {}, ok_body("hi"), 0

    with FakeServer(script) as server:
        engine, sleeps = make(server)
        [out] = engine.generate([chat("x")], SamplingParams(max_tokens=8))
    assert out.error is None and out.text == "hi" and out.finish_reason == "stop"
    assert (out.prompt_tokens, out.completion_tokens) == (5, 3)
    assert sleeps.waits == [7.0]
    assert len(server.calls) == 2
    assert server.calls[0]["max_tokens"] == 8


def test_429_retry_after_http_date_really_waits():
    def script(body, n):
        if n == 0:
            when = formatdate(time.time() + 2, usegmt=True)
            return 429, {"Retry-After": when}, error_body("x"), 0
        return 200, {}, ok_body("late"), 0

    with FakeServer(script) as server:
        engine = OpenAIEngine("m", base_url=server.url, timeout=10)
        start = time.monotonic()
        [out] = engine.generate([chat("x")], SamplingParams(max_tokens=8))
        elapsed = time.monotonic() - start
    assert out.text == "late"
    assert 0.9 <= elapsed < 5  # the date has 1 s resolution


def test_503_then_success_backs_off():
    def script(body, n):
        if n < 2:
            return 503, {}, error_body("overloaded"), 0
        return 200, {}, ok_body("ok"), 0

    with FakeServer(script) as server:
        engine, sleeps = make(server, backoff_initial=0.5, backoff_max=4)
        [out] = engine.generate([chat("x")], SamplingParams(max_tokens=8))
    assert out.text == "ok"
    assert len(server.calls) == 3
    assert len(sleeps.waits) == 2 and all(0 <= w <= 4 for w in sleeps.waits)


def test_400_is_never_retried():
    def script(body, n):
        return 400, {}, error_body("unsupported parameter: foo"), 0

    with FakeServer(script) as server:
        engine, sleeps = make(server)
        [out] = engine.generate([chat("x")], SamplingParams(max_tokens=8))
    assert len(server.calls) == 1
    assert sleeps.waits == []
    assert out.finish_reason == "error"
    assert out.error.code == ErrorCode.BAD_REQUEST
    assert "unsupported parameter" in out.error.raw


def test_context_length_400_is_its_own_code():
    def script(body, n):
        msg = "This model's maximum context length is 2048 tokens. However, you requested 9000."
        return 400, {}, error_body(msg), 0

    with FakeServer(script) as server:
        engine, _ = make(server)
        [out] = engine.generate([chat("x")], SamplingParams(max_tokens=8))
    assert out.error.code == ErrorCode.CONTEXT_LENGTH
    assert len(server.calls) == 1


def test_retries_exhausted_is_backend_unavailable():
    def script(body, n):
        return 500, {}, error_body("boom"), 0

    with FakeServer(script) as server:
        engine, sleeps = make(server, max_retries=2)
        [out] = engine.generate([chat("x")], SamplingParams(max_tokens=8))
    assert len(server.calls) == 3
    assert len(sleeps.waits) == 2
    assert out.error.code == ErrorCode.BACKEND_UNAVAILABLE
    assert "500" in out.error.message


def test_connection_refused_is_backend_unavailable():
    with FakeServer(lambda b, n: (200, {}, ok_body(""), 0)) as server:
        url = server.url
    engine = OpenAIEngine("m", base_url=url, max_retries=1, timeout=2)
    engine.sleep = SleepRecorder()
    [out] = engine.generate([chat("x")], SamplingParams(max_tokens=8))
    assert out.error.code == ErrorCode.BACKEND_UNAVAILABLE
    assert engine.sleep.waits and len(engine.sleep.waits) == 1


def test_concurrency_bound_and_order_preserved():
    def script(body, n):
        text = last_user(body)
        delay = 0.05 + 0.1 * (int(text) % 3 == 0)  # uneven latency shuffles completion order
        return 200, {}, ok_body(f"echo {text}"), delay

    with FakeServer(script) as server:
        engine, _ = make(server, concurrency=3)
        outs = engine.generate([chat(str(i)) for i in range(20)], SamplingParams(max_tokens=8))
    assert [o.text for o in outs] == [f"echo {i}" for i in range(20)]
    assert 2 <= server.max_in_flight <= 3
    assert len(server.calls) == 20


def test_mixed_batch_one_failure_does_not_sink_the_rest():
    def script(body, n):
        if last_user(body) == "bad":
            return 400, {}, error_body("nope"), 0
        return 200, {}, ok_body("fine", finish="length"), 0

    with FakeServer(script) as server:
        engine, _ = make(server)
        outs = engine.generate([chat("a"), chat("bad"), chat("c")], SamplingParams(max_tokens=3))
    assert [o.finish_reason for o in outs] == ["length", "error", "length"]
    assert outs[1].error.code == ErrorCode.BAD_REQUEST


def test_request_fields_and_per_request_seed():
    with FakeServer(lambda b, n: (200, {}, ok_body("x"), 0)) as server:
        engine, _ = make(server)
        params = SamplingParams(max_tokens=5, temperature=0.7, top_p=0.9, seed=10, stop=["\n"])
        engine.generate([chat("a"), chat("a")], params)
    seeds = sorted(c["seed"] for c in server.calls)
    assert seeds == [10, 11]
    assert all(c["stop"] == ["\n"] and c["temperature"] == 0.7 for c in server.calls)


def _logprob_body(top: list[tuple[str, float]], prompt_tokens: int = 5) -> dict:
    entries = [{"token": t, "logprob": lp, "bytes": None} for t, lp in top]
    content = [{"token": top[0][0], "logprob": top[0][1], "bytes": None, "top_logprobs": entries}]
    return ok_body(top[0][0], finish="length", logprobs={"content": content}, prompt_tokens=prompt_tokens)


def vllm_like(top: list[tuple[str, float]], honours_continuation: bool = True):
    """A script answering `top` with the prompt tokens a vLLM server would count."""
    def script(body, n):
        return 200, {}, _logprob_body(top, chat_prompt_tokens(body, honours_continuation)), 0
    return script


def test_choice_logprobs_reads_top_logprobs_and_sends_prefix():
    with FakeServer(vllm_like([("A", -0.2), ("B", -1.9), ("C", -4.0)])) as server:
        engine, _ = make(server)
        [scores] = engine.choice_logprobs([chat("q")], ["A", "B"], prefix="The answer is (")
        assert len(server.calls) == 3  # the continuation check (2 requests), then the batch
        engine.choice_logprobs([chat("q")], ["A", "B"], prefix="The answer is (")
        assert len(server.calls) == 4  # checked once per engine
    assert scores.error is None and scores.bounded == []
    assert scores.logprobs == pytest.approx({"A": -0.2, "B": -1.9})
    assert [t.token for t in scores.top] == ["A", "B", "C"]
    body = server.calls[-1]
    assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 20
    assert body["messages"][-1] == {"role": "assistant", "content": "The answer is ("}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False


def test_choice_logprobs_bounds_a_missing_option_and_reports_missing_logprobs():
    def script(body, n):
        if last_user(body) == "none":
            return 200, {}, ok_body("A", finish="length"), 0
        return 200, {}, _logprob_body([("Z", -3.0), ("A", -0.1)]), 0

    with FakeServer(script) as server:
        engine, _ = make(server)
        missing, none = engine.choice_logprobs([chat("q"), chat("none")], ["A", "B"])
    # B is not among the returned tokens: at most as likely as the least likely returned one
    assert missing.error is None and missing.bounded == ["B"]
    assert missing.logprobs == pytest.approx({"A": -0.1, "B": -3.0})
    assert [(t.token, t.logprob) for t in missing.top] == [("A", -0.1), ("Z", -3.0)]
    assert none.error.code == ErrorCode.NO_LOGPROBS
    assert "continue_final_message" not in server.calls[0]


def test_server_that_ignores_continue_final_message_is_one_clear_error():
    script = vllm_like([("The", -0.1), ("A", -5.0)], honours_continuation=False)
    with FakeServer(script) as server:
        engine, _ = make(server)
        with pytest.raises(EngineCapabilityError, match="ignores continue_final_message") as info:
            engine.choice_logprobs([chat("q")] * 4, ["A", "B"], prefix="The answer is: (")
        assert len(server.calls) == 4  # the two checks only: no batch of rows scored after a new turn
        assert server.url in str(info.value) and "--mode structured" in str(info.value)
        unchecked, _ = make(server, verify_continuation=False)
        [scores] = unchecked.choice_logprobs([chat("q")], ["A", "B"], prefix="The answer is: (")
    assert scores.error is None and scores.bounded == ["B"]


def test_continuation_check_without_usage_is_retried_later():
    answers = iter([0, 0])  # the first check gets no usage counts: unknown, not an error

    def script(body, n):
        counted = next(answers, None)
        tokens = chat_prompt_tokens(body) if counted is None else counted
        return 200, {}, _logprob_body([("A", -0.1), ("B", -2.0)], tokens), 0

    with FakeServer(script) as server:
        engine, _ = make(server)
        engine.choice_logprobs([chat("q")], ["A", "B"], prefix="(")
        assert not engine.continuation_verified
        engine.choice_logprobs([chat("q")], ["A", "B"], prefix="(")
        assert engine.continuation_verified


def test_generate_inside_a_running_event_loop():
    import asyncio

    async def main():
        with FakeServer(lambda b, n: (200, {}, ok_body("in loop"), 0)) as server:
            engine, _ = make(server)
            return engine.generate([chat("x")], SamplingParams(max_tokens=4))

    [out] = asyncio.run(main())
    assert out.text == "in loop"


def test_retry_after_parsing():
    class R:
        def __init__(self, headers):
            self.headers = headers

    class E(Exception):
        def __init__(self, headers):
            self.response = R(headers)

    assert retry_after_seconds(E({"retry-after": "3"})) == 3.0
    assert retry_after_seconds(E({"retry-after-ms": "250"})) == 0.25
    assert retry_after_seconds(E({})) is None
    assert retry_after_seconds(E({"retry-after": "soon"})) is None
    date = formatdate(1000.0 + 30, usegmt=True)
    assert retry_after_seconds(E({"retry-after": date}), now=1000.0) == pytest.approx(30.0)
