"""How a worker runs a job: `run_job` with the worker's `EngineCache`, in the worker's thread or in a
child process of its own (`JobProcess`, the default of `cai serve`), as vLLM keeps its engine core out of the API
server's process: the requests a server answers (status polls, record pages, exports) never take the
interpreter, or its lock, that a job's engine calls and commits run in.

    worker thread (server)  --("run", job row)-->  child: run_job(...) with its own engine cache
        Tracker, job row    <--("event", ProgressEvent) / ("step", text)--
                            <--("done", (summary, tokens/s)) or ("error", exception)--

- One child per worker, spawned when the workers start and kept: the engines it built stay loaded
  between jobs (a worker holds one engine at a time, as before).
- Cancel and shut-down: the worker thread sets the child's `cancel` event, which is the job's stop
  check there; the child also stops a job when the server that started it is gone (its parent
  changed), so a killed server leaves no job writing to a directory the next server resumes.
- A child that dies (killed, out of memory) fails its job with its exit code; the next job spawns
  a new one.
- An exception the child cannot send as itself (not picklable) arrives as WorkerError, its type's
  name and message kept.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import pickle
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from cai.batches import EngineDown, JobCancelled
from cai.engine.base import Engine
from cai.events import ProgressEvent
from cai.kinds import kind
from cai.pipeline import build_engine
from cai.recipe import EngineSpec
from serve.resolve import client_recipe, resolve_engines

log = logging.getLogger("serve")
POLL_SECONDS = 0.1


Report = Callable[[str | None], None]
"""Where a worker says what it is doing outside the job's own steps (`starting engine NAME`)."""


class EngineCache:
    """A worker's engines, each built on first use (model loading is not counted in tokens/s).

    A worker keeps one engine resident: building another closes the cached one first, so a phase-2
    job's policy and a different judge never hold one GPU's memory at once."""

    def __init__(self, settings, factory: Callable[[EngineSpec], Engine]):
        self.settings, self.factory = settings, factory
        self.engines: dict[str, Engine] = {}

    def get(self, spec: EngineSpec, report: Report) -> Engine:
        key = spec.model_dump_json()
        if key not in self.engines:
            self.close()
            names = [n for n, profile in self.settings.engines.items() if profile == spec]
            report(f"starting engine {names[0] if names else spec.backend}")
            self.engines[key] = self.factory(spec)
            report(None)
        return self.engines[key]

    def after_failure(self, exc: BaseException) -> None:
        """A job failed with `exc`: after EngineDown the engine is built afresh (the backend may come back)."""
        if isinstance(exc, EngineDown):
            self.engines.clear()

    def close(self) -> None:
        for key in list(self.engines):
            try:
                self.engines.pop(key).close()
            except Exception:
                log.exception("closing an engine failed")


def run_job(row: dict[str, Any], settings, engines: EngineCache, stop: Callable[[], bool],
            progress: Callable[[ProgressEvent], None], report: Report) -> tuple[dict, float | None]:
    """Run one job through its kind (cai.kinds); (summary as JSON data, tokens per second).

    The stored recipe names engines by profile: their specs come from the settings now. The job
    directory's manifest.json records the client's view of the recipe (resolve.client_recipe)."""
    stored, job_kind, root = json.loads(row["recipe"]), kind(row["kind"]), Path(row["dir"])
    shown = client_recipe(stored, settings, root)
    job = job_kind.job_model.model_validate(resolve_engines(stored, settings))
    if stop():
        raise JobCancelled("cancelled before it started")
    summary = job_kind.run(job, progress=progress, stop=stop, recipe=shown,
                           build=lambda spec: engines.get(spec, report))
    return summary.flat(), summary.tokens_per_second or None


class WorkerError(RuntimeError):
    """An exception raised in a job's child process that could not cross to the server as itself."""

    def __init__(self, type_name: str, message: str):
        super().__init__(message)
        self.type_name = type_name

    def __reduce__(self):
        return WorkerError, (self.type_name, str(self))


class WorkerDied(RuntimeError):
    """The job's child process ended while it ran the job."""


def sendable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling, else a WorkerError with its type's name and message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001  (whatever pickling raises, the message must still cross)
        return WorkerError(type(exc).__name__, str(exc))


class JobProcess:
    """One worker's child process: `run(row, ...)` sends it a job and relays what it reports."""

    def __init__(self, settings, name: str):
        self.settings, self.name = settings, name
        self._context = multiprocessing.get_context("spawn")  # no fork of a threaded server
        self.process = None
        self.conn = None
        self.cancel = self._context.Event()

    def _ensure_started(self) -> None:
        if self.process is not None and self.process.is_alive():
            return
        if self.conn is not None:  # a child that ended between two jobs
            self.conn.close()
        self.conn, child_end = self._context.Pipe()
        # not a daemon: a daemonic process may not start its own (vLLM's engine core, Ray's workers)
        self.process = self._context.Process(target=child_main, args=(self.settings, child_end, self.cancel,
                                                                       os.getpid()), name=self.name)
        self.process.start()
        child_end.close()

    def run(self, row: dict[str, Any], stop: Callable[[], bool], progress: Callable[[ProgressEvent], None],
            report: Report) -> tuple[dict, float | None]:
        """Run the job `row` in the child; (summary, tokens per second), or its exception raised here."""
        self._ensure_started()
        self.cancel.clear()
        self.conn.send(("run", row))
        while True:
            if stop():
                self.cancel.set()
            if not self.conn.poll(POLL_SECONDS):
                if not self.process.is_alive():
                    self._died()
                continue
            try:
                kind, payload = self.conn.recv()
            except (EOFError, OSError):
                self._died()
            if kind == "event":
                progress(payload)
            elif kind == "step":
                report(payload)
            elif kind == "done":
                return payload
            else:
                raise payload

    def _died(self) -> NoReturn:
        self.process.join(5)
        code = self.process.exitcode
        self.conn.close()
        self.process = None  # the next job spawns a new one
        raise WorkerDied(f"the job's worker process ended (exit code {code}); finished batches are kept, "
                         "POST .../resume continues the job")

    def close(self, grace: float) -> None:
        """Ask the child to finish (it closes its engines), then stop it if it has not within `grace`."""
        if self.process is None:
            return
        self.cancel.set()
        try:
            self.conn.send(("quit", None))
        except (BrokenPipeError, OSError):
            pass
        self.process.join(grace)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        self.conn.close()
        self.process = None


def child_main(settings, conn, cancel, server_pid: int) -> None:
    """The child's loop: one job at a time from the worker thread, each through `run_job`. Ctrl-C is
    the server's to handle: it stops the job through `cancel`, as at any shut-down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    engines = EngineCache(settings, build_engine)
    stop = lambda: cancel.is_set() or os.getppid() != server_pid  # noqa: E731
    report = lambda text: conn.send(("step", text))  # noqa: E731
    try:
        while True:
            kind, row = conn.recv()
            if kind == "quit":
                return
            try:
                result = run_job(row, settings, engines, stop, lambda event: conn.send(("event", event)), report)
            except Exception as exc:  # noqa: BLE001  (every failure goes back to the server as the job's)
                if not isinstance(exc, (JobCancelled, BrokenPipeError)):
                    log.exception("job %s failed", row.get("id"))
                engines.after_failure(exc)
                conn.send(("error", sendable(exc)))
            else:
                conn.send(("done", result))
    except (EOFError, OSError):  # the server is gone (its end of the pipe closed)
        return
    finally:
        engines.close()


__all__ = ["EngineCache", "JobProcess", "WorkerDied", "WorkerError", "child_main", "run_job", "sendable"]
