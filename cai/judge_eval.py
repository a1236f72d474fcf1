"""Judge evaluation as a resumable batch job: `cai eval judge` writes a job directory.

    DIR/manifest.json               data digest, judge model, judge settings, templates
    DIR/shards/judge-eval-N.jsonl   one JudgedItem per (judge, item): cai's judge and the baseline
    DIR/report.json, report.md, reliability.png, predictions.jsonl   written once all rows exist

Both judges run through `run_batches`, so a killed evaluation resumes where it
stopped, a dead backend stops it without rows, and cancelling writes `cancelled`
rows. The report is computed from the shards, so it is the same whether the
evaluation ran in one go or in several.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cai.constitution import display_path
from cai.engine.base import Engine
from cai.evaluate import EvalItem, EvalSet, JudgeReport, item_results, judge_metrics, read_eval_items, write_report
from cai.judge import JudgeConfig, baseline_judge, judge_pairs
from cai.pipeline import (
    BatchRun,
    JobCancelled,
    ProgressHook,
    StopCheck,
    build_engine,
    engine_model_ref,
    manifest_recipe,
    open_job_store,
    run_batches,
    source_digest,
)
from cai.prompts import BASELINE_TEMPLATE_HASH, JUDGE_TEMPLATE_HASH
from cai.recipe import EngineSpec
from cai.records import ErrorCode, ErrorInfo, Judgement, ModelRef, stable_id
from cai.store import Manifest, fingerprint

JUDGE_EVAL_CODE_VERSION = "1"
# What `cai jobs retry-errors` redoes here: failures of the backend, not verdicts that are measurements.
JUDGE_EVAL_REDO = (ErrorCode.BACKEND_UNAVAILABLE.value, ErrorCode.INTERNAL.value)
JudgeName = Literal["cai", "baseline"]


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
    batch_size: int = Field(default=256, ge=1)
    new_job: bool = False


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


class JudgeEvalSummary(BaseModel):
    out: str
    done_before: int
    done_now: int
    report: JudgeReport
    files: list[str]
    skipped: dict[str, int]  # data rows that are not a usable labelled pair, by reason


def judged_id(judge: JudgeName, item: EvalItem) -> str:
    # The source line keeps two identical labelled pairs apart: each is a row of the human data.
    return stable_id("judge-eval", judge, item.source.rsplit(":", 1)[-1], item.item.model_dump(), item.human)


def judge_eval_manifest(job: EvalJob, model: ModelRef, recipe: dict | None = None) -> Manifest:
    """`recipe`: what manifest.json records as the job's settings (default: cai.pipeline.manifest_recipe,
    the settings without secret engine options)."""
    inputs = {
        "stage": f"judge-eval/{JUDGE_EVAL_CODE_VERSION}",
        "data": source_digest(job.data),
        "model": model.model_dump(),
        "judge": job.judge.model_dump(mode="json"),
        "seed": job.seed,
        "template_hash": JUDGE_TEMPLATE_HASH,
        "baseline_template_hash": BASELINE_TEMPLATE_HASH,
    }
    recipe = manifest_recipe(job) if recipe is None else recipe
    return Manifest(stage="judge-eval", fingerprint=fingerprint(inputs), fingerprint_inputs=inputs, recipe=recipe)


def _judge_batch(judge: JudgeName, run: Callable[[list[EvalItem]], list[Judgement]]):
    def process(batch: list[EvalItem]) -> list[JudgedItem]:
        started = time.perf_counter()
        judgements = run(batch)
        share = (time.perf_counter() - started) / len(batch)
        return [JudgedItem(id=judged_id(judge, it), judge=judge, item=it, judgement=j, seconds=share,
                           error=j.error) for it, j in zip(batch, judgements)]

    return process


def _cancelled(judge: JudgeName, mode) -> Callable[[list[EvalItem], str], list[JudgedItem]]:
    def rows(batch: list[EvalItem], reason: str) -> list[JudgedItem]:
        error = ErrorInfo(code=ErrorCode.CANCELLED, message=reason)
        return [JudgedItem(id=judged_id(judge, it), judge=judge, item=it,
                           judgement=Judgement(mode=mode, error=error), error=error) for it in batch]

    return rows


def run_judge_eval(
    job: EvalJob, engine: Engine | None = None, progress: ProgressHook | None = None, stop: StopCheck | None = None,
    redo: Collection[str] = (), recipe: dict | None = None,
) -> JudgeEvalSummary:
    """Judge every labelled pair with cai's judge (and the baseline), resumably; write the report.
    `recipe`: what a new job's manifest.json records as its settings (see judge_eval_manifest).

    If the job is stopped, the pass in flight and every later pass write `cancelled` rows
    for what they did not start, so each (judge, pair) still ends as one row.
    """
    evalset = _named_as_shown(read_eval_items(job.data, limit=job.limit, seed=job.seed))
    model = engine.model if engine is not None else engine_model_ref(job.engine)
    engines: list[Engine] = [engine] if engine is not None else []

    def start_engine() -> None:
        if not engines:
            engines.append(build_engine(job.engine))

    passes: list[tuple[JudgeName, Callable[[list[EvalItem]], list[Judgement]], str]] = [
        ("cai", lambda batch: judge_pairs(engines[0], [it.item for it in batch], job.judge), job.judge.mode)]
    if job.baseline:
        passes.append(("baseline", lambda batch: baseline_judge(engines[0], [it.item for it in batch]), "baseline"))
    runs: list[BatchRun] = []
    cancelled: list[JobCancelled] = []
    with open_job_store(job, judge_eval_manifest(job, model, recipe)) as store:
        for n, (name, judge, mode) in enumerate(passes):
            # Both judges' rows share the stage (their ids differ): drop rows to redo once, before the first pass.
            todo = {ErrorCode.CANCELLED.value, *redo} if n == 0 else ()
            try:
                runs.append(run_batches(
                    store, "judge-eval", lambda: evalset.items, lambda it, name=name: judged_id(name, it),
                    _judge_batch(name, judge), job.batch_size, progress, start_engine,
                    stop=(lambda: True) if cancelled else stop, cancelled=_cancelled(name, mode), redo=todo))
            except JobCancelled as exc:
                cancelled.append(exc)
        if cancelled:
            done, written = sum(e.done for e in cancelled), sum(e.written for e in cancelled)
            raise JobCancelled(f"cancelled after {done} verdicts; {written} (judge, pair) rows not started were "
                               "written as `cancelled` error rows; rerun the job to resume", done, written)
        rows = {row["id"]: row for row in store.read("judge-eval")}
        report = _report(job, model, evalset, rows)
        paths = write_report(report, store.root)
    return JudgeEvalSummary(out=str(store.root), done_before=runs[0].done_before,
                            done_now=sum(r.done_now for r in runs), report=report,
                            files=[str(p) for p in paths], skipped=evalset.skipped)


def _named_as_shown(evalset: EvalSet) -> EvalSet:
    """The data file as the report and predictions name it: relative to the project, or by name (no
    absolute local path); item ids depend on the line number only, so resuming is unaffected."""
    shown = display_path(evalset.path)
    items = [it.model_copy(update={"source": f"{shown}:{it.source.rsplit(':', 1)[-1]}"}) for it in evalset.items]
    return evalset.model_copy(update={"path": shown, "items": items})


def _report(job: EvalJob, model: ModelRef, evalset: EvalSet, rows: dict[str, dict]) -> JudgeReport:
    items: Sequence[EvalItem] = evalset.items

    def judged(name: JudgeName) -> tuple[list[Judgement], float]:
        found = [JudgedItem.model_validate(rows[judged_id(name, it)]) for it in items]
        return [r.judgement for r in found], sum(r.seconds for r in found)

    cai, cai_s = judged("cai")
    title = f"cai ({job.judge.mode}, {job.judge.orders} order{'s' if job.judge.orders > 1 else ''})"
    report = JudgeReport(data=evalset.path, format=evalset.format, model=model, config=job.judge, n=len(items),
                         cai=judge_metrics(title, items, cai, cai_s), baseline=None, cai_items=item_results(items, cai))
    if job.baseline:
        base, base_s = judged("baseline")
        report.baseline = judge_metrics("baseline (JSON verdict, 1 order, greedy)", items, base, base_s)
        report.baseline_items = item_results(items, base)
    return report
