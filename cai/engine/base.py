"""The one engine protocol every stage talks to.

Stages hand an engine *all* requests of a step at once; a backend decides how to
batch them internally. Failures come back as `Completion.error`, never as None.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, Field

from cai.records import Chat, Completion, ErrorInfo, ModelRef, SamplingParams

TOP_ALTERNATIVES = 5
"""How many of the most likely tokens a backend reports next to the option scores."""


class EngineCapabilityError(RuntimeError):
    """The engine cannot do what was asked for any request alike (its vLLM lacks a
    feature, its server ignores `continue_final_message`, its tokenizer cannot
    form an option): one exception naming the cause and the fix, not one error
    row per request."""


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
    backend: str
    model: ModelRef

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Completion]:
        """One completion per chat, in order. Every request honours params.max_tokens."""
        ...

    def choice_logprobs(
        self, chats: Sequence[Chat], options: Sequence[str], prefix: str = ""
    ) -> list[ChoiceScores]:
        """Score each option as the continuation of the assistant turn that starts with `prefix`.

        The prefix is rendered as the chat template renders an assistant message
        that is continued (`continue_final_message`), so local backends and a
        vLLM server see the same text."""
        ...

    def close(self) -> None: ...
