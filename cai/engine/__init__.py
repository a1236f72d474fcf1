"""Engines: one protocol (`Engine`, its contract in cai.engine.base), several backends in a registry
(cai.engine.registry; the built-in ones in cai.engine.backends).

    engine = build_engine(EngineSpec(backend="transformers"))

Backends are imported lazily, so `import cai.engine` never pulls in torch or vllm.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from cai.engine import backends as _builtin_backends  # noqa: F401  (registers vllm, transformers, openai, fake)
from cai.engine.base import (
    ChoiceScores,
    Engine,
    EngineCapabilityError,
    EngineConfigError,
    NoLogprobs,
)
from cai.engine.checked import CheckedEngine, checked
from cai.engine.models import EMBEDDED_MODEL, resolve_model
from cai.engine.registry import (
    AUTO,
    Backend,
    available_backends,
    backend_names,
    build_engine,
    check_engine_spec,
    engine_model_ref,
    make_engine,
    register_backend,
    resolve_backend,
)

BACKENDS = (AUTO, *backend_names())
"""The backends built in (a backend registered later is in `backend_names()`, not here)."""

__all__ = [
    "BACKENDS",
    "Backend",
    "CheckedEngine",
    "ChoiceScores",
    "EMBEDDED_MODEL",
    "Engine",
    "EngineCapabilityError",
    "EngineConfigError",
    "NoLogprobs",
    "available_backends",
    "backend_names",
    "build_engine",
    "check_engine_spec",
    "checked",
    "engine_model_ref",
    "is_secret_option",
    "make_engine",
    "redact_options",
    "register_backend",
    "resolve_backend",
    "resolve_model",
]

# Words that make an engine option's name a secret (api_key, hf_token, password, Authorization...);
# a name ending in `_env` names an environment variable instead (api_key_env) and is kept.
_SECRET_WORDS = frozenset({"key", "apikey", "token", "password", "passwd", "secret", "authorization", "auth",
                           "credential", "credentials", "cookie", "bearer"})


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
