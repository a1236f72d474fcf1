"""The service's default: each worker's jobs in a child process of its own (serve.job_process), with
the engine built there from the operator's profile: same records as in a thread, cancel, a killed
child, shut-down while a job runs, an exception that cannot be pickled."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient
from serve_helpers import A, export_rows, settings, submit, wait

from cai.engine.stub_server import StubChatServer
from cai.pipeline import build_engine
from cai.recipe import EngineSpec
from serve.app import Settings, create_app
from serve.job_process import WorkerError, sendable

SLOW_PROMPTS = [f"question number {i}" for i in range(8)]


def service_settings(roots, engine: EngineSpec) -> Settings:
    base = settings(roots).model_dump()
    return Settings.model_validate({**base, "engines": {"remote": engine}, "default_engine": "remote"})


def untimed(value):
    """`value` without its creation times (two runs of one job differ only there)."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k != "created_at"}
    return [untimed(v) for v in value] if isinstance(value, list) else value


def asked(c: TestClient, job_id: str) -> list[str]:
    """The prompts of a job's export, in order."""
    return sorted(r["messages"][0]["content"] for r in export_rows(c, job_id))


def workers() -> list:
    return [p for p in multiprocessing.active_children() if p.name.startswith("cai-serve-worker")]


@pytest.fixture
def stub():
    with StubChatServer(latency=0.15) as server:
        yield server


def stub_engine(server: StubChatServer) -> EngineSpec:
    return EngineSpec(backend="openai", model="stub", options={"base_url": server.url, "api_key": "k"})


def test_a_job_runs_in_the_workers_child_process_with_the_records_a_thread_writes(roots):
    fake = EngineSpec(backend="fake", options={"responder": "varied"})
    body = dict(kind="sft", dataset="questions.jsonl", phase1={"rounds": 1}, batch_size=2)
    with TestClient(create_app(service_settings(roots, fake))) as c:
        job = wait(c, submit(c, **body))
        children = workers()
        assert job["state"] == "completed" and job["records"] == 4, job
        assert len(children) == 1 and children[0].pid != os.getpid()
        in_child = export_rows(c, job["id"])
    assert workers() == []  # stopped with the app
    threaded = service_settings(roots, fake).model_copy(update={"jobs_root": roots / "threaded"})
    with TestClient(create_app(threaded, engine_factory=build_engine)) as c:  # a factory given: threads
        job = wait(c, submit(c, **body))
        assert workers() == []
        in_thread = export_rows(c, job["id"])
    assert untimed(in_child) == untimed(in_thread) and len(in_child) == 4


def test_cancel_stops_the_job_in_the_child_and_resume_finishes_it(roots, stub):
    with TestClient(create_app(service_settings(roots, stub_engine(stub)))) as c:
        job_id = submit(c, kind="sft", prompts=SLOW_PROMPTS, phase1={"rounds": 1}, batch_size=1)
        wait(c, job_id, check=lambda j: j["progress"]["done"] >= 2)
        assert c.post(f"/v1/jobs/{job_id}/cancel", headers=A).json()["state"] == "running"
        job = wait(c, job_id)
        assert job["state"] == "cancelled" and 2 <= job["records"] < 8, job
        assert c.post(f"/v1/jobs/{job_id}/resume", headers=A).json()["state"] == "queued"
        job = wait(c, job_id)
        assert job["state"] == "completed" and job["records"] == 8
        assert asked(c, job_id) == sorted(SLOW_PROMPTS)


def test_a_killed_child_fails_its_job_and_the_next_run_gets_a_new_one(roots, stub):
    with TestClient(create_app(service_settings(roots, stub_engine(stub)))) as c:
        job_id = submit(c, kind="sft", prompts=SLOW_PROMPTS, phase1={"rounds": 1}, batch_size=1)
        wait(c, job_id, check=lambda j: j["progress"]["done"] >= 2)
        killed = workers()[0].pid
        os.kill(killed, signal.SIGKILL)
        job = wait(c, job_id)
        assert job["state"] == "failed" and "worker process ended (exit code -9)" in job["message"], job
        assert c.post(f"/v1/jobs/{job_id}/resume", headers=A).json()["state"] == "queued"
        job = wait(c, job_id)
        assert job["state"] == "completed" and job["records"] == 8 and job["progress"]["resumed"] >= 2
        assert [p.pid for p in workers()] != [killed]
        assert asked(c, job_id) == sorted(SLOW_PROMPTS)  # each once: the killed batch was redone, not doubled


def test_shutting_down_mid_job_queues_it_again_and_ends_the_child(roots, stub):
    with TestClient(create_app(service_settings(roots, stub_engine(stub)))) as c:
        job_id = submit(c, kind="sft", prompts=SLOW_PROMPTS, phase1={"rounds": 1}, batch_size=1)
        wait(c, job_id, check=lambda j: j["progress"]["done"] >= 1)
    assert workers() == []
    with sqlite3.connect(roots / "jobs" / "jobs.sqlite3") as db:
        assert db.execute("SELECT state, runs FROM jobs WHERE id = ?", (job_id,)).fetchone() == ("queued", 1)
    with TestClient(create_app(service_settings(roots, stub_engine(stub)))) as c:
        job = wait(c, job_id)
        assert job["state"] == "completed" and job["records"] == 8 and job["progress"]["resumed"] >= 1, job
        assert asked(c, job_id) == sorted(SLOW_PROMPTS)


def children_of(pid: int) -> set[int]:
    """The child processes of `pid` (any of its threads may have started one)."""
    tasks = Path(f"/proc/{pid}/task")
    return {int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()} if tasks.exists() else set()


def serve_pid(config: Path) -> int:
    """The process running `cai serve --config CONFIG`."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if str(config) in cmdline.read_bytes().decode(errors="replace").split("\0"):
                return int(cmdline.parent.name)
    raise AssertionError(f"no cai serve process for {config}")


def running(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads child processes from /proc")
def test_a_child_whose_server_was_killed_stops_its_job(tmp_path):
    from serve.bench import _write_inputs, bench_prompts
    from serve.bench_procs import service_process, stub_process

    with stub_process(0.25) as url:
        engine = EngineSpec(backend="openai", model="stub", options={"base_url": url, "api_key": "k"})
        _, key = _write_inputs(tmp_path, bench_prompts("redteam", 40), engine)
        headers = {"Authorization": f"Bearer {key}"}
        with service_process(tmp_path) as service:
            body = {"kind": "sft", "dataset": "bench.jsonl", "phase1": {"rounds": 1}, "batch_size": 1}
            job_id = httpx.post(f"{service}/v1/jobs", json=body, headers=headers, trust_env=False).json()["id"]
            deadline = time.monotonic() + 60
            while httpx.get(f"{service}/v1/jobs/{job_id}", headers=headers, trust_env=False).json()["progress"][
                    "done"] < 1:
                assert time.monotonic() < deadline, "the job did not start"
                time.sleep(0.1)
            server = serve_pid(tmp_path / "serve.yaml")
            children = children_of(server)
            assert children, "no worker process"
            os.kill(server, signal.SIGKILL)
            deadline = time.monotonic() + 20
            while any(running(c) for c in children) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not any(running(c) for c in children), "the worker went on after its server was killed"
    rows = sum(1 for shard in (tmp_path / "jobs" / job_id / "shards").glob("sft-*.jsonl") for _ in shard.open())
    assert 1 <= rows <= 40  # what it finished (and the batch it was stopped in) is on disk


def nice_of(pid: int, thread: int | None = None) -> int:
    stat = Path(f"/proc/{pid}/task/{thread or pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])  # field 19 of proc(5): nice


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads priorities from /proc (Linux)")
def test_request_handling_gives_up_priority_and_the_job_process_keeps_it(tmp_path):
    from serve.bench import _write_inputs, bench_prompts
    from serve.bench_procs import service_process

    _, key = _write_inputs(tmp_path, bench_prompts("redteam", 4), EngineSpec(backend="fake"), {"api_nice": 7})
    with service_process(tmp_path) as service:
        headers = {"Authorization": f"Bearer {key}"}
        job_id = httpx.post(f"{service}/v1/jobs", json={"kind": "sft", "dataset": "bench.jsonl"}, headers=headers,
                            trust_env=False).json()["id"]
        deadline = time.monotonic() + 60
        while httpx.get(f"{service}/v1/jobs/{job_id}", headers=headers, trust_env=False).json()["state"] != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        server = serve_pid(tmp_path / "serve.yaml")
        base = os.getpriority(os.PRIO_PROCESS, 0)
        assert nice_of(server) == min(19, base + 7)  # the event loop's thread, which answers requests
        jobs = [c for c in children_of(server) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(jobs) == 1 and nice_of(jobs[0]) == base


@pytest.mark.real_model
def test_the_embedded_model_answers_a_service_job_from_the_workers_process(tmp_path):
    from serve.bench import _write_inputs, bench_prompts
    from serve.bench_procs import service_process

    _, key = _write_inputs(tmp_path, bench_prompts("redteam", 2), EngineSpec(backend="transformers"))
    short = {"max_tokens": 24}
    body = {"kind": "sft", "dataset": "bench.jsonl", "phase1": {"rounds": 1, "answer": short, "critique": short,
                                                               "revision": short}}
    with service_process(tmp_path) as service, httpx.Client(base_url=service, trust_env=False, timeout=30,
                                                            headers={"Authorization": f"Bearer {key}"}) as c:
        job_id = c.post("/v1/jobs", json=body).json()["id"]
        deadline = time.monotonic() + 300
        while (job := c.get(f"/v1/jobs/{job_id}").json())["state"] not in ("completed", "failed", "cancelled"):
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
        assert job["state"] == "completed" and job["records"] == 2 and job["tokens"] > 0, job
        assert set(job["errors"]) <= {"truncated"}  # 24 tokens: a reply may be cut off
        rows = c.get(f"/v1/jobs/{job_id}/records", params={"limit": 10}).json()["items"]
        assert len(rows) == 2 and all(step["text"].strip() for r in rows for step in r["trajectory"])


def test_an_exception_that_cannot_be_pickled_crosses_as_its_name_and_message():
    class Odd(Exception):
        def __init__(self, lock):
            super().__init__(f"odd failure holding {type(lock).__name__}")
            self.lock = lock

    sent = sendable(Odd(threading.Lock()))
    assert isinstance(sent, WorkerError) and sent.type_name == "Odd" and "odd failure" in str(sent)
    assert sendable(ValueError("plain")).args == ("plain",)
