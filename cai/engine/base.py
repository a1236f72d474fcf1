"""The one engine protocol every stage talks to.

Stages hand an engine *all* requests of a step at once; a backend decides how to
batch them internally. Failures come back as `Completion.error`, never as None.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from pydantic import BaseModel

from cai.records import Chat, Completion, ErrorInfo, ModelRef, SamplingParams


class ChoiceScores(BaseModel):
    """Log-probabilities of each option as the first tokens of the assistant reply.

    `logprobs` maps option text -> log P(option | chat, prefix), unnormalised over
    the options (callers normalise). `error` is set when the backend could not score.
    """

    logprobs: dict[str, float] | None = None
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
        """Score each option as the continuation of the assistant turn that starts with `prefix`."""
        ...

    def close(self) -> None: ...
