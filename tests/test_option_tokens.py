"""Option tokens after the judge's answer prefix, for two tokenizer styles built offline.

Each option must be scored as the tokens the tokenizer itself produces for
prefix + option (a merge across the boundary included), or refused with an error
naming the tokenizer and the tokens: never a stand-in token.
"""

from __future__ import annotations

import math
import os

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see cai.engine

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_tokenizers import CHATML, MISTRAL, byte_level, sentencepiece_like, tiny_llama  # noqa: E402

from cai.engine.base import TOP_ALTERNATIVES  # noqa: E402
from cai.engine.hf import TransformersEngine  # noqa: E402
from cai.engine.tokens import OptionTokenError, encode, plan_options, render_prompt  # noqa: E402
from cai.judge import JudgeConfig, JudgeItem, judge_pairs  # noqa: E402
from cai.prompts import JUDGE_ANSWER_PREFIX, JUDGE_OPTIONS  # noqa: E402
from cai.records import ErrorCode, Message  # noqa: E402

CHAT = [Message(role="user", content="Which is kinder? Answer with (A) or (B).")]
PREFIX = JUDGE_ANSWER_PREFIX  # "The answer is: ("


def pieces(tok, ids):
    return tok.convert_ids_to_tokens(ids)


def continued(tok, prefix: str = PREFIX) -> str:
    """What a vLLM server renders for the OpenAI backend's request (continue_final_message)."""
    messages = [m.model_dump() for m in CHAT] + [{"role": "assistant", "content": prefix}]
    return tok.apply_chat_template(messages, tokenize=False, continue_final_message=True)


def test_gpt2_style_byte_level_scores_the_letter_after_the_whole_prompt():
    tok = byte_level()
    plan = plan_options(tok, CHAT, JUDGE_OPTIONS, PREFIX)
    assert plan.context == encode(tok, render_prompt(tok, CHAT, PREFIX))
    assert {o: pieces(tok, ids) for o, ids in plan.continuations.items()} == {"A": ["A"], "B": ["B"]}
    assert plan.single_token


def test_byte_level_merge_across_the_prefix_is_scored_on_the_merged_tokens():
    tok = byte_level(regex=False, merge_paren_a=True)  # " (" + "A" is one token "Ġ(A"; "B" stays apart
    prompt_ids = encode(tok, render_prompt(tok, CHAT, PREFIX))
    plan = plan_options(tok, CHAT, JUDGE_OPTIONS, PREFIX)
    assert pieces(tok, prompt_ids[-1:]) == ["Ġ("]
    assert plan.context == prompt_ids[:-1]  # both options are scored from before " ("
    assert pieces(tok, plan.continuations["A"]) == ["Ġ(A"]
    assert pieces(tok, plan.continuations["B"]) == ["Ġ(", "B"]
    assert not plan.single_token


def test_sentencepiece_merge_is_scored_on_the_merged_tokens():
    tok = sentencepiece_like()
    plan = plan_options(tok, CHAT, JUDGE_OPTIONS, PREFIX)
    assert plan.context == encode(tok, render_prompt(tok, CHAT, PREFIX))[:-1]
    assert {o: pieces(tok, ids) for o, ids in plan.continuations.items()} == {"A": ["▁(A"], "B": ["▁(B"]}
    assert plan.single_token


def test_an_option_the_tokenizer_cannot_spell_is_refused_naming_tokenizer_and_tokens():
    tok = sentencepiece_like(drop="B")
    with pytest.raises(OptionTokenError) as info:
        plan_options(tok, CHAT, JUDGE_OPTIONS, PREFIX)
    message = str(info.value)
    assert "tiny-sentencepiece-without-B" in message and "'B'" in message
    assert "'<unk>'" in message and "'▁('" in message


@pytest.mark.parametrize("make", [byte_level, sentencepiece_like])
def test_the_answer_prefix_renders_as_a_continued_assistant_message(make):
    mistral = make(MISTRAL)
    text = render_prompt(mistral, CHAT, PREFIX)
    assert text == continued(mistral) and text.endswith("[/INST] The answer is: (")
    chatml = make(CHATML)  # templates without such a space render as before
    assert render_prompt(chatml, CHAT, PREFIX) == render_prompt(chatml, CHAT) + PREFIX == continued(chatml)


# ---- the transformers engine on tiny random Llamas --------------------------------------


@pytest.fixture(scope="module")
def sp_engine(tmp_path_factory):
    folder = tiny_llama(tmp_path_factory.mktemp("sp-llama"), sentencepiece_like(MISTRAL))
    return TransformersEngine(str(folder), max_batch_size=4)


@pytest.fixture(scope="module")
def merged_engine(tmp_path_factory):
    folder = tiny_llama(tmp_path_factory.mktemp("bl-llama"), byte_level(regex=False, merge_paren_a=True))
    return TransformersEngine(str(folder), max_batch_size=4)


def manual_logprob(engine, text: str, n_last: int) -> float:
    """log P(the last n_last tokens of `text`) by one plain forward pass."""
    ids = encode(engine.tokenizer, text)
    with torch.no_grad():
        logp = torch.log_softmax(engine.hf_model(torch.tensor([ids])).logits[0].float(), -1)
    return float(sum(logp[t - 1, ids[t]] for t in range(len(ids) - n_last, len(ids))))


def test_sentencepiece_engine_scores_the_continued_prefix_and_merged_tokens(sp_engine):
    [scores] = sp_engine.choice_logprobs([CHAT], JUDGE_OPTIONS, prefix=PREFIX)
    assert scores.error is None
    text = continued(sp_engine.tokenizer)  # "... [/INST] The answer is: ("
    for option in JUDGE_OPTIONS:  # the last token is the merged "▁(A" / "▁(B"
        assert scores.logprobs[option] == pytest.approx(manual_logprob(sp_engine, text + option, 1), abs=1e-4)
    assert len(scores.top) == TOP_ALTERNATIVES
    probs = [math.exp(t.logprob) for t in scores.top]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-5
    assert all(isinstance(t.token, str) for t in scores.top)


def test_byte_level_engine_scores_both_options_from_the_same_context(merged_engine):
    [scores] = merged_engine.choice_logprobs([CHAT], JUDGE_OPTIONS, prefix=PREFIX)
    text = render_prompt(merged_engine.tokenizer, CHAT, PREFIX)
    assert scores.logprobs["A"] == pytest.approx(manual_logprob(merged_engine, text + "A", 1), abs=1e-4)
    assert scores.logprobs["B"] == pytest.approx(manual_logprob(merged_engine, text + "B", 2), abs=1e-4)


def test_engine_refuses_an_unspellable_option_once_not_per_row(tmp_path):
    engine = TransformersEngine(str(tiny_llama(tmp_path, sentencepiece_like(drop="B"))))
    with pytest.raises(OptionTokenError, match="cannot score option 'B'"):
        engine.choice_logprobs([CHAT, CHAT], JUDGE_OPTIONS, prefix=PREFIX)


def test_judge_on_a_random_model_says_it_was_off_the_options(sp_engine):
    item = JudgeItem(prompt=CHAT, answer_a="Be kind.", answer_b="Go away.", question="Which is kinder?")
    [j] = judge_pairs(sp_engine, [item])
    assert not j.ok and j.error.code == ErrorCode.OFF_OPTIONS
    assert all(o.option_mass is not None and o.option_mass < 0.5 for o in j.orders)
    assert "its top tokens: '" in j.error.message
    [j] = judge_pairs(sp_engine, [item], JudgeConfig(min_option_mass=0))
    assert j.ok and 0 < j.p_a < 1
