"""The one engine protocol every stage talks to, and its written contract.

Stages hand an engine *all* requests of a step at once; a backend decides how to
batch them internally. The contract every backend keeps (`Engine` below spells it out per
method) is enforced once, by `cai.engine.checked.CheckedEngine`, which the registry puts
around every engine it builds:

- `generate` returns exactly one `Completion` per chat, in the chats' order; `choice_logprobs`
  exactly one `ChoiceScores` per chat. A wrong count is a bug in the backend
  (`EngineContractError`), never a user error.
- A request that fails comes back as its own error row (`Completion.error` /
  `ChoiceScores.error`) with an `ErrorCode`, never as None and never as an exception that fails
  its neighbours. The codes a backend sets:
    backend_unavailable      the backend could not be reached or did not answer (after its own
                             retries). A batch whose every row has it stops the job (EngineDown)
                             and is not written, so a rerun does it again.
    bad_request              the backend refused this request (a malformed chat, a 4xx).
    context_length_exceeded  the prompt does not fit the model's context.
    empty                    the backend answered with nothing usable (no choices).
    no_logprobs              (choice_logprobs) this request came back without log-probs.
    cancelled                the backend aborted the request.
    internal                 anything else that failed for this request alone.
  The stages add their own codes on top (truncated, unparseable, off_options); a backend does not
  set them. A length-capped answer is `finish_reason="length"`, not an error.
- An exception means the whole call cannot be done, for every request alike:
  `EngineCapabilityError` (the engine lacks a feature; one message naming the cause and the fix),
  its subclass `NoLogprobs` (the backend cannot score options at all), or `StopRequested`.

Stopping inside a step: the batch runner puts the job's stop check in `stop_scope` while it
processes a batch; retry and request loops (the judge's structured retries, OpenAIEngine's
backoff and requests) call `check_stop()` / `until_stopped()`, which raise StopRequested once
the check turns true. The runner turns that into `cancelled` rows for the batch in flight and
every input not started (see cai.batches.run_batches).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, Field

from cai.errors import CaiError
from cai.records import Chat, Completion, ErrorInfo, ModelRef, SamplingParams

TOP_ALTERNATIVES = 5
"""How many of the most likely tokens a backend reports next to the option scores."""


class EngineCapabilityError(CaiError, RuntimeError):
    """The engine cannot do what was asked for any request alike (its vLLM lacks a
    feature, its server ignores `continue_final_message`, its tokenizer cannot
    form an option): one exception naming the cause and the fix, not one error
    row per request."""


class NoLogprobs(EngineCapabilityError):
    """The backend cannot score options at all (`choice_logprobs`); the judge falls back to
    structured verdicts or reports `no_logprobs` rows."""


class EngineContractError(RuntimeError):
    """A backend broke the engine contract (e.g. returned fewer results than chats): a bug in that
    backend, reported with its traceback, never a user error."""


class EngineConfigError(CaiError, ValueError):
    """An engine spec names an unknown backend or an option its backend does not take, or gives an
    option a value of the wrong type: the message names the backend, the option and the valid ones."""


StopCheck = Callable[[], bool]
_STOP: ContextVar[StopCheck | None] = ContextVar("cai_stop_check", default=None)
_T = TypeVar("_T")


class StopRequested(RuntimeError):
    """The job's stop check turned true inside an engine call or a retry loop (see `stop_scope`)."""


@contextmanager
def stop_scope(stop: StopCheck | None) -> Iterator[None]:
    """Make `stop` the stop check that `check_stop()` consults while the block runs.

    A context variable: it follows the thread and the asyncio tasks started inside the block
    (a helper thread must be given a copy of the context, as `cai.engine.background_loop.BackgroundLoop.run` does)."""
    token = _STOP.set(stop)
    try:
        yield
    finally:
        _STOP.reset(token)


def check_stop() -> None:
    """Raise StopRequested when the current job asked to stop; a no-op outside `stop_scope`."""
    stop = _STOP.get()
    if stop is not None and stop():
        raise StopRequested("the job was asked to stop")


async def until_stopped(awaitable: Awaitable[_T], poll: float = 0.5) -> _T:
    """Await `awaitable` (a request, a backoff), checking the stop signal every `poll` seconds;
    on stop the awaitable is cancelled and StopRequested raised."""
    if _STOP.get() is None:
        return await awaitable
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            check_stop()
            if (await asyncio.wait({task}, timeout=poll))[0]:
                return task.result()
    finally:
        task.cancel()  # no-op once done; a stopped request or backoff ends here


class TokenLogprob(BaseModel):
    token: str
    logprob: float


class ChoiceScores(BaseModel):
    """Log-probabilities of each option as the first tokens of the assistant reply.

    `logprobs` maps option text -> log P(option | chat, prefix), unnormalised over
    the options (callers normalise). `top` lists the most likely tokens at the
    first option position, most likely first, as far as the backend knows them
    (what the model wanted to say instead). `bounded` names options the backend
    did not return: their value is an upper bound (the smallest returned
    log-prob), not the exact log-prob. `error` is set when the backend could not score.
    """

    logprobs: dict[str, float] | None = None
    top: list[TokenLogprob] = Field(default_factory=list)
    bounded: list[str] = Field(default_factory=list)
    error: ErrorInfo | None = None


@runtime_checkable
class Engine(Protocol):
    """A batched chat model. `backend` names the registered backend that built it; `model` is the
    model's identity for lineage and job fingerprints, computed by the backend's `model_ref` (the
    same function `cai.engine.engine_model_ref` uses before any model is loaded)."""

    backend: str
    model: ModelRef

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Completion]:
        """Exactly one completion per chat, in order; every request honours `params.max_tokens`.

        A request that fails is an error row (`finish_reason="error"`, `error.code` as listed in
        this module's docstring); it never fails its neighbours."""
        ...

    def choice_logprobs(
        self, chats: Sequence[Chat], options: Sequence[str], prefix: str = ""
    ) -> list[ChoiceScores]:
        """Exactly one ChoiceScores per chat, in order: each option scored as the continuation of the
        assistant turn that starts with `prefix`.

        The prefix is rendered as the chat template renders an assistant message
        that is continued (`continue_final_message`), so local backends and a
        vLLM server see the same text. A request that cannot be scored is a row with `error`;
        a backend that cannot score options at all raises `NoLogprobs`."""
        ...

    def close(self) -> None:
        """Release the model and its memory. Idempotent: a second call does nothing."""
        ...


@runtime_checkable
class HasControlTokens(Protocol):
    """An engine that knows its model's control tokens (optional, not part of `Engine`): the
    tokenizer's special and added tokens and its chat template's markers, e.g. DeepSeek's
    `<｜end▁of▁sentence｜>`. The judge breaks them up inside quoted text; an engine without a
    tokenizer (openai) gets cai.prompts' fixed list and its <|...|> / <｜...｜> breaks only."""

    control_tokens: tuple[str, ...]
