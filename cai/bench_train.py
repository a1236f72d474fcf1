"""`cai bench --train`: per-step time and peak memory of cai's trainers against plain TRL scripts.

For each TRL-backed trainer (sft, rm, dpo) two programs train the same model on the same rows
with the same TRL config: cai's trainer (`train_sft`, ...) and a plain TRL script (the model,
tokenizer and dataset loaded by hand and the TRL trainer constructed directly, no cai code). cai
runs with the settings that make it compute what TRL's stock trainer computes: the reward model
with `loss="margin", margin_scale=0` (TRL's Bradley-Terry loss) and no held-out split, DPO with
`soft_label="none"` (TRL's sigmoid loss). The report checks that claim: it lists every field in
which the two TrainingArguments differ (paths aside), so a wrapper that changed the config shows.

Each run is its own child process, so peak memory is that child's own (`ru_maxrss` from wait4)
and runs cannot warm each other's caches. A cai run and its plain twin run side by side in lock
step: a Trainer callback (the same in both programs) lets a process begin an optimiser step only
when it holds the turn, and passes the turn to the twin when its next step begins, so the two
never compute at once and their steps alternate cai, plain, cai, ...: load on a shared machine
falls on both alike, step by step. A step's time runs from taking the turn to the beginning of the
next step (forward, backward, optimiser, logging, the next batch's collation); the first `warmup`
steps are not timed; the report gives the median over every step of every repeat. Which twin goes
first swaps from one pair to the next. Setup (imports, model, data) runs side by side, so its time
is indicative only.

PPO is cai's own (TRL has no PPO trainer any more): its per-step time is reported alone, timed
through `train_ppo`'s public interface (the interval between consecutive calls of its reward
function: one rollout and update).

The child entry point is `python -m cai.bench_train_child SPEC.json` (what the parent runs).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from cai.errors import CaiError

TRL_TRAINERS = ("sft", "rm", "dpo")
TRAINERS = (*TRL_TRAINERS, "ppo")
# TrainingArguments fields that name paths or runs: they differ between any two runs.
IGNORED_FIELDS = {"output_dir", "logging_dir", "run_name", "hub_model_id"}
WORDS = ("the a cat dog story poem help answer question please write tell about why how what good careful "
         "kind short long river mountain city garden light music friend letter recipe plan idea").split()


class ChildSpec(BaseModel):
    trainer: str
    runner: Literal["cai", "plain"]
    model: str
    data: str
    out: str
    result: str
    batch_size: int
    warmup: int
    steps: int
    threads: int
    turn_in: str | None = None  # lock step: a FIFO this run reads the turn from ...
    turn_out: str | None = None  # ... and one it passes the turn to (its twin's turn_in)
    first: bool = False  # holds the turn at the start


class TrainRun(BaseModel):
    """One child process: a trainer run by cai or by the plain TRL script."""

    trainer: str
    runner: Literal["cai", "plain"]
    step_seconds: list[float]
    setup_seconds: float  # child start -> training begins (imports, model, data, TRL's preprocessing)
    seconds: float  # the child's wall time
    peak_rss_mb: float
    config: dict[str, Any] = {}  # the TrainingArguments it trained with (none for ppo)
    step_spans: list[tuple[float, float]] = []  # each timed step's (start, end), time.monotonic() (not ppo)


class TrainerComparison(BaseModel):
    trainer: str
    cai_step_s: float  # median over every timed step of every run
    plain_step_s: float | None = None
    step_ratio: float | None = None  # cai / plain, of the medians
    cai_best_step_s: float  # the fastest timed step: load on a shared machine only ever adds time
    plain_best_step_s: float | None = None
    best_step_ratio: float | None = None
    pair_ratios: list[float] = []  # cai / plain of the medians of each side-by-side pair of runs
    # the median of cai / plain over the step pairs, each cai step with the plain step of the same index
    # in the same pair of runs: the two ran a step apart, under the machine's load of that moment
    step_pair_ratio: float | None = None
    cai_peak_mb: float
    plain_peak_mb: float | None = None
    peak_ratio: float | None = None
    cai_setup_s: float
    plain_setup_s: float | None = None
    config_differences: list[str] = []  # "field: cai value != plain value"


class TrainBenchReport(BaseModel):
    model: str
    batch_size: int
    warmup: int
    steps: int
    repeats: int
    threads: int
    runs: list[TrainRun]

    def comparisons(self) -> list[TrainerComparison]:
        return [compare(self.runs, trainer) for trainer in dict.fromkeys(r.trainer for r in self.runs)]


def compare(runs: Sequence[TrainRun], trainer: str) -> TrainerComparison:
    """`trainer`'s cai and plain runs side by side: medians and minima of the timed steps, median peak
    memory, and their cai / plain ratios (see TrainerComparison)."""
    cai = [r for r in runs if r.trainer == trainer and r.runner == "cai"]
    plain = [r for r in runs if r.trainer == trainer and r.runner == "plain"]

    def steps(rs):
        return [s for r in rs for s in r.step_seconds]

    def median(values):
        return statistics.median(values) if values else None

    def ratio(a, b):
        return a / b if a is not None and b else None

    fields = dict(cai_step_s=median(steps(cai)), plain_step_s=median(steps(plain)), cai_best_step_s=min(steps(cai)),
                  plain_best_step_s=min(steps(plain), default=None), cai_peak_mb=median([r.peak_rss_mb for r in cai]),
                  plain_peak_mb=median([r.peak_rss_mb for r in plain]), cai_setup_s=median([r.setup_seconds for r in cai]),
                  plain_setup_s=median([r.setup_seconds for r in plain]))
    return TrainerComparison(
        trainer=trainer, **fields, step_ratio=ratio(fields["cai_step_s"], fields["plain_step_s"]),
        best_step_ratio=ratio(fields["cai_best_step_s"], fields["plain_best_step_s"]),
        pair_ratios=[median(a.step_seconds) / median(b.step_seconds) for a, b in zip(cai, plain)],
        step_pair_ratio=median([x / y for a, b in zip(cai, plain) for x, y in zip(a.step_seconds, b.step_seconds)]),
        peak_ratio=ratio(fields["cai_peak_mb"], fields["plain_peak_mb"]),
        config_differences=config_differences(cai[0].config, plain[0].config) if plain else [])


def config_differences(cai: dict[str, Any], plain: dict[str, Any]) -> list[str]:
    keys = sorted((set(cai) | set(plain)) - IGNORED_FIELDS)
    return [f"{k}: {cai.get(k)!r} != {plain.get(k)!r}" for k in keys if cai.get(k) != plain.get(k)]


# ---- the parent: data, schedule, child processes ----------------------------------


def synthetic_data(folder: Path, rows: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """(SFT rows, preference pairs): chat turns of ~24-word prompts and ~48-word answers."""
    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    def turn(role: str, n: int) -> list[dict[str, str]]:
        return [{"role": role, "content": text(n)}]

    sft = [{"messages": turn("user", 24) + turn("assistant", 48)} for _ in range(rows)]
    prefs = [{"prompt": turn("user", 24), "chosen": turn("assistant", 48), "rejected": turn("assistant", 48),
              "score": 0.9} for _ in range(rows)]
    paths = folder / "sft.jsonl", folder / "preferences.jsonl"
    for path, data in zip(paths, (sft, prefs)):
        path.write_text("".join(json.dumps(row) + "\n" for row in data), encoding="utf-8")
    return paths


def schedule(trainers: Sequence[str], repeats: int) -> list[tuple[str, tuple[str, ...]]]:
    """(trainer, runners) in run order: each TRL trainer's cai and plain runs as a lock-step pair,
    which goes first swapped from one pair to the next; ppo (cai only) alone, once per repeat."""
    order, pair = [], 0
    for _ in range(repeats):
        for trainer in trainers:
            if trainer == "ppo":
                order.append((trainer, ("cai",)))
                continue
            order.append((trainer, ("cai", "plain") if pair % 2 == 0 else ("plain", "cai")))
            pair += 1
    return order


def run_train_bench(model: str | None = None, trainers: Sequence[str] = TRAINERS, batch_size: int = 4,
                    steps: int = 3, warmup: int = 1, repeats: int = 1, threads: int = 1,
                    workdir: str | Path | None = None, log=None) -> TrainBenchReport:
    """Run the bench (see the module docstring); `log(line)` hears each finished run."""
    from cai.engine.models import resolve_model

    unknown = [t for t in trainers if t not in TRAINERS]
    if unknown or not trainers:
        raise CaiError(f"--trainer: {unknown or 'none given'}; choose from {', '.join(TRAINERS)}")
    if min(steps, warmup, repeats, batch_size, threads) < 1:
        raise CaiError("steps, warmup, repeats, batch size and threads must each be at least 1")
    path = resolve_model(model)
    if not Path(path).is_dir():
        raise CaiError(f"model folder not found: {model}")
    with tempfile.TemporaryDirectory(prefix="cai-bench-train-", dir=workdir) as tmp:
        folder = Path(tmp)
        sft, prefs = synthetic_data(folder, rows=max(64, batch_size * (warmup + steps + 1)))
        runs: list[TrainRun] = []
        for trainer, runners in schedule(trainers, repeats):
            specs = [ChildSpec(trainer=trainer, runner=runner, model=path, data=str(sft if trainer == "sft" else prefs),
                               out=str(folder / f"out-{len(runs) + i}"), result=str(folder / f"result-{len(runs) + i}.json"),
                               batch_size=batch_size, warmup=warmup, steps=steps, threads=threads)
                     for i, runner in enumerate(runners)]
            pair = run_children(in_lock_step(specs, folder / f"turn-{len(runs)}"), folder / f"child-{len(runs)}")
            runs += sorted(pair, key=lambda r: r.runner)  # cai, then plain: the pairs of compare()
            for run in pair:
                if log:
                    log(f"{trainer} ({run.runner}): {statistics.median(run.step_seconds):.2f} s/step, "
                        f"peak {run.peak_rss_mb:.0f} MB")
    return TrainBenchReport(model=path, batch_size=batch_size, warmup=warmup, steps=steps, repeats=repeats,
                            threads=threads, runs=runs)


def in_lock_step(specs: list[ChildSpec], prefix: Path) -> list[ChildSpec]:
    """Two runs: each reads the turn from its own FIFO and passes it into the other's; the first holds it."""
    if len(specs) == 1:
        return specs
    fifos = [f"{prefix}-{i}" for i in range(2)]
    for fifo in fifos:
        os.mkfifo(fifo)
    return [spec.model_copy(update=dict(turn_in=fifos[i], turn_out=fifos[1 - i], first=i == 0))
            for i, spec in enumerate(specs)]


def run_children(specs: list[ChildSpec], prefix: Path) -> list[TrainRun]:
    """`python -m cai.bench_train_child SPEC` for each spec, all at once; each one's peak RSS from wait4. When
    one fails the others are stopped (a lock-step twin would wait for the turn for ever)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}
    started, children = time.perf_counter(), {}
    for i, spec in enumerate(specs):
        log_path, spec_path = Path(f"{prefix}-{i}.log"), Path(f"{prefix}-{i}.spec.json")
        spec_path.write_text(spec.model_dump_json(), encoding="utf-8")
        with open(log_path, "w", encoding="utf-8") as out:
            proc = subprocess.Popen([sys.executable, "-m", "cai.bench_train_child", str(spec_path)], stdout=out,
                                    stderr=subprocess.STDOUT, env=env)
        children[proc.pid] = (proc, spec, log_path)
    runs = {}
    while len(runs) < len(children):
        for pid, (proc, spec, log_path) in children.items():
            if pid in runs:
                continue
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if not done:
                continue
            if os.waitstatus_to_exitcode(status) != 0 or not Path(spec.result).exists():
                for other, _, _ in children.values():
                    if other.pid not in runs and other.pid != pid:
                        other.kill()
                        other.wait()
                tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
                raise CaiError(f"bench run {spec.trainer} ({spec.runner}) failed:\n{tail}")
            result = json.loads(Path(spec.result).read_text(encoding="utf-8"))
            runs[pid] = TrainRun(trainer=spec.trainer, runner=spec.runner, seconds=time.perf_counter() - started,
                                 peak_rss_mb=usage.ru_maxrss / 1024, **result)
        time.sleep(0.05)
    return [runs[pid] for pid in children]
