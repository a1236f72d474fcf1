"""cai.bench_judge: judge throughput per mode and the prefix-cache comparison, on the fake engine."""

from __future__ import annotations

import io
import json
import math

import pytest
from helpers import HARMLESS, write_jsonl
from rich.console import Console

from cai.bench_judge import (
    CountingEngine,
    EngineCall,
    Pair,
    call_tokens,
    main,
    print_judge_bench,
    print_prefix_cache_bench,
    read_pairs,
    run_judge_bench,
    run_prefix_cache_bench,
)
from cai.constitution import load_constitution
from cai.engine.fake import FakeEngine, uniform_chooser
from cai.errors import CaiError
from cai.recipe import Phase1Config, Phase2Config
from cai.records import Message, SamplingParams, SourcePrompt

pytestmark = pytest.mark.timeout(60)

PAIRS = [Pair(f"question {n}", f"first answer {n}", f"second answer {n}") for n in range(3)]
VERDICT = '{"reasoning": "fine", "choice": "A"}'


@pytest.fixture(scope="module")
def harmless():
    return load_constitution(HARMLESS)


def words(chat, prefix):
    """A stand-in tokenizer: one token per word of every turn, then the prefix's words."""
    return [w for m in chat for w in f"{m.role}: {m.content}".split()] + prefix.split()


def test_both_modes_judge_every_pair_in_both_orders(harmless):
    engine = FakeEngine(responder=lambda chat, params: VERDICT, chooser=uniform_chooser)
    report = run_judge_bench(engine, PAIRS, harmless, tokenize=words)
    logprob, structured = report.runs
    assert (logprob.mode, structured.mode) == ("logprob", "structured")
    for run in report.runs:
        assert (run.pairs, run.orders, run.calls, run.requests, run.errors) == (3, 2, 1, 6, {})
        assert run.modes_used == {run.mode: 3} and run.seconds > 0 and run.prompt_tokens > 0
        assert run.pairs_per_second == pytest.approx(3 / run.seconds)
    # warm-up (one pair, two orders), then the timed call: each pair once with A first, once with B first
    warm, timed = engine.choice_batches
    assert len(warm) == 2 and len(timed) == 6
    for n in range(3):
        shown = [c[-1].content for c in timed if f"question {n}" in c[-1].content]
        firsts = [text.index(f"first answer {n}") < text.index(f"second answer {n}") for text in shown]
        assert sorted(firsts) == [False, True]
    assert report.ratios == {"logprob/structured": pytest.approx(logprob.pairs_per_second / structured.pairs_per_second)}


def test_error_rows_and_retries_are_counted(harmless):
    def respond(chat, params):
        return "no json here" if "question 1" in chat[0].content else VERDICT

    def choose(chat, options, prefix):  # 1% of the mass on the options for pair 2: off_options
        low = math.log(0.005) if "question 2" in chat[-1].content else 0.0
        return {o: low for o in options}

    engine = FakeEngine(responder=respond, chooser=choose)
    report = run_judge_bench(engine, PAIRS, harmless, Phase2Config(), tokenize=words)
    logprob, structured = report.runs
    assert logprob.errors == {"off_options": 1} and logprob.pairs == 3
    assert structured.errors == {"unparseable": 1}
    # pair 1's two orders are asked twice more (structured_retries = 2): 6 + 2 + 2 requests in 3 calls
    assert (structured.calls, structured.requests) == (3, 10)


def test_a_backend_without_log_probs_is_reported_as_falling_back(harmless):
    engine = FakeEngine(responder=lambda chat, params: VERDICT)  # no chooser: NoLogprobs
    [run] = run_judge_bench(engine, PAIRS[:2], harmless, modes=["logprob"]).runs
    assert run.modes_used == {"structured": 2} and run.errors == {}
    assert (run.calls, run.requests) == (2, 8)  # the refused scoring call, then the structured one
    assert run.prompt_tokens is None  # the fake engine has no tokenizer


def test_unknown_mode_and_no_pairs_are_user_errors(harmless):
    engine = FakeEngine(chooser=uniform_chooser)
    with pytest.raises(CaiError, match="unknown judge mode 'fast'"):
        run_judge_bench(engine, PAIRS, harmless, modes=["fast"])
    with pytest.raises(CaiError, match="no pairs"):
        run_judge_bench(engine, [], harmless)


def test_reusable_prefix_is_the_longest_shared_with_an_earlier_request():
    ids = {"a": [1, 2, 3, 4], "b": [1, 2, 9], "c": [7], "d": [1, 2, 3, 5, 6], "e": [1, 2, 3, 5, 6, 8]}
    counting = CountingEngine(FakeEngine(), names=["answer"])
    counting.calls = [EngineCall("generate", [[Message(role="user", content=k)] for k in "abc"], ""),
                      EngineCall("score", [[Message(role="user", content="d")]], "")]
    counting.streamed = {0: [[Message(role="user", content="e")]], 1: [[Message(role="user", content="a")]]}
    first, second, third, fourth = call_tokens(counting, lambda chat, prefix: ids[chat[0].content])
    assert (first.step, first.requests, first.prompt_tokens, first.reusable_prefix_tokens) == ("generate", 3, 8 / 3, 2 / 3)
    assert (second.step, second.prompt_tokens, second.reusable_prefix_tokens) == ("score", 5, 3)
    assert (third.step, third.reusable_prefix_tokens, fourth.step, fourth.reusable_prefix_tokens) == ("answer", 5, "step 1", 4)


def test_streamed_requests_are_counted_under_their_step():
    counting = CountingEngine(FakeEngine(), names=["answer", "critique"])
    stream = counting.open_stream()
    params = SamplingParams(max_tokens=8)
    for key, text in ((0, "a0"), (1, "a1"), (0, "c0")):
        stream.submit(key, [Message(role="user", content=text)], params)
    assert sorted(key for key, _ in stream.wait()) == [0, 0, 1]
    assert {n: [c[0].content for c in chats] for n, chats in counting.streamed.items()} == {0: ["a0", "a1"], 1: ["c0"]}
    assert (counting.requests, counting.calls, [c.step for c in counting.all_calls()]) == (3, [], ["answer", "critique"])


class Switchable(FakeEngine):
    def __init__(self, caching: bool, log: list):
        super().__init__(responder=lambda chat, params: "A short answer.", chooser=uniform_chooser)
        self.caching, self.log = caching, log
        self.counted = [0, 0]  # prompt tokens, cache hits: 10 a request, a hit each with the cache on
        log.append(f"start {caching}")

    def generate(self, chats, params):
        self.counted = [self.counted[0] + 10 * len(chats), self.counted[1] + self.caching * len(chats)]
        return super().generate(chats, params)

    def choice_logprobs(self, chats, options, prefix=""):
        self.counted = [self.counted[0] + 10 * len(chats), self.counted[1] + self.caching * len(chats)]
        return super().choice_logprobs(chats, options, prefix)

    def prefix_cache_stats(self):
        return tuple(self.counted)

    def reset_prefix_cache(self):
        self.log.append("reset")

    def close(self):
        self.log.append(f"close {self.caching}")


def test_prefix_cache_bench_runs_both_workloads_on_one_engine_at_a_time(harmless):
    log: list[str] = []
    sources = [SourcePrompt(id=f"p{n}", messages=[Message(role="user", content=f"prompt {n}")], source="t")
               for n in range(4)]
    params = SamplingParams(max_tokens=16)
    phase1 = Phase1Config(rounds=1, system_prompt="Be brief.", answer=params, critique=params, revision=params,
                          schedule="continuous")
    report = run_prefix_cache_bench(lambda on: Switchable(on, log), sources, PAIRS, harmless, phase1,
                                    repeats=2, tokenize=words)
    assert [e for e in log if e != "reset"] == ["start True", "close True", "start False", "close False"]
    assert log.count("reset") == 8  # a cold cache before every timed run: 2 workloads x 2 repeats x 2 engines
    assert [(r.workload, r.prefix_caching) for r in report.runs] == [
        ("phase1 continuous", True), ("judge logprob", True), ("phase1 continuous", False), ("judge logprob", False)]
    phase1_on, judge_on, _, _ = report.runs
    assert [(s.step, s.requests) for s in phase1_on.steps] == [("answer", 4), ("critique 1", 4), ("revision 1", 4)]
    # phase 1 sends its requests through the engine's request stream, the judge in one scoring call
    assert (phase1_on.calls, phase1_on.requests, judge_on.calls, judge_on.requests) == (0, 12, 1, 6)
    assert all(len(r.repeats) == 2 and r.seconds == min(r.repeats) for r in report.runs)
    # the engine's own cache counters, over the last timed run only
    assert [r.cache_hits for r in report.runs] == [(120, 12), (60, 6), (120, 0), (60, 0)]
    # a revision request extends its critique request; a critique starts with the principle's few-shot turns
    answer, critique, revision = phase1_on.steps
    assert revision.reusable_prefix_tokens > critique.prompt_tokens * 0.9
    assert critique.prompt_tokens > answer.prompt_tokens + 50
    for workload in ("phase1 continuous", "judge logprob"):
        on, off = (r for r in report.runs if r.workload == workload)
        assert report.speedup(workload) == pytest.approx(off.seconds / on.seconds)
    assert set(report.speedups) == {"phase1 continuous", "judge logprob"}


def test_print_functions_write_the_reports_as_json(harmless, tmp_path):
    console = Console(file=io.StringIO(), width=200)
    judged = run_judge_bench(FakeEngine(responder=lambda c, p: VERDICT, chooser=uniform_chooser), PAIRS, harmless)
    print_judge_bench(judged, tmp_path / "judge.json", console)
    data = json.loads((tmp_path / "judge.json").read_text())
    assert data["ratios"] == pytest.approx(judged.ratios)
    assert [r["pairs_per_second"] for r in data["runs"]] == pytest.approx([r.pairs_per_second for r in judged.runs])
    assert "logprob/structured pairs/s" in console.file.getvalue()
    cached = run_prefix_cache_bench(lambda on: Switchable(on, []), [], PAIRS, harmless, Phase1Config())
    print_prefix_cache_bench(cached, tmp_path / "cache.json", console)
    assert json.loads((tmp_path / "cache.json").read_text())["speedups"] == pytest.approx(cached.speedups)
    assert "judge logprob: off / on" in console.file.getvalue()


def test_pairs_from_hh_transcripts_and_the_module_main(tmp_path, capsys):
    rows = [{"chosen": f"\n\nHuman: q{n}?\n\nAssistant: kind {n}", "rejected": f"\n\nHuman: q{n}?\n\nAssistant: rude {n}"}
            for n in range(4)]
    data = write_jsonl(tmp_path / "hh.jsonl", rows)
    pairs = read_pairs(data, limit=3)
    assert len(pairs) == 3 and all(p.prompt[-1].content == f"q{n}?" for n, p in enumerate(pairs))
    assert all({p.answer_a, p.answer_b} == {f"kind {n}", f"rude {n}"} for n, p in enumerate(pairs))
    main(["--data", str(data), "--engine", "fake", "--limit", "2", "--out", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "judge.json").read_text())
    assert [(r["mode"], r["pairs"]) for r in report["runs"]] == [("logprob", 2), ("structured", 2)]
    assert report["runs"][1]["errors"] == {"unparseable": 2}  # the fake engine's echo is no JSON verdict
    assert "judge throughput" in capsys.readouterr().out
