"""Engines: one protocol (`Engine`), several backends, chosen by `make_engine`.

Backends are imported lazily, so `import cai.engine` never pulls in torch or vllm.
"""

from __future__ import annotations

import importlib.util
import os

from cai.engine.base import ChoiceScores, Engine, EngineCapabilityError
from cai.engine.models import EMBEDDED_MODEL, resolve_model

BACKENDS = ("auto", "vllm", "transformers", "openai")

__all__ = [
    "BACKENDS",
    "ChoiceScores",
    "EMBEDDED_MODEL",
    "Engine",
    "EngineCapabilityError",
    "available_backends",
    "make_engine",
    "resolve_backend",
    "resolve_model",
]


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available_backends() -> list[str]:
    """Backends whose libraries are installed here (the fake engine is for tests only)."""
    found = []
    if _has("vllm"):
        found.append("vllm")
    if _has("transformers") and _has("torch"):
        found.append("transformers")
    if _has("openai") and _has("tenacity"):
        found.append("openai")
    return found


def resolve_backend(backend: str) -> str:
    """"auto" -> vllm when it is installed, else transformers; others are checked and returned."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown engine backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "vllm" if _has("vllm") else "transformers"
    return backend


def make_engine(backend: str = "auto", model: str | None = None, **options) -> Engine:
    """Build an engine. "auto" is vllm when it is installed, else transformers.

    `model`: None or "embedded" for the embedded SmolLM2-135M-Instruct, a local
    folder, or (openai) the served model name. `options` go to the backend's
    constructor (e.g. max_batch_size, max_model_len, base_url, concurrency).
    """
    backend = resolve_backend(backend)
    if backend == "vllm":
        from cai.engine.vllm_engine import VLLMEngine

        return VLLMEngine(model, **options)
    if backend == "transformers":
        from cai.engine.hf import TransformersEngine

        return TransformersEngine(model, **options)
    from cai.engine.openai_engine import OpenAIEngine

    base_url = options.pop("base_url", None) or os.environ.get("OPENAI_BASE_URL")
    if not base_url:
        raise ValueError("the openai backend needs base_url= (or env OPENAI_BASE_URL)")
    if not model:
        raise ValueError("the openai backend needs model= (the served model name)")
    return OpenAIEngine(model, base_url=base_url, **options)
