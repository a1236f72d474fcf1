"""`cai bench`: throughput of the bare engine vs phase 1 through cai vs a one-at-a-time loop."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from cai.bench import (
    BRIEF_SYSTEM_PROMPT,
    COMPLETION_GOAL,
    BatchSizeReport,
    BenchReport,
    cycled,
    run_batch_size_bench,
    run_bench,
)
from cai.bench_judge import (
    print_judge_bench,
    print_prefix_cache_bench,
    read_pairs,
    run_judge_bench,
    run_prefix_cache_bench,
)
from cai.bench_train import TRAINERS, TrainBenchReport, run_train_bench
from cai.cli.common import (
    ConstitutionOpt,
    EngineOpt,
    ModelOpt,
    engine_spec,
    fail_on_user_error,
    parse_pairs,
)
from cai.constitution import load_constitution
from cai.engine.stub_server import StubChatServer
from cai.files import atomic_write_json
from cai.jobdir import build_engine
from cai.recipe import DEFAULT_BATCH_SIZE, Phase1Config
from cai.records import SamplingParams
from cai.sources import read_prompts

console = Console()


TemperatureOpt = Annotated[float, typer.Option(min=0.0, help="sampling temperature (seeded per request); greedy "
    "decoding makes a small model repeat itself until the budget runs out")]
SystemOpt = Annotated[str, typer.Option(help="system turn before every request ('' for none); the default, "
    "the CPU recipe's, lets a small model finish within its budget")]
ScheduleOpt = Annotated[Optional[list[str]], typer.Option(
    "--schedule", help="phase-1 schedule(s) to time: steps, continuous (repeatable; default both)")]
BatchSizesOpt = Annotated[Optional[list[int]], typer.Option(
    "--batch-size", min=1, help="instead: phase 1 on --limit prompts (the source repeated if shorter) cut "
    "into batches of this size, as a job cuts them; repeat to compare sizes (prompts/s and their ratio)")]
StubLatencyOpt = Annotated[Optional[float], typer.Option(
    min=0, help="answer from a local OpenAI-compatible stub server that replies after this many ms "
    "(the openai backend; e.g. --engine-option concurrency=16): the backend's own cost, no model")]
JudgeFileOpt = Annotated[Optional[Path], typer.Option(
    "--judge", help="instead: judge throughput on --limit pairs of this file (HH-RLHF chosen/rejected or two-option "
    "JSONL), judged as phase 2 does (both orders): pairs/s per --judge-mode and their ratio")]
JudgeModesOpt = Annotated[Optional[list[str]], typer.Option(
    "--judge-mode", help="judge modes for --judge (repeatable; default logprob, structured)")]
ServiceOpt = Annotated[bool, typer.Option("--service", help="instead: the same phase-1 job through `cai serve` (its own "
    "process) and the CLI code path, then through the service while --pollers clients poll its status and records, "
    "against the stub server (--stub-latency-ms, default 10; --limit prompts, the source repeated; serve extra)")]
TrainOpt = Annotated[bool, typer.Option("--train", help="instead: per-step time and peak memory of cai's trainers "
    "(--trainer) against plain TRL scripts with the same config, on --model (each run its own process; cai and "
    "plain side by side in lock step, their steps alternating; --repeats pairs each): s/step, peak MB and "
    "cai/plain ratios")]
TrainerOpt = Annotated[Optional[list[str]], typer.Option(
    "--trainer", help=f"--train: trainers to time (repeatable; default all: {', '.join(TRAINERS)}; ppo has no TRL twin)")]
PrefixCacheOpt = Annotated[bool, typer.Option(
    "--prefix-cache", help="instead: phase 1 (and the logprob judge on --judge pairs) on vLLM with prefix caching "
    "on, then off, one engine at a time: seconds, speed-up, prompt tokens and shared prefix per request")]


def bench(
    constitution: ConstitutionOpt = "harmless",
    prompts: Annotated[str, typer.Option(help="prompt source (as for `generate sft`)")] = "redteam",
    engine: EngineOpt = "auto",
    model: ModelOpt = None,
    engine_option: Annotated[Optional[list[str]], typer.Option("--engine-option")] = None,
    limit: Annotated[int, typer.Option(min=1, help="prompts in the batched runs")] = 32,
    naive_prompts: Annotated[int, typer.Option(min=1, help="prompts in the one-at-a-time loop")] = 4,
    rounds: Annotated[int, typer.Option(min=1)] = 1,
    max_tokens: Annotated[int, typer.Option(min=1, help="max new tokens per answer and revision")] = 256,
    critique_max_tokens: Annotated[int, typer.Option(min=1)] = 128,
    temperature: TemperatureOpt = 0.7,
    seed: int = 0,
    system: SystemOpt = BRIEF_SYSTEM_PROMPT,
    schedule: ScheduleOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="also write the report as JSON here")] = None,
    naive_engine: Annotated[Optional[str], typer.Option(help="backend of the one-at-a-time loop; default: the same engine")] = None,
    batch_size: BatchSizesOpt = None,
    stub_latency_ms: StubLatencyOpt = None,
    judge: JudgeFileOpt = None,
    judge_mode: JudgeModesOpt = None,
    service: ServiceOpt = False,
    pollers: Annotated[int, typer.Option(min=0, help="--service: clients polling the job (0: no polled run)")] = 24,
    poll_interval_ms: Annotated[float, typer.Option(min=0, help="--service: each poller's pause between rounds")] = 0.0,
    repeats: Annotated[int, typer.Option(min=1, help="--service: runs of each path, the median shown; --train: pairs of runs per trainer")] = 1,
    prefix_cache: PrefixCacheOpt = False,
    train: TrainOpt = False,
    trainer: TrainerOpt = None,
    train_batch_size: Annotated[int, typer.Option(min=1, help="--train: per-device batch size")] = 4,
    train_steps: Annotated[int, typer.Option(min=1, help="--train: timed steps per run, after one warm-up step")] = 3,
    threads: Annotated[int, typer.Option(min=1, help="--train: torch CPU threads in every run")] = 1,
) -> None:
    """Phase 1's tokens/s through cai vs the bare engine, its steady state and a naive loop, with
    requests and finished trajectories per step. Or: --batch-size, --judge, --prefix-cache, --service, --train."""
    if train:
        with fail_on_user_error():
            report = run_train_bench(model, trainer or TRAINERS, batch_size=train_batch_size, steps=train_steps,
                                     repeats=repeats, threads=threads, log=console.print)
        _print_train_bench(report, out)
        return
    if service:
        _service(prompts, limit, rounds, batch_size, stub_latency_ms, engine_option, pollers, poll_interval_ms, repeats, out)
        return
    schedules = schedule or ["continuous", "steps"]  # the last is the default's: the one the ratios use
    with fail_on_user_error():
        loaded = load_constitution(constitution)
        sources = list(read_prompts(prompts, limit=limit))
        config = Phase1Config(
            rounds=rounds, system_prompt=system or None, schedule=schedules[-1],
            answer=SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed),
            critique=SamplingParams(max_tokens=critique_max_tokens, temperature=temperature, seed=seed),
            revision=SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed))
    if judge is not None or prefix_cache:
        _judge_and_cache(loaded, sources, config, judge, judge_mode, prefix_cache, engine_spec(engine, model, engine_option),
                         limit, out)
        return
    with ExitStack() as resources:
        if stub_latency_ms is not None:
            stub = resources.enter_context(StubChatServer(latency=stub_latency_ms / 1000))
            engine, model = "openai", model or "stub"
            engine_option = [*(engine_option or []), f"base_url={stub.url}", "api_key=EMPTY"]
        eng = build_engine(engine_spec(engine, model, engine_option))
        resources.callback(eng.close)
        if batch_size:
            sized = run_batch_size_bench(eng, cycled(sources, limit), loaded, config, batch_size)
            _print_batch_sizes(sized, out)
            return
        naive = build_engine(engine_spec(naive_engine, model, None)) if naive_engine else None
        if naive is not None:
            resources.callback(naive.close)
        report = run_bench(eng, sources, loaded, config, min(naive_prompts, len(sources)), naive, schedules)
    _print_comparison(report, out)


def _service(prompts, limit, rounds, batch_size, stub_latency_ms, engine_option, pollers, poll_interval_ms, repeats, out) -> None:
    try:
        from serve.bench import print_service_bench, run_service_bench
    except ImportError as exc:
        console.print(f"[red]error:[/] --service needs the serve extra ({exc.name} missing): pip install 'cai[serve]'")
        raise typer.Exit(2) from None
    options = parse_pairs(engine_option, "--engine-option", "concurrency=16")
    with fail_on_user_error():
        report = run_service_bench(
            prompts=limit, pollers=pollers, stub_latency_ms=10.0 if stub_latency_ms is None else stub_latency_ms,
            concurrency=int(options.get("concurrency", 16)), rounds=rounds, source=prompts, repeats=repeats,
            batch_size=batch_size[0] if batch_size else DEFAULT_BATCH_SIZE, poll_interval_ms=poll_interval_ms)
    print_service_bench(report, out)


def _judge_and_cache(loaded, sources, config, judge, judge_mode, prefix_cache, spec, limit, out) -> None:
    with fail_on_user_error():
        pairs = read_pairs(judge, limit=limit) if judge is not None else []
    if judge is not None:
        eng = build_engine(spec)
        try:
            report = run_judge_bench(eng, pairs, loaded, modes=judge_mode or ("logprob", "structured"))
        finally:
            eng.close()
        print_judge_bench(report, out, console)
    if prefix_cache:
        def build(on: bool):
            return build_engine(spec.model_copy(update={"options": {**spec.options, "enable_prefix_caching": on}}))

        cached = run_prefix_cache_bench(build, sources, pairs, loaded, config)
        print_prefix_cache_bench(cached, out.with_suffix(".prefix-cache.json") if out and judge is not None else out, console)


def _print_comparison(report: BenchReport, out: Path | None) -> None:
    config = report.config
    console.print(f"settings: {config.rounds} round(s); max_tokens answer {config.answer.max_tokens}, critique "
                  f"{config.critique.max_tokens}, revision {config.revision.max_tokens}; temperature "
                  f"{config.answer.temperature} (seed {config.answer.seed}); system turn: {config.system_prompt!r}")
    steps = Table(title="requests per step (step-batched run)")
    for col in ("step", "requests", "ended with an error"):
        steps.add_column(col, justify="right" if col != "step" else "left")
    for count in report.steps:
        steps.add_row(count.step, str(count.requests), str(count.ended_with_error))
    console.print(steps)
    share = report.completed_share
    colour = "green" if share >= COMPLETION_GOAL else "bold red"
    console.print(f"[{colour}]trajectories completed: {report.completed}/{report.bare_engine.prompts} ({share:.0%})"
                  + ("" if share >= COMPLETION_GOAL else f": below {COMPLETION_GOAL:.0%}, so this bench measures "
                     "mostly the first step; raise --max-tokens or shorten the answers (--system)") + "[/]")
    table = Table(title=f"{report.model} on {report.backend}")
    for col in ("run", "prompts", "calls/requests", "tokens", "seconds", "tok/s"):
        table.add_column(col, justify="right" if col != "run" else "left")
    runs = [*((f"cai phase 1 ({name})", t) for name, t in report.cai.items()), ("bare engine (step calls)", report.bare_engine),
            ("steady state (all requests at once)", report.steady_state), (f"naive loop ({report.naive_backend})", report.naive_loop)]
    for name, t in runs:
        table.add_row(name, str(t.prompts), str(t.calls), str(t.generated_tokens), f"{t.seconds:.1f}", f"{t.tokens_per_second:.1f}")
    console.print(table)
    ratios = report.ratios()
    console.print(f"cai ({report.config.schedule}) / bare engine = {ratios['cai_vs_bare']:.2f}   "
                  f"cai / steady state = {ratios['cai_vs_steady_state']:.2f}   cai / naive loop = {ratios['cai_vs_naive']:.1f}x"
                  + (f"   continuous / steps = {ratios['continuous_vs_steps']:.2f}" if "continuous_vs_steps" in ratios else ""))
    if out:
        atomic_write_json(out, report.model_dump(mode="json") | ratios | {"completed_share": share})


def _print_batch_sizes(report: BatchSizeReport, out: Path | None) -> None:
    table = Table(title=f"{report.model} on {report.backend}: phase 1, {report.rounds} round(s), by batch size")
    for col in ("batch size", "prompts", "engine calls", "generation s", "prompts/s"):
        table.add_column(col, justify="right")
    for run in report.runs:
        table.add_row(str(run.batch_size), str(run.prompts), str(run.calls), f"{run.seconds:.2f}",
                      f"{run.prompts_per_second:.1f}")
    console.print(table)
    console.print(f"slowest / fastest prompts/s = {report.slowest_vs_fastest:.2f}")
    if out:
        runs = [r.model_dump() | {"prompts_per_second": r.prompts_per_second} for r in report.runs]
        atomic_write_json(out, report.model_dump() | {"runs": runs, "slowest_vs_fastest": report.slowest_vs_fastest})


def _print_train_bench(report: TrainBenchReport, out: Path | None) -> None:
    table = Table(title=f"{report.model}: batch {report.batch_size}, {report.steps} timed step(s) after "
                        f"{report.warmup} warm-up, {report.repeats} repeat(s), {report.threads} thread(s)")
    for col in ("trainer", "cai s/step", "plain s/step", "cai/plain", "step pairs", "best steps", "cai peak MB",
                "plain peak MB", "cai/plain peak"):
        table.add_column(col, justify="left" if col == "trainer" else "right")

    def num(value, spec):
        return "-" if value is None else format(value, spec)

    comparisons = report.comparisons()
    for c in comparisons:
        table.add_row(c.trainer, num(c.cai_step_s, ".2f"), num(c.plain_step_s, ".2f"), num(c.step_ratio, ".3f"),
                      num(c.step_pair_ratio, ".3f"), num(c.best_step_ratio, ".3f"), num(c.cai_peak_mb, ".0f"), num(c.plain_peak_mb, ".0f"),
                      num(c.peak_ratio, ".3f"))
    console.print(table)
    for c in comparisons:
        if c.step_ratio is not None:
            console.print(f"{c.trainer}: cai / plain = {c.step_ratio:.3f} per step (median; step by step "
                          f"{c.step_pair_ratio:.3f}; best steps {c.best_step_ratio:.3f}; by pair "
                          f"{', '.join(f'{r:.3f}' for r in c.pair_ratios)}), "
                          f"{c.peak_ratio:.3f} peak memory")
        if c.config_differences:
            console.print(f"[yellow]{c.trainer}: cai's TRL config differs from the plain script's:[/] "
                          + "; ".join(c.config_differences))
    if out:
        atomic_write_json(out, report.model_dump() | {"comparisons": [c.model_dump() for c in comparisons]})
