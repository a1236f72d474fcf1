"""What every job kind shares around its job directory: the fingerprint of its inputs, the one
manifest builder, opening the store, the engines, and the one summary model. The kinds
(cai.pipeline, cai.judge_eval) build on this module; cai.kinds lists them."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from cai.engine import build_engine, checked, engine_model_ref, redact_options  # noqa: F401  (the kinds' one way to engines)
from cai.engine.base import Engine
from cai.recipe import EngineSpec
from cai.sources import BUNDLED, BUNDLED_DIR
from cai.store import JobStore, Manifest, RecordModels, fingerprint, read_manifest


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


# ---------------------------------------------------------------- engines: the one place jobs reach the factory


class LazyEngine:
    """A job's engine: the one given, else built by `build(spec)` when first called (only if the job
    has work). The caller owns an engine it gave; one built here lives as long as the process."""

    def __init__(self, spec: EngineSpec, build: Callable[[EngineSpec], Engine], engine: Engine | None = None):
        self.spec, self.build = spec, build
        self.engine = checked(engine) if engine is not None else None

    def __call__(self) -> Engine:
        if self.engine is None:
            self.engine = checked(self.build(self.spec))
        return self.engine


# ---------------------------------------------------------------- manifest


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


def job_manifest(kind: str, version: str, inputs: dict[str, Any], job: BaseModel,
                 recipe: dict | None = None) -> Manifest:
    """A job's manifest: its kind, the fingerprint of `inputs` (everything that changes its output;
    `version` is the kind's code version) and `recipe`, the settings manifest.json records (default:
    manifest_recipe(job); the service passes its client view)."""
    inputs = {"stage": f"{kind}/{version}", **inputs}
    recipe = manifest_recipe(job) if recipe is None else recipe
    return Manifest(stage=kind, fingerprint=fingerprint(inputs), fingerprint_inputs=inputs, recipe=recipe)


def open_job_store(job: BaseModel, manifest: Manifest, models: RecordModels) -> JobStore:
    """The job's store, locked by `with`. With `job.new_job`, a directory holding another job's
    settings is left alone and the job goes to OUT-FINGERPRINT beside it."""
    out = Path(job.out)
    if job.new_job and (out / "manifest.json").exists():
        if read_manifest(out).fingerprint != manifest.fingerprint:
            out = out.with_name(f"{out.name}-{manifest.fingerprint[:8]}")
    return JobStore.open(out, manifest, replan_if_empty=True, models=models)  # replan: a first run with no row


# ---------------------------------------------------------------- summary

D = TypeVar("D", bound=BaseModel)


class JobSummary(BaseModel, Generic[D]):
    """What one run of a job did. `details` holds the kind's own results (sft: `export`, the export
    statistics; prefs: `stats`, the label statistics; judge-eval: the report and `skipped`); their
    attributes also read as the summary's own (`summary.export.rows`, `summary.stats.exported`)."""

    kind: str
    out: str
    done_before: int
    done_now: int
    duplicates_merged: int = 0
    files: list[str]
    generated_tokens_now: int = 0
    generation_seconds: float = 0.0
    wall_seconds: float = 0.0
    details: D

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of engine work (model loading excluded)."""
        return self.generated_tokens_now / self.generation_seconds if self.generation_seconds else 0.0

    def flat(self) -> dict[str, Any]:
        """JSON data with the details' fields beside the common ones (a job's summary in `cai serve`)."""
        data = self.model_dump(mode="json")
        return {**data.pop("details"), **data}

    def __getattr__(self, name: str) -> Any:
        details = self.__dict__.get("details")
        if details is not None and not name.startswith("_") and hasattr(details, name):
            return getattr(details, name)
        return super().__getattr__(name)
