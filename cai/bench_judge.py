"""Judge throughput and the effect of prefix caching, measured through cai's own stages.

- `run_judge_bench`: pairs judged by phase 2's entry point (`judge_samples`: a principle per pair,
  both orders) in each judge mode: pairs/s, engine calls, error rows, the ratio between modes.
- `run_prefix_cache_bench`: phase 1 (a principle's few-shot turns open its critique and revision
  requests; a revision request extends its critique request) and the judge (a pair's two orders
  share all up to the first option) with prefix caching on, then off, one engine at a time.
`python -m cai.bench_judge --help` runs both.
"""

from __future__ import annotations

import argparse
import json
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from contextlib import closing, suppress
from os.path import commonprefix
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, Field
from rich.console import Console
from rich.table import Table

from cai.bench import BRIEF_SYSTEM_PROMPT
from cai.constitution import LoadedConstitution, load_constitution
from cai.critique import run_phase1, step_names
from cai.engine import build_engine, check_engine_spec
from cai.engine.base import ChoiceScores, Engine
from cai.engine.stream import BatchedStream, RequestStream
from cai.engine.tokens import encode, render_prompt
from cai.errors import CaiError
from cai.evaluate import read_eval_items
from cai.files import atomic_write_json
from cai.judge import JUDGE_MODE_SPECS
from cai.preferences import judge_samples
from cai.recipe import EngineSpec, Phase1Config, Phase2Config
from cai.records import (
    AnswerSample,
    Chat,
    Completion,
    Message,
    SampledAnswers,
    SamplingParams,
    SourcePrompt,
    stable_id,
)
from cai.sources import read_prompts

Tokenize = Callable[[Chat, str], list[int]]  # (chat, answer prefix) -> the prompt's token ids

Pair = NamedTuple("Pair", [("prompt", Chat | str), ("answer_a", str), ("answer_b", str)])  # prompt: a chat or a text


def read_pairs(path: str | Path, limit: int | None = None, seed: int = 0) -> list[Pair]:
    """Pairs from HH-RLHF chosen/rejected transcripts or two-option files (cai.evaluate's readers)."""
    return [Pair(it.item.prompt, it.item.answer_a, it.item.answer_b) for it in read_eval_items(path, limit, seed).items]


EngineCall = NamedTuple("EngineCall", [("step", str), ("chats", list[Chat]), ("prefix", str)])


class CountingEngine:
    """Passes requests through to `inner`, keeping their chats for `call_tokens` (after the timed run:
    counting costs the measurement nothing). Other attributes (model, control_tokens...) are `inner`'s.
    A request sent through a request stream is kept under its step: the n-th request submitted under
    one key is step `names[n]` (phase 1 submits each trajectory's steps under its place in the batch)."""

    def __init__(self, inner: Engine, names: Sequence[str] = ()):
        self.inner, self.names = inner, list(names)
        self.calls: list[EngineCall] = []  # generate and scoring calls
        self.streamed: dict[int, list[Chat]] = {}  # step number -> the chats submitted through a stream
        self.submits: Counter = Counter()

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Completion]:
        self.calls.append(EngineCall("generate", list(chats), ""))
        return self.inner.generate(chats, params)

    def choice_logprobs(self, chats: Sequence[Chat], options: Sequence[str], prefix: str = "") -> list[ChoiceScores]:
        self.calls.append(EngineCall("score", list(chats), prefix))
        return self.inner.choice_logprobs(chats, options, prefix)

    def open_stream(self) -> RequestStream:
        native = getattr(self.inner, "open_stream", None)
        return _CountingStream(native() if callable(native) else BatchedStream(self.inner), self)

    def all_calls(self) -> list[EngineCall]:
        """The engine calls, then the streamed requests as one call per step."""
        return self.calls + [EngineCall(self.names[n] if n < len(self.names) else f"step {n}", chats, "")
                             for n, chats in sorted(self.streamed.items())]

    @property
    def requests(self) -> int:
        return sum(len(c.chats) for c in self.calls) + sum(self.submits.values())


class _CountingStream:
    def __init__(self, inner: RequestStream, counting: CountingEngine):
        self.inner, self.counting = inner, counting

    def __getattr__(self, name: str) -> Any:  # wait, close
        return getattr(self.inner, name)

    def submit(self, key: Hashable, chat: Chat, params: SamplingParams) -> None:
        self.counting.streamed.setdefault(self.counting.submits[key], []).append(chat)
        self.counting.submits[key] += 1
        self.inner.submit(key, chat, params)


def engine_tokenizer(engine: Engine) -> Tokenize | None:
    """Token ids as a local backend (vLLM, transformers) renders them; None for an engine without a tokenizer."""
    tokenizer = getattr(engine, "tokenizer", None)
    return None if tokenizer is None else lambda chat, prefix: encode(tokenizer, render_prompt(tokenizer, chat, prefix))


class StepTokens(BaseModel):
    """One engine call: mean prompt tokens per request, and the mean longest token prefix a request shares
    with an earlier request of the run (what a prefix cache can reuse at most: vLLM reuses whole blocks)."""

    step: str
    requests: int
    prompt_tokens: float
    reusable_prefix_tokens: float


def call_tokens(counting: CountingEngine, tokenize: Tokenize) -> list[StepTokens]:
    """Per call: prompt tokens and the prefix each request shares with an earlier one (in sorted
    order the longest shared prefix is with a neighbour, so this is O(n log n) comparisons)."""
    seen: list[tuple[int, ...]] = []
    out = []
    for call in counting.all_calls():
        lengths, shared = [], []
        for chat in call.chats:
            ids = tuple(tokenize(chat, call.prefix))
            at = bisect_left(seen, ids)
            shared.append(max((len(commonprefix([ids, seen[k]])) for k in (at - 1, at) if 0 <= k < len(seen)), default=0))
            lengths.append(len(ids))
            seen.insert(at, ids)
        out.append(StepTokens(step=call.step, requests=len(call.chats), prompt_tokens=sum(lengths) / max(len(lengths), 1),
                              reusable_prefix_tokens=sum(shared) / max(len(shared), 1)))
    return out


def _weighted(steps: Sequence[StepTokens], field: str) -> float | None:
    total = sum(s.requests for s in steps)
    return sum(getattr(s, field) * s.requests for s in steps) / total if total else None


class JudgeRun(BaseModel):
    mode: str
    pairs: int
    orders: int  # judged per pair
    calls: int
    requests: int
    seconds: float
    errors: dict[str, int] = Field(default_factory=dict)  # error rows by code
    modes_used: dict[str, int] = Field(default_factory=dict)  # logprob falls back to structured without log-probs
    prompt_tokens: float | None = None

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / self.seconds if self.seconds else 0.0

    @property
    def labels_per_second(self) -> float:  # pairs that got a label, not an error row
        return (self.pairs - sum(self.errors.values())) / self.seconds if self.seconds else 0.0


class JudgeBenchReport(BaseModel):
    model: str
    backend: str
    runs: list[JudgeRun]

    @property
    def ratios(self) -> dict[str, float]:
        """"first/other": the first mode's pairs/s over each other mode's."""
        first, *others = self.runs or [None]
        return {f"{first.mode}/{r.mode}": first.pairs_per_second / r.pairs_per_second for r in others if r.pairs_per_second}


def _sampled(pairs: Sequence[Pair], engine: Engine) -> list[SampledAnswers]:
    chats = [[Message(role="user", content=p)] if isinstance(p, str) else list(p) for p, _, _ in pairs]
    return [SampledAnswers(id=stable_id("bench-judge", n, [m.model_dump() for m in chat]), parent_ids=[str(n)], prompt=chat,
                           answers=[AnswerSample(text=t, finish_reason="stop") for t in pair[1:]], model=engine.model)
            for n, (chat, pair) in enumerate(zip(chats, pairs))]


def run_judge_bench(
    engine: Engine, pairs: Sequence[Pair], constitution: LoadedConstitution,
    config_base: Phase2Config | None = None, modes: Sequence[str] = ("logprob", "structured"),
    tokenize: Tokenize | None = None,
) -> JudgeBenchReport:
    """Judge `pairs` in each mode as phase 2 does (judge_samples: principle per pair, both orders), each
    after one warm-up judgement and a cold prefix cache; `tokenize` (default: the engine's tokenizer,
    if any) adds prompt tokens per request."""
    if not pairs:
        raise CaiError("judge bench: no pairs to judge (is the data file empty?)")
    if unknown := [m for m in modes if m not in JUDGE_MODE_SPECS]:
        raise CaiError(f"judge bench: unknown judge mode {unknown[0]!r}; known: {', '.join(JUDGE_MODE_SPECS)}")
    base = config_base or Phase2Config()
    sampled = _sampled(pairs, engine)
    tokenize = tokenize or engine_tokenizer(engine)
    runs = []
    for mode in modes:
        config = base.model_copy(update={"judge": base.judge.model_copy(update={"mode": mode})})
        judge_samples(sampled[:1], constitution, engine, config)  # warm-up
        getattr(engine, "reset_prefix_cache", lambda: None)()  # every mode starts with a cold prefix cache
        counting = CountingEngine(engine)
        started = time.perf_counter()
        records = judge_samples(sampled, constitution, counting, config)
        seconds = time.perf_counter() - started
        judgements = [c.judgement for r in records for c in r.comparisons]
        runs.append(JudgeRun(
            mode=mode, pairs=len(judgements), orders=config.judge.orders, calls=len(counting.calls),
            requests=counting.requests, seconds=seconds,
            errors=dict(Counter(j.error.code.value for j in judgements if j.error is not None)),
            modes_used=dict(Counter(j.mode for j in judgements)),
            prompt_tokens=_weighted(call_tokens(counting, tokenize), "prompt_tokens") if tokenize else None))
    return JudgeBenchReport(model=engine.model.id, backend=engine.backend, runs=runs)


class CacheRun(BaseModel):
    workload: str  # "phase1 <schedule>" or "judge <mode>"
    prefix_caching: bool
    calls: int  # generate and scoring calls (phase 1 sends its requests through a request stream)
    requests: int
    seconds: float = Field(description="the fastest of the repeats")
    repeats: list[float] = Field(default_factory=list)
    prompt_tokens: float | None = None
    reusable_prefix_tokens: float | None = None
    steps: list[StepTokens] = Field(default_factory=list)
    cache_hits: tuple[int, int] | None = None  # the engine's own count: (prompt tokens, of them cache hits)


class PrefixCacheReport(BaseModel):
    model: str
    backend: str
    runs: list[CacheRun]

    def speedup(self, workload: str) -> float | None:
        """Seconds with the cache off over seconds with it on (> 1: the cache helps)."""
        seconds = {r.prefix_caching: r.seconds for r in self.runs if r.workload == workload}
        return seconds[False] / seconds[True] if seconds.get(True) and False in seconds else None

    @property
    def speedups(self) -> dict[str, float | None]:
        return {w: self.speedup(w) for w in dict.fromkeys(r.workload for r in self.runs)}


def _measure(engine: Engine, name: str, caching: bool, work: Callable[[Engine], object], names: Sequence[str], repeats: int,
             tokenize: Tokenize | None) -> CacheRun:
    times: list[float] = []
    stats = getattr(engine, "prefix_cache_stats", lambda: None)  # () -> (prompt tokens, cache hits) so far, or None
    for _ in range(repeats):
        getattr(engine, "reset_prefix_cache", lambda: None)()
        counting, before = CountingEngine(engine, names), stats()
        started = time.perf_counter()
        work(counting)
        times.append(time.perf_counter() - started)
    steps, after = call_tokens(counting, tokenize) if tokenize else [], stats()
    return CacheRun(workload=name, prefix_caching=caching, calls=len(counting.calls), requests=counting.requests,
                    seconds=min(times), repeats=times, prompt_tokens=_weighted(steps, "prompt_tokens"),
                    reusable_prefix_tokens=_weighted(steps, "reusable_prefix_tokens"), steps=steps,
                    cache_hits=tuple(a - b for a, b in zip(after, before)) if before and after else None)


def run_prefix_cache_bench(
    build: Callable[[bool], Engine], sources: Sequence[SourcePrompt], pairs: Sequence[Pair],
    constitution: LoadedConstitution, phase1: Phase1Config, phase2: Phase2Config | None = None,
    repeats: int = 1, tokenize: Tokenize | None = None,
) -> PrefixCacheReport:
    """Phase 1 on `sources` and the judge on `pairs` (either may be empty), on `build(True)` (prefix
    caching on) and then `build(False)`: one engine at a time, each closed before the next starts;
    a warm-up call first, a cold cache before every timed run, the fastest of `repeats` kept."""
    phase2 = phase2 or Phase2Config()
    workloads: list[tuple[str, Callable[[Engine], object], list[str]]] = []
    if sources:
        workloads.append((f"phase1 {phase1.schedule}", lambda eng: run_phase1(sources, constitution, eng, phase1),
                          step_names(phase1.rounds)))
    if pairs:
        workloads.append((f"judge {phase2.judge.mode}", lambda eng: judge_samples(
            _sampled(pairs, eng), constitution, eng, phase2), []))
    if not workloads:
        raise CaiError("prefix-cache bench: no prompts and no pairs to run")
    runs, model, backend = [], "", ""
    for caching in (True, False):
        with closing(build(caching)) as engine:
            model, backend = engine.model.id, engine.backend
            warm = sources[0].messages if sources else [Message(role="user", content="Hello")]
            engine.generate([warm], SamplingParams(max_tokens=8))
            tok = tokenize or engine_tokenizer(engine)
            runs += [_measure(engine, name, caching, work, names, max(1, repeats), tok) for name, work, names in workloads]
    return PrefixCacheReport(model=model, backend=backend, runs=runs)


def _table(title: str, columns: str, rows: list[list[str]], left: int) -> Table:
    table = Table(title=title)
    for n, col in enumerate(columns.split("|")):
        table.add_column(col, justify="left" if n < left else "right")
    for row in rows:
        table.add_row(*row)
    return table


def print_judge_bench(report: JudgeBenchReport, out: str | Path | None = None, console: Console | None = None) -> None:
    """A table of pairs/s per judge mode and the ratio line; the report as JSON at `out` if given."""
    console = console or Console()
    rows = [[r.mode, ", ".join(f"{k} {v}" for k, v in sorted(r.modes_used.items())),
             ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items())) or "0", str(r.pairs), str(r.orders),
             str(r.calls), str(r.requests), f"{r.prompt_tokens or 0:.0f}", f"{r.seconds:.2f}", f"{r.pairs_per_second:.2f}",
             f"{r.labels_per_second:.2f}"] for r in report.runs]
    console.print(_table(f"judge throughput: {report.model} on {report.backend}", "mode|modes used|error rows|pairs|"
                         "orders|engine calls|requests|prompt tok/req|seconds|pairs/s|labelled pairs/s", rows, 3))
    console.print("   ".join(f"{k} pairs/s = {v:.1f}x" for k, v in report.ratios.items()))
    if out:
        runs = [r.model_dump() | {"pairs_per_second": r.pairs_per_second, "labels_per_second": r.labels_per_second}
                for r in report.runs]
        atomic_write_json(out, report.model_dump() | {"runs": runs, "ratios": report.ratios})


def print_prefix_cache_bench(report: PrefixCacheReport, out: str | Path | None = None,
                             console: Console | None = None) -> None:
    """A table of seconds with the prefix cache on and off per workload, the speed-ups; JSON at `out`."""
    console = console or Console()
    rows = [[r.workload, "on" if r.prefix_caching else "off", str(r.calls), str(r.requests), f"{r.prompt_tokens or 0:.0f}",
             f"{r.reusable_prefix_tokens or 0:.0f}", f"{r.cache_hits[1]}/{r.cache_hits[0]}" if r.cache_hits else "-",
             f"{r.seconds:.2f}"] for r in report.runs]
    console.print(_table(f"prefix caching: {report.model} on {report.backend}", "workload|prefix cache|engine calls|"
                         "requests|prompt tok/req|reusable prefix tok/req|cache hits / prompt tok|seconds", rows, 2))
    console.print("   ".join(f"{w}: off / on = {s:.2f}x" for w, s in report.speedups.items() if s is not None))
    if out:
        atomic_write_json(out, report.model_dump() | {"speedups": report.speedups})


def _value(text: str) -> Any:
    """An --engine-option value: JSON when it parses (false, 0.5), else the text."""
    with suppress(json.JSONDecodeError):
        return json.loads(text)
    return text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cai.bench_judge", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="judge throughput on these pairs: HH-RLHF chosen/rejected or two-option JSONL")
    p.add_argument("--prompts", default="redteam", help="phase-1 prompts of the prefix-cache bench")
    p.add_argument("--constitution", default="harmless")
    p.add_argument("--engine", default="auto")
    p.add_argument("--model", default=None)
    p.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--limit", type=int, default=16, help="pairs judged, and phase-1 prompts")
    p.add_argument("--modes", default="logprob,structured", help="judge modes, comma-separated; the first is "
                   "the ratio's numerator; '' skips the throughput run")
    p.add_argument("--prefix-cache", action="store_true", help="phase 1 and the judge with prefix caching on, then off")
    p.add_argument("--max-tokens", type=int, default=128, help="phase-1 budget per step")
    p.add_argument("--schedule", default="continuous", choices=("continuous", "steps"), help="phase 1's schedule")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per workload (the fastest is kept)")
    p.add_argument("--out", type=Path, default=None, help="folder for judge.json and prefix-cache.json")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m cai.bench_judge`: judge throughput with --data, the prefix-cache bench with --prefix-cache."""
    args = _parser().parse_args(argv)
    options = {key.strip(): _value(value) for key, _, value in (o.partition("=") for o in args.engine_option)}

    def build(**extra: Any) -> Engine:
        return build_engine(check_engine_spec(EngineSpec(backend=args.engine, model=args.model, options=options | extra)))

    constitution = load_constitution(args.constitution)
    pairs = read_pairs(args.data, limit=args.limit) if args.data else []
    if out := args.out:
        out.mkdir(parents=True, exist_ok=True)
    if pairs and args.modes:
        with closing(build()) as engine:
            report = run_judge_bench(engine, pairs, constitution, modes=args.modes.split(","))
        print_judge_bench(report, out / "judge.json" if out else None)
    if args.prefix_cache:
        sources = list(read_prompts(args.prompts, limit=args.limit))
        budget = SamplingParams(max_tokens=args.max_tokens)
        phase1 = Phase1Config(rounds=1, system_prompt=BRIEF_SYSTEM_PROMPT, answer=budget, critique=budget, revision=budget,
                              schedule=args.schedule)
        cached = run_prefix_cache_bench(lambda on: build(enable_prefix_caching=on), sources, pairs, constitution,
                                        phase1, repeats=args.repeats)
        print_prefix_cache_bench(cached, out / "prefix-cache.json" if out else None)


if __name__ == "__main__":
    try:
        main()
    except CaiError as exc:
        raise SystemExit(f"error: {exc}") from None
