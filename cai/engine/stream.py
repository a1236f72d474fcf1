"""Requests one at a time, completions as they finish: what trajectory-level continuous batching
(cai.critique's `schedule="continuous"`) needs from an engine.

A stage `submit`s a request under its own key as soon as it knows it, and `wait`s for whichever
requests finish next; the engine keeps its batch full meanwhile (vLLM's request queue, the openai
backend's concurrent requests). `params.seed` is the request's own seed, used as is (an engine's
`generate` derives seed + i per request of a call instead), so a request's result never depends
on when it was submitted or what ran beside it.

A backend opts in with an `open_stream()` method; any other engine gets `BatchedStream`, which
sends what is pending as `generate` calls when waited on (the step-batched behaviour).
`open_stream(engine)` is the one entry point; it checks the contract of every stream: each
submitted key comes back exactly once, with a `Completion`.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Coroutine, Hashable, Sequence
from typing import Any, Protocol, runtime_checkable

from cai.engine.background_loop import BackgroundLoop, LoopStopped
from cai.engine.base import Engine, EngineContractError, check_stop
from cai.records import Chat, Completion, SamplingParams

__all__ = ["RequestStream", "BatchedStream", "LoopStream", "open_stream"]


@runtime_checkable
class RequestStream(Protocol):
    def submit(self, key: Hashable, chat: Chat, params: SamplingParams) -> None:
        """Queue one request; `params.seed` is its own seed (None: unseeded)."""
        ...

    def wait(self) -> list[tuple[Hashable, Completion]]:
        """Block until at least one submitted request has finished and return those that have, as
        (key, completion) pairs in any order; [] when nothing is pending. A failed request is a
        completion with `error`, as from `Engine.generate`."""
        ...

    def close(self) -> None:
        """Abort every request still pending. Idempotent."""
        ...


class BatchedStream:
    """A stream over a plain engine: `wait` sends everything pending as `generate` calls, one per run
    of requests with the same settings and consecutive seeds (the seeds `generate` would derive)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.pending: list[tuple[Hashable, Chat, SamplingParams]] = []

    def submit(self, key: Hashable, chat: Chat, params: SamplingParams) -> None:
        self.pending.append((key, chat, params))

    def wait(self) -> list[tuple[Hashable, Completion]]:
        pending, self.pending = self.pending, []
        done: list[tuple[Hashable, Completion]] = []
        for run in _generate_runs(pending):
            completions = self.engine.generate([chat for _, chat, _ in run], run[0][2])
            done.extend((key, completion) for (key, _, _), completion in zip(run, completions))
        return done

    def close(self) -> None:
        self.pending = []


def _generate_runs(requests: Sequence[tuple[Hashable, Chat, SamplingParams]]) -> list[list]:
    """`requests` cut into runs one `generate` call can serve: the same settings but the seed, and
    seeds that step by one (request i of a call seeded s gets s + i), no seed, or greedy decoding."""
    runs: list[list] = []
    for request in requests:
        params = request[2]
        if runs:
            first = runs[-1][0][2]
            same = first.model_copy(update={"seed": params.seed}) == params
            expected = None if first.seed is None else first.seed + len(runs[-1])
            if same and (params.seed == expected or params.temperature == 0):  # greedy: seeds unused
                runs[-1].append(request)
                continue
        runs.append([request])
    return runs


class LoopStream:
    """A stream whose requests are coroutines on a BackgroundLoop (the openai backend's concurrent
    requests): each starts when submitted, in the submitter's context (its stop check)."""

    def __init__(self, loop: BackgroundLoop, request: Callable[[Chat, SamplingParams], Coroutine[Any, Any, Completion]],
                 poll: float = 0.5):
        self.loop, self.request, self.poll = loop, request, poll
        self.futures: dict[concurrent.futures.Future, Hashable] = {}

    def submit(self, key: Hashable, chat: Chat, params: SamplingParams) -> None:
        self.futures[self.loop.submit(self.request(chat, params))] = key

    def wait(self) -> list[tuple[Hashable, Completion]]:
        done: set = set()
        while self.futures and not done:
            check_stop()
            done, _ = concurrent.futures.wait(self.futures, timeout=self.poll,
                                              return_when=concurrent.futures.FIRST_COMPLETED)
        finished = []
        for future in done:
            key = self.futures.pop(future)
            try:
                finished.append((key, future.result()))
            except concurrent.futures.CancelledError:
                raise LoopStopped("the engine was closed while its requests were pending") from None
        return finished

    def close(self) -> None:
        for future in self.futures:
            future.cancel()  # cancels the task on the loop: its request ends
        self.futures.clear()


class CheckedStream:
    """The stream contract, checked: every key is submitted once and comes back once, as a Completion."""

    def __init__(self, inner: RequestStream, backend: str):
        self.inner, self.backend = inner, backend
        self.pending: set[Hashable] = set()

    def submit(self, key: Hashable, chat: Chat, params: SamplingParams) -> None:
        if key in self.pending:
            raise ValueError(f"request key {key!r} is already pending on this stream")
        self.pending.add(key)
        self.inner.submit(key, chat, params)

    def wait(self) -> list[tuple[Hashable, Completion]]:
        if not self.pending:
            return []
        done = self.inner.wait()
        for key, completion in done:
            if key not in self.pending or not isinstance(completion, Completion):
                raise EngineContractError(
                    f"engine backend {self.backend!r} broke the stream contract: it returned "
                    f"{type(completion).__name__} for key {key!r}, which is not pending (each submitted request "
                    "comes back exactly once, as a Completion); this is a bug in that backend")
            self.pending.discard(key)
        if not done:
            raise EngineContractError(f"engine backend {self.backend!r} broke the stream contract: wait() returned "
                                      f"nothing while {len(self.pending)} request(s) were pending")
        return done

    def close(self) -> None:
        self.pending.clear()
        self.inner.close()

    def __enter__(self) -> CheckedStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_stream(engine: Engine) -> CheckedStream:
    """The engine's own request stream if its backend has one, else a BatchedStream over `generate`;
    checked either way. Close it (or use it as a context manager) to abort what is still pending."""
    native = getattr(engine, "open_stream", None)
    return CheckedStream(native() if callable(native) else BatchedStream(engine), engine.backend)
