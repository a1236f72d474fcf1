"""Progress of a job as typed events, emitted on the driver as the job plans, calls the engine and
commits batches. A consumer (`cai generate`'s progress bar, the service's job row) is a
`ProgressHook`: one callable taking any of them; it should ignore event types it does not know.

For one stage of one run, the rows written are the sum of `BatchCommitted.rows` and
`BatchCancelled.rows`, and its error rows by code the sum of their `errors`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Event(BaseModel):
    model_config = ConfigDict(frozen=True)
    stage: str = Field(description="the stage the event belongs to (sft, samples, prefs, judge-eval, ...)")


class Planned(Event):
    """The stage's plan: `total` inputs to do in this run, `done_before` finished by earlier runs."""

    event: Literal["planned"] = "planned"
    total: int
    done_before: int = 0


class StepStarted(Event):
    """`requests` chats of a stage step (answer, critique, revision, sample, judge...) went through the
    engine: one event per step of a batch when step-batched, one per group of finished requests when
    phase 1 runs continuously."""

    event: Literal["step"] = "step"
    name: str
    requests: int


class BatchCommitted(Event):
    """A batch's records are in the job directory (its shard is written)."""

    event: Literal["committed"] = "committed"
    batch_id: str
    rows: int
    errors: dict[str, int] = Field(default_factory=dict, description="error rows by code")
    generated_tokens: int = 0
    seconds: float = Field(0.0, description="engine time of the batch")


class BatchCancelled(Event):
    """A batch not processed (the job was stopped) is in the job directory as `cancelled` error rows."""

    event: Literal["cancelled"] = "cancelled"
    batch_id: str
    rows: int


ProgressEvent = Planned | StepStarted | BatchCommitted | BatchCancelled
ProgressHook = Callable[[ProgressEvent], None]


def step_hook(progress: ProgressHook | None, stage: str) -> Callable[[str, int], None] | None:
    """A stage function's `on_step(name, requests)` callback that reports StepStarted events."""
    if progress is None:
        return None
    return lambda name, requests: progress(StepStarted(stage=stage, name=name, requests=requests))
