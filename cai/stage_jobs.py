"""Job files: one job as JSON, `{"kind": KIND, "job": {...every setting...}}`, run by `cai run JOB.json`.

`cai run RECIPE` writes one per stage (RUN/<stage>/job.json) and runs each in its own process, so
any stage can be re-run by hand. The kinds are the typed jobs the CLI commands build from their
flags: `sft`, `prefs` (cai.recipe), `judge-eval` (cai.judge_eval), `train-sft`, `train-rm`,
`train-dpo`, `train-ppo` (cai.train.jobs) and `eval-policy` (cai.policy_records).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from cai.errors import CaiError
from cai.files import atomic_write_json
from cai.kinds import KINDS
from cai.policy_records import PolicyEvalJob
from cai.train.jobs import TRAIN_JOBS

JOB_KINDS: dict[str, type[BaseModel]] = {
    **{name: kind.job_model for name, kind in KINDS.items()}, **TRAIN_JOBS, "eval-policy": PolicyEvalJob,
}


class JobFileError(CaiError, ValueError):
    """A job file that cannot be read or does not hold a valid job; the message names the file."""


class JobFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str
    job: dict[str, Any]


def kind_of(job: BaseModel) -> str:
    return next(kind for kind, model in JOB_KINDS.items() if type(job) is model)


def write_job_file(path: str | Path, job: BaseModel) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"kind": kind_of(job), "job": job.model_dump(mode="json")})
    return path


def read_job_file(path: str | Path) -> BaseModel:
    """The typed job in a job file; a bad file, an unknown kind or an invalid job is a JobFileError
    naming the file (and the field)."""
    path = Path(path)
    try:
        raw = JobFile.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError, ValidationError) as exc:
        raise JobFileError(f"{path}: not a job file ({{\"kind\": ..., \"job\": {{...}}}}): {exc}") from None
    model = JOB_KINDS.get(raw.kind)
    if model is None:
        raise JobFileError(f"{path}: unknown job kind {raw.kind!r}; kinds: {', '.join(JOB_KINDS)}")
    try:
        return model.model_validate(raw.job)
    except ValidationError as exc:
        raise JobFileError(f"{path}: {raw.kind} job: {describe_errors(exc, 'job')}") from None


def describe_errors(exc: ValidationError, prefix: str = "") -> str:
    """Every error of a ValidationError on one line each: `dotted.field: what is wrong`."""
    lines = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in (prefix, *error["loc"]) if part != "")
        message = error["msg"].removeprefix("Value error, ")  # a validator's own message says what is wrong
        lines.append(f"{where}: {message}" if where else message)
    return "; ".join(lines)


def job_settings(job: type[BaseModel], set_by_runner: set[str], name: str, doc: str,
                 **extra: tuple[Any, Any]) -> type[BaseModel]:
    """The fields of `job` that a recipe sets (same types, defaults and descriptions), without the
    ones the runner fills in, plus `extra`. Unknown keys are refused."""
    unknown = set_by_runner - set(job.model_fields)
    if unknown:
        raise TypeError(f"{job.__name__} has no fields {sorted(unknown)}")
    fields: dict[str, Any] = {key: (info.annotation, info) for key, info in job.model_fields.items()
                              if key not in set_by_runner}
    return create_model(name, __config__=ConfigDict(extra="forbid", allow_inf_nan=False), __doc__=doc,
                        **fields, **extra)
