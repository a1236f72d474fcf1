"""The job table (SQLite) and the worker threads that run jobs through cai's job kinds (each worker's
jobs in a child process of its own by default: serve.job_process).

A job is a row here plus a job directory under the jobs root (cai's own format:
manifest.json, shards/, exports). The worker turns the stored recipe back into its
kind's job model and calls the kind's run function (cai.kinds); the service generates
nothing itself.

Restart: jobs left `running` by a stopped or killed server are queued again at
start-up, and rerunning a job resumes from its directory (finished batches are
skipped by the pipeline). Cancel: a queued job is cancelled at once; a running one
stops between two batches, or sooner inside an OpenAI request or a judge retry loop
(`stop=` of the pipeline), keeping what it finished and writing a `cancelled` row for
every input not finished; resume drops those and goes on.
One server process owns a database: the cancel flags and workers live in memory.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cai.batches import EngineDown, JobCancelled
from cai.constitution import CONSTITUTIONS_DIR
from cai.engine import is_secret_option
from cai.engine.base import Engine
from cai.events import BatchCommitted, Planned, ProgressEvent, StepStarted
from cai.kinds import JobKind, kind
from cai.recipe import EngineSpec
from cai.records import ErrorCode, utc_now
from cai.sources import BUNDLED_DIR
from cai.store import JobStore
from serve.job_process import EngineCache, JobProcess, WorkerError, run_job

log = logging.getLogger("serve")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE, owner TEXT NOT NULL, kind TEXT NOT NULL, state TEXT NOT NULL,
    request TEXT NOT NULL, recipe TEXT NOT NULL, dir TEXT NOT NULL,
    created_at TEXT NOT NULL, started_at TEXT, finished_at TEXT,
    total INTEGER, done INTEGER NOT NULL DEFAULT 0, resumed INTEGER NOT NULL DEFAULT 0, step TEXT,
    records INTEGER NOT NULL DEFAULT 0, errors TEXT NOT NULL DEFAULT '{}', tokens INTEGER NOT NULL DEFAULT 0,
    tokens_per_second REAL, cancel_requested INTEGER NOT NULL DEFAULT 0, message TEXT, summary TEXT,
    runs INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, seq);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS reviews (
    job_id TEXT NOT NULL, record_id TEXT NOT NULL, reviewer TEXT NOT NULL, label TEXT NOT NULL,
    note TEXT, created_at TEXT NOT NULL, PRIMARY KEY (job_id, record_id, reviewer)
);
"""


class TooManyActive(RuntimeError):
    pass


HIDDEN = "<engine option>"


def _hidden_strings(options: dict[str, Any], secret: bool = False) -> Iterator[str]:
    """Option values no client may read: a secret option's (api_key, token...), a URL or a path, any long string."""
    for key, value in options.items():
        hidden = secret or is_secret_option(str(key))
        if isinstance(value, dict):
            yield from _hidden_strings(value, hidden)
        elif isinstance(value, str) and len(value) >= 4 and (
                hidden or "://" in value or value.startswith("/") or len(value) >= 16):
            yield value


class ClientView:
    """Takes the server's own strings out of what a client reads (job messages, summaries, records):
    the engine profiles' option values (keys, internal URLs) become `<engine option>`, and the
    server's absolute paths go: files under the job directory and the server's roots keep their
    relative names, a bare root shows as `.` (the job directory) or `<data>`, `<jobs>`...
    A net under the rule that job directories never hold options or absolute paths in the first place."""

    def __init__(self, settings, job_dir: Path):
        pairs: dict[str, str] = {}
        for root, shown in ((job_dir, "."), (settings.jobs_root, "<jobs>"), (settings.data_root, "<data>"),
                            (settings.constitutions_dir, "<constitutions>"), (BUNDLED_DIR, "<bundled>"),
                            (CONSTITUTIONS_DIR.parent, "<cai>")):
            for form in {os.path.abspath(root), str(Path(root).resolve())}:
                if len(form) > 1:
                    pairs[form + os.sep], pairs[form] = "", shown
        for spec in settings.engines.values():
            pairs.update((value, HIDDEN) for value in _hidden_strings(spec.options))
        self.pairs = sorted(pairs.items(), key=lambda pair: -len(pair[0]))

    def text(self, text: str) -> str:
        for old, new in self.pairs:
            if old in text:
                text = text.replace(old, new)
        return text

    def __call__(self, value: Any) -> Any:
        """`value` (text or JSON data) as a client may read it."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self(k): self(v) for k, v in value.items()}
        return [self(v) for v in value] if isinstance(value, list) else value


class JobDB:
    """The jobs and reviews tables. One connection, serialised by a lock (WAL journal)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(SCHEMA)
            self._db.execute("UPDATE jobs SET kind = 'judge-eval' WHERE kind = 'judge_eval'")  # older servers' name

    def _all(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, args).fetchall()]

    def _run(self, sql: str, args: tuple = ()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    def insert(self, *, id: str, owner: str, kind: str, request: dict, recipe: dict, dir: str,
               max_active: int) -> None:
        """Add a queued job; TooManyActive when the owner already has `max_active` queued or running."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                active = self._db.execute("SELECT COUNT(*) FROM jobs WHERE owner = ? AND state IN "
                                          "('queued', 'running')", (owner,)).fetchone()[0]
                if active >= max_active:
                    raise TooManyActive(f"{owner} has {active} queued or running jobs (limit {max_active}); "
                                        "wait for one to finish or cancel one")
                self._db.execute(
                    "INSERT INTO jobs (id, owner, kind, state, request, recipe, dir, created_at) "
                    "VALUES (?, ?, ?, 'queued', ?, ?, ?, ?)",
                    (id, owner, kind, json.dumps(request), json.dumps(recipe), dir, utc_now()))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def get(self, job_id: str, owner: str | None = None) -> dict[str, Any] | None:
        sql, args = "SELECT * FROM jobs WHERE id = ?", (job_id,)
        if owner is not None:
            sql, args = sql + " AND owner = ?", (job_id, owner)
        rows = self._all(sql, args)
        return rows[0] if rows else None

    def list(self, owner: str, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        if state is None:
            return self._all("SELECT * FROM jobs WHERE owner = ? ORDER BY seq DESC LIMIT ?", (owner, limit))
        return self._all("SELECT * FROM jobs WHERE owner = ? AND state = ? ORDER BY seq DESC LIMIT ?",
                         (owner, state, limit))

    def count_active(self, owner: str) -> int:
        return self._all("SELECT COUNT(*) AS n FROM jobs WHERE owner = ? AND state IN ('queued', 'running')",
                         (owner,))[0]["n"]

    def update(self, job_id: str, **fields: Any) -> None:
        if fields:
            cols = ", ".join(f"{k} = ?" for k in fields)
            self._run(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    def claim_next(self) -> dict[str, Any] | None:
        """The oldest queued job, now marked running (atomic within this process)."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            self._db.execute("UPDATE jobs SET state = 'running', started_at = ?, runs = runs + 1, message = NULL, "
                             "total = NULL, done = 0, step = NULL WHERE id = ?", (utc_now(), row["id"]))
            return dict(self._db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())

    def recover(self) -> int:
        """At start-up: jobs a previous server left running are queued again (or cancelled, if asked)."""
        self._run("UPDATE jobs SET state = 'cancelled', finished_at = ?, message = 'cancelled while the server "
                  "was down' WHERE state = 'running' AND cancel_requested = 1", (utc_now(),))
        return self._run("UPDATE jobs SET state = 'queued', message = 'resumed after a server restart' "
                         "WHERE state = 'running'")

    def transition(self, job_id: str, from_states: tuple[str, ...], **fields: Any) -> bool:
        """Update only if the job is in one of `from_states`; True when it was."""
        cols = ", ".join(f"{k} = ?" for k in fields)
        marks = ", ".join("?" for _ in from_states)
        return self._run(f"UPDATE jobs SET {cols} WHERE id = ? AND state IN ({marks})",
                         (*fields.values(), job_id, *from_states)) == 1

    # -- reviews

    def put_review(self, job_id: str, record_id: str, reviewer: str, label: str, note: str | None) -> dict:
        created = utc_now()
        self._run("INSERT OR REPLACE INTO reviews (job_id, record_id, reviewer, label, note, created_at) "
                  "VALUES (?, ?, ?, ?, ?, ?)", (job_id, record_id, reviewer, label, note, created))
        return dict(record_id=record_id, reviewer=reviewer, label=label, note=note, created_at=created)

    def reviews(self, job_id: str) -> list[dict[str, Any]]:
        """Every review of a job, oldest first (a replaced review counts as new)."""
        return self._all("SELECT record_id, reviewer, label, note, created_at FROM reviews WHERE job_id = ? "
                         "ORDER BY rowid", (job_id,))


class Tracker:
    """The pipeline's progress hook: counts, errors by kind and tokens/s of the job's result stage into
    the job row. What earlier runs wrote is counted once from the store; each batch committed in this
    run adds the counts its event carries."""

    def __init__(self, db: JobDB, job_id: str, job_kind: JobKind, store: JobStore | None):
        self.db, self.job_id, self.stage = db, job_id, job_kind.result_stage
        stats = store.stats(self.stage).check() if store is not None else None  # CorruptShard names the line
        self.errors: Counter[str] = Counter(stats.errors if stats else {})
        self.records, self.tokens = (stats.rows, stats.generated_tokens) if stats else (0, 0)
        self.run_tokens = self.done = self.total = 0
        self.started: float | None = None
        # `cancelled` rows of an earlier stop are dropped and redone by the pipeline: not resumed work.
        self.records -= self.errors.pop(ErrorCode.CANCELLED.value, 0)
        db.update(job_id, resumed=self.records, records=self.records, errors=json.dumps(self.errors),
                  tokens=self.tokens, done=0, total=None, step=None, tokens_per_second=None)

    def __call__(self, event: ProgressEvent) -> None:
        if isinstance(event, StepStarted):
            self.db.update(self.job_id, step=f"{event.name} ({event.requests} requests)")
        elif event.stage != self.stage:
            return  # e.g. a prefs job's samples: its progress is its judged pairs
        elif isinstance(event, Planned):  # judge evaluation has two passes (cai's judge, the baseline): totals add
            self.started = self.started or time.perf_counter()
            self.total += event.total
            self.db.update(self.job_id, total=self.total)
        elif isinstance(event, BatchCommitted):
            self.done += event.rows
            self.records += event.rows
            self.errors.update(event.errors)
            self.tokens += event.generated_tokens
            self.run_tokens += event.generated_tokens
            seconds = time.perf_counter() - (self.started or time.perf_counter())
            rate = self.run_tokens / seconds if seconds > 0 and self.run_tokens else None
            self.db.update(self.job_id, done=self.done, records=self.records, errors=json.dumps(self.errors),
                           tokens=self.tokens, tokens_per_second=rate)


class JobManager:
    """Worker threads that take queued jobs oldest first and run them: each in a child process of its
    own (`processes`, the default of `cai serve`: see serve.job_process) or in the thread itself."""

    def __init__(self, settings, db: JobDB, engine_factory: Callable[[EngineSpec], Engine], processes: bool = False):
        self.settings, self.db, self.engine_factory, self.processes = settings, db, engine_factory, processes
        self._wake = threading.Condition()
        self._shutdown = threading.Event()
        self._cancel: set[str] = set()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        requeued = self.db.recover()
        if requeued:
            log.info("re-queued %d job(s) left running by a previous server; they resume from their directories",
                     requeued)
        self._shutdown.clear()
        for n in range(self.settings.workers):
            name = f"cai-serve-worker-{n}"
            thread = threading.Thread(target=self._loop, args=(name,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Ask running jobs to stop after their current batch (they are queued again), then wait."""
        self._shutdown.set()
        self.notify()
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = [t for t in self._threads if t.is_alive()]
        if self._threads:
            log.warning("%d job(s) still in a batch at shut-down; they resume at the next start", len(self._threads))

    def notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def cancel(self, job_id: str) -> str:
        """Cancel a queued job now, or ask a running one to stop after its batch; the resulting state."""
        if self.db.transition(job_id, ("queued",), state="cancelled", finished_at=utc_now(),
                              message="cancelled before it started"):
            return "cancelled"
        self._cancel.add(job_id)
        if self.db.transition(job_id, ("running",), cancel_requested=1):
            return "running"
        self._cancel.discard(job_id)
        return self.db.get(job_id)["state"]

    def _loop(self, name: str) -> None:
        runner = JobProcess(self.settings, name) if self.processes else _ThreadRunner(self.settings, self.engine_factory)
        try:
            while not self._shutdown.is_set():
                row = self.db.claim_next()
                if row is None:
                    with self._wake:
                        self._wake.wait(1.0)
                    continue
                self._execute(row, runner)
        finally:
            runner.close(max(1.0, self.settings.shutdown_grace_s))

    def _execute(self, row: dict[str, Any], runner: _ThreadRunner | JobProcess) -> None:
        job_id = row["id"]
        stop = lambda: job_id in self._cancel or self._shutdown.is_set()
        view = ClientView(self.settings, Path(row["dir"]))  # messages and summaries are read by the client
        try:
            job_kind, root = kind(row["kind"]), Path(row["dir"])
            store = JobStore.at(root, job_kind.record_models) if (root / "manifest.json").is_file() else None
            tracker = Tracker(self.db, job_id, job_kind, store)
            summary, rate = runner.run(row, stop, tracker, lambda text: self.db.update(job_id, step=text))
        except JobCancelled as exc:
            if job_id in self._cancel:
                self.db.update(job_id, state="cancelled", finished_at=utc_now(),
                               message=view.text(f"{exc}; POST /v1/jobs/{job_id}/resume continues it"))
            else:
                self.db.update(job_id, state="queued", message="server stopping: queued again, resumes at next start")
        except EngineDown as exc:
            self.db.update(job_id, state="failed", finished_at=utc_now(),
                           message=view.text(f"engine down: {exc}; finished batches are kept, POST .../resume retries"))
        except Exception as exc:  # any other failure ends the job as failed, with its reason
            log.exception("job %s failed", job_id)
            name = exc.type_name if isinstance(exc, WorkerError) else type(exc).__name__
            self.db.update(job_id, state="failed", finished_at=utc_now(), message=view.text(f"{name}: {exc}"))
        else:
            self.db.update(job_id, state="completed", finished_at=utc_now(), summary=json.dumps(view(summary)),
                           tokens_per_second=rate, step=None, message=None)
        finally:
            self._cancel.discard(job_id)
            self.db.update(job_id, cancel_requested=0)


class _ThreadRunner:
    """Jobs in the worker's own thread (an engine factory given to create_app: tests, embedding)."""

    def __init__(self, settings, factory: Callable[[EngineSpec], Engine]):
        self.settings, self.engines = settings, EngineCache(settings, factory)

    def run(self, row, stop, progress, report):
        try:
            return run_job(row, self.settings, self.engines, stop, progress, report)
        except Exception as exc:
            self.engines.after_failure(exc)
            raise

    def close(self, grace: float) -> None:
        self.engines.close()
