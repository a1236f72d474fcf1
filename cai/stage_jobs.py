"""Job files: one job as JSON, `{"kind": KIND, "job": {...every setting...}}`, run by `cai run JOB.json`.

`cai run RECIPE` writes one per stage (RUN/<stage>/job.json) and runs each in its own process
(`run_stage`, which records its time and peak memory as a StageResult), so any stage can be re-run
by hand. The kinds are the typed jobs the CLI commands build from their
flags: `sft`, `prefs` (cai.recipe), `judge-eval` (cai.judge_eval), `train-sft`, `train-rm`,
`train-dpo`, `train-ppo` (cai.train.jobs) and `eval-policy` (cai.policy_records).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from cai.errors import CaiError
from cai.files import atomic_write_json
from cai.interrupt import sigint_handler
from cai.kinds import KINDS
from cai.policy_records import PolicyEvalJob
from cai.records import utc_now
from cai.train.jobs import TRAIN_JOBS
from cai.train.launch import Launcher, shown

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


class StageResult(BaseModel):
    name: str
    command: list[str]
    seconds: float
    peak_rss_mb: float
    finished_at: str = Field(default_factory=utc_now)


def run_stage(name: str, job_file: Path, run_dir: Path, log, launcher: Launcher | None = None) -> StageResult:
    """Run one stage's job file in a child process (`cai run JOB.json`, under `accelerate launch` with a
    launcher); the peak RSS of its process (of the launcher's largest with one) comes from wait4."""
    target = ["-m", "cai", "run", str(job_file)]
    command = launcher.command(target) if launcher else [sys.executable, *target]
    log(f"[{name}] {' '.join(shown(command))}")
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
    return StageResult(name=name, command=shown(command), seconds=time.perf_counter() - started,
                       peak_rss_mb=usage.ru_maxrss / 1024)
