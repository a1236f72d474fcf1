"""The job kinds: what the CLI, the service and `cai jobs` look up instead of dispatching on a name.

A kind is a job that writes a resumable job directory: phase 1 (`sft`), phase 2 (`prefs`) and
the judge evaluation (`judge-eval`). Its name is the `stage` of its manifest.json and of its
result shards. Adding a kind is one module with its job model and run function (built on
cai.jobdir and cai.batches) and one entry in KINDS; `cai serve` offers it once
serve.resolve.REQUEST_KINDS says how a request becomes its job.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from cai import critique, pipeline, preferences
from cai import judge_eval as judge_eval_job
from cai.engine.base import Engine
from cai.events import ProgressHook
from cai.executor import StopCheck
from cai.jobdir import JobSummary
from cai.recipe import ExecutorConfig, PrefsJob, SFTJob
from cai.records import ErrorCode
from cai.store import JobError, JobStore, read_manifest

EVERY_ERROR = frozenset(code.value for code in ErrorCode)


@dataclass(frozen=True)
class JobKind:
    """One job kind.

    - `run(job, progress=, stop=, redo=, recipe=, build=, **engines) -> JobSummary`: runs or resumes
      the job; `engines` are the kind's own engine arguments (`engine_args`).
    - `record_models`: stage -> record model of every stage it writes (the store checks rows with them);
      `result_stage` is the one whose rows are the job's results.
    - `cancelled_rows`: the stage's factory of `cancelled` error rows (its arguments are the kind's own).
    - `manifest_inputs`: what the job's fingerprint covers (its arguments are the kind's own).
    - `export_files`: the files a finished job offers, its dataset (or report) first.
    - `retry_codes`: error codes `cai jobs retry-errors` generates again.
    - `engine_fields`: the job model's fields holding an EngineSpec.
    - `reviewable` / `judged_pairs`: records people review (sft, prefs); records that are AI-judged
      preference pairs (prefs: a review may flip them, reviewer-judge agreement applies).
    """

    name: str
    title: str
    job_model: type[BaseModel]
    run: Callable[..., JobSummary]
    result_stage: str
    record_models: Mapping[str, type[BaseModel]]
    cancelled_rows: Callable[..., Sequence[BaseModel]]
    manifest_inputs: Callable[..., dict]
    export_files: tuple[str, ...]
    retry_codes: frozenset[str]
    engine_fields: tuple[str, ...]
    engine_args: tuple[str, ...]
    reviewable: bool = False
    judged_pairs: bool = False
    aliases: tuple[str, ...] = field(default=())

    @property
    def record_model(self) -> type[BaseModel]:
        """The model of the job's result records."""
        return self.record_models[self.result_stage]

    @property
    def dataset(self) -> str:
        """The export a client gets by default (sft.jsonl, prefs.jsonl, report.json)."""
        return self.export_files[0]


KINDS: dict[str, JobKind] = {k.name: k for k in (
    JobKind(name=pipeline.SFT, title="phase 1", job_model=SFTJob, run=pipeline.generate_sft,
            result_stage=pipeline.SFT, record_models=pipeline.SFT_RECORDS, cancelled_rows=critique.cancelled_records,
            manifest_inputs=pipeline.sft_manifest_inputs, export_files=pipeline.SFT_EXPORTS, retry_codes=EVERY_ERROR,
            engine_fields=("engine",), engine_args=("engine",), reviewable=True),
    JobKind(name=pipeline.PREFS, title="phase 2", job_model=PrefsJob, run=pipeline.generate_prefs,
            result_stage=pipeline.PREFS, record_models=pipeline.PREFS_RECORDS,
            cancelled_rows=preferences.cancelled_records, manifest_inputs=pipeline.prefs_manifest_inputs,
            export_files=pipeline.PREFS_EXPORTS, retry_codes=EVERY_ERROR, engine_fields=("policy", "judge"),
            engine_args=("policy_engine", "judge_engine"), reviewable=True, judged_pairs=True),
    # A judge evaluation redoes only failures of the backend: its other error rows are measurements.
    JobKind(name=judge_eval_job.JUDGE_EVAL, title="judge evaluation", job_model=judge_eval_job.EvalJob,
            run=judge_eval_job.run_judge_eval, result_stage=judge_eval_job.JUDGE_EVAL,
            record_models=judge_eval_job.JUDGE_EVAL_RECORDS, cancelled_rows=judge_eval_job.cancelled_rows,
            manifest_inputs=judge_eval_job.judge_eval_manifest_inputs, export_files=judge_eval_job.JUDGE_EVAL_EXPORTS,
            retry_codes=frozenset(judge_eval_job.JUDGE_EVAL_REDO), engine_fields=("engine",), engine_args=("engine",),
            aliases=("judge_eval",)),
)}
_BY_NAME = {name: k for k in KINDS.values() for name in (k.name, *k.aliases)}


class UnknownKind(JobError):
    """A name that is no job kind."""


def canonical(name: str) -> str:
    """A kind's name as cai writes it (`judge_eval` -> `judge-eval`); a name that is no kind, unchanged."""
    found = _BY_NAME.get(name)
    return found.name if found is not None else name


def kind(name: str) -> JobKind:
    """The kind called `name` (or one of its aliases)."""
    if name not in _BY_NAME:
        raise UnknownKind(f"unknown job kind {name!r}; kinds: {', '.join(KINDS)}")
    return _BY_NAME[name]


def kind_of_job(job: BaseModel) -> JobKind:
    """The kind whose job model `job` is."""
    return next(k for k in KINDS.values() if type(job) is k.job_model)


def open_store(job_dir: str | Path) -> tuple[JobKind, JobStore]:
    """A job directory's kind and its store, for reading (status, records, exports): no lock taken."""
    manifest = read_manifest(job_dir)
    if manifest.stage not in KINDS:
        raise JobError(f"{job_dir}: a job of kind {manifest.stage!r}, which this cai does not know")
    found = KINDS[manifest.stage]
    return found, JobStore(Path(job_dir), manifest, models=found.record_models)


def retry_errors(
    job_dir: str | Path, progress: ProgressHook | None = None, stop: StopCheck | None = None,
    executor: ExecutorConfig | None = None, **engines: Engine,
) -> tuple[dict[str, int], JobSummary]:
    """Resume a job, generating again the inputs that ended as error rows; (error rows redone by code, summary).

    Each kind redoes its `retry_codes`. `engines` are the kind's own engine arguments (`engine=` for
    sft and judge-eval, `policy_engine=`/`judge_engine=` for prefs); missing ones are built from the
    recipe. `executor`: where the batches run (the job directory does not say: it is the same whichever
    executor wrote it); default local. The error rows are dropped only once the job has reopened with
    the same fingerprint.
    """
    found, store = open_store(job_dir)
    profiles = sorted(v["profile"] for v in store.manifest.recipe.values() if isinstance(v, dict) and "profile" in v)
    if profiles:  # cai serve writes engine profile names (and client-facing paths), never the specs
        raise JobError(f"{job_dir} is a `cai serve` job (engine profile {', '.join(profiles)}); resume it through "
                       "the service (POST /v1/jobs/ID/resume), which resolves its profiles and paths")
    settings = {**store.manifest.recipe, "out": str(job_dir), "new_job": False}
    job = found.job_model.model_validate({**settings, **({"executor": executor} if executor else {})})
    redone = Counter(row["error"]["code"] for row in store.read(found.result_stage)
                     if row.get("error") and row["error"]["code"] in found.retry_codes)
    return dict(redone), found.run(job, progress=progress, stop=stop, redo=found.retry_codes, **engines)
