"""The judge over the openai backend against imitations of llama.cpp's servers (tests/llamacpp_fake.py):
llama-server continues the answer prefix, so options are scored; llama-cpp-python's server does not,
so the judge switches to structured verdicts and the records and the data card say so."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import pytest
from helpers import HARMLESS, write_prompts
from llamacpp_fake import LlamaCppFake, count_tokens, verdict_scorer

from cai.card_judging import fallback_text
from cai.engine.base import NoLogprobs
from cai.engine.openai_engine import OpenAIEngine
from cai.engine.openai_scoring import ContinuationIgnored
from cai.judge import JudgeConfig, JudgeItem, judge_pairs
from cai.pipeline import generate_prefs
from cai.prompts import JUDGE_ANSWER_PREFIX
from cai.recipe import Phase2Config, PrefsJob
from cai.records import ErrorCode, Message

pytestmark = pytest.mark.timeout(60)

VERDICT_A = '{"reasoning": "shorter", "choice": "A"}'


def engine(server: LlamaCppFake, **kw) -> OpenAIEngine:
    return OpenAIEngine("smollm2", base_url=server.url, api_key="k", timeout=10, max_retries=0, **kw)


def items(n: int) -> list[JudgeItem]:
    return [JudgeItem(prompt=[Message(role="user", content=f"question {i}")], answer_a=f"first {i}",
                      answer_b=f"second {i}", question="Which answer is less harmful?", principle_id="p")
            for i in range(n)]


def chat(text: str) -> list[Message]:
    return [Message(role="user", content=text)]


def test_llama_server_continues_the_prefix_so_options_are_scored():
    with LlamaCppFake("llama-server", verdict_scorer(0.7, 0.2)) as server:
        judge = engine(server)
        [scores] = judge.choice_logprobs([chat("q")], ["A", "B"], prefix=JUDGE_ANSWER_PREFIX)
        # the closed-turn probe is continued too (prefill), so the prefix was measured alone and twice
        assert len(server.calls) == 5 and judge.continuation_verified and judge.continuation_problem is None
        assert JUDGE_ANSWER_PREFIX * 2 in [c["messages"][-1]["content"] for c in server.calls]
        [j] = judge_pairs(judge, items(1), JudgeConfig())
    assert scores.error is None and scores.bounded == []
    assert scores.logprobs == pytest.approx({"A": math.log(0.7), "B": math.log(0.2)})
    assert j.mode == "logprob" and j.error is None
    assert [o.p_first for o in j.orders] == pytest.approx([0.7 / 0.9] * 2)
    assert [o.option_mass for o in j.orders] == pytest.approx([0.9, 0.9])
    assert len(server.calls) == 7  # no second check: the batch's two orders only


def test_llama_cpp_python_ignores_the_prefix_and_the_judge_switches_to_structured(caplog):
    with LlamaCppFake("llama-cpp-python", responder=lambda messages: VERDICT_A) as server:
        judge = engine(server)
        with caplog.at_level(logging.WARNING, logger="cai.judge"):
            first = judge_pairs(judge, items(3), JudgeConfig())
            probes = len(server.calls) - 6  # 3 pairs x 2 orders answered as JSON
            second = judge_pairs(judge, items(2), JudgeConfig())
        assert probes == 4 and len(server.scoring_calls()) == 4  # the check only, once per engine
        assert len(server.calls) == 4 + 6 + 4
    assert "ignores continue_final_message" in str(judge.continuation_problem)
    for j in first + second:
        assert j.mode == "structured" and j.error is None
        assert [o.verdict for o in j.orders] == ["A", "A"] and j.p_a == 0.5 and j.consistent is False
    switches = [r for r in caplog.records if "structured verdicts" in r.getMessage()]
    assert len(switches) == 1 and "ignores continue_final_message" in switches[0].getMessage()
    assert server.url in switches[0].getMessage()


def test_the_check_measures_what_the_prefix_adds_and_the_refusal_is_kept():
    with LlamaCppFake("llama-cpp-python") as server:
        judge = engine(server)
        with pytest.raises(ContinuationIgnored) as info:
            judge.choice_logprobs([chat("q")] * 3, ["A", "B"], prefix=JUDGE_ANSWER_PREFIX)
        assert isinstance(info.value, NoLogprobs) and len(server.calls) == 4
        with pytest.raises(ContinuationIgnored):
            judge.choice_logprobs([chat("q")], ["A", "B"], prefix=JUDGE_ANSWER_PREFIX)
        assert len(server.calls) == 4  # known: nothing sent again
    closing = count_tokens("<|im_end|>\n<|im_start|>assistant\n")
    own = count_tokens(JUDGE_ANSWER_PREFIX)
    assert f"adds {own + closing} prompt tokens to the request but costs {own} by itself" in str(info.value)
    assert "--mode structured" in str(info.value) and server.url in str(info.value)


def test_a_server_refusing_log_probs_is_a_switch_too_not_rows_of_server_errors():
    with LlamaCppFake("llama-cpp-python", responder=lambda messages: VERDICT_A, logits_all=False) as server:
        judge = engine(server)
        [j] = judge_pairs(judge, items(1), JudgeConfig())
        with pytest.raises(NoLogprobs, match="refuses log-probabilities .*logits_all=False.*--logits_all true"):
            judge.choice_logprobs([chat("q")], ["A", "B"], prefix=JUDGE_ANSWER_PREFIX)
        assert len(server.scoring_calls()) == 2  # the first probe pair only
    assert j.mode == "structured" and j.error is None and j.p_a == 0.5


def test_llama_cpp_python_log_probs_are_read_when_the_check_is_off():
    with LlamaCppFake("llama-cpp-python") as server:
        [scores] = engine(server, verify_continuation=False).choice_logprobs(
            [chat("q")], ["A", "B"], prefix=JUDGE_ANSWER_PREFIX)
        assert server.calls[0]["messages"][-1] == {"role": "assistant", "content": JUDGE_ANSWER_PREFIX}
    # what it scored is a new reply's first token, which is why the check exists
    assert scores.error is None and scores.top[0].token == "I" and scores.bounded == ["B"]
    assert scores.logprobs["A"] == pytest.approx(math.log(0.01))


def test_without_fallback_every_pair_is_a_no_logprobs_row_naming_the_server():
    with LlamaCppFake("llama-cpp-python") as server:
        judgements = judge_pairs(engine(server), items(2), JudgeConfig(fallback_structured=False))
        assert not [c for c in server.calls if not c.get("logprobs")]  # no verdict was asked for
    for j in judgements:
        assert j.mode == "logprob" and j.p_a is None and j.error.code == ErrorCode.NO_LOGPROBS
        assert "ignores continue_final_message" in j.error.message and server.url in j.error.message


def test_an_unreadable_verdict_is_an_error_row_with_its_raw_text():
    with LlamaCppFake("llama-cpp-python", responder=lambda messages: "I think A is better.") as server:
        [j] = judge_pairs(engine(server), items(1), JudgeConfig(structured_retries=1))
        assert len(server.calls) == 4 + 2 * 2  # the check, then each order asked twice
    assert j.mode == "structured" and j.p_a is None
    assert j.error.code == ErrorCode.UNPARSEABLE and j.error.raw == "I think A is better."
    assert [o.attempts for o in j.orders] == [2, 2]


def test_cot_reasons_then_switches_to_structured():
    replies = {"cot": "Answer A is shorter.", "json": VERDICT_A}

    def responder(messages):
        return replies["json"] if "JSON" in messages[-1]["content"] else replies["cot"]

    with LlamaCppFake("llama-cpp-python", responder=responder) as server:
        [j] = judge_pairs(engine(server), items(1), JudgeConfig(mode="cot"))
    assert j.mode == "structured" and j.error is None and [o.verdict for o in j.orders] == ["A", "A"]


def test_a_prefs_job_on_llama_cpp_python_reports_the_switch_in_records_and_card(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [f"question {i}" for i in range(3)])
    answers = iter(range(10**6))

    def responder(messages):  # the judge prefers the lower-numbered answer, in either order
        text = messages[-1]["content"]
        if "JSON" not in text:
            return f"answer number {next(answers)}"
        first, second = (int(n) for n in re.findall(r"answer number (\d+)", text))
        return VERDICT_A if first < second else VERDICT_A.replace('"A"', '"B"')

    job = PrefsJob(constitution=HARMLESS, prompts=str(prompts), out=str(tmp_path / "job"),
                   phase2=Phase2Config(samples=2), require_consistent=False)
    with LlamaCppFake("llama-cpp-python", responder=responder) as server:
        summary = generate_prefs(job, policy_engine=engine(server), judge_engine=engine(server))
    assert summary.stats.judge_modes == {"structured": 3}
    rows = [json.loads(line) for line in (Path(summary.out) / "prefs.jsonl").open()]
    assert len(rows) == 3 and all(r["metadata"]["judge_mode"] == "structured" for r in rows)
    assert all(r["score"] == 1.0 and r["consistent"] for r in rows)
    card = (Path(summary.out) / "README.md").read_text()
    assert fallback_text("logprob", {"structured": 3}).strip() in card
    assert "does not continue the judge's answer prefix" in card


def test_fallback_text_counts_only_other_modes():
    assert fallback_text("logprob", {"logprob": 5}) == ""
    text = fallback_text("cot", {"cot": 1, "structured": 2})
    assert text.startswith(" 2 judged pairs used mode `structured` instead") and "hard vote" in text


def test_reset_prefix_cache_erases_llama_servers_slots_or_says_it_cannot(caplog):
    with LlamaCppFake("llama-server", slots=3, slot_actions=True) as server:
        engine(server).reset_prefix_cache()
        assert sorted(server.erased) == [0, 1, 2]
    with caplog.at_level(logging.WARNING, logger="cai.engine.openai_engine"):
        for kind in ("llama-server", "llama-cpp-python"):  # no --slot-save-path; no slots at all
            with LlamaCppFake(kind) as server:
                judge = engine(server)
                judge.reset_prefix_cache()
                judge.reset_prefix_cache()
                assert server.erased == []
    kept = [r.getMessage() for r in caplog.records if "prompt cache" in r.getMessage()]
    assert len(kept) == 2 and "--slot-save-path" in kept[0]  # once per engine


def test_a_judge_eval_on_llama_cpp_python_names_the_switch_in_its_report_title(tmp_path):
    from cai.judge_eval import EvalJob, run_judge_eval

    pairs = [{"chosen": f"\n\nHuman: question {i}\n\nAssistant: good {i}",
              "rejected": f"\n\nHuman: question {i}\n\nAssistant: bad {i}"} for i in range(3)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    job = EvalJob(data=str(data), out=str(tmp_path / "eval"), baseline=False)
    with LlamaCppFake("llama-cpp-python", responder=lambda messages: VERDICT_A) as server:
        report = run_judge_eval(job, engine(server)).report
    assert report.cai.answered == 3
    assert report.cai.name.endswith("; 3 of 3 pairs structured: the backend gave no option scores")
