"""The engine registry: backends by name, typed options checked when flags or settings are read, one
model identity per backend, the engine contract enforced once, and the fake backend's dry run."""

from __future__ import annotations

import importlib.util
import inspect
import json
import subprocess
import sys
import textwrap

import pytest
from pydantic import BaseModel, ValidationError

from cai.engine import (
    CheckedEngine,
    EngineConfigError,
    NoLogprobs,
    available_backends,
    backend_names,
    build_engine,
    check_engine_spec,
    checked,
    engine_model_ref,
    make_engine,
    register_backend,
    registry,
    resolve_backend,
)
from cai.engine.backends import (
    OpenAIOptions,
    TransformersOptions,
    VLLMOptions,
    vllm_engine_arg_names,
)
from cai.engine.base import EngineContractError
from cai.engine.fake import FakeEngine, fake_model_ref
from cai.errors import CaiError
from cai.recipe import EngineSpec
from cai.records import Message, ModelRef, SamplingParams

HAS_VLLM = importlib.util.find_spec("vllm") is not None
CHATS = [[Message(role="user", content="one")], [Message(role="user", content="two")]]


def config_error(spec: EngineSpec) -> str:
    with pytest.raises(EngineConfigError) as caught:
        check_engine_spec(spec)
    assert isinstance(caught.value, CaiError) and isinstance(caught.value, ValueError)
    return str(caught.value)


# ---- names and options -----------------------------------------------------------------------------


def test_builtin_backends_are_registered_and_auto_picks_one():
    assert backend_names()[:4] == ["vllm", "transformers", "openai", "fake"]
    assert "fake" in available_backends()
    assert resolve_backend("auto") == ("vllm" if HAS_VLLM else "transformers")
    assert resolve_backend("fake") == "fake"
    message = config_error(EngineSpec(backend="openia"))
    assert "unknown engine backend 'openia'" in message and "did you mean 'openai'" in message
    assert "choose one of auto, vllm, transformers, openai, fake" in message


def test_an_option_typo_names_the_option_the_backend_and_the_valid_names():
    message = config_error(EngineSpec(backend="transformers", options={"max_batch_sise": 4}))
    assert "'max_batch_sise' is not an option of the engine backend 'transformers'" in message
    assert "did you mean 'max_batch_size'" in message
    assert "device, dtype, max_batch_size, max_model_len" in message
    spec = EngineSpec(backend="transformers", options={"max_batch_size": 4, "device": "cpu"})
    assert check_engine_spec(spec) is spec


def test_option_values_are_typed_and_never_echoed():
    message = config_error(EngineSpec(backend="transformers", options={"max_batch_size": "many"}))
    assert "option 'max_batch_size' of the engine backend 'transformers'" in message and "integer" in message
    message = config_error(EngineSpec(backend="openai", model="m", options={"api_key": ["sEcReT-1"],
                                                                             "concurrency": 0}))
    assert "'api_key'" in message and "'concurrency'" in message and "sEcReT" not in message


def test_secret_and_header_options_of_the_openai_backend_are_accepted():
    options = {"api_key": "k", "api_key_env": "MY_KEY", "base_url": "http://127.0.0.1:9/v1", "organization": "o",
               "default_headers": {"Authorization": "Bearer k"}, "concurrency": 4, "timeout": 5}
    check_engine_spec(EngineSpec(backend="openai", model="m", options=options))
    assert "did you mean 'base_url'" in config_error(EngineSpec(backend="openai", options={"baseurl": "x"}))


def test_auto_checks_the_options_of_the_backend_it_picks():
    message = config_error(EngineSpec(options={"concurrency": 2}))
    assert f"engine backend '{resolve_backend('auto')}' (what 'auto' picks here)" in message


@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed")
def test_vllm_options_pass_through_to_vllms_own_engine_arguments():
    check_engine_spec(EngineSpec(backend="vllm", options={"max_num_seqs": 8, "kv_cache_memory_bytes": 1 << 30,
                                                          "max_model_len": 512, "chat_template": "x"}))
    message = config_error(EngineSpec(backend="vllm", options={"max_num_seq": 8}))
    assert "did you mean 'max_num_seqs'" in message and "vLLM's engine arguments" in message
    assert "'model' is not an option" in config_error(EngineSpec(backend="vllm", options={"model": "x"}))
    assert "'gpu_memory_utilization'" in config_error(
        EngineSpec(backend="vllm", options={"gpu_memory_utilization": 2}))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed")
def test_vllm_names_read_from_source_match_engine_args():
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    fields = {f.name for f in dataclasses.fields(EngineArgs) if not f.name.startswith("_")} - {"model"}
    assert fields <= vllm_engine_arg_names()


def test_options_models_match_the_engine_constructors():
    from cai.engine.openai_engine import OpenAIEngine
    from cai.engine.vllm_engine import VLLMEngine

    for model, cls in ((OpenAIOptions, OpenAIEngine), (VLLMOptions, VLLMEngine)):
        assert _defaults(model) == _constructor_defaults(cls), cls
    if importlib.util.find_spec("torch") is not None:
        from cai.engine.hf import TransformersEngine

        assert _defaults(TransformersOptions) == _constructor_defaults(TransformersEngine)


def _defaults(model: type[BaseModel]) -> dict:
    return {name: field.default for name, field in model.model_fields.items()}


def _constructor_defaults(cls) -> dict:
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty and p.name != "model"}


# ---- model identity --------------------------------------------------------------------------------


def test_the_fake_backend_builds_without_a_model_and_names_it_stably():
    spec = EngineSpec(backend="fake")
    engine = build_engine(spec)
    assert isinstance(engine, CheckedEngine) and engine.backend == "fake"
    assert engine.model == engine_model_ref(spec) == fake_model_ref() == engine_model_ref(spec)
    assert build_engine(EngineSpec(backend="fake", model="dry")).model == ModelRef(id="dry", revision="0",
                                                                                      engine="fake")
    [out] = engine.generate(CHATS[:1], SamplingParams(max_tokens=8))
    assert out.text == "reply to: one" and out.error is None
    [scores] = engine.choice_logprobs(CHATS[:1], ["A", "B"])
    assert scores.logprobs == {"A": 0.0, "B": 0.0}
    with pytest.raises(NoLogprobs):
        make_engine("fake", chooser="none").choice_logprobs(CHATS, ["A", "B"])


def test_the_fake_backends_varied_responder_gives_k_samples_that_differ():
    engine = build_engine(EngineSpec(backend="fake", options={"responder": "varied"}))
    outs = engine.generate(CHATS[:1] * 3, SamplingParams(max_tokens=8, temperature=0.8))
    assert len({o.text for o in outs}) == 3 and all(o.text.endswith("to: one") for o in outs)


def test_the_openai_backend_names_its_served_model_without_a_server(monkeypatch):
    spec = EngineSpec(backend="openai", model="served-7b", options={"base_url": "http://127.0.0.1:9/v1"})
    assert engine_model_ref(spec) == ModelRef(id="served-7b", revision=None, engine="openai")
    assert build_engine(spec).model == engine_model_ref(spec)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(EngineConfigError, match="base_url"):
        build_engine(EngineSpec(backend="openai", model="m"))
    with pytest.raises(EngineConfigError, match="needs a model"):
        engine_model_ref(EngineSpec(backend="openai"))


def test_a_local_engine_reports_the_model_ref_the_fingerprint_uses(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tiny_tokenizers import byte_level, tiny_llama

    folder = tiny_llama(tmp_path / "tiny", byte_level())
    spec = EngineSpec(backend="transformers", model=str(folder), options={"max_batch_size": 2})
    engine = build_engine(spec)
    try:
        assert engine.model == engine_model_ref(spec) and engine.model.id == "tiny" and engine.model.revision
        assert engine.max_batch_size == 2 and "<|im_end|>" in engine.control_tokens  # the engine's own attributes
    finally:
        engine.close()
        engine.close()  # idempotent


# ---- the contract, enforced once -----------------------------------------------------------------


class Broken:
    """A backend that breaks the contract: one result too few, and scoring it never learnt."""

    backend = "broken"

    def __init__(self, model: str | None = None):
        self.model = ModelRef(id=model or "b", engine="broken")
        self.closed = 0

    def generate(self, chats, params):
        return FakeEngine().generate(chats, params)[:-1]

    def choice_logprobs(self, chats, options, prefix=""):
        raise NotImplementedError("Broken cannot score")

    def close(self):
        self.closed += 1


class BrokenOptions(BaseModel):
    model_config = {"extra": "forbid"}
    flavour: str = "plain"


@pytest.fixture
def broken_backend(monkeypatch):
    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))  # the registration ends with the test
    return register_backend(registry.Backend(
        name="broken", summary="a test backend", options=BrokenOptions, factory=lambda model, options: Broken(model),
        model_ref=lambda model, options: ModelRef(id=model or "b", engine="broken"), available=lambda: True))


def test_a_registered_backend_is_built_checked_and_validated(broken_backend):
    assert "broken" in backend_names()
    with pytest.raises(ValueError, match="registered already"):
        register_backend(broken_backend)
    assert "did you mean 'flavour'" in config_error(EngineSpec(backend="broken", options={"flavor": "x"}))
    engine = build_engine(EngineSpec(backend="broken", options={"flavour": "x"}))
    with pytest.raises(EngineContractError, match="backend 'broken' broke the engine contract: generate returned "
                                                  "1 results for 2 chats"):
        engine.generate(CHATS, SamplingParams())
    with pytest.raises(NoLogprobs, match="Broken cannot score"):
        engine.choice_logprobs(CHATS, ["A", "B"])
    assert engine.generate([], SamplingParams()) == []
    engine.close()
    engine.close()
    assert engine.inner.closed == 1 and checked(engine) is engine
    engine.flavour = "set through"  # attributes are the backend engine's own
    assert engine.inner.flavour == engine.flavour == "set through"


def test_a_missing_result_is_a_contract_error_not_a_none_row():
    class Holey(FakeEngine):
        def generate(self, chats, params):
            return [None, *super().generate(chats[1:], params)]

    with pytest.raises(EngineContractError, match="generate returned NoneType for chat 0, not a Completion"):
        checked(Holey()).generate(CHATS, SamplingParams())


def test_the_judge_reads_no_logprobs_from_a_checked_engine(broken_backend):
    from cai.judge import _score

    [scores, _] = _score(build_engine(EngineSpec(backend="broken")), CHATS)
    assert scores.error.code.value == "no_logprobs" and "broken: Broken cannot score" in scores.error.message


def test_http_backend_and_options_import_no_torch():
    code = textwrap.dedent("""
        import sys
        import cai.engine.openai_engine
        from cai.engine import check_engine_spec, engine_model_ref
        from cai.recipe import EngineSpec
        check_engine_spec(EngineSpec(backend="vllm", options={"max_num_seqs": 4}))
        check_engine_spec(EngineSpec(backend="transformers", options={"max_batch_size": 4}))
        engine_model_ref(EngineSpec(backend="openai", model="m"))
        print(sorted(m for m in ("torch", "vllm", "transformers") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


# ---- parse time: CLI flags and service settings ---------------------------------------------------


def test_cli_refuses_an_engine_option_typo_before_anything_starts(tmp_path):
    from typer.testing import CliRunner

    from cai.cli import app

    out = tmp_path / "job"
    result = CliRunner().invoke(app, ["generate", "sft", "--engine", "transformers", "--engine-option", "bogus=1",
                                      "--limit", "1", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "bogus" in result.output and "transformers" in result.output and not out.exists()
    result = CliRunner().invoke(app, ["generate", "prefs", "--engine", "fake", "--judge-engine", "fake",
                                      "--judge-engine-option", "chooser=always", "--out", str(out)])
    assert result.exit_code == 2 and "chooser" in result.output and not out.exists()


def test_cli_dry_run_with_the_fake_backend(tmp_path):
    from typer.testing import CliRunner

    from cai.cli import app

    out = tmp_path / "dry"
    args = ["generate", "sft", "--engine", "fake", "--limit", "3", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert {json.dumps(r["metadata"]["model"], sort_keys=True) for r in rows} == {
        json.dumps(engine_model_ref(EngineSpec(backend="fake")).model_dump(), sort_keys=True)}
    again = CliRunner().invoke(app, args)  # a stable model identity: the same job, resumed
    assert again.exit_code == 0 and "0 prompts now, 3 resumed" in again.output, again.output


def test_service_settings_refuse_a_profile_with_an_unknown_option(tmp_path):
    pytest.importorskip("fastapi")
    from serve.app import Settings

    config = tmp_path / "serve.yaml"
    config.write_text("engines:\n  small: {backend: transformers, options: {max_batch_sise: 4}}\n"
                      "  big: {backend: openai, model: m, options: {api_key: sEcReT-7, base_url: 'https://sEcReT-8/v1'}}\n"
                      "default_engine: big\n")
    with pytest.raises(ValidationError) as caught:
        Settings.from_yaml(config)
    message = str(caught.value)
    assert "engine profile 'small'" in message and "'max_batch_sise'" in message and "max_batch_size" in message
    assert "sEcReT" not in message  # the other profile's key and URL are not echoed
    config.write_text("engines: {small: {backend: transformers, options: {max_batch_size: 4}}}\n"
                      "default_engine: small\n")
    assert Settings.from_yaml(config).engines["small"].options == {"max_batch_size": 4}
