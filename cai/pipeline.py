"""Phase-1 (sft) and phase-2 (prefs) jobs: a job's settings -> stages -> job directory and exports.
cai.kinds lists them with the judge evaluation (cai.judge_eval); cai.jobdir has what they share."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel

from cai.batches import (  # noqa: F401  (EngineDown, JobCancelled: part of this module's API)
    BatchRun,
    CancelledRows,
    EngineDown,
    JobCancelled,
    run_batches,
)
from cai.constitution_plan import ConstitutionPlan, load_plan
from cai.contrastive import require_plan_directions
from cai.critique import cancelled_records as cancelled_sft
from cai.critique import phase1_id
from cai.engine.base import Engine
from cai.engine.openai_batch import with_state_dir
from cai.errors import CaiError
from cai.events import ProgressHook, step_hook
from cai.executor import Executor, StopCheck
from cai.export import SFTExportStats, export_prefs, export_sft
from cai.job_update import (
    OldJob,
    Update,
    job_dir_spec,
    open_update,
    plan_prefs_update,
    plan_sft_update,
    save_constitutions,
    start_update,
    update_inputs,
)
from cai.job_usage import UsageMeter, record_usage
from cai.jobdir import (  # noqa: F401  (manifest_recipe, source_digest: part of this module's API)
    JobSummary,
    LazyEngine,
    build_engine,
    checked,
    engine_model_ref,
    job_manifest,
    manifest_recipe,
    open_job_store,
    source_digest,
)
from cai.preferences import NO_JUDGE, PreferenceStats, phase2_id
from cai.preferences import cancelled_records as cancelled_prefs
from cai.prompts import (
    CONTRAST_TEMPLATE_HASH,
    PHASE1_TEMPLATE_HASH,
    judge_config_template_hashes,
)
from cai.ray_executor import executor_for
from cai.recipe import EngineSpec, PrefsJob, SFTJob
from cai.records import (
    ErrorCode,
    ModelRef,
    PreferenceRecord,
    SampledAnswers,
    SFTRecord,
    SourcePrompt,
    stable_id,
)
from cai.sources import near_duplicate_key, read_prompts
from cai.stage_calls import JudgeProcess, Phase1Process, SampleProcess  # noqa: F401  (part of this module's API)
from cai.store import JobStore, Manifest, read_manifest  # noqa: F401  (read_manifest: part of this module's API)

SFT, PREFS, SAMPLES = "sft", "prefs", "samples"
PHASE1_CODE_VERSION = "2"  # 2: a truncated critique no longer ends the trajectory
PHASE2_CODE_VERSION = "2"  # 2: all answers sampled (samples-* shards) before any pair is judged
SFT_RECORDS = {SFT: SFTRecord}
PREFS_RECORDS = {SAMPLES: SampledAnswers, PREFS: PreferenceRecord}
SFT_EXPORTS = ("sft.jsonl", "sft.parquet", "README.md", "manifest.json")
PREFS_EXPORTS = ("prefs.jsonl", "prefs.parquet", "README.md", "manifest.json")


class SFTDetails(BaseModel):
    export: SFTExportStats


class PrefsDetails(BaseModel):
    stats: PreferenceStats


Phase1Summary = JobSummary[SFTDetails]
Phase2Summary = JobSummary[PrefsDetails]


@contextmanager
def job_executor(job: BaseModel, executor: Executor | None) -> Iterator[Executor | None]:
    """`executor` as given (the caller's), else the one the job's `executor` settings ask for, closed at
    the end (None: local)."""
    if executor is not None:
        yield executor
        return
    built = executor_for(job.executor, [v for v in vars(job).values() if isinstance(v, EngineSpec)])
    try:
        yield built
    finally:
        if built is not None:
            built.close()


def is_remote(executor: Executor | None) -> bool:
    """Whether `executor` runs batches in processes holding their own engines (the driver builds none)."""
    return bool(getattr(executor, "remote", False))


def settings_recipe(job: BaseModel, recipe: dict | None) -> dict:
    """What manifest.json records as the job's settings: `recipe`, else the job's, without where its
    batches ran (a job directory is the same whichever executor wrote it; a rerun chooses again)."""
    if recipe is not None:
        return recipe
    settings = manifest_recipe(job)
    settings.pop("executor", None)
    return settings


def job_plan(job: SFTJob | PrefsJob, allow_unrevised: bool) -> ConstitutionPlan:
    """The job's constitutions by prompt group, checked against the groups its prompts really have."""
    plan = load_plan(job.constitution, job.constitution_by_group, allow_unrevised)
    if plan.groups:
        plan.check_groups({p.group for p in read_prompts(job.prompts, limit=job.limit)}, "constitution_by_group")
    return plan


# ---------------------------------------------------------------- phase 1


def sft_manifest_inputs(job: SFTJob, plan: ConstitutionPlan, model: ModelRef) -> dict:
    """What a phase-1 job's output depends on (its fingerprint)."""
    return {**plan.fingerprint_inputs(), "prompts": source_digest(job.prompts), "model": model.model_dump(),
            "phase1": job.phase1.model_dump(exclude={"schedule"}), "template_hash": PHASE1_TEMPLATE_HASH}


def generate_sft(
    job: SFTJob, engine: Engine | None = None, progress: ProgressHook | None = None, stop: StopCheck | None = None,
    redo: Collection[str] = (), recipe: dict | None = None, build: Callable[[EngineSpec], Engine] | None = None,
    executor: Executor | None = None,
) -> Phase1Summary:
    """Phase 1 end to end: resume-aware batches of critique-then-revise, then export.
    `engine`, else one built by `build` (default: build_engine) only if there is work; `executor`
    runs the batches (default: the job's `executor` settings, local unless they say ray).
    `recipe`: what a new job's manifest.json records as its settings (default: settings_recipe(job)).
    A job with `update_from` carries over the old job's rows its constitution leaves as they were
    (cai.job_update)."""
    started = time.perf_counter()
    plan = job_plan(job, allow_unrevised=True)
    model = engine.model if engine is not None else engine_model_ref(job.engine)
    old = open_update(job, SFT_RECORDS)
    manifest = job_manifest(SFT, PHASE1_CODE_VERSION, {**sft_manifest_inputs(job, plan, model), **update_inputs(old)},
                            job, settings_recipe(job, recipe))
    _check_update(old, manifest, job, executor)
    meter = UsageMeter()
    with job_executor(job, executor) as runner, open_job_store(job, manifest, SFT_RECORDS) as store:
        spec = job_dir_spec(job.engine, store.root, plan)
        engine_of = LazyEngine(spec, meter.metered("engine", build or build_engine), meter.watch("engine", engine))
        process = Phase1Process(spec, plan, job.phase1, engine_of, step_hook(progress, SFT))
        prompts = lambda: read_prompts(job.prompts, limit=job.limit)  # noqa: E731
        dedupe = near_duplicate_key if job.drop_near_duplicates else None
        update = None if old is None else start_update(store.root, plan_sft_update(
            old.index({SFT: lambda row: row["id"]}), plan, prompts(), phase1_id, dedupe, job.phase1.rounds,
            job.phase1.seed))
        if update is not None:
            process = update.reusing(SFT, process, phase1_id, lambda r: r.id, per_prompt=1)
        setup = None if is_remote(runner) or (update and not update.has_work(SFT)) else engine_of
        try:
            run = run_batches(
                store, SFT, prompts, phase1_id, process, job.batch_size, progress, setup, stop=stop, dedupe_key=dedupe,
                cancelled=lambda batch, reason: cancelled_sft(batch, plan, model, job.phase1, reason),
                redo={ErrorCode.CANCELLED.value, *redo}, executor=runner,
                engine_down=process.engine_down() if update else None,
            )
        finally:
            record_usage(store.root, job.price_per_mtok, meter.used())
            if old is not None:
                old.close()
        stats = export_sft(store, parquet=job.parquet)
    return Phase1Summary(
        kind=SFT, out=str(store.root), done_before=run.done_before, done_now=run.done_now,
        duplicates_merged=run.duplicates, files=stats.files,
        generated_tokens_now=run.generated_tokens - (process.carried_tokens if update else 0),
        generation_seconds=run.generation_seconds, wall_seconds=time.perf_counter() - started,
        details=SFTDetails(export=stats),
    )


def _check_update(old: OldJob | None, manifest: Manifest, job: SFTJob | PrefsJob, executor: Executor | None) -> None:
    """CaiError for an update that cannot run: an old job with other settings, or batches run elsewhere."""
    if old is None:
        return
    if job.executor.name != "local" or is_remote(executor):
        raise CaiError("--update-from runs its batches in this process (carried rows come from the old job's "
                       "directory): drop --executor ray, or run the job in full")
    old.check_compatible(manifest, job.out)


# ---------------------------------------------------------------- phase 2


def prefs_manifest_inputs(job: PrefsJob, plan: ConstitutionPlan, policy: ModelRef, judge: ModelRef) -> dict:
    """What a phase-2 job's output depends on (its fingerprint). Labeller `judge` leaves the labeller out,
    so a job made before labellers existed keeps its fingerprint; `contrastive` has no judge."""
    judging, labeller = job.phase2.judge, job.phase2.labeller
    judged = labeller != "contrastive"
    templates = judge_config_template_hashes(judging.mode, judging.fallback_structured) if judged else {}
    if labeller != "judge":
        templates = {**templates, "contrast": CONTRAST_TEMPLATE_HASH}
    return {**plan.fingerprint_inputs(), "prompts": source_digest(job.prompts), "policy": policy.model_dump(),
            "judge": (judge if judged else NO_JUDGE).model_dump(),
            "phase2": job.phase2.model_dump(exclude={"labeller"} if labeller == "judge" else None),
            "template_hash": templates}


class PrefsEngines:
    """The policy engine (pass 1) and the judge engine (pass 2) of a phase-2 job.

    Each engine is built only when its pass starts, and one built here is closed as soon
    as its pass ends, so a policy and a different judge never hold memory (one GPU's) at
    the same time. With no judge of its own, the policy's engine judges and stays open.
    With `job_dir`, an openai_batch engine keeps its batches there (with_state_dir); `meter` counts
    the Batch API usage of the engines this job gets.
    Engines passed in, and engines from a caller's `build` (e.g. the service's per-worker
    cache, which keeps one model resident at a time), belong to the caller.
    """

    def __init__(self, job: PrefsJob, policy: Engine | None = None, judge: Engine | None = None,
                 build: Callable[[EngineSpec], Engine] | None = None, job_dir: Path | None = None,
                 meter: UsageMeter | None = None) -> None:
        self.job, self.meter = job, meter or UsageMeter()
        self.given = {"policy": policy and checked(policy), "judge": judge and checked(judge)}
        for role, engine in self.given.items():
            self.meter.watch(role, engine)
        self.build, self.owned = build or build_engine, build is None
        self.built: dict[str, Engine] = {}
        policy_spec, judge_spec = job.policy, job.judge or job.policy
        if job_dir is not None:
            policy_spec, judge_spec = with_state_dir(policy_spec, job_dir), with_state_dir(judge_spec, job_dir)
        self.specs = {"policy": policy_spec, "judge": judge_spec}

    def get(self, role: str) -> Engine:
        if (engine := self.given[role] or self.built.get(role)) is not None:
            return engine
        if role == "judge" and self.job.judge is None:
            return self.get("policy")
        self.built[role] = self.meter.watch(role, checked(self.build(self.specs[role])))
        return self.built[role]

    def release(self, role: str) -> None:
        if role == "policy" and self.job.judge is None and self.given["judge"] is None:
            return  # it judges next
        if (engine := self.built.pop(role, None)) is not None and self.owned:
            engine.close()

    def close(self) -> None:
        """Close every engine built here (the policy that also judged included)."""
        while self.built:
            engine = self.built.popitem()[1]
            if self.owned:
                engine.close()


def generate_prefs(
    job: PrefsJob,
    policy_engine: Engine | None = None,
    judge_engine: Engine | None = None,
    progress: ProgressHook | None = None,
    stop: StopCheck | None = None,
    redo: Collection[str] = (),
    build: Callable[[EngineSpec], Engine] | None = None,
    recipe: dict | None = None,
    executor: Executor | None = None,
) -> Phase2Summary:
    """Phase 2 end to end: sample K answers for every prompt (pass 1, then the policy engine is closed),
    judge pairs in both orders (pass 2), export preferences. See PrefsEngines for who builds engines.
    `recipe`: what a new job's manifest.json records as its settings (default: manifest_recipe(job))."""
    started = time.perf_counter()
    plan = job_plan(job, allow_unrevised=False)
    if job.phase2.labeller != "judge":
        require_plan_directions(plan)
    policy_ref = policy_engine.model if policy_engine else engine_model_ref(job.policy)
    judge_ref = NO_JUDGE if job.phase2.labeller == "contrastive" else judge_engine.model if judge_engine else (
        policy_ref if job.judge is None else engine_model_ref(job.judge))
    old = open_update(job, PREFS_RECORDS)
    manifest = job_manifest(PREFS, PHASE2_CODE_VERSION, {**prefs_manifest_inputs(job, plan, policy_ref, judge_ref),
                                                         **update_inputs(old)}, job, settings_recipe(job, recipe))
    _check_update(old, manifest, job, executor)
    redo_codes = {ErrorCode.CANCELLED.value, *redo}
    cancelled = lambda batch, reason: cancelled_prefs(  # noqa: E731
        [_as_source(x) for x in batch], plan, policy_ref, judge_ref, job.phase2, reason)
    with job_executor(job, executor) as runner, open_job_store(job, manifest, PREFS_RECORDS) as store:
        engines = PrefsEngines(job, policy_engine, judge_engine, build, store.root)
        save_constitutions(store.root, plan)
        update = None if old is None else start_update(store.root, _plan_prefs_update(old, job, plan))
        try:
            sampled = _sample_pass(job, plan, store, engines, progress, stop, redo_codes, cancelled, runner, update)
            engines.release("policy")
            judge = JudgeProcess(engines.specs["judge"], plan, job.phase2, lambda: engines.get("judge"),
                                 step_hook(progress, PREFS))
            label = judge if update is None else update.reusing(PREFS, judge, lambda r: r.id, _prefs_key)
            rows = lambda: store.records(SAMPLES)  # noqa: E731
            setup = None if is_remote(runner) or (update and not update.has_work(PREFS)) else judge.engine
            judged = run_batches(store, PREFS, rows, lambda r: r.id, label, job.batch_size, progress,
                                 setup=setup, row_key=_prefs_row_key,
                                 stop=stop, cancelled=cancelled, redo=redo_codes, executor=runner,
                                 engine_down=_judge_down if update is None else label.engine_down(_judge_down))
        finally:
            engines.close()
            record_usage(store.root, job.price_per_mtok, engines.meter.used())
            if old is not None:
                old.close()
        stats, files = export_prefs(store, job.min_confidence, job.require_consistent, job.parquet)
    return Phase2Summary(
        kind=PREFS, out=str(store.root), done_before=judged.done_before, done_now=judged.done_now,
        duplicates_merged=sampled.duplicates, files=files, generated_tokens_now=sampled.generated_tokens,
        generation_seconds=sampled.generation_seconds + judged.generation_seconds,
        wall_seconds=time.perf_counter() - started, details=PrefsDetails(stats=stats),
    )


def _plan_prefs_update(old: OldJob, job: PrefsJob, plan: ConstitutionPlan) -> Update:
    old.index({SAMPLES: lambda row: row["id"], PREFS: _prefs_row_key})
    return plan_prefs_update(old, plan, read_prompts(job.prompts, limit=job.limit), phase2_id,
                             near_duplicate_key if job.drop_near_duplicates else None, job.phase2.labeller,
                             job.phase2.seed)


def _sample_pass(job: PrefsJob, plan: ConstitutionPlan, store: JobStore, engines: PrefsEngines,
                 progress: ProgressHook | None, stop: StopCheck | None, redo: set[str], cancelled: CancelledRows,
                 executor: Executor | None = None, update: Update | None = None) -> BatchRun:
    """Pass 1 into shards/samples-*. A stop here writes a `cancelled` prefs row for every prompt
    not judged yet (each input still ends as one row) and raises JobCancelled."""
    prompts = lambda: read_prompts(job.prompts, limit=job.limit)  # noqa: E731
    dedupe = near_duplicate_key if job.drop_near_duplicates else None
    sample = SampleProcess(engines.specs["policy"], job.phase2, lambda: engines.get("policy"),
                           step_hook(progress, SAMPLES), plan)
    per_prompt = job.phase2.samples if job.phase2.labeller == "judge" else 1  # requests per prompt and call
    process = sample if update is None else update.reusing(SAMPLES, sample, phase2_id, lambda r: r.id, per_prompt)
    setup = None if is_remote(executor) or (update and not update.has_work(SAMPLES)) else sample.engine
    try:
        run = run_batches(store, SAMPLES, prompts, phase2_id, process, job.batch_size, progress, setup,
                          stop=stop, dedupe_key=dedupe,
                          redo=redo, executor=executor, engine_down=None if update is None else process.engine_down())
        run.generated_tokens -= process.carried_tokens if update else 0
        return run
    except JobCancelled as exc:
        try:
            run_batches(store, PREFS, prompts, phase2_id, lambda batch: [], job.batch_size, row_key=_prefs_row_key,
                        stop=lambda: True, dedupe_key=dedupe, cancelled=cancelled, redo=redo)
        except JobCancelled as rest:
            raise JobCancelled(f"cancelled while sampling, after {exc.done} prompts of this run; {rest.written} "
                               "prompts not judged yet were written as `cancelled` error rows; rerun the job to "
                               "resume", exc.done, rest.written) from None
        raise


def _judge_down(records: Sequence[PreferenceRecord]) -> bool:
    """The judge failed for the backend on every pair it saw (rows passed on from a failed sample don't count;
    labeller both: a pair the judge failed on is still a row, its error kept in `comparisons`)."""
    def down(r: PreferenceRecord) -> bool:
        error = r.error or next((c.judgement.error for c in r.comparisons if c.judgement.error), None)
        return error is not None and error.code == ErrorCode.BACKEND_UNAVAILABLE

    judged = [r for r in records if r.comparisons]
    return bool(judged) and all(down(r) for r in judged)


def _as_source(item: SourcePrompt | SampledAnswers) -> SourcePrompt:
    if isinstance(item, SourcePrompt):
        return item
    return SourcePrompt(id=item.parent_ids[0], messages=item.prompt, source="samples", group=item.group)


def _prefs_row_key(row: dict) -> str:  # "all" pairing writes one row per pair: key rows by their prompt
    return stable_id("prefs", row["prompt"])


def _prefs_key(record: PreferenceRecord) -> str:
    return stable_id("prefs", [m.model_dump() for m in record.prompt])
