"""A scripted engine for tests and dry runs (backend `fake`: `cai generate sft --engine fake`).
It needs no model and is never a default."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence

from cai.engine.base import ChoiceScores, NoLogprobs, check_stop
from cai.engine.common import derive_seed
from cai.engine.stream import BatchedStream, RequestStream
from cai.records import Chat, Completion, ModelRef, SamplingParams

Responder = Callable[[Chat, SamplingParams], "str | Completion"]
Chooser = Callable[[Chat, Sequence[str], str], "dict[str, float] | ChoiceScores"]


FAKE_MODEL_ID = "fake-model"
FAKE_REVISION = "0"


def echo_responder(chat: Chat, params: SamplingParams) -> str:
    return f"reply to: {chat[-1].content[:40]}"


def varied_responder() -> Responder:
    """Like echo_responder, numbered per request, so K samples of one prompt differ (a phase-2 dry run
    gets pairs to judge)."""
    count = itertools.count(1)
    return lambda chat, params: f"reply {next(count)} to: {chat[-1].content[:40]}"


def uniform_chooser(chat: Chat, options: Sequence[str], prefix: str) -> dict[str, float]:
    """Every option equally likely (a dry run's judge)."""
    return {option: 0.0 for option in options}


def fake_model_ref(model_id: str = FAKE_MODEL_ID) -> ModelRef:
    """The fake model's identity: fixed for a model id, so a dry-run job resumes."""
    return ModelRef(id=model_id, revision=FAKE_REVISION, engine="fake")


class FakeEngine:
    """Answers with `responder(chat, params)`; records every batch it was handed."""

    backend = "fake"

    def __init__(
        self,
        responder: Responder = echo_responder,
        chooser: Chooser | None = None,
        model_id: str = FAKE_MODEL_ID,
        keep_batches: bool = True,
        finish_order_seed: int | None = None,
    ):
        self.responder = responder
        self.chooser = chooser
        self.model = fake_model_ref(model_id)
        self.keep_batches = keep_batches  # off for memory tests: kept batches grow with the job
        # Set: the engine has a request stream (cai.engine.stream) that finishes a random share of
        # the pending requests at each wait, in a random order drawn from this seed.
        self.finish_order_seed = finish_order_seed
        self.batches: list[list[Chat]] = []
        self.choice_batches: list[list[Chat]] = []

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Completion]:
        if self.keep_batches:
            self.batches.append(list(chats))
        # Request i of a call seeded s is seeded s + i, as in every backend.
        return [self._complete(chat, params.model_copy(update={"seed": derive_seed(params.seed, i)}))
                for i, chat in enumerate(chats)]

    def _complete(self, chat: Chat, params: SamplingParams) -> Completion:
        out = self.responder(chat, params)
        if isinstance(out, Completion):
            return out
        words = out.split()
        if len(words) > params.max_tokens:
            return Completion(
                text=" ".join(words[: params.max_tokens]),
                finish_reason="length",
                prompt_tokens=sum(len(m.content.split()) for m in chat),
                completion_tokens=params.max_tokens,
            )
        return Completion(
            text=out,
            finish_reason="stop",
            prompt_tokens=sum(len(m.content.split()) for m in chat),
            completion_tokens=len(words),
        )

    def open_stream(self) -> RequestStream:
        if self.finish_order_seed is None:
            return BatchedStream(self)
        return _ShuffledStream(self, random.Random(self.finish_order_seed))

    def choice_logprobs(
        self, chats: Sequence[Chat], options: Sequence[str], prefix: str = ""
    ) -> list[ChoiceScores]:
        if self.chooser is None:
            raise NoLogprobs("FakeEngine needs a chooser to score options")
        if self.keep_batches:
            self.choice_batches.append(list(chats))
        results = []
        for chat in chats:
            out = self.chooser(chat, options, prefix)
            results.append(out if isinstance(out, ChoiceScores) else ChoiceScores(logprobs=out))
        return results

    def close(self) -> None:
        pass


class _ShuffledStream:
    """Finishes a random non-empty share of what is pending at each wait, in a random order."""

    def __init__(self, engine: FakeEngine, rng: random.Random):
        self.engine, self.rng = engine, rng
        self.pending: list[tuple[object, Chat, SamplingParams]] = []

    def submit(self, key, chat: Chat, params: SamplingParams) -> None:
        self.pending.append((key, chat, params))

    def wait(self) -> list[tuple[object, Completion]]:
        check_stop()
        self.rng.shuffle(self.pending)
        cut = self.rng.randint(1, len(self.pending)) if self.pending else 0
        finished, self.pending = self.pending[:cut], self.pending[cut:]
        if self.engine.keep_batches and finished:
            self.engine.batches.append([chat for _, chat, _ in finished])
        return [(key, self.engine._complete(chat, params)) for key, chat, params in finished]

    def close(self) -> None:
        self.pending = []
