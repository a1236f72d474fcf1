"""OpenAIEngine keeps one client, connection pool and event loop for its lifetime."""

from __future__ import annotations

import asyncio
import gc
import threading
import time

import openai
import pytest
from fakeserver import FakeServer, chat_prompt_tokens, ok_body

from cai.engine.base import StopRequested, stop_scope
from cai.engine.openai_engine import EngineClosedError, OpenAIEngine
from cai.records import Message, SamplingParams

pytestmark = pytest.mark.timeout(60)
PARAMS = SamplingParams(max_tokens=4)


def chats(n: int, text: str = "x") -> list[list[Message]]:
    return [[Message(role="user", content=f"{text} {i}")] for i in range(n)]


def engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("cai-openai-") and t.is_alive()]


def wait_until(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture
def constructions(monkeypatch) -> list[openai.AsyncOpenAI]:
    made: list[openai.AsyncOpenAI] = []

    class Counted(openai.AsyncOpenAI):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            made.append(self)

    monkeypatch.setattr(openai, "AsyncOpenAI", Counted)
    return made


def scored_answer(body, n):
    entries = [{"token": "A", "logprob": -0.1, "bytes": None}, {"token": "B", "logprob": -2.0, "bytes": None}]
    content = [{"token": "A", "logprob": -0.1, "bytes": None, "top_logprobs": entries}]
    logprobs = {"content": content} if body.get("logprobs") else None
    return 200, {}, ok_body("ok", logprobs=logprobs, prompt_tokens=chat_prompt_tokens(body)), 0.01


def test_one_client_and_one_pool_serve_every_call(constructions):
    with FakeServer(scored_answer, keep_alive=True) as server:
        engine = OpenAIEngine("m", base_url=server.url, api_key="k", timeout=10, concurrency=4)
        for _ in range(5):
            outs = engine.generate(chats(8), PARAMS)
            assert [o.text for o in outs] == ["ok"] * 8
            scores = engine.choice_logprobs(chats(4), ["A", "B"], prefix="(")
            assert all(s.error is None for s in scores)
        engine.close()
    assert len(constructions) == 1
    assert len(server.calls) == 5 * 12 + 2  # and the continuation check, once
    assert server.connections <= 4  # the pool's connections are reused across calls


def test_close_closes_the_client_stops_the_loop_and_refuses_later_calls(constructions):
    before = set(engine_threads())
    with FakeServer(scored_answer) as server:
        engine = OpenAIEngine("m", base_url=server.url, api_key="k", timeout=10)
        engine.close()  # never used: nothing to close
        with pytest.raises(EngineClosedError, match="closed"):
            engine.generate(chats(1), PARAMS)
        used = OpenAIEngine("m", base_url=server.url, api_key="k", timeout=10)
        used.generate(chats(2), PARAMS)
        [client] = constructions
        assert not client.is_closed() and len(set(engine_threads()) - before) == 1
        used.close()
        assert client.is_closed()
        assert wait_until(lambda: set(engine_threads()) <= before)
        used.close()  # idempotent
        with pytest.raises(EngineClosedError, match="closed"):
            used.generate(chats(1), PARAMS)
        with pytest.raises(EngineClosedError):
            used.choice_logprobs(chats(1), ["A", "B"])
    assert len(server.calls) == 2


def test_a_dropped_engine_ends_its_thread():
    before = set(engine_threads())
    with FakeServer(scored_answer) as server:
        engine = OpenAIEngine("m", base_url=server.url, api_key="k", timeout=10)
        engine.generate(chats(1), PARAMS)
        del engine
        gc.collect()
        assert wait_until(lambda: set(engine_threads()) <= before)


def test_a_stop_ends_the_requests_in_flight_and_the_engine_stays_usable():
    stopped = threading.Event()

    def slow_then_quick(body, n):
        late = body["messages"][-1]["content"].startswith("slow")
        return 200, {}, ok_body("late" if late else "quick"), 30 if late else 0

    with FakeServer(slow_then_quick, keep_alive=True) as server:
        engine = OpenAIEngine("m", base_url=server.url, api_key="k", timeout=60, concurrency=2)
        threading.Timer(0.3, stopped.set).start()
        started = time.monotonic()
        with stop_scope(stopped.is_set), pytest.raises(StopRequested):
            engine.generate(chats(5, "slow"), PARAMS)
        assert time.monotonic() - started < 5
        assert wait_until(lambda: server.in_flight == 0)  # the requests were cancelled, not left running
        assert len(server.calls) == 2  # the three waiting for a slot never started
        with stop_scope(stopped.is_set):
            stopped.clear()
            assert [o.text for o in engine.generate(chats(3, "fast"), PARAMS)] == ["quick"] * 3
        engine.close()


def test_calls_from_inside_a_running_event_loop(constructions):
    with FakeServer(scored_answer) as server:
        engine = OpenAIEngine("m", base_url=server.url, api_key="k", timeout=10)

        async def main():
            direct = engine.generate(chats(2), PARAMS)  # blocks this loop, runs on the engine's own
            threaded = await asyncio.to_thread(engine.generate, chats(3), PARAMS)
            with stop_scope(lambda: True), pytest.raises(StopRequested):  # the stop check crosses over
                engine.generate(chats(1), PARAMS)
            return direct, threaded

        direct, threaded = asyncio.run(main())
        engine.close()
    assert [o.text for o in direct + threaded] == ["ok"] * 5
    assert len(constructions) == 1


def test_concurrency_is_bounded_across_callers():
    with FakeServer(lambda body, n: (200, {}, ok_body("ok"), 0.05)) as server:
        engine = OpenAIEngine("m", base_url=server.url, api_key="k", timeout=10, concurrency=3)
        threads = [threading.Thread(target=engine.generate, args=(chats(9), PARAMS)) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        engine.close()
    assert len(server.calls) == 27 and server.max_in_flight <= 3
