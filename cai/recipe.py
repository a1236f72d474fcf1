"""Typed job settings shared by the CLI, the service and notebooks."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cai.records import SamplingParams


class EngineSpec(BaseModel):
    """Which backend and model answer. `model=None` is the embedded SmolLM2-135M-Instruct."""

    model_config = ConfigDict(extra="forbid")
    backend: str = "auto"
    model: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class Phase1Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rounds: int = Field(2, ge=1)
    seed: int = 0
    answer: SamplingParams = SamplingParams(max_tokens=256)
    critique: SamplingParams = SamplingParams(max_tokens=192)
    revision: SamplingParams = SamplingParams(max_tokens=256)


class SFTJob(BaseModel):
    """Phase 1: a constitution and prompts in, a job directory with an SFT dataset out."""

    model_config = ConfigDict(extra="forbid")
    constitution: str
    prompts: str = "redteam"
    out: str
    engine: EngineSpec = Field(default_factory=EngineSpec)
    phase1: Phase1Config = Field(default_factory=Phase1Config)
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(256, ge=1, description="prompts per engine call and per shard")
    parquet: bool = Field(True, description="also export Parquet (JSONL is always written)")
    new_job: bool = False
