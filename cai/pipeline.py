"""Wiring only: a job's settings -> stages -> job directory and exports."""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

from pydantic import BaseModel

from cai.batches import (  # noqa: F401  (EngineDown, JobCancelled, ProgressHook: part of this module's API)
    BatchRun,
    CancelledRows,
    EngineDown,
    JobCancelled,
    ProgressHook,
    StopCheck,
    run_batches,
)
from cai.constitution_plan import ConstitutionPlan, load_plan
from cai.critique import cancelled_records as cancelled_sft
from cai.critique import phase1_id, run_phase1
from cai.engine import make_engine, redact_options, resolve_backend
from cai.engine.base import Engine
from cai.engine.models import model_display_id, model_revision, resolve_model
from cai.export import SFTExportStats, export_prefs, export_sft
from cai.preferences import PreferenceStats, judge_samples, phase2_id, sample_answers
from cai.preferences import cancelled_records as cancelled_prefs
from cai.prompts import JUDGE_TEMPLATE_HASH, PHASE1_TEMPLATE_HASH
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
from cai.sources import BUNDLED, BUNDLED_DIR, near_duplicate_key, read_prompts
from cai.store import JobError, JobStore, Manifest, fingerprint

PHASE1_CODE_VERSION = "2"  # 2: a truncated critique no longer ends the trajectory
PHASE2_CODE_VERSION = "2"  # 2: all answers sampled (samples-* shards) before any pair is judged


class Phase1Summary(BaseModel):
    out: str
    done_before: int
    done_now: int
    duplicates_merged: int
    export: SFTExportStats
    generated_tokens_now: int
    generation_seconds: float
    wall_seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of engine work (model loading excluded)."""
        return self.generated_tokens_now / self.generation_seconds if self.generation_seconds else 0.0


def source_digest(spec: str) -> str:
    """sha256 of the prompt source's bytes (a file, every file of a dataset folder, or a bundled set)."""
    path = BUNDLED_DIR / f"{spec}.jsonl" if spec in BUNDLED else Path(spec)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def engine_model_ref(spec: EngineSpec) -> ModelRef:
    """The model's identity without loading it (so a finished job starts no engine)."""
    resolved = resolve_model(spec.model)
    revision = model_revision(resolved) if Path(resolved).is_dir() else None
    backend = resolve_backend(spec.backend)
    return ModelRef(id=model_display_id(spec.model, resolved), revision=revision, engine=backend)


def build_engine(spec: EngineSpec) -> Engine:
    return make_engine(spec.backend, spec.model, **spec.options)


def manifest_recipe(job: BaseModel) -> dict:
    """The job's settings as manifest.json records them, with no secret in them: every engine's secret
    options (api_key, token, password, ...) are left out and a URL's `user:password@` removed
    (cai.engine.redact_options). The engine reads its key from the environment again when the job
    is rebuilt from its manifest (`cai jobs retry-errors`): openai reads $OPENAI_API_KEY, or the
    variable named by the `api_key_env` option."""
    return _redact(job.model_dump(mode="json"))


def _redact(value):
    if isinstance(value, dict):
        return {k: redact_options(v) if k == "options" and isinstance(v, dict) else _redact(v)
                for k, v in value.items()}
    return [_redact(v) for v in value] if isinstance(value, list) else value


def phase1_manifest(job: SFTJob, plan: ConstitutionPlan, model: ModelRef, recipe: dict | None = None) -> Manifest:
    """`recipe`: what manifest.json records as the job's settings (default: manifest_recipe(job));
    a caller whose job directories are read by others (cai serve) passes its own client view."""
    inputs = {
        "stage": f"sft/{PHASE1_CODE_VERSION}",
        **plan.fingerprint_inputs(),
        "prompts": source_digest(job.prompts),
        "model": model.model_dump(),
        "phase1": job.phase1.model_dump(),
        "template_hash": PHASE1_TEMPLATE_HASH,
    }
    recipe = manifest_recipe(job) if recipe is None else recipe
    return Manifest(stage="sft", fingerprint=fingerprint(inputs), fingerprint_inputs=inputs, recipe=recipe)


def open_job_store(job: SFTJob | PrefsJob, manifest: Manifest) -> JobStore:
    out = Path(job.out)
    if job.new_job and (out / "manifest.json").exists():
        existing = Manifest.model_validate_json((out / "manifest.json").read_text())
        if existing.fingerprint != manifest.fingerprint:
            out = out.with_name(f"{out.name}-{manifest.fingerprint[:8]}")
    return JobStore.open(out, manifest, replan_if_empty=True)  # a first run that failed before any row


def generate_sft(
    job: SFTJob, engine: Engine | None = None, progress: ProgressHook | None = None, stop: StopCheck | None = None,
    redo: Collection[str] = (), recipe: dict | None = None,
) -> Phase1Summary:
    """Phase 1 end to end: resume-aware batches of critique-then-revise, then export.
    `recipe`: what a new job's manifest.json records as its settings (default: manifest_recipe(job))."""
    started = time.perf_counter()
    constitution = job_plan(job, allow_unrevised=True)
    model = engine.model if engine is not None else engine_model_ref(job.engine)
    manifest = phase1_manifest(job, constitution, model, recipe)
    engines: list[Engine] = [engine] if engine is not None else []

    def start_engine() -> None:
        if not engines:
            engines.append(build_engine(job.engine))

    def process(batch: list[SourcePrompt]) -> list[SFTRecord]:
        hook = (lambda name, n: progress(f"step {name}", n)) if progress else None
        return run_phase1(batch, constitution, engines[0], job.phase1, on_step=hook)

    with open_job_store(job, manifest) as store:
        prompts = lambda: read_prompts(job.prompts, limit=job.limit)  # noqa: E731
        run = run_batches(
            store, "sft", prompts, phase1_id, process, job.batch_size, progress, start_engine, stop=stop,
            dedupe_key=near_duplicate_key if job.drop_near_duplicates else None,
            cancelled=lambda batch, reason: cancelled_sft(batch, constitution, model, job.phase1, reason),
            redo={ErrorCode.CANCELLED.value, *redo},
        )
        stats = export_sft(store, parquet=job.parquet)
    return Phase1Summary(
        out=str(store.root),
        done_before=run.done_before,
        done_now=run.done_now,
        duplicates_merged=run.duplicates,
        export=stats,
        generated_tokens_now=run.generated_tokens,
        generation_seconds=run.generation_seconds,
        wall_seconds=time.perf_counter() - started,
    )


def job_plan(job: SFTJob | PrefsJob, allow_unrevised: bool) -> ConstitutionPlan:
    """The job's constitutions by prompt group, checked against the groups its prompts really have."""
    plan = load_plan(job.constitution, job.constitution_by_group, allow_unrevised)
    if plan.groups:
        plan.check_groups({p.group for p in read_prompts(job.prompts, limit=job.limit)}, "constitution_by_group")
    return plan


def read_manifest(job_dir: str | Path) -> Manifest:
    path = Path(job_dir) / "manifest.json"
    if not path.is_file():
        raise JobError(f"{job_dir} is not a job directory (no manifest.json)")
    return Manifest.model_validate_json(path.read_text())


def retry_errors(
    job_dir: str | Path, progress: ProgressHook | None = None, stop: StopCheck | None = None, **engines: Engine
) -> tuple[dict[str, int], BaseModel]:
    """Resume a job, generating again the inputs that ended as error rows; (error rows redone by code, summary).

    Generation stages redo every error kind. A judge evaluation redoes only failures of the
    backend: its other error rows (unparseable, truncated...) are measurements of the judge.
    `engines` are the stage's own engine arguments (`engine=` for sft and judge-eval,
    `policy_engine=`/`judge_engine=` for prefs); missing ones are built from the recipe.
    The error rows are dropped only once the job has reopened with the same fingerprint.
    """
    from cai.judge_eval import (  # judge_eval builds on this module
        JUDGE_EVAL_REDO,
        EvalJob,
        run_judge_eval,
    )

    manifest = read_manifest(job_dir)
    everything = {code.value for code in ErrorCode}
    stages: dict[str, tuple[type[BaseModel], Callable[..., BaseModel], set[str]]] = {
        "sft": (SFTJob, generate_sft, everything),
        "prefs": (PrefsJob, generate_prefs, everything),
        "judge-eval": (EvalJob, run_judge_eval, set(JUDGE_EVAL_REDO)),
    }
    if manifest.stage not in stages:
        raise JobError(f"{job_dir}: retry-errors does not know stage {manifest.stage!r}")
    job_type, run, codes = stages[manifest.stage]
    profiles = sorted(v["profile"] for v in manifest.recipe.values() if isinstance(v, dict) and "profile" in v)
    if profiles:  # cai serve writes engine profile names (and client-facing paths), never the specs
        raise JobError(f"{job_dir} is a `cai serve` job (engine profile {', '.join(profiles)}); resume it through "
                       "the service (POST /v1/jobs/ID/resume), which resolves its profiles and paths")
    job = job_type.model_validate({**manifest.recipe, "out": str(job_dir), "new_job": False})
    redone = Counter(row["error"]["code"] for row in JobStore(Path(job_dir), manifest).read(manifest.stage)
                     if row.get("error") and row["error"]["code"] in codes)
    return dict(redone), run(job, progress=progress, stop=stop, redo=codes, **engines)


class Phase2Summary(BaseModel):
    out: str
    done_before: int
    done_now: int
    duplicates_merged: int
    stats: PreferenceStats
    files: list[str]
    generated_tokens_now: int
    generation_seconds: float
    wall_seconds: float


def prefs_manifest(job: PrefsJob, plan: ConstitutionPlan, policy: ModelRef, judge: ModelRef,
                   recipe: dict | None = None) -> Manifest:
    """`recipe`: as in phase1_manifest."""
    inputs = {
        "stage": f"prefs/{PHASE2_CODE_VERSION}",
        **plan.fingerprint_inputs(),
        "prompts": source_digest(job.prompts),
        "policy": policy.model_dump(),
        "judge": judge.model_dump(),
        "phase2": job.phase2.model_dump(),
        "template_hash": JUDGE_TEMPLATE_HASH,
    }
    recipe = manifest_recipe(job) if recipe is None else recipe
    return Manifest(stage="prefs", fingerprint=fingerprint(inputs), fingerprint_inputs=inputs, recipe=recipe)


class PrefsEngines:
    """The policy engine (pass 1) and the judge engine (pass 2) of a phase-2 job.

    Each engine is built only when its pass starts, and one built here is closed as soon
    as its pass ends, so a policy and a different judge never hold memory (one GPU's) at
    the same time. With no judge of its own, the policy's engine judges and stays open.
    Engines passed in, and engines from a caller's `build` (e.g. the service's per-worker
    cache, which keeps one model resident at a time), belong to the caller.
    """

    def __init__(self, job: PrefsJob, policy: Engine | None = None, judge: Engine | None = None,
                 build: Callable[[EngineSpec], Engine] | None = None):
        self.job = job
        self.given = {"policy": policy, "judge": judge}
        self.build, self.owned = build or build_engine, build is None
        self.built: dict[str, Engine] = {}

    def get(self, role: str) -> Engine:
        if (engine := self.given[role] or self.built.get(role)) is not None:
            return engine
        if role == "judge" and self.job.judge is None:
            return self.get("policy")
        spec = self.job.policy if role == "policy" else self.job.judge
        self.built[role] = self.build(spec)
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
) -> Phase2Summary:
    """Phase 2 end to end: sample K answers for every prompt (pass 1, then the policy engine is closed),
    judge pairs in both orders (pass 2), export preferences. See PrefsEngines for who builds engines.
    `recipe`: what a new job's manifest.json records as its settings (default: manifest_recipe(job))."""
    started = time.perf_counter()
    plan = job_plan(job, allow_unrevised=False)
    policy_ref = policy_engine.model if policy_engine else engine_model_ref(job.policy)
    judge_ref = judge_engine.model if judge_engine else (
        policy_ref if job.judge is None else engine_model_ref(job.judge))
    manifest = prefs_manifest(job, plan, policy_ref, judge_ref, recipe)
    engines = PrefsEngines(job, policy_engine, judge_engine, build)
    redo_codes = {ErrorCode.CANCELLED.value, *redo}
    on_step = (lambda name, n: progress(f"step {name}", n)) if progress else None
    cancelled = lambda batch, reason: cancelled_prefs(  # noqa: E731
        [_as_source(x) for x in batch], plan, policy_ref, judge_ref, job.phase2, reason)
    with open_job_store(job, manifest) as store:
        try:
            sampled = _sample_pass(job, store, engines, on_step, stop, redo_codes, cancelled)
            engines.release("policy")

            def judge(batch: list[SampledAnswers]) -> list[PreferenceRecord]:
                return judge_samples(batch, plan, engines.get("judge"), job.phase2, on_step=on_step)

            rows = lambda: (SampledAnswers.model_validate(r) for r in store.read("samples"))  # noqa: E731
            judged = run_batches(store, "prefs", rows, lambda r: r.id, judge, job.batch_size, progress,
                                 setup=lambda: engines.get("judge"), row_key=_prefs_row_key, stop=stop,
                                 cancelled=cancelled, redo=redo_codes, engine_down=_judge_down)
        finally:
            engines.close()
        stats, files = export_prefs(store, job.min_confidence, job.require_consistent, job.parquet)
    return Phase2Summary(
        out=str(store.root), done_before=judged.done_before, done_now=judged.done_now,
        duplicates_merged=sampled.duplicates, stats=stats, files=files,
        generated_tokens_now=sampled.generated_tokens,
        generation_seconds=sampled.generation_seconds + judged.generation_seconds,
        wall_seconds=time.perf_counter() - started,
    )


def _sample_pass(job: PrefsJob, store: JobStore, engines: PrefsEngines, on_step, stop: StopCheck | None,
                 redo: set[str], cancelled: CancelledRows) -> BatchRun:
    """Pass 1 into shards/samples-*. A stop here writes a `cancelled` prefs row for every prompt
    not judged yet (each input still ends as one row) and raises JobCancelled."""
    prompts = lambda: read_prompts(job.prompts, limit=job.limit)  # noqa: E731
    dedupe = near_duplicate_key if job.drop_near_duplicates else None

    def sample(batch: list[SourcePrompt]) -> list[SampledAnswers]:
        return sample_answers(batch, engines.get("policy"), job.phase2, on_step=on_step)

    try:
        return run_batches(store, "samples", prompts, phase2_id, sample, job.batch_size, None,
                           lambda: engines.get("policy"), stop=stop, dedupe_key=dedupe, redo=redo)
    except JobCancelled as exc:
        try:
            run_batches(store, "prefs", prompts, phase2_id, lambda batch: [], job.batch_size, row_key=_prefs_row_key,
                        stop=lambda: True, dedupe_key=dedupe, cancelled=cancelled, redo=redo)
        except JobCancelled as rest:
            raise JobCancelled(f"cancelled while sampling, after {exc.done} prompts of this run; {rest.written} "
                               "prompts not judged yet were written as `cancelled` error rows; rerun the job to "
                               "resume", exc.done, rest.written) from None
        raise


def _judge_down(records: Sequence[PreferenceRecord]) -> bool:
    """The judge failed for the backend on every pair it saw (rows passed on from a failed sample don't count)."""
    judged = [r for r in records if r.comparisons]
    return bool(judged) and all(r.error is not None and r.error.code == ErrorCode.BACKEND_UNAVAILABLE for r in judged)


def _as_source(item: SourcePrompt | SampledAnswers) -> SourcePrompt:
    if isinstance(item, SourcePrompt):
        return item
    return SourcePrompt(id=item.parent_ids[0], messages=item.prompt, source="samples", group=item.group)


def _prefs_row_key(row: dict) -> str:  # "all" pairing writes one row per pair: key rows by their prompt
    return stable_id("prefs", row["prompt"])
