"""Judge evaluation as a resumable batch job: `cai eval judge` writes a job directory.

    DIR/manifest.json               data digest, judge model, judge settings, templates
    DIR/shards/judge-eval-*.jsonl   one JudgedItem per (judge, item): cai's judge and the baseline
    DIR/report.json, report.md, reliability.png, predictions.jsonl   written once all rows exist

Both judges run through `run_batches`, so a killed evaluation resumes where it
stopped, a dead backend stops it without rows, and cancelling writes `cancelled`
rows. The report is computed from the shards, so it is the same whether the
evaluation ran in one go or in several. cai.kinds lists this job kind with the others.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cai.batches import BatchRun, JobCancelled, run_batches
from cai.constitution import display_path
from cai.engine.base import Engine
from cai.evaluate import (
    EvalItem,
    EvalSet,
    JudgeReport,
    item_results,
    judge_metrics,
    read_eval_items,
    write_report,
)
from cai.events import ProgressHook
from cai.executor import Executor, StopCheck
from cai.jobdir import (
    JobSummary,
    LazyEngine,
    build_engine,
    engine_model_ref,
    job_manifest,
    open_job_store,
    source_digest,
)
from cai.judge import JudgeConfig, baseline_judge, judge_pairs
from cai.pipeline import is_remote, job_executor, settings_recipe
from cai.prompts import BASELINE_TEMPLATE_HASH, judge_config_template_hashes
from cai.ray_executor import EngineProcess
from cai.recipe import DEFAULT_BATCH_SIZE, EXECUTOR_HELP, EngineSpec, ExecutorConfig
from cai.records import ErrorCode, ErrorInfo, Judgement, ModelRef, stable_id

JUDGE_EVAL = "judge-eval"
JUDGE_EVAL_CODE_VERSION = "1"
# What `cai jobs retry-errors` redoes here: failures of the backend, not verdicts that are measurements.
JUDGE_EVAL_REDO = (ErrorCode.BACKEND_UNAVAILABLE.value, ErrorCode.INTERNAL.value)
JudgeName = Literal["cai", "baseline"]
JUDGE_EVAL_EXPORTS = ("report.json", "report.md", "reliability.png", "predictions.jsonl")


class EvalJob(BaseModel):
    """The recipe of a judge evaluation: human-labelled pairs, the judge model and its settings."""

    model_config = ConfigDict(extra="forbid")
    data: str
    out: str
    engine: EngineSpec = Field(default_factory=EngineSpec)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    limit: int | None = None
    seed: int = 0
    baseline: bool = True
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1)
    new_job: bool = False
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig, description=EXECUTOR_HELP)


class JudgedItem(BaseModel):
    """One judge's verdict on one labelled pair (an error row when the judgement failed)."""

    id: str
    stage: Literal["judge-eval"] = "judge-eval"
    judge: JudgeName
    item: EvalItem
    judgement: Judgement
    seconds: float = 0.0  # this row's share of its batch's judging time
    error: ErrorInfo | None = None

    @property
    def generated_tokens(self) -> int:
        return 0


JUDGE_EVAL_RECORDS = {JUDGE_EVAL: JudgedItem}


class JudgeEvalDetails(JudgeReport):
    """The report, and the data rows that are not a usable labelled pair (`skipped`, by reason)."""

    skipped: dict[str, int] = Field(default_factory=dict)

    @property
    def report(self) -> JudgeReport:
        return self


JudgeEvalSummary = JobSummary[JudgeEvalDetails]


def judged_id(judge: JudgeName, item: EvalItem) -> str:
    # The source line keeps two identical labelled pairs apart: each is a row of the human data.
    return stable_id("judge-eval", judge, item.source.rsplit(":", 1)[-1], item.item.model_dump(), item.human)


def judge_eval_manifest_inputs(job: EvalJob, model: ModelRef) -> dict:
    """What a judge evaluation's output depends on (its fingerprint)."""
    return {"data": source_digest(job.data), "model": model.model_dump(), "judge": job.judge.model_dump(mode="json"),
            "seed": job.seed, "template_hash": judge_config_template_hashes(job.judge.mode, job.judge.fallback_structured),
            "baseline_template_hash": BASELINE_TEMPLATE_HASH}


class JudgeEvalProcess(EngineProcess):
    """One judge's batch of labelled pairs: cai's judge (`config`) or the baseline (config None).
    Picklable, so a remote executor can run it (cai.ray_executor.EngineProcess)."""

    def __init__(self, spec: EngineSpec, judge: JudgeName, config: JudgeConfig | None,
                 engine_of: Callable[[], Engine] | None = None):
        super().__init__(spec, engine_of)
        self.judge, self.config = judge, config

    def run(self, engine: Engine, batch: list[EvalItem]) -> list[JudgedItem]:
        started = time.perf_counter()
        items = [it.item for it in batch]
        judgements = judge_pairs(engine, items, self.config) if self.config else baseline_judge(engine, items)
        share = (time.perf_counter() - started) / len(batch)
        return [JudgedItem(id=judged_id(self.judge, it), judge=self.judge, item=it, judgement=j, seconds=share,
                           error=j.error) for it, j in zip(batch, judgements)]


def cancelled_rows(judge: JudgeName, mode) -> Callable[[list[EvalItem], str], list[JudgedItem]]:
    """The `cancelled` row factory of one judge's pass: (items not judged, reason) -> their rows."""

    def rows(batch: list[EvalItem], reason: str) -> list[JudgedItem]:
        error = ErrorInfo(code=ErrorCode.CANCELLED, message=reason)
        return [JudgedItem(id=judged_id(judge, it), judge=judge, item=it,
                           judgement=Judgement(mode=mode, error=error), error=error) for it in batch]

    return rows


def run_judge_eval(
    job: EvalJob, engine: Engine | None = None, progress: ProgressHook | None = None, stop: StopCheck | None = None,
    redo: Collection[str] = (), recipe: dict | None = None, build: Callable[[EngineSpec], Engine] | None = None,
    executor: Executor | None = None,
) -> JudgeEvalSummary:
    """Judge every labelled pair with cai's judge (and the baseline), resumably; write the report.
    `engine`, else one built by `build` (default: build_engine) only if there is work; `executor` runs
    the batches (default: the job's `executor` settings, local unless they say ray). `recipe`: what
    a new job's manifest.json records as its settings (default: cai.pipeline.settings_recipe).

    If the job is stopped, the pass in flight and every later pass write `cancelled` rows
    for what they did not start, so each (judge, pair) still ends as one row.
    """
    started = time.perf_counter()
    evalset = _named_as_shown(read_eval_items(job.data, limit=job.limit, seed=job.seed))
    model = engine.model if engine is not None else engine_model_ref(job.engine)
    manifest = job_manifest(JUDGE_EVAL, JUDGE_EVAL_CODE_VERSION, judge_eval_manifest_inputs(job, model), job,
                            settings_recipe(job, recipe))
    engine_of = LazyEngine(job.engine, build or build_engine, engine)
    passes: list[tuple[JudgeName, JudgeConfig | None, str]] = [("cai", job.judge, job.judge.mode)]
    if job.baseline:
        passes.append(("baseline", None, "baseline"))
    runs: list[BatchRun] = []
    cancelled: list[JobCancelled] = []
    with job_executor(job, executor) as runner, open_job_store(job, manifest, JUDGE_EVAL_RECORDS) as store:
        for n, (name, config, mode) in enumerate(passes):
            # Both judges' rows share the stage (their ids differ): drop rows to redo once, before the first pass.
            todo = {ErrorCode.CANCELLED.value, *redo} if n == 0 else ()
            try:
                runs.append(run_batches(
                    store, JUDGE_EVAL, lambda: evalset.items, lambda it, name=name: judged_id(name, it),
                    JudgeEvalProcess(job.engine, name, config, engine_of), job.batch_size, progress,
                    None if is_remote(runner) else engine_of,
                    stop=(lambda: True) if cancelled else stop, cancelled=cancelled_rows(name, mode), redo=todo,
                    executor=runner))
            except JobCancelled as exc:
                cancelled.append(exc)
        if cancelled:
            done, written = sum(e.done for e in cancelled), sum(e.written for e in cancelled)
            raise JobCancelled(f"cancelled after {done} verdicts; {written} (judge, pair) rows not started were "
                               "written as `cancelled` error rows; rerun the job to resume", done, written)
        rows = {record.id: record for record in store.records(JUDGE_EVAL)}
        report = _report(job, model, evalset, rows)
        paths = write_report(report, store.root)
    return JudgeEvalSummary(
        kind=JUDGE_EVAL, out=str(store.root), done_before=runs[0].done_before, done_now=sum(r.done_now for r in runs),
        files=[str(p) for p in paths], generation_seconds=sum(r.generation_seconds for r in runs),
        wall_seconds=time.perf_counter() - started,
        details=JudgeEvalDetails(**dict(report), skipped=evalset.skipped))


def _named_as_shown(evalset: EvalSet) -> EvalSet:
    """The data file as the report and predictions name it: relative to the project, or by name (no
    absolute local path); item ids depend on the line number only, so resuming is unaffected."""
    shown = display_path(evalset.path)
    items = [it.model_copy(update={"source": f"{shown}:{it.source.rsplit(':', 1)[-1]}"}) for it in evalset.items]
    return evalset.model_copy(update={"path": shown, "items": items})


def _report(job: EvalJob, model: ModelRef, evalset: EvalSet, rows: dict[str, JudgedItem]) -> JudgeReport:
    items: Sequence[EvalItem] = evalset.items

    def judged(name: JudgeName) -> tuple[list[Judgement], float]:
        found = [rows[judged_id(name, it)] for it in items]
        return [r.judgement for r in found], sum(r.seconds for r in found)

    cai, cai_s = judged("cai")
    title = f"cai ({job.judge.mode}, {job.judge.orders} order{'s' if job.judge.orders > 1 else ''})"
    other_modes = Counter(j.mode for j in cai if j.ok and j.mode != job.judge.mode)
    title += "".join(f"; {n} of {len(cai)} pairs {mode}: the backend gave no option scores"
                     for mode, n in sorted(other_modes.items()))
    report = JudgeReport(data=evalset.path, format=evalset.format, model=model, config=job.judge, n=len(items),
                         cai=judge_metrics(title, items, cai, cai_s), baseline=None, cai_items=item_results(items, cai))
    if job.baseline:
        base, base_s = judged("baseline")
        report.baseline = judge_metrics("baseline (JSON verdict, 1 order, greedy)", items, base, base_s)
        report.baseline_items = item_results(items, base)
    return report
