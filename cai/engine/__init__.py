"""Engines: one protocol (`Engine`), several backends, chosen by `make_engine`.

Backends are imported lazily, so `import cai.engine` never pulls in torch or vllm.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

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
    "is_secret_option",
    "make_engine",
    "redact_options",
    "resolve_backend",
    "resolve_model",
]

# Words that make an engine option's name a secret (api_key, hf_token, password, Authorization...);
# a name ending in `_env` names an environment variable instead (api_key_env) and is kept.
_SECRET_WORDS = frozenset({"key", "apikey", "token", "password", "passwd", "secret", "authorization", "auth",
                           "credential", "credentials", "cookie", "bearer"})


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


def is_secret_option(name: str) -> bool:
    """True for an option whose value is a credential: a word of its name (split at `_`, `-`, `.`,
    camelCase) is key, token, password, secret, authorization..., and it does not end in `_env`."""
    if name.lower().endswith("_env"):
        return False
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower().replace("-", "_").replace(".", "_").split("_")
    return any(word in _SECRET_WORDS for word in words)


def _without_userinfo(value: Any) -> Any:
    """A URL string without its `user:password@` part; any other value as is."""
    if not isinstance(value, str) or "@" not in value or "://" not in value:
        return value
    try:
        parts = urlsplit(value)
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=host)) if "@" in parts.netloc else value
    except ValueError:
        return value


def redact_options(options: dict[str, Any]) -> dict[str, Any]:
    """Engine options fit to write down (a job's manifest): secret options left out (nested mappings
    too), a URL's `user:password@` removed. The engine reads its key from the environment instead
    (openai: $OPENAI_API_KEY, or the variable named by the `api_key_env` option)."""
    return {k: redact_options(v) if isinstance(v, dict) else _without_userinfo(v)
            for k, v in options.items() if not is_secret_option(str(k))}


def make_engine(backend: str = "auto", model: str | None = None, **options) -> Engine:
    """Build an engine. "auto" is vllm when it is installed, else transformers.

    `model`: None or "embedded" for the embedded SmolLM2-135M-Instruct, a local
    folder, or (openai) the served model name. `options` go to the backend's
    constructor (e.g. max_batch_size, max_model_len, base_url, concurrency). The openai
    backend's key: `api_key`, else the environment variable `api_key_env` names (default
    OPENAI_API_KEY), so a recipe need not hold the key itself.
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
