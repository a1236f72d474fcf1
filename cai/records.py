"""Pydantic records with lineage. No I/O here: every other layer builds on these."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["system", "user", "assistant"]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Role
    content: str


Chat = list[Message]


class ErrorCode(str, Enum):
    """Why a row failed. Every input ends as one result or one error row."""

    BACKEND_UNAVAILABLE = "backend_unavailable"
    BAD_REQUEST = "bad_request"
    CONTEXT_LENGTH = "context_length_exceeded"
    TRUNCATED = "truncated"
    EMPTY = "empty"
    UNPARSEABLE = "unparseable"
    NO_LOGPROBS = "no_logprobs"
    CANCELLED = "cancelled"
    INTERNAL = "internal"


class ErrorInfo(BaseModel):
    code: ErrorCode
    message: str
    raw: str | None = None


class SamplingParams(BaseModel):
    """What changes a completion. `max_tokens` is always set: no request is unbounded."""

    model_config = ConfigDict(extra="forbid")
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] | None = None


class Completion(BaseModel):
    """One engine answer. `error` is set when the backend failed for this request."""

    text: str = ""
    finish_reason: Literal["stop", "length", "error"] = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: ErrorInfo | None = None


class ConstitutionRef(BaseModel):
    """A constitution's identity: name + version + content sha, plus git commit when tracked."""

    name: str
    version: str
    sha256: str
    git_commit: str | None = None
    path: str | None = None


class ModelRef(BaseModel):
    id: str
    revision: str | None = None
    engine: str


class Lineage(BaseModel):
    constitution: ConstitutionRef
    principle_ids: list[str]
    model: ModelRef
    sampling: dict[str, SamplingParams]
    seed: int
    template_hash: str
    cai_version: str
    created_at: str = Field(default_factory=lambda: utc_now())


class SourcePrompt(BaseModel):
    """A prompt as read from a source: the conversation up to the turn to answer."""

    id: str
    messages: Chat
    source: str


class Step(BaseModel):
    """One turn of a critique-then-revise trajectory."""

    kind: Literal["answer", "critique", "revision"]
    principle_id: str | None = None
    text: str
    finish_reason: Literal["stop", "length", "error"]
    prompt_tokens: int = 0
    completion_tokens: int = 0


class SFTRecord(BaseModel):
    """Phase-1 result for one source prompt: the full trajectory and its final revision."""

    id: str
    stage: Literal["sft"] = "sft"
    parent_ids: list[str]
    prompt: Chat
    trajectory: list[Step]
    final: str | None = None
    lineage: Lineage
    error: ErrorInfo | None = None

    @property
    def generated_tokens(self) -> int:
        return sum(s.completion_tokens for s in self.trajectory)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def stable_id(stage: str, *parts: object) -> str:
    """Deterministic id from the stage and whatever identifies the input."""
    payload = json.dumps([stage, *parts], sort_keys=True, ensure_ascii=False, default=str)
    return f"{stage}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
