"""Phase 2 stage on the scripted fake engine: sampling, pairing, exclusions, rows."""

from __future__ import annotations

import math

import pytest
from helpers import CONSTITUTIONS

from cai.constitution import load_constitution
from cai.engine.fake import FakeEngine
from cai.formats import keep_for_export, preference_row
from cai.judge import JudgeConfig
from cai.preferences import Phase2Config, run_phase2, win_scores
from cai.records import Completion, ErrorCode, Message, SamplingParams, SourcePrompt

HARMLESS = load_constitution(CONSTITUTIONS / "harmless.yaml")


def sources(n: int) -> list[SourcePrompt]:
    return [SourcePrompt(id=f"p{i}", messages=[Message(role="user", content=f"question {i}")], source="t")
            for i in range(n)]


def numbered_policy():
    """Answer k of each prompt is 'answer k ...' (k counts per prompt); quality grows with k."""
    counter: dict[str, int] = {}

    def responder(chat, params):
        key = chat[-1].content
        k = counter.get(key, 0)
        counter[key] = k + 1
        return f"answer {k} to {key}"

    return responder


def first_option(chat) -> str:
    text = chat[0].content
    tag = text.split("<<<BEGIN ", 1)[1].split(">>>", 1)[0]
    return text.split(f"<<<BEGIN {tag}>>>\n")[2].split("\n<<<END", 1)[0]


def higher_number_wins(chat, options, prefix):
    text = chat[0].content
    tag = text.split("<<<BEGIN ", 1)[1].split(">>>", 1)[0]
    blocks = [b.split("\n<<<END", 1)[0] for b in text.split(f"<<<BEGIN {tag}>>>\n")[2:]]
    first, second = (int(b.split()[1]) for b in blocks)
    p = 0.9 if first > second else 0.1
    return {"A": math.log(p), "B": math.log(1 - p)}


def always_first(chat, options, prefix):
    return {"A": math.log(0.8), "B": math.log(0.2)}


def test_k2_one_call_per_step_and_trl_row():
    policy = FakeEngine(numbered_policy(), model_id="policy")
    judge = FakeEngine(chooser=higher_number_wins, model_id="judge")
    records = run_phase2(sources(3), HARMLESS, policy, judge, Phase2Config(samples=2, seed=3))
    assert [len(b) for b in policy.batches] == [6]
    assert [len(b) for b in judge.choice_batches] == [6]  # 3 pairs x 2 orders
    r = records[0]
    assert r.ok and r.chosen == "answer 1 to question 0" and r.rejected == "answer 0 to question 0"
    assert r.score == pytest.approx(0.9) and r.margin == pytest.approx(0.8)
    assert r.judgement.consistent is True and r.pair == (0, 1)
    row = preference_row(r)
    assert row["prompt"] == [{"role": "user", "content": "question 0"}]
    assert row["chosen"] == [{"role": "assistant", "content": r.chosen}]
    assert row["rejected"] == [{"role": "assistant", "content": r.rejected}]
    assert row["consistent"] is True
    meta = row["metadata"]
    assert meta["principle_id"] in HARMLESS.constitution.ids
    assert meta["policy_model"]["id"] == "policy" and meta["judge_model"]["id"] == "judge"
    assert meta["constitution"]["sha256"] == HARMLESS.ref.sha256
    assert meta["sampling"]["policy"]["temperature"] == 0.8 and meta["sampling"]["policy"]["seed"] == 3
    assert meta["p_a_orders"] == [pytest.approx(0.1), pytest.approx(0.1)]
    assert keep_for_export(r)


def test_policy_sampling_must_be_random():
    with pytest.raises(ValueError):
        Phase2Config(policy=SamplingParams(temperature=0.0))
    with pytest.raises(ValueError):
        Phase2Config(samples=1)


def test_k4_best_vs_worst_from_soft_win_counts():
    policy = FakeEngine(numbered_policy())
    judge = FakeEngine(chooser=higher_number_wins)
    [r] = run_phase2(sources(1), HARMLESS, policy, judge, Phase2Config(samples=4))
    assert len(r.comparisons) == 6 and [len(b) for b in judge.choice_batches] == [12]
    assert (r.chosen_index, r.rejected_index) == (3, 0)
    wins = win_scores(r.comparisons)
    assert wins[3] == pytest.approx(2.7) and wins[0] == pytest.approx(0.3)
    assert len(r.lineage.principle_ids) == 6


def test_all_pairs_mode_emits_one_record_per_pair():
    policy = FakeEngine(numbered_policy())
    judge = FakeEngine(chooser=higher_number_wins)
    records = run_phase2(sources(2), HARMLESS, policy, judge, Phase2Config(samples=3, pairing="all"))
    assert len(records) == 6 and len({r.id for r in records}) == 6
    assert all(r.ok and r.score == pytest.approx(0.9) for r in records)


def test_truncated_empty_and_duplicate_samples_are_not_paired():
    replies = iter([
        "a fine answer",
        " ".join(["word"] * 50),  # truncated at max_tokens=10
        "",  # empty
        "a fine answer",  # duplicate of sample 0
        "another fine answer",
    ])
    policy = FakeEngine(lambda c, p: next(replies))
    judge = FakeEngine(chooser=always_first)
    cfg = Phase2Config(samples=5, policy=SamplingParams(temperature=1.0, max_tokens=10))
    [r] = run_phase2(sources(1), HARMLESS, policy, judge, cfg)
    assert [s.excluded for s in r.answers] == [None, "truncated", "empty", "duplicate", None]
    assert [(c.a, c.b) for c in r.comparisons] == [(0, 4)]
    assert r.judgement.consistent is False and r.score == pytest.approx(0.5)
    assert not keep_for_export(r)  # a coin flip: margin 0


def test_fewer_than_two_usable_samples_is_an_error_row():
    replies = iter(["ok answer", " ".join(["w"] * 50), "ok answer", "fine"])
    policy = FakeEngine(lambda c, p: next(replies))
    judge = FakeEngine(chooser=always_first)
    cfg = Phase2Config(samples=2, policy=SamplingParams(temperature=1.0, max_tokens=10))
    bad, good = run_phase2(sources(2), HARMLESS, policy, judge, cfg)
    assert not bad.ok and bad.error.code == ErrorCode.TRUNCATED and bad.chosen is None
    assert "only 1 of 2" in bad.error.message and bad.error.raw
    assert good.judgement is not None
    assert [len(b) for b in judge.choice_batches] == [2]  # only the good prompt was judged
    assert not keep_for_export(bad)
    with pytest.raises(ValueError):
        preference_row(bad)


def test_backend_failure_is_an_error_row():
    from cai.records import ErrorInfo

    def responder(chat, params):
        if "question 0" in chat[-1].content:
            return Completion(finish_reason="error", error=ErrorInfo(code=ErrorCode.INTERNAL, message="boom"))
        return "text " + str(id(params))[-3:] + chat[-1].content

    policy = FakeEngine(responder)
    records = run_phase2(sources(1), HARMLESS, policy, FakeEngine(chooser=always_first), Phase2Config())
    assert records[0].error.code == ErrorCode.INTERNAL


def test_a_failed_judgement_makes_the_record_an_error_row():
    policy = FakeEngine(numbered_policy())
    judge = FakeEngine(responder=lambda c, p: "no json here")  # no log-probs -> structured -> unparseable
    [r] = run_phase2(sources(1), HARMLESS, policy, judge, Phase2Config(samples=3))
    assert r.error.code == ErrorCode.UNPARSEABLE and r.error.raw == "no json here"
    assert r.chosen is None and len(r.comparisons) == 3


def test_exclusion_rules():
    policy = FakeEngine(numbered_policy())
    judge = FakeEngine(chooser=higher_number_wins)
    [r] = run_phase2(sources(1), HARMLESS, policy, judge, Phase2Config())
    assert keep_for_export(r) and keep_for_export(r, min_confidence=0.79)
    assert not keep_for_export(r, min_confidence=0.81)
    inconsistent = r.model_copy(update={"judgement": r.judgement.model_copy(update={"consistent": False})})
    assert not keep_for_export(inconsistent)
    assert keep_for_export(inconsistent, require_consistent=False)
    one_order = r.model_copy(update={"judgement": r.judgement.model_copy(update={"consistent": None})})
    assert keep_for_export(one_order)


def test_principles_are_seeded_per_pair_and_order_independent():
    cfg = Phase2Config(samples=3, seed=11)
    run = lambda srcs: run_phase2(srcs, HARMLESS, FakeEngine(numbered_policy()),
                                  FakeEngine(chooser=higher_number_wins), cfg)
    a = {r.id: r.lineage.principle_ids for r in run(sources(6))}
    b = {r.id: r.lineage.principle_ids for r in run(list(reversed(sources(6))))}
    assert a == b
    assert len({p for ids in a.values() for p in ids}) > 2


def test_judge_config_is_in_lineage():
    cfg = Phase2Config(judge=JudgeConfig(mode="cot", clamp=(0.4, 0.6)))
    judge = FakeEngine(responder=lambda c, p: "because", chooser=higher_number_wins)
    [r] = run_phase2(sources(1), HARMLESS, FakeEngine(numbered_policy()), judge, cfg)
    assert r.lineage.judge_config["mode"] == "cot" and r.score == pytest.approx(0.6)
    assert r.lineage.sampling["judge"].max_tokens == 256


def test_preference_stats_for_the_data_card():
    from cai.cards import preference_stats

    policy = FakeEngine(numbered_policy())
    good = run_phase2(sources(3), HARMLESS, policy, FakeEngine(chooser=higher_number_wins), Phase2Config())
    coin = run_phase2(sources(2), HARMLESS, FakeEngine(numbered_policy()), FakeEngine(chooser=always_first),
                      Phase2Config())
    failed = run_phase2(sources(1), HARMLESS, FakeEngine(numbered_policy()),
                        FakeEngine(responder=lambda c, p: "no json"), Phase2Config())
    stats = preference_stats(good + coin + failed)
    assert stats.records == 6 and stats.judged == 5 and stats.exported == 3
    assert stats.errors == {"unparseable": 1} and stats.excluded == {"tie": 2}
    assert stats.consistency_rate == pytest.approx(3 / 5)
    # good: the better answer wins wherever it is shown (1 of 2 orders first); coin: always first
    assert stats.first_position_wins == pytest.approx((3 * 1 + 2 * 2) / 10)
    assert stats.mean_confidence == pytest.approx(3 * 0.8 / 5)
    assert sum(stats.principles.values()) == 3
    assert stats.chosen_longer is None and stats.mean_chosen_chars == stats.mean_rejected_chars  # equal lengths
