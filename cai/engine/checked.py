"""The one place the engine contract (cai.engine.base) is enforced: `CheckedEngine` wraps a backend's
engine so every stage can rely on one result per input and on `NoLogprobs` meaning "cannot score".

The registry wraps every engine it builds; `checked(engine)` wraps one built elsewhere (a test's
FakeEngine, a caller's own engine) and leaves an already wrapped one as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cai.engine.base import ChoiceScores, Engine, EngineContractError, NoLogprobs
from cai.engine.stream import BatchedStream, RequestStream
from cai.records import Chat, Completion, ModelRef, SamplingParams

__all__ = ["CheckedEngine", "checked"]


class CheckedEngine:
    """An engine that keeps the contract: the wrapped engine's results, counted against the chats.

    Every other attribute (control_tokens, tokenizer, reset_prefix_cache, ...), read or set, is the
    wrapped engine's own; `inner` is the wrapped engine."""

    _OWN = frozenset({"inner", "_closed"})

    def __init__(self, inner: Engine):
        self.inner = inner
        self._closed = False

    @property
    def backend(self) -> str:
        return self.inner.backend

    @property
    def model(self) -> ModelRef:
        return self.inner.model

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copy, pickle): no recursion through __getattr__
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    def __repr__(self) -> str:
        return f"CheckedEngine({self.inner!r})"

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Completion]:
        if not chats:
            return []
        return _counted(self.backend, "generate", Completion, self.inner.generate(chats, params), chats)

    def choice_logprobs(self, chats: Sequence[Chat], options: Sequence[str], prefix: str = "") -> list[ChoiceScores]:
        if not chats:
            return []
        try:
            scores = self.inner.choice_logprobs(chats, options, prefix)
        except NotImplementedError as exc:  # an engine written before NoLogprobs existed
            raise NoLogprobs(str(exc) or f"the {self.backend} backend cannot score options") from exc
        return _counted(self.backend, "choice_logprobs", ChoiceScores, scores, chats)

    def open_stream(self) -> RequestStream:
        """The backend's own request stream, else one that batches over this engine's `generate`
        (cai.engine.stream.open_stream checks either)."""
        native = getattr(self.inner, "open_stream", None)
        return native() if callable(native) else BatchedStream(self)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.inner.close()


def _counted(backend: str, method: str, kind: type, results: Any, chats: Sequence[Chat]) -> list:
    """`results` when they are a list of one `kind` per chat; else EngineContractError."""
    if not isinstance(results, list):
        problem = f"a {type(results).__name__}, not a list"
    elif len(results) != len(chats):
        problem = f"{len(results)} results for {len(chats)} chats"
    else:
        wrong = next((i for i, r in enumerate(results) if not isinstance(r, kind)), None)
        if wrong is None:
            return results
        problem = f"{type(results[wrong]).__name__} for chat {wrong}, not a {kind.__name__}"
    raise EngineContractError(
        f"engine backend {backend!r} broke the engine contract: {method} returned {problem} (it must return "
        f"exactly one {kind.__name__} per chat, in order, a failure as that row's error); this is a bug in that "
        "backend, not in the job's input")


def checked(engine: Engine) -> Engine:
    """`engine` wrapped in CheckedEngine; an engine that is already wrapped as it is."""
    return engine if isinstance(engine, CheckedEngine) else CheckedEngine(engine)
