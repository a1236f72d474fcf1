"""The engine backends by name: what each takes (a typed options model), how it names its model, how
it is built. Adding a backend is one module with its engine class and one `register_backend` call.

    build_engine(EngineSpec(backend="transformers", options={"max_batch_size": 4}))

`check_engine_spec` validates a spec's backend and options without building anything, so a typo in
`--engine-option` or in a service's engine profile fails when the flags or settings are read, not
when the first job starts the engine. Every engine `build_engine` returns is wrapped in
`CheckedEngine`, which enforces the engine contract (cai.engine.base) once for every stage.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from cai.engine.base import Engine, EngineConfigError
from cai.engine.checked import checked
from cai.recipe import EngineSpec
from cai.records import ModelRef

__all__ = [
    "AUTO",
    "Backend",
    "available_backends",
    "backend_names",
    "build_engine",
    "check_engine_spec",
    "engine_model_ref",
    "get_backend",
    "make_engine",
    "parse_options",
    "register_backend",
    "resolve_backend",
]

AUTO = "auto"
AUTO_ORDER = ("vllm", "transformers")
"""What "auto" resolves to: the first of these that is installed, else the last."""


class Backend(BaseModel):
    """One registered engine backend.

    `options`: a pydantic model of the options the backend takes (unknown names are refused unless
    the model allows extra ones and checks them itself). `factory(model, options)` builds the engine;
    `model_ref(model, options)` is the model's identity without loading it, and the engine's own
    `.model` is computed by the same function. `available()`: its libraries are installed here."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    name: str
    summary: str
    options: type[BaseModel]
    factory: Callable[[str | None, Any], Engine]
    model_ref: Callable[[str | None, Any], ModelRef]
    available: Callable[[], bool]
    extra_option_names: Callable[[], Collection[str] | None] | None = None
    """For an options model that allows extra names: the names it accepts beyond its fields, None when
    they cannot be known here (then any name passes, and the backend's library checks it)."""
    extra_options_doc: str = ""
    """What the extra names are, for messages (e.g. "vLLM's engine arguments")."""


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend, replace: bool = False) -> Backend:
    """Make `backend` buildable by name. A second backend of the same name needs `replace=True`."""
    if backend.name == AUTO or not backend.name.isidentifier():
        raise ValueError(f"{backend.name!r} cannot name a backend")
    if backend.name in _BACKENDS and not replace:
        raise ValueError(f"an engine backend named {backend.name!r} is registered already")
    _BACKENDS[backend.name] = backend
    return backend


def backend_names() -> list[str]:
    """The registered backends, in registration order ("auto" is not one: it picks one of them)."""
    return list(_BACKENDS)


def resolve_backend(name: str) -> str:
    """"auto" -> vllm when it is installed, else transformers; another name is checked and returned."""
    if name == AUTO:
        installed = [n for n in AUTO_ORDER if n in _BACKENDS and _BACKENDS[n].available()]
        return installed[0] if installed else AUTO_ORDER[-1]
    if name not in _BACKENDS:
        raise EngineConfigError(f"unknown engine backend {name!r}{_did_you_mean(name, [AUTO, *_BACKENDS])}; "
                                f"choose one of {', '.join([AUTO, *_BACKENDS])}")
    return name


def get_backend(name: str) -> Backend:
    return _BACKENDS[resolve_backend(name)]


def available_backends() -> list[str]:
    """The registered backends whose libraries are installed here."""
    return [name for name, backend in _BACKENDS.items() if backend.available()]


def parse_options(backend: Backend, options: dict[str, Any], requested: str | None = None) -> BaseModel:
    """`options` validated by the backend's options model. An unknown name or a value of the wrong type
    raises EngineConfigError naming the option, the backend and the valid names (never a value: an
    option may hold a key). `requested`: the name the spec used ("auto"), for the message."""
    try:
        parsed = backend.options.model_validate(options)
    except ValidationError as exc:
        problems = [(".".join(str(p) for p in e["loc"]) or "options", None if e["type"] == "extra_forbidden" else e["msg"])
                    for e in exc.errors(include_input=False, include_url=False)]
        raise EngineConfigError(_describe(backend, problems, requested)) from None
    known = backend.extra_option_names() if backend.extra_option_names else None
    unknown = [(name, None) for name in parsed.model_extra or {} if known is not None and name not in known]
    if unknown:
        raise EngineConfigError(_describe(backend, unknown, requested))
    return parsed


def check_engine_spec(spec: EngineSpec) -> EngineSpec:
    """`spec` as given when its backend is registered and its options are what that backend takes;
    else EngineConfigError. Loads no model and starts no engine."""
    parse_options(get_backend(spec.backend), spec.options, spec.backend)
    return spec


def engine_model_ref(spec: EngineSpec) -> ModelRef:
    """The identity of the model `spec` names, without loading it (a finished job starts no engine):
    the same ModelRef the built engine reports as `.model`."""
    backend = get_backend(spec.backend)
    return backend.model_ref(spec.model, parse_options(backend, spec.options, spec.backend))


def build_engine(spec: EngineSpec) -> Engine:
    """Start the engine `spec` names, wrapped in CheckedEngine (the engine contract, enforced once)."""
    backend = get_backend(spec.backend)
    return checked(backend.factory(spec.model, parse_options(backend, spec.options, spec.backend)))


def make_engine(backend: str = AUTO, model: str | None = None, **options) -> Engine:
    """Build an engine: `build_engine(EngineSpec(backend=backend, model=model, options=options))`.

    `model`: None or "embedded" for the embedded SmolLM2-135M-Instruct, a local
    folder, or (openai) the served model name. `options` are the backend's options (e.g.
    max_batch_size, max_model_len, base_url, concurrency; see each backend's options model). The
    openai backend's key: `api_key`, else the environment variable `api_key_env` names (default
    OPENAI_API_KEY), so a recipe need not hold the key itself.
    """
    return build_engine(EngineSpec(backend=backend, model=model, options=options))


# ---- messages ------------------------------------------------------------------------------------


def _describe(backend: Backend, problems: list[tuple[str, str | None]], requested: str | None) -> str:
    """One message for (option, what is wrong with its value; None: no such option) pairs."""
    named = f"engine backend {backend.name!r}" + (
        f" (what {requested!r} picks here)" if requested and requested != backend.name else "")
    valid = _option_names(backend)
    lines = [f"{option!r} is not an option of the {named}{_did_you_mean(option, valid)}" if problem is None
             else f"option {option!r} of the {named}: {problem}" for option, problem in problems]
    return "; ".join(lines) + f". Its options: {_listing(backend, valid)}"


def _option_names(backend: Backend) -> list[str]:
    extra = backend.extra_option_names() if backend.extra_option_names else None
    return sorted({*backend.options.model_fields, *(extra or ())})


def _listing(backend: Backend, valid: list[str]) -> str:
    own = sorted(backend.options.model_fields)
    if len(valid) <= 24:
        return ", ".join(valid) or "(none)"
    more = backend.extra_options_doc or "its library's own"
    return f"{', '.join(own)}, and {len(valid) - len(own)} more: {more}"


def _did_you_mean(name: str, valid: Collection[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
