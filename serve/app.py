"""The FastAPI application: settings, wiring, start-up and shut-down of the job workers.

    from serve.app import Settings, create_app
    app = create_app(Settings(jobs_root="jobs/serve", data_root="data"))

`create_app(settings, engine_factory=...)` takes the function that turns an `EngineSpec`
into an engine; the default is `cai.pipeline.build_engine` (the real engines), run in each
worker's child process (`job_processes`). A factory given here is a local object (tests pass one
that returns a `cai.engine.fake.FakeEngine`): jobs then run in threads of this process.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import yaml
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cai import __version__
from cai.constitution import CONSTITUTIONS_DIR
from cai.engine import EngineConfigError, check_engine_spec
from cai.engine.base import Engine
from cai.pipeline import build_engine
from cai.recipe import EngineSpec, ExecutorConfig
from serve.auth import KEYS_ENV, BodyLimit, KeyStore
from serve.jobs import JobDB, JobManager
from serve.keys import default_keys_file

log = logging.getLogger("serve")
EngineFactory = Callable[[EngineSpec], Engine]


class Limits(BaseModel):
    """What one request or one key may ask for. Over a limit: 413 (sizes), 422 (caps), 429 (active jobs)."""

    model_config = ConfigDict(extra="forbid")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="request body (413)")
    max_prompt_chars: int = Field(8_000, ge=1, description="characters of one inline prompt, all turns (413)")
    max_turns: int = Field(64, ge=1, description="messages of one prompt, inline or from a dataset (422)")
    max_job_chars: int = Field(4_000_000, ge=1, description="characters of all prompts a job uses (413)")
    max_constitution_bytes: int = Field(64_000, ge=1, description="an inline constitution's YAML (413)")
    max_rows: int = Field(2_000, ge=1, description="prompts or evaluation items per job (422)")
    max_tokens: int = Field(1_024, ge=1, description="max_tokens of any generation step (422)")
    max_samples: int = Field(8, ge=2, description="phase 2 answers sampled per prompt (422)")
    max_rounds: int = Field(4, ge=1, description="phase 1 critique -> revision rounds (422)")
    max_retries: int = Field(4, ge=0, description="judge structured_retries: re-asks of a malformed verdict (422)")
    max_batch_size: int = Field(256, ge=1, description="prompts per engine call (422)")
    max_active_jobs: int = Field(4, ge=1, description="queued + running jobs per key name (429)")
    max_page: int = Field(200, ge=1, description="records per page (422)")


class Settings(BaseModel):
    """Server settings; `cai serve --config FILE` reads them from YAML (safe loader)."""

    # The engine profiles hold keys and internal URLs: an error names the field, never echoes its value.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)
    jobs_root: Path = Field(Path("jobs/serve"), description="job directories and the SQLite database")
    data_root: Path = Field(Path("data"), description="datasets clients may name")
    constitutions_dir: Path = Field(CONSTITUTIONS_DIR, description="constitutions clients may name")
    db_path: Path | None = Field(None, description="default: JOBS_ROOT/jobs.sqlite3")
    keys_file: Path | None = Field(default_factory=default_keys_file,
                                   description="API keys file (NAME:KEY or NAME:sha256:HEX per line); default "
                                               "$CAI_API_KEYS_FILE or ~/.config/cai/serve-keys.txt")
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig, description="where jobs run their batches: local, "
                                     "or Ray replicas (name: ray, address: auto, replicas, gpus_per_replica)")
    keys_from_env: bool = Field(True, description=f"also accept keys from ${KEYS_ENV}")
    workers: int = Field(1, ge=1, le=16, description="jobs run at the same time (each worker loads its engines)")
    job_processes: bool = Field(True, description="run each worker's jobs in a child process of its own (engines "
                                "stay loaded between jobs), so answering requests never slows a job's engine "
                                "calls; false: in threads of the server process")
    api_nice: int = Field(10, ge=0, le=19, description="CPU priority the server's request handling gives up "
                          "(Linux nice increment of its threads; job processes keep theirs), so a host's cores go "
                          "to generation first when clients poll hard; 0: none")
    engines: dict[str, EngineSpec] = Field(
        default_factory=lambda: {"embedded": EngineSpec()},
        description="the engine profiles clients may choose by name; only the operator sets backends, "
                    "models and options",
    )
    default_engine: str = "embedded"
    limits: Limits = Field(default_factory=Limits)
    docs: bool = Field(False, description="serve the OpenAPI schema at /openapi.json and Swagger UI at /docs, "
                                          "without a key; off by default: the /docs page loads Swagger UI's "
                                          "JS/CSS from a public CDN (jsDelivr) with no integrity check")
    shutdown_grace_s: float = Field(30.0, ge=0, description="wait this long for running batches at shut-down")

    @field_validator("engines")
    @classmethod
    def _engine_profiles_valid(cls, engines: dict[str, EngineSpec]) -> dict[str, EngineSpec]:
        """Each profile's backend and options are checked when the settings load, so a typo stops the
        server at start instead of failing the first job that uses the profile."""
        for name, spec in engines.items():
            try:
                check_engine_spec(spec)
            except EngineConfigError as exc:
                raise ValueError(f"engine profile {name!r}: {exc}") from None
        return engines

    @model_validator(mode="after")
    def _default_engine_known(self) -> Settings:
        if self.default_engine not in self.engines:
            raise ValueError(f"default_engine {self.default_engine!r} is not one of the engines: {sorted(self.engines)}")
        return self

    @property
    def database(self) -> Path:
        return self.db_path or self.jobs_root / "jobs.sqlite3"

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> Settings:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of settings")
        return cls.model_validate({**data, **{k: v for k, v in overrides.items() if v is not None}})


def lower_priority(increment: int) -> None:
    """Raise this thread's nice value by `increment` (threads it starts later inherit it). Linux sets
    nice per thread, so the job processes started from the workers' threads keep the server's
    priority; elsewhere it would lower the whole process, jobs included, so it is skipped."""
    if not increment:
        return
    if not sys.platform.startswith("linux"):
        log.info("api_nice applies on Linux only; request handling keeps its priority here")
        return
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + increment))
    except OSError as exc:
        log.warning("could not lower request handling's priority (api_nice %d): %s", increment, exc)


UI_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def create_app(settings: Settings | None = None, engine_factory: EngineFactory | None = None) -> FastAPI:
    """The app. Workers start with the app's lifespan (`with TestClient(app)`, uvicorn) and stop with it."""
    from serve.routes import api, public

    settings = settings or Settings()
    settings.jobs_root.mkdir(parents=True, exist_ok=True)
    keys = KeyStore(settings.keys_file, os.environ.get(KEYS_ENV) if settings.keys_from_env else None)
    db = JobDB(settings.database)
    manager = JobManager(settings, db, engine_factory or build_engine,
                         processes=settings.job_processes and engine_factory is None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if keys.count() == 0:
            log.warning("no API keys configured: every API call will get 401; create one with "
                        "`python -m serve.keys create NAME --file KEYS_FILE`")
        manager.start()  # before lower_priority: worker threads, and the job processes they start, keep theirs
        lower_priority(settings.api_nice)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(manager.stop)

    app = FastAPI(
        title="cai serve",
        version=__version__,
        description="Constitutional AI data generation jobs: phase 1 (critique -> revision SFT data), phase 2 "
                    "(AI-judged preference pairs) and judge evaluation, with a review page at /ui. "
                    "Every route except /healthz, /ui and this schema needs `Authorization: Bearer KEY`.",
        lifespan=lifespan,
        docs_url="/docs" if settings.docs else None,
        openapi_url="/openapi.json" if settings.docs else None,
        redoc_url=None,
    )
    app.state.settings, app.state.keys, app.state.db, app.state.manager = settings, keys, db, manager
    app.include_router(public)
    app.include_router(api)

    @app.middleware("http")
    async def ui_headers(request: Request, call_next):
        response = await call_next(request)
        if request.url.path == "/ui" or request.url.path.startswith("/ui/"):
            response.headers.update(UI_HEADERS)
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    app.add_middleware(BodyLimit, max_bytes=settings.limits.max_body_bytes)
    return app
