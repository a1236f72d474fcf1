"""TransformersEngine on a tiny random Llama built offline; the real embedded model
through TransformersEngine and VLLMEngine under the `real_model` mark."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
from tiny_tokenizers import tiny_llama, trained_bpe

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see cai.engine

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cai.engine import available_backends, make_engine  # noqa: E402
from cai.engine.base import TOP_ALTERNATIVES  # noqa: E402
from cai.engine.hf import TransformersEngine, encode, render_prompt  # noqa: E402
from cai.engine.models import model_revision, resolve_model  # noqa: E402
from cai.records import ErrorCode, Message, SamplingParams  # noqa: E402


def chat(text: str) -> list[Message]:
    return [Message(role="user", content=text)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"), trained_bpe(), max_positions=256)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return TransformersEngine(str(tiny_dir), max_batch_size=3)


PROMPTS = [
    "hi",
    "the quick brown fox jumps over the lazy dog " * 3,
    "which response is better?",
    "a constitution lists principles",
    "numbers 0 1 2 3 4 5 6 7 8 9",
    "please answer helpfully and harmlessly",
    "fox",
]


def test_prompt_has_a_single_bos(tiny):
    ids = encode(tiny.tokenizer, render_prompt(tiny.tokenizer, chat("hi")))
    bos = tiny.tokenizer.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1


def test_batched_greedy_equals_one_at_a_time(tiny):
    params = SamplingParams(max_tokens=12)
    batched = tiny.generate([chat(p) for p in PROMPTS], params)
    single = [tiny.generate([chat(p)], params)[0] for p in PROMPTS]
    assert [c.text for c in batched] == [c.text for c in single]
    assert [c.completion_tokens for c in batched] == [c.completion_tokens for c in single]
    assert all(c.error is None for c in batched)


def test_length_finish_and_token_counts(tiny):
    outs = tiny.generate([chat(p) for p in PROMPTS[:3]], SamplingParams(max_tokens=5))
    for p, out in zip(PROMPTS, outs):
        expected = len(encode(tiny.tokenizer, render_prompt(tiny.tokenizer, chat(p))))
        assert out.prompt_tokens == expected
        if out.finish_reason == "length":
            assert out.completion_tokens == 5
        else:  # a random model may still emit EOS
            assert out.finish_reason == "stop" and out.completion_tokens <= 5


def test_stop_string_truncates_and_reports_stop(tiny):
    [full] = tiny.generate([chat("hi")], SamplingParams(max_tokens=20))
    assert len(full.text) > 6, full.text
    stop = full.text[3:6]
    [cut] = tiny.generate([chat("hi")], SamplingParams(max_tokens=20, stop=[stop]))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.completion_tokens < 20


def test_too_long_prompt_is_an_error_row_not_a_failed_batch(tiny_dir):
    engine = TransformersEngine(str(tiny_dir), max_batch_size=4, max_model_len=40)
    chats = [chat("hi"), chat("fox " * 60), chat("fox")]
    outs = engine.generate(chats, SamplingParams(max_tokens=4))
    assert outs[1].finish_reason == "error"
    assert outs[1].error.code == ErrorCode.CONTEXT_LENGTH
    assert outs[1].prompt_tokens > 40
    assert outs[0].error is None and outs[2].error is None
    [scores] = engine.choice_logprobs([chat("fox " * 60)], ["A", "B"])
    assert scores.error.code == ErrorCode.CONTEXT_LENGTH


def test_sampling_is_seeded(tiny):
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=3)
    first = tiny.generate([chat("hi"), chat("hi")], params)
    again = tiny.generate([chat("hi"), chat("hi")], params)
    assert [c.text for c in first] == [c.text for c in again]
    other = tiny.generate([chat("hi")], params.model_copy(update={"seed": 4}))
    greedy = tiny.generate([chat("hi")], SamplingParams(max_tokens=10))
    assert {other[0].text, first[0].text} != {greedy[0].text}


def _manual_logprob(engine, text: str, prefix: str, option: str) -> float:
    prompt = render_prompt(engine.tokenizer, chat(text)) + prefix
    p_ids = encode(engine.tokenizer, prompt)
    full = encode(engine.tokenizer, prompt + option)
    assert full[: len(p_ids)] == p_ids
    with torch.no_grad():
        logits = engine.hf_model(torch.tensor([full])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return float(sum(logp[t - 1, full[t]] for t in range(len(p_ids), len(full))))


def test_choice_logprobs_exact_and_batch_invariant(tiny):
    options = [" A", " B", " the quick"]
    texts = PROMPTS[:5]
    batched = tiny.choice_logprobs([chat(t) for t in texts], options, prefix="The answer is")
    for text, scores in zip(texts, batched):
        assert scores.error is None
        single = tiny.choice_logprobs([chat(text)], options, prefix="The answer is")[0]
        for option in options:
            manual = _manual_logprob(tiny, text, "The answer is", option)
            assert scores.logprobs[option] == pytest.approx(manual, abs=1e-4)
            assert single.logprobs[option] == pytest.approx(manual, abs=1e-4)


def test_choice_logprobs_normalise_over_the_vocabulary(tiny):
    """Scoring every single-character token as an option sums to probability ~1
    minus the mass of multi-character tokens, never more than 1."""
    vocab = tiny.tokenizer.get_vocab()
    singles = sorted({tiny.tokenizer.decode([i]) for i in vocab.values()} - {""})
    singles = [s for s in singles if len(encode(tiny.tokenizer, s)) == 1 and s.strip()]
    [scores] = tiny.choice_logprobs([chat("hi")], singles)
    total = sum(torch.tensor(list(scores.logprobs.values())).exp().tolist())
    assert 0 < total <= 1.0 + 1e-5
    assert all(v <= 0 for v in scores.logprobs.values())


def test_choice_logprobs_report_the_top_tokens_of_the_full_distribution(tiny):
    [scores] = tiny.choice_logprobs([chat("hi")], ["A", "B"], prefix="The answer is")
    ids = encode(tiny.tokenizer, render_prompt(tiny.tokenizer, chat("hi"), "The answer is"))
    with torch.no_grad():
        logp = torch.log_softmax(tiny.hf_model(torch.tensor([ids])).logits[0, -1].float(), -1)
    best = logp.topk(TOP_ALTERNATIVES)
    assert [t.token for t in scores.top] == [tiny.tokenizer.decode([i]) for i in best.indices.tolist()]
    assert [t.logprob for t in scores.top] == pytest.approx(best.values.tolist(), abs=1e-4)


def test_model_revision_and_resolve(tiny_dir, tmp_path):
    rev = model_revision(tiny_dir)
    assert rev == model_revision(tiny_dir) and len(rev) == 12
    assert resolve_model(str(tiny_dir)) == str(tiny_dir)
    assert resolve_model("gpt-4o-mini") == "gpt-4o-mini"
    assert model_revision("gpt-4o-mini") == "unknown"
    copy = tmp_path / "copy"
    copy.mkdir()
    config = json.loads((tiny_dir / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (copy / "config.json").write_text(json.dumps(config))
    (copy / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    assert model_revision(copy) != rev


def test_make_engine_choices(tiny_dir, monkeypatch):
    with pytest.raises(ValueError, match="choose one of"):
        make_engine("llama.cpp")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="base_url"):
        make_engine("openai", "some-model")
    assert "transformers" in available_backends()
    engine = make_engine("transformers", str(tiny_dir), max_batch_size=2)
    assert engine.backend == "transformers" and engine.model.id == tiny_dir.name
    assert engine.model.revision == model_revision(tiny_dir)


# ---- the real embedded model -----------------------------------------------------

REAL_PROMPTS = ["What is the capital of France?", "Give me one tip for sleeping better."]
JUDGE_OPTIONS = ["A", "B"]
JUDGE_CHATS = [
    chat("Which answer is kinder? (A) 'You are wrong.' (B) 'I see it differently.' Answer A or B."),
    chat("Which is a fruit? (A) carrot (B) apple. Answer with A or B."),
]


@pytest.fixture(scope="module")
def real_hf():
    return TransformersEngine(None)


@pytest.mark.real_model
def test_real_transformers_engine(real_hf):
    outs = real_hf.generate([chat(p) for p in REAL_PROMPTS], SamplingParams(max_tokens=24))
    assert all(o.error is None and o.text.strip() for o in outs)
    assert "Paris" in outs[0].text
    assert real_hf.model.id == "smollm2-135m"


@pytest.mark.real_model
def test_real_judge_options_follow_the_whole_prefix_and_get_most_of_the_mass(real_hf):
    from cai.engine.tokens import plan_options
    from cai.prompts import JUDGE_ANSWER_PREFIX

    tok = real_hf.tokenizer
    plan = plan_options(tok, JUDGE_CHATS[0], JUDGE_OPTIONS, JUDGE_ANSWER_PREFIX)
    assert plan.single_token  # SmolLM2: " (" then "A" / "B", no merge across the prefix
    assert plan.context == encode(tok, render_prompt(tok, JUDGE_CHATS[0], JUDGE_ANSWER_PREFIX))
    scores = real_hf.choice_logprobs(JUDGE_CHATS, JUDGE_OPTIONS, prefix=JUDGE_ANSWER_PREFIX)
    for s in scores:
        mass = sum(math.exp(v) for v in s.logprobs.values())
        assert mass > 0.5 and s.top[0].token in JUDGE_OPTIONS


@pytest.mark.real_model
def test_real_vllm_matches_transformers(real_hf):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    from cai.engine.vllm_engine import VLLMEngine

    engine = VLLMEngine(None, max_model_len=2048)
    try:
        params = SamplingParams(max_tokens=16)
        got = engine.generate([chat(p) for p in REAL_PROMPTS], params)
        want = real_hf.generate([chat(p) for p in REAL_PROMPTS], params)
        assert [g.text for g in got] == [w.text for w in want]
        assert [g.completion_tokens for g in got] == [w.completion_tokens for w in want]
        for prefix, options in (("", JUDGE_OPTIONS), ("The answer is", [" A", " B", " neither of them"])):
            v = engine.choice_logprobs(JUDGE_CHATS, options, prefix=prefix)
            h = real_hf.choice_logprobs(JUDGE_CHATS, options, prefix=prefix)
            for vs, hs in zip(v, h):
                for option in options:
                    assert vs.logprobs[option] == pytest.approx(hs.logprobs[option], abs=0.05)
                assert vs.top[0].token == hs.top[0].token
    finally:
        engine.close()
