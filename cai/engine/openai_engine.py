"""Any OpenAI-compatible chat server (`vllm serve`, hosted APIs).

One `AsyncOpenAI` client (one connection pool) and one event loop on a daemon thread
(cai.engine.background_loop) serve every call for the engine's lifetime: both start at the
first call and end with `close()`, after which calls raise EngineClosedError. All requests
of a call run concurrently, at most `concurrency` in flight across the engine.

tenacity is the only retry layer (the client's own retries are off): 408/409/429/5xx,
timeouts and connection errors are retried with exponential backoff and jitter, waiting
what `Retry-After` asks when the server sends it. Other 4xx are never retried. Every
failure of a request ends as an error row (`Completion.error` / `ChoiceScores.error`),
never an exception (except StopRequested: every attempt, backoff and request in flight
ends when the job's stop check turns true, see cai.engine.base.stop_scope); a server that
ignores `continue_final_message` (so no option score would mean what the judge asks)
raises one NoLogprobs (ContinuationIgnored; the judge switches to structured verdicts)
instead. docs/llamacpp.md: what llama.cpp's two servers do.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence

import openai
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from cai.engine.background_loop import BackgroundLoop, LoopStopped
from cai.engine.base import (
    ChoiceScores,
    NoLogprobs,
    StopRequested,
    until_stopped,
)
from cai.engine.common import derive_seed, describe
from cai.engine.models import served_model_ref
from cai.engine.openai_scoring import (
    choice_body,
    erase_slots,
    prompt_tokens,
    to_scores,
    verify_continuation,
)
from cai.engine.stream import LoopStream
from cai.records import Chat, Completion, ErrorCode, ErrorInfo, SamplingParams

RETRYABLE_STATUS = frozenset({408, 409, 429})
log = logging.getLogger(__name__)


class EngineClosedError(RuntimeError):
    """A call on an OpenAIEngine after its `close()`: build a new engine instead."""


class OpenAIEngine:
    backend = "openai"

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 6,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        retry_after_max: float = 300.0,
        verify_continuation: bool = True,
        organization: str | None = None,
        default_headers: dict[str, str] | None = None,
    ):
        base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            raise ValueError("the openai backend needs base_url (or env OPENAI_BASE_URL)")
        self.base_url = base_url
        # The key: `api_key`, else the environment variable `api_key_env` names. A recipe names the
        # variable (api_key_env=...), never the key: manifests leave secret options out (cai.engine.redact_options).
        self.api_key = api_key or os.environ.get(api_key_env) or "EMPTY"
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.retry_after_max = retry_after_max
        # Checked once, on the first scoring call with a prefix; False skips the check.
        self.continuation_verified = not verify_continuation
        self.organization = organization
        self.default_headers = default_headers
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep  # tests patch this
        self.model = served_model_ref(model, self.backend)
        self._lock = threading.Lock()
        self._closed = False
        self._loop: BackgroundLoop | None = None  # with the client and semaphore, from the first call
        self._client: openai.AsyncOpenAI | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._finalizer: weakref.finalize | None = None

    # -- public API --

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Completion]:
        bodies = [chat_body(self.model.id, chat, params, derive_seed(params.seed, i)) for i, chat in enumerate(chats)]
        return self._run(bodies, _to_completion, _error_completion)

    def open_stream(self) -> LoopStream:
        """Requests sent as they are submitted, on this engine's client, pool and `concurrency` slots."""
        async def one(chat: Chat, params: SamplingParams) -> Completion:
            body = chat_body(self.model.id, chat, params, params.seed)
            return (await self._gather([body], _to_completion, _error_completion))[0]

        return LoopStream(self._start(), one)

    continuation_problem: NoLogprobs | None = None
    """Why this server cannot score after the judge's answer prefix, once found (ContinuationIgnored, or a
    refusal of log-probs): every later scoring call with a prefix raises it again at once, sending nothing."""

    def choice_logprobs(
        self, chats: Sequence[Chat], options: Sequence[str], prefix: str = ""
    ) -> list[ChoiceScores]:
        """First-token scoring from `top_logprobs` (OpenAI-compatible servers
        expose no prompt logprobs). An option that is not among the returned top
        tokens gets the smallest returned log-prob, an upper bound on its own, and
        is listed in `bounded`. A non-empty `prefix` is sent as a final assistant
        message to be continued (`continue_final_message`: vLLM's server, llama.cpp's
        `llama-server`); the first such call checks that the server honours it
        (`verify_continuation`, cai.engine.openai_scoring) and raises a NoLogprobs when not."""
        bodies = [choice_body(self.model.id, chat, prefix) for chat in chats]
        if prefix and bodies and not self.continuation_verified:
            self._check_continuation(bodies[0], prefix)
        return self._run(bodies, lambda r: to_scores(r, options), lambda e: ChoiceScores(error=e))

    def _check_continuation(self, body: dict, prefix: str) -> None:
        if self.continuation_problem is None:
            honoured, self.continuation_problem = verify_continuation(
                self._prompt_counts, body, prefix, self.base_url)
            self.continuation_verified = bool(honoured)
        if (problem := self.continuation_problem) is not None:
            raise type(problem)(*problem.args)

    def _prompt_counts(self, bodies: list[dict]) -> list[int | ErrorInfo | None]:
        return self._run(bodies, prompt_tokens, lambda error: error)

    def reset_prefix_cache(self) -> None:
        """Empty the server's prompt cache where it offers a way: llama.cpp's `llama-server` started with
        `--slot-save-path` (and `--cache-ram 0`) has every slot erased. `cai bench` calls this before each
        run so replays of the same prompts do not run warm; a server without a way is logged once."""
        if not erase_slots(self.base_url, self.api_key, self.timeout) and not self._cache_kept_logged:
            self._cache_kept_logged = True
            log.warning("the server at %s offers no way to empty its prompt cache (llama-server: start it with "
                        "--slot-save-path DIR --cache-ram 0): runs that repeat prompts may run warm", self.base_url)

    _cache_kept_logged = False

    def close(self) -> None:
        """Cancel any request in flight, close the client's connections and stop the loop. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._finalizer is not None:
            self._finalizer.detach()
            self._loop.stop(self._client.close)

    # -- machinery --

    def _start(self) -> BackgroundLoop:
        with self._lock:
            if self._closed:
                raise EngineClosedError(f"this openai engine ({self.model.id} at {self.base_url}) was closed")
            if self._loop is None:
                self._client = openai.AsyncOpenAI(
                    base_url=self.base_url, api_key=self.api_key, timeout=self.timeout, max_retries=0,
                    organization=self.organization, default_headers=self.default_headers,
                )
                self._semaphore = asyncio.Semaphore(self.concurrency)
                self._loop = BackgroundLoop(name=f"cai-openai-{self.model.id}")
                # An engine dropped without close() still ends its thread and connections.
                self._finalizer = weakref.finalize(self, self._loop.stop, self._client.close, False)
            return self._loop

    def _run(self, bodies: list[dict], convert, on_error) -> list:
        """`_gather` on the engine's loop, from this thread, in this thread's context (the stop check)."""
        loop = self._start()
        try:
            return loop.run(self._gather(bodies, convert, on_error))
        except LoopStopped as exc:
            raise EngineClosedError(f"this openai engine ({self.model.id}) was closed during the call") from exc

    async def _gather(self, bodies, convert, on_error) -> list:
        client, semaphore = self._client, self._semaphore

        async def one(body):
            try:
                response = await self._call(client, semaphore, body)
            except StopRequested:
                raise  # the job was stopped: the whole call ends, the batch runner writes cancelled rows
            except Exception as exc:
                return on_error(_error_info(exc))
            try:
                return convert(response)
            except Exception as exc:  # a malformed response fails alone
                return on_error(ErrorInfo(code=ErrorCode.INTERNAL, message=describe(exc)))

        tasks = [asyncio.ensure_future(one(b)) for b in bodies]
        try:
            return list(await asyncio.gather(*tasks))
        finally:  # the loop outlives the call: a stop (or a cancelled caller) ends every request of it
            pending = [t for t in tasks if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    async def _call(self, client, semaphore, body):
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=self._wait,
            retry=retry_if_exception(is_retryable),
            sleep=lambda seconds: until_stopped(self.sleep(seconds)),  # a backoff ends when the job stops
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                async with semaphore:  # a request waiting out a backoff holds no slot
                    return await until_stopped(client.chat.completions.create(**body))

    def _wait(self, retry_state) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        asked = retry_after_seconds(exc)
        if asked is not None:
            return min(asked, self.retry_after_max)
        backoff = wait_random_exponential(multiplier=self.backoff_initial, max=self.backoff_max)
        return backoff(retry_state)


# ---- retry policy ------------------------------------------------------------------


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in RETRYABLE_STATUS or exc.status_code >= 500
    return False


def retry_after_seconds(exc: BaseException | None, now: float | None = None) -> float | None:
    """Seconds the server asked us to wait: `retry-after-ms`, or `Retry-After`
    as seconds or as an HTTP date. None when absent or unreadable."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _error_info(exc: BaseException) -> ErrorInfo:
    if isinstance(exc, openai.APIStatusError) and not is_retryable(exc):
        raw = _body_text(exc)
        text = f"{exc.message} {raw or ''}".lower()
        context = "context length" in text or "context_length" in text or "maximum context" in text
        code = ErrorCode.CONTEXT_LENGTH if context else ErrorCode.BAD_REQUEST
        return ErrorInfo(code=code, message=f"HTTP {exc.status_code}: {exc.message}", raw=raw)
    if is_retryable(exc):
        status = getattr(exc, "status_code", None)
        where = f"HTTP {status}: " if status else ""
        return ErrorInfo(
            code=ErrorCode.BACKEND_UNAVAILABLE,
            message=f"gave up after retries; last error: {where}{describe(exc)}",
            raw=_body_text(exc),
        )
    return ErrorInfo(code=ErrorCode.INTERNAL, message=describe(exc))


def _body_text(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    try:
        return response.text if response is not None else None
    except Exception:
        return None


# ---- response mapping --------------------------------------------------------------


def chat_body(model: str, chat: Chat, params: SamplingParams, seed: int | None) -> dict:
    """The chat-completions request body of one generation request with its own seed."""
    body = dict(model=model, messages=_messages(chat), max_tokens=params.max_tokens,
                temperature=params.temperature, top_p=params.top_p)
    if seed is not None:
        body["seed"] = seed
    if params.stop:
        body["stop"] = list(params.stop)
    return body


def _messages(chat: Chat) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in chat]


def _error_completion(error: ErrorInfo) -> Completion:
    return Completion(finish_reason="error", error=error)


def _to_completion(response) -> Completion:
    usage = getattr(response, "usage", None)
    counts = dict(
        prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
        completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
    )
    if not response.choices:
        error = ErrorInfo(code=ErrorCode.EMPTY, message="the server returned no choices")
        return Completion(finish_reason="error", error=error, **counts)
    choice = response.choices[0]
    text = choice.message.content or ""
    if choice.finish_reason in ("stop", "length"):
        return Completion(text=text, finish_reason=choice.finish_reason, **counts)
    error = ErrorInfo(
        code=ErrorCode.INTERNAL, message=f"unexpected finish_reason {choice.finish_reason!r}"
    )
    return Completion(text=text, finish_reason="error", error=error, **counts)
