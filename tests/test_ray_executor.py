"""The Ray executor on one local Ray cluster (127.0.0.1, 2 CPUs), started once for this module:
same records as a local run, a replica killed mid-batch, the driver killed mid-run, stop, an engine
that cannot start. Skipped when Ray is not installed (pip install -e '.[ray]')."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import HARMLESS, ROOT, write_jsonl, write_prompts

from cai.engine import EngineConfigError
from cai.engine.stub_server import StubChatServer
from cai.events import BatchCommitted, StepStarted
from cai.judge_eval import EvalJob, run_judge_eval
from cai.pipeline import JobCancelled, generate_prefs, generate_sft
from cai.recipe import (
    EngineSpec,
    ExecutorConfig,
    Phase1Config,
    Phase2Config,
    PrefsJob,
    SFTJob,
)
from cai.records import SamplingParams

if importlib.util.find_spec("ray") is None:
    pytest.skip("Ray is not installed: pip install -e '.[ray]'", allow_module_level=True)

from cai.ray_executor import RayExecutor  # noqa: E402

# Ray resolves 127.0.0.1 to the machine's address unless this is off: keep every socket on loopback.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
FAKE = EngineSpec(backend="fake")
SHORT = SamplingParams(max_tokens=16)


@pytest.fixture(scope="module")
def cluster():
    """The GCS address of a Ray instance started here (2 CPUs, no dashboard), shut down at the end."""
    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def executor(cluster):
    """Two replicas of half a CPU each (the driver-kill test's subprocess takes the other CPU)."""
    with RayExecutor(replicas=2, num_cpus=0.5) as ex:
        yield ex


@pytest.fixture(scope="module")
def stub():
    with StubChatServer(latency=0.15) as server:
        yield server


def stub_spec(server: StubChatServer) -> EngineSpec:
    return EngineSpec(backend="openai", model="stub", options={"base_url": server.url, "api_key": "k"})


def sft_job(tmp_path: Path, out: str, n: int = 10, engine: EngineSpec = FAKE, **kw) -> SFTJob:
    prompts = tmp_path / "prompts.jsonl"
    if not prompts.exists():
        write_prompts(prompts, [f"question number {i}?" for i in range(n)])
    phase1 = Phase1Config(rounds=1, answer=SHORT, critique=SHORT, revision=SHORT)
    return SFTJob(constitution=HARMLESS, prompts=str(prompts), out=str(tmp_path / out), engine=engine,
                  phase1=phase1, batch_size=2, parquet=False, **kw)


def rows(out: str | Path, stage: str = "sft") -> list[dict]:
    return [json.loads(line) for p in sorted((Path(out) / "shards").glob(f"{stage}-*.jsonl")) for line in p.open()]


def untimed(value):
    """`value` without its creation times (two runs of one job differ only there)."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k != "created_at"}
    return [untimed(v) for v in value] if isinstance(value, (list, tuple)) or hasattr(value, "__next__") else value


def assert_each_once(found: list[dict], n: int) -> None:
    ids = [r["id"] for r in found]
    assert len(ids) == n and len(set(ids)) == n
    assert not [r for r in found if r["error"]]


def test_two_replicas_write_the_job_directory_a_local_run_writes(tmp_path, executor):
    local = generate_sft(sft_job(tmp_path, "local"))
    remote = generate_sft(sft_job(tmp_path, "ray"), executor=executor)
    assert (remote.done_now, remote.done_before) == (local.done_now, local.done_before) == (10, 0)
    assert_each_once(rows(remote.out), 10)
    assert untimed(rows(remote.out)) == untimed(rows(local.out))
    export = lambda out: untimed(json.loads(line) for line in (Path(out) / "sft.jsonl").open())  # noqa: E731
    assert export(remote.out) == export(local.out) and len(export(local.out)) == 10
    manifest = lambda out: untimed(json.loads((Path(out) / "manifest.json").read_text()))  # noqa: E731
    assert manifest(remote.out)["recipe"].pop("out") != manifest(local.out)["recipe"].pop("out")
    assert {**manifest(remote.out), "recipe": None} == {**manifest(local.out), "recipe": None}
    assert {**manifest(remote.out)["recipe"], "out": ""} == {**manifest(local.out)["recipe"], "out": ""}
    shards = lambda out: sorted(p.name for p in (Path(out) / "shards").iterdir())  # noqa: E731
    assert shards(remote.out) == shards(local.out)
    assert remote.generation_seconds > 0


def test_phase_two_and_judge_evaluation_run_on_the_replicas(tmp_path, executor):
    prompts = write_prompts(tmp_path / "p.jsonl", [f"question {i}" for i in range(6)])
    policy = EngineSpec(backend="fake", options={"responder": "varied"})
    prefs = generate_prefs(PrefsJob(constitution=HARMLESS, prompts=str(prompts), out=str(tmp_path / "prefs"),
                                    policy=policy, batch_size=2, parquet=False,
                                    phase2=Phase2Config(policy=SamplingParams(temperature=0.8, max_tokens=8))),
                           executor=executor)
    assert prefs.done_now == 6 and len({r["prompt"][-1]["content"] for r in rows(prefs.out, "prefs")}) == 6
    assert len(rows(prefs.out, "samples")) == 6

    data = write_jsonl(tmp_path / "pairs.jsonl", [
        {"chosen": f"\n\nHuman: q{i}\n\nAssistant: good {i}", "rejected": f"\n\nHuman: q{i}\n\nAssistant: bad {i}"}
        for i in range(5)])
    job = lambda out: EvalJob(data=str(data), out=str(tmp_path / out), engine=FAKE, batch_size=2)  # noqa: E731
    local, remote = run_judge_eval(job("local-eval")), run_judge_eval(job("ray-eval"), executor=executor)
    assert remote.done_now == local.done_now == 10  # both judges, 5 pairs
    strip = lambda out: sorted(({**r, "seconds": 0} for r in rows(out, "judge-eval")), key=lambda r: r["id"])  # noqa: E731
    assert strip(remote.out) == strip(local.out)


def test_a_replica_killed_mid_batch_is_restarted_and_its_batch_committed_once(tmp_path, executor, stub):
    import ray

    pids = ray.get([a.pid.remote() for a in executor.pool()])
    kill = threading.Timer(0.2, os.kill, (pids[0], signal.SIGKILL))  # both replicas are mid-batch by then

    def on_first_commit(event) -> None:
        if isinstance(event, BatchCommitted) and not kill.is_alive() and not kill.finished.is_set():
            kill.start()

    summary = generate_sft(sft_job(tmp_path, "killed", engine=stub_spec(stub)), executor=executor,
                           progress=on_first_commit)
    kill.join()
    assert kill.finished.is_set()
    assert summary.done_now == 10
    assert_each_once(rows(summary.out), 10)
    assert ray.get(executor.pool()[0].pid.remote()) != pids[0]  # restarted by Ray, its batch retried


def test_a_driver_killed_mid_run_resumes_exactly_once(tmp_path, cluster, executor, stub):
    job = sft_job(tmp_path, "driver", n=16, engine=stub_spec(stub))
    command = [sys.executable, "-m", "cai", "generate", "sft", "--constitution", HARMLESS, "--prompts", job.prompts,
               "--out", job.out, "--engine", "openai", "--model", "stub", "--engine-option", f"base_url={stub.url}",
               "--engine-option", "api_key=k", "--rounds", "1", "--max-tokens", "16", "--critique-max-tokens", "16",
               "--batch-size", "2", "--no-parquet", "--executor", "ray", "--ray-address", cluster,
               "--replicas", "2", "--cpus-per-replica", "0.5"]
    driver = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shards = Path(job.out) / "shards"
    deadline = time.monotonic() + 90
    while not list(shards.glob("sft-*.jsonl")) and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert driver.returncode == -signal.SIGKILL, driver.stderr.read().decode()[-2000:]
    before = len(rows(job.out))
    assert 0 < before < 16

    recipe = json.loads((Path(job.out) / "manifest.json").read_text())["recipe"]
    rerun = generate_sft(SFTJob.model_validate(recipe), executor=executor)  # the command's job, on this driver
    assert (rerun.done_before, rerun.done_now) == (before, 16 - before)
    assert_each_once(rows(job.out), 16)


def test_stop_cancels_the_batches_in_flight_and_a_rerun_finishes(tmp_path, executor, stub):
    job = sft_job(tmp_path, "stopped", engine=stub_spec(stub))
    commits: list[BatchCommitted] = []
    progress = lambda e: commits.append(e) if isinstance(e, BatchCommitted) else None  # noqa: E731
    with pytest.raises(JobCancelled):
        generate_sft(job, executor=executor, progress=progress, stop=lambda: bool(commits))
    found = rows(job.out)
    assert len(found) == 10 and len({r["id"] for r in found}) == 10  # every prompt once: done or cancelled
    cancelled = [r for r in found if r["error"]]
    assert cancelled and {r["error"]["code"] for r in cancelled} == {"cancelled"}
    rerun = generate_sft(job, executor=executor)
    assert rerun.done_now == len(cancelled)
    assert_each_once(rows(job.out), 10)


def test_an_engine_that_cannot_start_fails_the_job_with_the_replicas_error(tmp_path, executor):
    broken = EngineSpec(backend="openai", model="stub", options={"api_key": "k"})  # no base_url
    with pytest.raises(EngineConfigError, match="base_url"):
        generate_sft(sft_job(tmp_path, "broken", engine=broken), executor=executor)
    assert rows(tmp_path / "broken") == []


def test_each_step_a_replica_runs_reaches_the_driver_before_its_batch_is_committed(tmp_path, executor):
    local: list = []
    remote: list = []
    generate_sft(sft_job(tmp_path, "steps-local"), progress=local.append)
    generate_sft(sft_job(tmp_path, "steps-ray"), progress=remote.append, executor=executor)
    steps = lambda events: Counter((e.name, e.requests) for e in events if isinstance(e, StepStarted))  # noqa: E731
    assert steps(remote) == steps(local)
    assert steps(local)[("answer", 2)] == 5  # 10 prompts in batches of 2, one answer step each
    kinds = [type(e).__name__ for e in remote if isinstance(e, StepStarted | BatchCommitted)]
    assert kinds[0] == "StepStarted" and kinds.count("BatchCommitted") == 5
    answers_by_commit = [sum(1 for e in remote[:i] if isinstance(e, StepStarted) and e.name == "answer")
                         for i, e in enumerate(remote) if isinstance(e, BatchCommitted)]
    assert all(answered >= n for n, answered in enumerate(answers_by_commit, 1))  # a batch's steps come first


def test_retry_errors_runs_a_jobs_error_rows_on_the_replicas_it_is_given(tmp_path, cluster, monkeypatch):
    from cai.kinds import retry_errors

    job = sft_job(tmp_path, "retry")
    with pytest.raises(JobCancelled):
        generate_sft(job, stop=lambda: True)  # every input a `cancelled` error row
    ran = []
    execute = RayExecutor.execute
    monkeypatch.setattr(RayExecutor, "execute", lambda self, *a, **k: ran.append(self.replicas) or execute(self, *a, **k))
    redone, summary = retry_errors(job.out, executor=ExecutorConfig(name="ray", replicas=2, cpus_per_replica=0.5))
    assert redone == {"cancelled": 10} and ran == [2] and summary.done_now == 10
    assert_each_once(rows(job.out), 10)  # the cancelled rows are gone, each input once


def test_the_job_settings_choose_the_executor_and_stay_out_of_the_manifest(tmp_path, cluster):
    job = sft_job(tmp_path, "settings", executor=ExecutorConfig(name="ray", replicas=1, cpus_per_replica=0.5))
    summary = generate_sft(job)
    assert_each_once(rows(summary.out), 10)
    manifest = json.loads((Path(summary.out) / "manifest.json").read_text())
    assert "executor" not in manifest["recipe"]
    assert generate_sft(sft_job(tmp_path, "settings")).done_before == 10  # same fingerprint, resumed locally


@pytest.mark.real_model  # about 30 s on 2 cores: two replicas load the model side by side
def test_the_embedded_model_on_two_replicas(tmp_path, executor):
    engine = EngineSpec(backend="transformers")
    summary = generate_sft(sft_job(tmp_path, "real", n=4, engine=engine), executor=executor)
    found = rows(summary.out)
    assert sorted(r["id"] for r in found) == sorted({r["id"] for r in found}) and len(found) == 4
    assert {r["error"]["code"] for r in found if r["error"]} <= {"truncated"}  # 16 tokens: short replies
    assert all(step["text"] for r in found for step in r["trajectory"]) and summary.generated_tokens_now > 0


def test_replicas_get_the_api_key_variable_of_every_engine_of_the_job(monkeypatch):
    from cai.pipeline import job_executor

    monkeypatch.setenv("POLICY_KEY", "p-secret")
    monkeypatch.setenv("JUDGE_KEY", "j-secret")
    monkeypatch.setenv("UNRELATED_KEY", "x")
    job = PrefsJob(constitution=HARMLESS, prompts="p.jsonl", out="o", executor=ExecutorConfig(name="ray"),
                   policy=EngineSpec(backend="openai", options={"api_key_env": "POLICY_KEY"}),
                   judge=EngineSpec(backend="openai", options={"api_key_env": "JUDGE_KEY"}))
    with job_executor(job, None) as built:  # no replica starts until a batch runs
        assert built.env["POLICY_KEY"] == "p-secret" and built.env["JUDGE_KEY"] == "j-secret"
        assert "UNRELATED_KEY" not in built.env
