"""`cai run RECIPE.yaml`: the two-phase Constitutional AI run, stage by stage.

Each stage is one `cai` CLI command run in its own process, so every stage can
be re-run by hand from `RUN/run.json`, engines and trainers never share a
process (vLLM's CPU thread binding and model memory go away between stages), and
the peak memory of each stage is measured on its own. A stage is finished when
its folder holds `.done`; a rerun starts at the first unfinished stage, and the
data stages resume inside themselves from their job directories.

    01-sft-data  phase 1: critique -> revise with the base model
    02-sft       SFT of the base model on the revisions
    03-prefs     phase 2: K samples per prompt from the SFT model, AI-judged pairs
    04-rm        reward model (method: ppo)
    05-policy    PPO against the reward model, or DPO on the pairs
    06-judge-check-N  the evaluation judge against human labels (`cai eval judge`), per judge_check file
    07-eval      final vs SFT vs base, graded by the evaluation judge: win rates next to that
                 judge's human agreement, refusal rate, plots

Phase 1 and phase 2 take disjoint, seeded slices of each prompt source (run.json
records the split); evaluation excludes both. Each prompt group can have its own
constitution (red-team prompts: harmless; ordinary requests: helpful, or unrevised).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from cai.engine.models import EMBEDDED_MODEL
from cai.interrupt import sigint_handler
from cai.records import utc_now
from cai.sources import read_prompts
from cai.store import atomic_write_lines, atomic_write_text

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataStage(_Strict):
    prompts: list[str] = Field(default_factory=lambda: ["redteam"], description="sources, mixed in order")
    limit: int | None = Field(None, ge=1, description="prompts taken from each source")
    constitutions: dict[str, str] = Field(
        default_factory=dict, description="prompt group (a source's bundled name or file name without suffix) -> "
        "constitution for its prompts; phase 1 also takes `none` (answers kept unrevised)")
    args: list[str] = Field(default_factory=list, description="extra `cai generate` flags, verbatim")


class JudgeCheck(_Strict):
    data: list[str] = Field(default_factory=list, description="human-labelled files for `cai eval judge` "
                            "(multiple-choice or HH pairs); a missing file is skipped and the report says so")
    args: list[str] = Field(default_factory=lambda: ["--limit", "100"], description="extra `cai eval judge` flags")


class TrainStage(_Strict):
    args: list[str] = Field(default_factory=list, description="extra `cai train` flags, e.g. --max-steps 20")


class EvalStage(_Strict):
    args: list[str] = Field(default_factory=list, description="extra `cai eval policy` flags")


class RunRecipe(_Strict):
    """One YAML file describes the whole run; stage `args` are the CLI flags of that stage's command."""

    name: str
    description: str = ""
    constitution: str = "harmless"
    base_model: str = EMBEDDED_MODEL
    judge_model: str | None = Field(None, description="labels the phase-2 pairs; default: the base model")
    eval_judge_model: str | None = Field(
        None, description="grades the final policy; best a model other than judge_model. Default: judge_model, "
        "and then the report's first line says the policy is graded by the judge that trained it")
    split_seed: int = Field(0, description="seed of the disjoint phase-1 / phase-2 split of each prompt source")
    engine: str = "auto"
    method: Literal["dpo", "ppo"] = "dpo"
    phase1: DataStage = Field(default_factory=DataStage)
    sft: TrainStage = Field(default_factory=TrainStage)
    phase2: DataStage = Field(default_factory=DataStage)
    rm: TrainStage = Field(default_factory=TrainStage)
    policy: TrainStage = Field(default_factory=TrainStage)
    eval: EvalStage = Field(default_factory=EvalStage)
    judge_check: JudgeCheck = Field(default_factory=JudgeCheck)


class StageResult(BaseModel):
    name: str
    command: list[str]
    seconds: float
    peak_rss_mb: float
    finished_at: str = Field(default_factory=utc_now)


def load_recipe(spec: str | Path) -> RunRecipe:
    """A recipe file, or the name of a shipped recipe (`cpu-smollm2`, `gpu-7b`)."""
    path = Path(spec)
    if not path.exists() and (RECIPES_DIR / f"{spec}.yaml").exists():
        path = RECIPES_DIR / f"{spec}.yaml"
    if not path.is_file():
        shipped = ", ".join(p.stem for p in sorted(RECIPES_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"{spec}: no such recipe file (shipped recipes: {shipped})")
    return RunRecipe.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))


def split_prompts(recipe: RunRecipe, run_dir: Path) -> dict[str, Any]:
    """Write prompts-phase1.jsonl and prompts-phase2.jsonl once: each source's prompts are shuffled
    with `split_seed` and dealt out without overlap (phase 1 first), so phase 2 never reuses a
    phase-1 prompt; evaluation excludes both files. Rows keep their group in `source`.
    Returns the split (recorded in run.json)."""
    phases = {"phase1": recipe.phase1, "phase2": recipe.phase2}
    taken: dict[str, dict[str, set[int]]] = {name: {} for name in phases}
    for spec in dict.fromkeys(recipe.phase1.prompts + recipe.phase2.prompts):
        size = sum(1 for _ in read_prompts(spec))
        counts = _split_counts(recipe, spec, size)
        picked = random.Random(f"{recipe.split_seed}:{spec}").sample(range(size), sum(counts.values()))
        start = 0
        for name, count in counts.items():
            taken[name][spec] = set(picked[start:start + count])
            start += count
    for name in phases:
        path = run_dir / f"prompts-{name}.jsonl"
        if not path.exists():
            atomic_write_lines(path, (
                json.dumps({"id": p.id, "source": p.group, "messages": [m.model_dump() for m in p.messages]},
                           ensure_ascii=False) + "\n"
                for spec, picked in taken[name].items()
                for index, p in enumerate(read_prompts(spec)) if index in picked))
    return {"seed": recipe.split_seed, **{name: {spec: len(ids) for spec, ids in taken[name].items()}
                                          for name in phases},
            "eval": "the eval sets minus every phase-1 and phase-2 prompt (cai eval policy --exclude)"}


def _split_counts(recipe: RunRecipe, spec: str, size: int) -> dict[str, int]:
    """How many prompts of `spec` each phase takes; refuses overlap, an empty phase or too few prompts."""
    users = {name: stage for name, stage in (("phase1", recipe.phase1), ("phase2", recipe.phase2))
             if spec in stage.prompts}
    if len(users) == 2 and recipe.phase1.limit is None:
        raise ValueError(f"recipe {recipe.name}: phase 1 and phase 2 both read {spec} and phase1.limit is unset, "
                         "so phase 1 would take every prompt and leave phase 2 none; set phase1.limit")
    counts = {name: stage.limit or size for name, stage in users.items()}
    if len(users) == 2 and recipe.phase2.limit is None:
        counts["phase2"] = size - counts["phase1"]
    if sum(counts.values()) > size or 0 in counts.values():
        raise ValueError(f"recipe {recipe.name}: {spec} has {size} prompts, but the phases ask for "
                         f"{counts}; lower the limits (phase 1 and phase 2 never share a prompt)")
    return counts


def _group_flags(stage: DataStage) -> list[str]:
    return [flag for group, spec in stage.constitutions.items() for flag in ("--constitution-for", f"{group}={spec}")]


def stage_commands(recipe: RunRecipe, run_dir: Path) -> list[tuple[str, list[str]]]:
    """(stage folder, `cai` arguments) in order; paths point inside run_dir."""
    d = {name: str(run_dir / name) for name in ("01-sft-data", "02-sft", "03-prefs", "04-rm", "05-policy")}
    judge = recipe.judge_model or recipe.base_model
    eval_judge = recipe.eval_judge_model or judge
    engine = ["--engine", recipe.engine]
    stages = [
        ("01-sft-data", ["generate", "sft", "--constitution", recipe.constitution, *_group_flags(recipe.phase1),
                         "--prompts", str(run_dir / "prompts-phase1.jsonl"), "--out", d["01-sft-data"],
                         "--model", recipe.base_model, *engine, "--show", "0", *recipe.phase1.args]),
        ("02-sft", ["train", "sft", "--model", recipe.base_model, "--data", f"{d['01-sft-data']}/sft.jsonl",
                    "--out", d["02-sft"], *recipe.sft.args]),
        ("03-prefs", ["generate", "prefs", "--constitution", recipe.constitution, *_group_flags(recipe.phase2),
                      "--prompts", str(run_dir / "prompts-phase2.jsonl"), "--policy", d["02-sft"], "--judge", judge,
                      "--out", d["03-prefs"], *engine, *recipe.phase2.args]),
    ]
    prefs = f"{d['03-prefs']}/prefs.jsonl"
    if recipe.method == "ppo":
        stages.append(("04-rm", ["train", "rm", "--model", d["02-sft"], "--data", prefs, "--out", d["04-rm"],
                                 *recipe.rm.args]))
        stages.append(("05-policy", ["train", "ppo", "--model", d["02-sft"], "--data", prefs,
                                     "--reward-model", d["04-rm"], "--out", d["05-policy"], *recipe.policy.args]))
    else:
        stages.append(("05-policy", ["train", "dpo", "--model", d["02-sft"], "--data", prefs,
                                     "--out", d["05-policy"], *recipe.policy.args]))
    policy_log = "ppo" if recipe.method == "ppo" else "dpo"
    reports = []
    for n, data in enumerate(recipe.judge_check.data):
        if Path(data).is_file():  # missing: the eval report says the judge's human agreement was not measured
            folder = str(run_dir / f"06-judge-check-{n}")
            reports += ["--judge-report", f"{folder}/report.json"]
            stages.append((f"06-judge-check-{n}", ["eval", "judge", "--data", str(Path(data).resolve()),
                                                   "--judge", eval_judge, *engine, "--out", folder,
                                                   "--no-baseline", *recipe.judge_check.args]))
    stages.append(("07-eval", ["eval", "policy", "--policy", d["05-policy"], "--sft", d["02-sft"],
                               "--base", recipe.base_model, "--judge", eval_judge, "--training-judge", judge,
                               *reports, *engine, "--out", str(run_dir / "07-eval"),
                               # held-out means held out: no prompt the run trained on is evaluated
                               "--exclude", str(run_dir / "prompts-phase1.jsonl"),
                               "--exclude", str(run_dir / "prompts-phase2.jsonl"),
                               "--train-log", f"sft={d['02-sft']}/log.jsonl",
                               "--train-log", f"{policy_log}={d['05-policy']}/log.jsonl",
                               *recipe.eval.args]))
    return stages


def _run_stage(name: str, args: list[str], run_dir: Path, log) -> StageResult:
    """Run one stage's command in a child process; its own peak RSS comes from wait4."""
    command = [sys.executable, "-m", "cai", *args]
    log(f"[{name}] cai {' '.join(args)}")
    started = time.perf_counter()
    with open(run_dir / f"{name}.log", "w", encoding="utf-8") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        # Ctrl-C reaches the stage too (same process group): let it stop cleanly, then report that.
        with sigint_handler(signal.SIG_IGN):
            _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode in (130, -signal.SIGINT):
        raise RuntimeError(f"stage {name} stopped by Ctrl-C; finished work is kept, rerun the same "
                           f"`cai run` to resume (log {run_dir / name}.log)")
    if proc.returncode != 0:
        tail = (run_dir / f"{name}.log").read_text(encoding="utf-8", errors="replace")[-2000:]
        raise RuntimeError(f"stage {name} failed (exit {proc.returncode}); log {run_dir / name}.log:\n{tail}")
    return StageResult(name=name, command=["cai", *args], seconds=time.perf_counter() - started,
                       peak_rss_mb=usage.ru_maxrss / 1024)


def run_recipe(recipe: RunRecipe, run_dir: str | Path, log=print) -> list[StageResult]:
    """Run every unfinished stage in order; finished stages (a `.done` file) are skipped."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = run_dir / "run.json"
    state: dict[str, Any] = {"recipe": recipe.model_dump(), "stages": {}}
    if manifest_path.exists():
        state = json.loads(manifest_path.read_text())
        if state["recipe"] != recipe.model_dump():
            raise ValueError(f"{run_dir} was started with another recipe; use a new run folder")
    state["split"] = split_prompts(recipe, run_dir)
    results = []
    for name, args in stage_commands(recipe, run_dir):
        done = run_dir / name / ".done"
        if done.exists():
            log(f"[{name}] done earlier, skipped")
            results.append(StageResult.model_validate_json(done.read_text()))
            continue
        result = _run_stage(name, args, run_dir, log)
        done.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(done, result.model_dump_json(indent=2))
        state["stages"][name] = result.model_dump()
        atomic_write_text(manifest_path, json.dumps(state, indent=2))
        log(f"[{name}] {result.seconds:.0f}s, peak {result.peak_rss_mb:.0f} MB")
        results.append(result)
    return results
