"""Batches on Ray: a pool of actors, each holding one engine, running the same stage code as the
local executor (the Executor contract is in cai.executor; the driver, cai.batches, plans and commits).

    driver: plan -> take a batch when a replica is free -> actor.run(process, items) -> ray.wait
            -> yield Executed(batch, records, seconds) -> commit (shard named by batch id)

- Each replica is a Ray actor (its own process) reserving `num_gpus`/`num_cpus`; it builds the engine
  of the stage's spec once (any backend: vLLM on its GPU, the openai backend, transformers) and keeps
  it for the next batches; a stage with another spec (phase 2's judge) replaces it, so a replica holds
  one engine at a time. The stage's `process` is an `EngineProcess`: the stage settings and the engine
  spec, shipped once per stage (`ray.put`), never an engine.
- At most `max_in_flight` batches are submitted (default: one per replica), to the least busy
  replica, and a batch is taken from the plan only when there is room: the driver holds at most that
  many batches' inputs, and finished results wait in Ray's object store until the driver fetches them
  one at a time, so the driver's memory stays flat in the number of prompts.
- A replica that dies (its process killed, its node lost) is restarted by Ray and its batch retried
  (`max_restarts`, `max_task_retries`); the driver commits by batch id, so a batch is committed once.
  An engine that cannot start raises in the replica; the job fails with that error (not retried).
- Progress: a stage's per-step events (`on_step`: answer, critique, revision, sample, judge) reach the
  driver while a batch runs: each replica puts them on a small Ray queue (an actor of no CPU) that the
  driver drains as it polls, before it yields the batch they belong to. A retried batch reports its
  steps again (step events are progress; the rows committed are what counts).
- Stop: as each batch is taken (the driver), and while waiting here: the batches in flight are
  cancelled through Ray, which a replica's retry and request loops see (`stop_scope` over
  `is_canceled()`) just as they see the local stop check; batches that finish anyway are yielded,
  and StopRequested is raised so the driver writes `cancelled` rows for the rest.

Why actors + `ray.wait` and not Ray Data's `map_batches` with an actor pool: the plan is a lazy
stream whose batches carry stable ids (plan position + input digest) that name the shards the
driver commits, and the stop check is consulted each time a batch is taken. `map_batches` re-blocks
rows on its own (batch ids would need one Dataset row per cai batch), owns the pull from the source
(stop and cancel become a whole-pipeline shutdown rather than "finish the batches in flight, cancel
the rest"), and adds Ray Data's streaming executor and its object-store budget for what is, here, a
queue of tens to thousands of coarse tasks. The pool gives the same things cai needs from it —
streaming results, backpressure, retries on actor death — in one small loop over plain Ray calls.

`ray` is imported only when a pool starts: `pip install 'cai[ray]'`.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from cai.engine.base import Engine, StopRequested, stop_scope
from cai.errors import CaiError
from cai.executor import Batch, Executed, Executor, Process, StopCheck
from cai.jobdir import build_engine, checked
from cai.recipe import EngineSpec, ExecutorConfig

# Environment passed on to replicas (runtime_env): engine settings, model caches, the openai key.
FORWARDED_ENV_PREFIXES = ("VLLM_", "HF_", "CAI_", "TRANSFORMERS_", "OPENAI_")
FORWARDED_ENV = ("OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM")


class RayUnavailable(CaiError):
    """Ray is not installed, or the cluster cannot hold the replicas asked for."""


def _connect_advice(address: str | None, exc: Exception) -> str:
    """Why the driver could not join the cluster, and what to do. Ray >= 2.59 turns token authentication on
    for a `ray start --head` cluster once a token exists (~/.ray/auth_token), while a driver joining it
    still defaults to RAY_AUTH_MODE=disabled."""
    text = str(exc)
    causes = f"{text} {exc.__cause__ or ''}".lower()
    if "auth" in causes and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return (f"cannot join the Ray cluster at {address or 'auto'}: it requires token authentication; "
                "set RAY_AUTH_MODE=token (the token is read from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
                f"~/.ray/auth_token) and run again. Ray said: {text.splitlines()[0]}")
    first = text.splitlines()[0] if text else repr(exc)
    return f"cannot join the Ray cluster at {address or 'auto'}: {first}"


class EngineProcess:
    """A stage call that can run in another process: the stage's settings and its engine's spec.

    Subclasses implement `run(engine, items)`. Called here, the engine comes from `engine_of` (the
    job's engine, given or built lazily); unpickled in a Ray replica, `engine_of` and the progress hook
    are dropped and the engine is the replica's own, built from `spec` once per process."""

    def __init__(self, spec: EngineSpec, engine_of: Callable[[], Engine] | None = None,
                 on_step: Callable[..., Any] | None = None):
        self.spec, self.engine_of, self.on_step = spec, engine_of, on_step

    def run(self, engine: Engine, items: list) -> list:
        raise NotImplementedError

    def engine(self) -> Engine:
        return self.engine_of() if self.engine_of is not None else _REPLICA_ENGINE.get(self.spec)

    def __call__(self, items: list) -> list:
        return self.run(self.engine(), items)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "engine_of": None, "on_step": None}


class _ReplicaEngine:
    """The one engine of this process (a replica): built from a spec, replaced by another spec's."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.engine: Engine | None = None

    def get(self, spec: EngineSpec) -> Engine:
        key = spec.model_dump_json()
        if self.engine is None or key != self.key:
            self.close()
            self.engine, self.key = checked(build_engine(spec)), key
        return self.engine

    def close(self) -> None:
        engine, self.engine, self.key = self.engine, None, None
        if engine is not None:
            engine.close()


_REPLICA_ENGINE = _ReplicaEngine()


class Replica:
    """One actor of the pool (wrapped by `ray.remote` when the pool starts)."""

    def pid(self) -> int:
        return os.getpid()

    def run(self, process: Process, items: list, steps: Any = None) -> tuple[list, float]:
        import ray

        if isinstance(process, EngineProcess):
            if steps is not None:
                process.on_step = _StepRelay(steps)
            process.engine()  # built (or kept) before the clock starts: loading is not generation time
        started = time.perf_counter()
        with stop_scope(getattr(ray.get_runtime_context(), "is_canceled", None)):  # Ray < 2.4x: no check
            records = list(process(items))
        return records, time.perf_counter() - started

    def close(self) -> None:
        _REPLICA_ENGINE.close()


class _StepRelay:
    """A replica's `on_step`: each step's (name, requests) onto the driver's queue."""

    def __init__(self, queue: Any):
        self.queue = queue

    def __call__(self, name: str, requests: int) -> None:
        self.queue.put_nowait((name, requests))


def _ray():
    try:
        import ray
    except ImportError:
        raise RayUnavailable("the Ray executor needs Ray: pip install 'cai[ray]' (or pip install 'ray[data]'), "
                             "or run with --executor local") from None
    return ray


def replica_env(spec: EngineSpec | None = None) -> dict[str, str]:
    """The variables of this process that replicas get too (engine settings, caches, API keys)."""
    names = set(FORWARDED_ENV)
    if spec is not None and isinstance(spec.options.get("api_key_env"), str):
        names.add(spec.options["api_key_env"])
    return {k: v for k, v in os.environ.items() if k in names or k.startswith(FORWARDED_ENV_PREFIXES)}


class RayExecutor:
    """An Executor over a pool of `replicas` Ray actors (see the module doc). `address`: the cluster
    (`auto`, `ray://HOST:10001`, `HOST:6379`); None uses the Ray this process is connected to, else
    starts one here (left running for the next jobs of this process; Ray stops it at exit). `env`:
    extra variables for the replicas. Close it (or use `with`) to stop the replicas."""

    remote = True  # engines live in the replicas: the driver builds none (cai.pipeline reads this)

    def __init__(self, address: str | None = None, replicas: int = 1, num_gpus: float = 0.0, num_cpus: float = 1.0,
                 max_in_flight: int | None = None, max_restarts: int = 3, env: dict[str, str] | None = None,
                 poll_seconds: float = 0.2):
        if replicas < 1:
            raise ValueError("replicas must be >= 1")
        self.address, self.replicas, self.num_gpus, self.num_cpus = address, replicas, num_gpus, num_cpus
        self.max_in_flight = max_in_flight or replicas
        self.max_restarts, self.env, self.poll_seconds = max_restarts, dict(env or {}), poll_seconds
        self.actors: list[Any] = []

    # ------------------------------------------------------------ the pool

    def _connect(self):
        ray = _ray()
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, include_dashboard=False, ignore_reinit_error=True)
            except (getattr(ray.exceptions, "AuthenticationError", ConnectionError), ConnectionError) as exc:
                raise RayUnavailable(_connect_advice(self.address, exc)) from exc
        return ray

    def _check_fits(self, ray) -> None:
        total = ray.cluster_resources()
        for name, per in (("GPU", self.num_gpus), ("CPU", self.num_cpus)):
            have = total.get(name, 0.0)
            if per and per * self.replicas > have + 1e-9:
                flag = "--gpus-per-replica" if name == "GPU" else "cpus_per_replica"
                raise RayUnavailable(f"the Ray cluster has {have:g} {name}s in all; {self.replicas} replicas x "
                                     f"{per:g} ({flag}) need {per * self.replicas:g}: lower --replicas or {flag}, "
                                     "or add nodes")

    def pool(self, spec: EngineSpec | None = None) -> list[Any]:
        """The replicas (started on first use)."""
        if not self.actors:
            ray = self._connect()
            self._check_fits(ray)
            actor = ray.remote(Replica).options(
                num_gpus=self.num_gpus, num_cpus=self.num_cpus, max_restarts=self.max_restarts,
                max_task_retries=self.max_restarts,
                runtime_env={"env_vars": {**replica_env(spec), **self.env}})
            self.actors = [actor.remote() for _ in range(self.replicas)]
        return self.actors

    def close(self) -> None:
        """Stop the replicas (their engines closed first, when they answer in time)."""
        if not self.actors:
            return
        ray = _ray()
        actors, self.actors = self.actors, []
        try:
            ray.wait([a.close.remote() for a in actors], num_returns=len(actors), timeout=30)
        finally:
            for a in actors:
                ray.kill(a)

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ execute

    def execute(self, batches: Iterable[Batch], process: Process, stop: StopCheck | None = None) -> Iterator[Executed]:
        run = _Dispatch(self, iter(batches), process)
        try:
            while True:
                run.submit()
                if not run.pending and (run.held is None or run.cancelling):
                    break
                ray = _ray()
                ready, _ = ray.wait([*run.pending, *run.starting], num_returns=1, timeout=self.poll_seconds)
                if not run.cancelling and stop is not None and stop():
                    run.cancel()
                run.relay_steps()
                for ref in ready:
                    executed = run.finished(ref)
                    if executed is not None:
                        yield executed
            if run.cancelling:
                raise StopRequested("the job was asked to stop")
        finally:
            run.cancel()
            run.close_steps()


class _Dispatch:
    """One `execute` call's state: the batch taken but not yet sent (`held`), the batches in flight by
    reference, the replicas still starting (sent nothing until they are up, so a replica waiting for
    resources holds no batch) and how busy each ready one is."""

    def __init__(self, executor: RayExecutor, taking: Iterator[Batch], process: Process):
        self.executor, self.taking, self.process = executor, taking, process
        self.held: Batch | None = None
        self.pending: dict[Any, tuple[Batch, int]] = {}
        self.starting: dict[Any, int] = {}
        self.busy: Counter[int] = Counter()
        self.ready: set[int] = set()
        self.actors: list[Any] = []
        self.shipped = None
        self.steps = None  # the queue replicas put step events on (only when the process has an on_step)
        self.cancelling = False

    def submit(self) -> None:
        """Send batches to the least busy ready replicas while there is room, taking each from the plan
        (where the driver checks its stop signal) only when it can be sent or the pool must start."""
        while not self.cancelling and len(self.pending) < self.executor.max_in_flight:
            if self.held is None:
                self.held = next(self.taking, None)
                if self.held is None:
                    return
            if self.shipped is None:
                self.actors = self.executor.pool(getattr(self.process, "spec", None))
                self.starting = {actor.pid.remote(): i for i, actor in enumerate(self.actors)}
                self.shipped = _ship(self.process)
                self.steps = _step_queue(self.process)
            if not self.ready:
                return
            index = min(sorted(self.ready), key=lambda i: self.busy[i])
            self.busy[index] += 1
            ref = self.actors[index].run.remote(self.shipped, list(self.held.items), self.steps)
            self.pending[ref] = (self.held, index)
            self.held = None

    def finished(self, ref) -> Executed | None:
        """A reference `ray.wait` returned: a replica now up, or a batch done (None if it was cancelled)."""
        ray = _ray()
        if ref in self.starting:
            index = self.starting.pop(ref)
            ray.get(ref)  # a replica that could not start raises here
            self.ready.add(index)
            return None
        batch, index = self.pending.pop(ref)
        self.busy[index] -= 1
        result = _result(ray, ref)
        if result is None:
            self.cancelling = True
            return None
        return Executed(batch, *result)

    def relay_steps(self) -> None:
        """The step events replicas reported since the last call, to the driver's `on_step`, in order."""
        count = self.steps.qsize() if self.steps is not None else 0
        for name, requests in self.steps.get_nowait_batch(count) if count else ():
            self.process.on_step(name, requests)

    def close_steps(self) -> None:
        if self.steps is not None:
            self.steps.shutdown(force=True)
            self.steps = None

    def cancel(self) -> None:
        """Cancel every batch in flight (replicas see it at their next stop check) and take no more."""
        self.cancelling = True
        if self.pending:
            ray = _ray()
            for ref in self.pending:
                ray.cancel(ref)


def _ship(process: Process):
    """The stage call in Ray's object store, sent once and shared by every batch."""
    ray = _ray()
    try:
        return ray.put(process)
    except Exception as exc:  # noqa: BLE001  (pickling errors come in many types)
        raise TypeError(f"the Ray executor cannot send this stage's process to its replicas ({exc}); it needs a "
                        "picklable callable such as cai.ray_executor.EngineProcess, not a closure over an "
                        "engine") from exc


def _step_queue(process: Process):
    """A queue for the step events of `process`'s batches, when the driver listens to them (None else)."""
    if getattr(process, "on_step", None) is None:
        return None
    from ray.util.queue import Queue

    return Queue(actor_options={"num_cpus": 0})


def _result(ray, ref) -> tuple[list, float] | None:
    """A finished batch's (records, seconds); None when it was cancelled or stopped; a replica's error
    is raised as the replica raised it."""
    try:
        return ray.get(ref)
    except (StopRequested, ray.exceptions.TaskCancelledError):
        return None
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            cause.add_note(f"raised in a Ray replica:\n{vars(exc).get('traceback_str', '')}")
            raise cause from None
        raise


def executor_for(config: ExecutorConfig, specs: Iterable[EngineSpec] = ()) -> Executor | None:
    """The executor a job's `executor` settings ask for; None for local (the driver's default).
    `specs`: every engine the job's replicas will build (phase 2: policy and judge), so each one's
    API key variable reaches the replicas, whichever engine starts the pool."""
    if config.name == "local":
        return None
    _ray()
    env = {k: v for spec in specs for k, v in replica_env(spec).items()}
    return RayExecutor(address=config.address, replicas=config.replicas, num_gpus=config.gpus_per_replica,
                       num_cpus=config.cpus_per_replica, max_in_flight=config.max_in_flight, env=env)


__all__ = ["EngineProcess", "RayExecutor", "RayUnavailable", "Replica", "executor_for",
           "replica_env"]
