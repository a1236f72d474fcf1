"""`python -m serve.bench`: a phase-1 job submitted to `cai serve` against the same job run as
`cai generate sft` runs it (the kind's run function, in this process), on the same backend, also
while `pollers` clients each GET its status and a records page (the review page's size) in a loop,
with no pause (the worst case) or `poll_interval_ms`. The backend is a local OpenAI-compatible stub
(cai.engine.stub_server) in its own process: the model costs nothing. Rates are the jobs' own
(`generation_seconds` of the job's summary, the engine's start excluded), the same field on both
paths. Prompts: a bundled set repeated, each repeat's text made distinct (a job merges identical ones).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml
from pydantic import BaseModel, computed_field
from rich.console import Console
from rich.table import Table

from cai.bench import cycled
from cai.constitution import CONSTITUTIONS_DIR
from cai.errors import CaiError
from cai.files import atomic_write_json, atomic_write_jsonl, atomic_write_text
from cai.kinds import kind_of_job
from cai.pipeline import build_engine
from cai.recipe import DEFAULT_BATCH_SIZE, EngineSpec, Phase1Config, SFTJob
from cai.records import SourcePrompt
from cai.sources import read_prompts
from serve.bench_procs import KEY_ENV, service_process, stub_process
from serve.keys import create_key
from serve.protocol import FINAL_STATES

console = Console()
PROFILE = "stub"
DATASET = "bench"
RECORDS_PAGE = 10  # the review page's page size (serve/static/app.js)


class JobRun(BaseModel):
    name: str
    prompts: int
    records: int
    errors: dict[str, int]
    generation_seconds: float  # the job's own: its batches' engine work
    job_wall_seconds: float  # the job's own: plan, batches, commits and export
    client_seconds: float  # cli: the call; service: submit -> done as the client saw it (0.25 s polls)

    @computed_field
    @property
    def prompts_per_second(self) -> float:
        return self.prompts / self.generation_seconds if self.generation_seconds else 0.0


class Latency(BaseModel):
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    max_ms: float


class PollStats(BaseModel):
    clients: int
    pause_ms: float  # each client's pause after its status + records requests (0: none, as fast as answered)
    seconds: float
    all: Latency
    status: Latency  # GET /v1/jobs/ID
    records: Latency  # GET /v1/jobs/ID/records?limit=10

    @computed_field
    @property
    def requests_per_second(self) -> float:
        return self.all.requests / self.seconds if self.seconds else 0.0


class ServiceBenchReport(BaseModel):
    source: str
    prompts: int
    rounds: int
    batch_size: int
    concurrency: int
    stub_latency_ms: float
    repeats: int = 1  # cli, service and polled runs in turn, this many times; each shown is its median run
    cli: JobRun
    service: JobRun
    polled: JobRun | None = None
    polling: PollStats | None = None  # every polled run's requests together
    rates: dict[str, list[float]] = {}  # prompts/s of every run, by path

    @computed_field
    @property
    def service_vs_cli(self) -> float:
        return _ratio(self.service, self.cli)

    @computed_field
    @property
    def polled_vs_cli(self) -> float | None:
        return _ratio(self.polled, self.cli) if self.polled else None

    @computed_field
    @property
    def polled_vs_unpolled(self) -> float | None:
        return _ratio(self.polled, self.service) if self.polled else None


def _ratio(run: JobRun, base: JobRun) -> float:
    return run.prompts_per_second / base.prompts_per_second if base.prompts_per_second else 0.0


def bench_prompts(source: str, count: int) -> list[SourcePrompt]:
    """`count` prompts: `source` repeated (cai.bench.cycled), each repeat's last turn made distinct."""
    out = cycled(list(read_prompts(source)), count)
    for n, prompt in enumerate(out):
        if "~" in prompt.id:  # a repeat: cycled names it ID~REPEAT
            *head, last = prompt.messages
            last = last.model_copy(update={"content": f"{last.content} (variant {prompt.id.rpartition('~')[2]})"})
            out[n] = prompt.model_copy(update={"messages": [*head, last]})
    return out


def _write_inputs(root: Path, prompts: list[SourcePrompt], engine: EngineSpec,
                  server: dict | None = None) -> tuple[Path, str]:
    """data/bench.jsonl, serve.yaml and keys.txt under `root`; (the prompts file, the API key)."""
    data = root / "data" / f"{DATASET}.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(data, ({"id": p.id, "messages": [m.model_dump() for m in p.messages]} for p in prompts))
    atomic_write_text(root / "serve.yaml", yaml.safe_dump({
        "jobs_root": str(root / "jobs"), "data_root": str(root / "data"), "keys_from_env": False, "engines": {
            PROFILE: engine.model_dump(mode="json")}, "default_engine": PROFILE,
        "limits": {"max_rows": max(2000, len(prompts))}, **(server or {})}))
    return data, create_key("bench", root / "keys.txt")


def run_cli(job: SFTJob, name: str = "cli") -> JobRun:
    """The job as `cai generate sft` runs it: its kind's run function, the engine built by the job."""
    built = []
    build = lambda spec: built.append(build_engine(spec)) or built[-1]  # noqa: E731
    started = time.perf_counter()
    try:
        summary = kind_of_job(job).run(job, progress=lambda event: None, stop=lambda: False, build=build)
    finally:
        for engine in built:
            engine.close()
    return JobRun(name=name, prompts=summary.done_now, records=summary.done_now, errors=summary.export.errors,
                  generation_seconds=summary.generation_seconds, job_wall_seconds=summary.wall_seconds,
                  client_seconds=time.perf_counter() - started)


def _poller(client: httpx.Client, job_id: str, done: threading.Event, out: list, pause: float = 0.0,
            nice: int = 0) -> None:
    if nice:  # this thread only (Linux): clients that stand for other machines yield the cores to the service
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    paths = (("status", f"/v1/jobs/{job_id}", None),
             ("records", f"/v1/jobs/{job_id}/records", {"limit": RECORDS_PAGE}))
    while True:  # at least one round, however soon the job ends
        for endpoint, path, params in paths:
            started = time.perf_counter()
            try:
                ok = client.get(path, params=params).status_code == 200
            except httpx.HTTPError:
                ok = False
            out.append((endpoint, time.perf_counter() - started, ok))
        if done.wait(pause):
            return


def _latency(samples: list[tuple[str, float, bool]]) -> Latency:
    ms = sorted(s[1] * 1000 for s in samples)
    at = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))] if ms else 0.0  # noqa: E731
    return Latency(requests=len(ms), errors=sum(1 for s in samples if not s[2]), p50_ms=at(0.5), p99_ms=at(0.99),
                   max_ms=ms[-1] if ms else 0.0)


def _wait(client: httpx.Client, job_id: str, timeout: float) -> dict:
    deadline, resets = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        try:
            job = client.get(f"/v1/jobs/{job_id}").json()
        except httpx.TransportError:  # a kept-alive connection the server closed as it was reused: once more
            if (resets := resets + 1) > 3:
                raise
            continue
        if job["state"] in FINAL_STATES:
            return job
        time.sleep(0.25)
    raise RuntimeError(f"job {job_id} did not finish within {timeout:.0f} s")


def run_service(url: str, key: str, request: dict, name: str, pollers: int = 0, poll_interval: float = 0.0,
                timeout: float = 1800, poller_nice: int = 0) -> tuple[JobRun, list[tuple[str, float, bool]], float]:
    """Submit `request`, wait for it (with `pollers` clients polling it meanwhile, each pausing
    `poll_interval` seconds after its status + records requests); (the run, the polls, seconds polled)."""
    headers = {"Authorization": f"Bearer {key}"}
    clients = [httpx.Client(base_url=url, headers=headers, timeout=120, trust_env=False) for _ in range(pollers + 1)]
    control, done, samples = clients[0], threading.Event(), [[] for _ in range(pollers)]
    try:
        started, answer = time.perf_counter(), control.post("/v1/jobs", json=request)
        if answer.status_code != 201:
            raise RuntimeError(f"submitting the job: {answer.status_code} {answer.text}")
        job_id = answer.json()["id"]
        threads = [threading.Thread(target=_poller, args=(c, job_id, done, out, poll_interval, poller_nice),
                                    daemon=True)
                   for c, out in zip(clients[1:], samples)]
        polled = time.perf_counter()
        for thread in threads:
            thread.start()
        job = _wait(control, job_id, timeout)
        client_seconds = time.perf_counter() - started
        done.set()
        for thread in threads:
            thread.join()
        poll_seconds = time.perf_counter() - polled
    finally:
        for client in clients:
            client.close()
    if job["state"] != "completed":
        raise RuntimeError(f"service job {job_id} {job['state']}: {job['message']}")
    summary = job["summary"]
    run = JobRun(name=name, prompts=summary["done_now"], records=job["records"], errors=job["errors"],
                 generation_seconds=summary["generation_seconds"], job_wall_seconds=summary["wall_seconds"],
                 client_seconds=client_seconds)
    return run, [s for out in samples for s in out], poll_seconds


def _median(runs: list[JobRun]) -> JobRun:
    return sorted(runs, key=lambda run: run.prompts_per_second)[(len(runs) - 1) // 2]


def run_service_bench(prompts: int = 500, pollers: int = 24, stub_latency_ms: float = 10.0, concurrency: int = 16,
                      batch_size: int = DEFAULT_BATCH_SIZE, rounds: int = 1, source: str = "redteam",
                      workdir: Path | None = None, poll_interval_ms: float = 0.0,
                      repeats: int = 1, server: dict | None = None, poller_nice: int = 0) -> ServiceBenchReport:
    """The same phase-1 job from the CLI code path, through the service, and through the service while
    `pollers` clients poll it (0: not run), in turn `repeats` times, against a stub answering in `stub_latency_ms`."""
    if workdir is not None and workdir.exists() and any(workdir.iterdir()):
        raise CaiError(f"--workdir {workdir}: not empty (its jobs would resume, not generate); give a new folder")
    sources, config = bench_prompts(source, prompts), Phase1Config(rounds=rounds)
    runs: dict[str, list[JobRun]] = {"cli": [], "service": [], "polled": []}
    samples, poll_seconds = [], 0.0
    with tempfile.TemporaryDirectory(prefix="cai-serve-bench-") as tmp, stub_process(stub_latency_ms / 1000) as stub:
        root = Path(workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        engine = EngineSpec(backend="openai", model="stub",
                            options={"base_url": stub, "concurrency": concurrency, "api_key_env": KEY_ENV})
        data, key = _write_inputs(root, sources, engine, server)
        request = {"kind": "sft", "constitution": "harmless", "dataset": DATASET, "engine": PROFILE,
                   "phase1": config.model_dump(mode="json"), "batch_size": batch_size}
        with service_process(root) as url:
            for n in range(repeats):
                runs["cli"].append(run_cli(SFTJob(constitution=str(CONSTITUTIONS_DIR / "harmless.yaml"),
                                                  prompts=str(data), out=str(root / f"cli-{n}"), engine=engine,
                                                  phase1=config, batch_size=batch_size)))
                runs["service"].append(run_service(url, key, request, "service")[0])
                if pollers:
                    run, polls, seconds = run_service(url, key, request, f"service + {pollers} pollers", pollers,
                                                      poll_interval_ms / 1000, poller_nice=poller_nice)
                    runs["polled"].append(run)
                    samples, poll_seconds = samples + polls, poll_seconds + seconds
    by = lambda endpoint: _latency([s for s in samples if s[0] == endpoint])  # noqa: E731
    polling = PollStats(clients=pollers, pause_ms=poll_interval_ms, seconds=poll_seconds, all=_latency(samples),
                        status=by("status"), records=by("records"))
    return ServiceBenchReport(
        source=source, prompts=prompts, rounds=rounds, batch_size=batch_size, concurrency=concurrency,
        stub_latency_ms=stub_latency_ms, repeats=repeats, cli=_median(runs["cli"]), service=_median(runs["service"]),
        polled=_median(runs["polled"]) if pollers else None,
        polling=polling if pollers else None,
        rates={path: [round(r.prompts_per_second, 2) for r in done] for path, done in runs.items() if done})


def print_service_bench(report: ServiceBenchReport, out: Path | None = None) -> None:
    """The runs and the polling as tables, the ratios against their goal (>= 0.9); JSON to `out`."""
    table = Table(title=f"phase 1 ({report.rounds} round, batch size {report.batch_size}) on {report.prompts} "
                        f"{report.source} prompts, openai backend (concurrency {report.concurrency}) against a stub "
                        f"answering in {report.stub_latency_ms:g} ms")
    for col in ("run", "records", "errors", "generation s", "prompts/s", "job wall s", "client s", "÷ cli"):
        table.add_column(col, justify="right" if table.columns else "left")
    for run in (r for r in (report.cli, report.service, report.polled) if r is not None):
        errors = sum(run.errors.values())
        table.add_row(run.name, str(run.records), f"[red]{errors}[/]" if errors else "0",
                      f"{run.generation_seconds:.2f}", f"{run.prompts_per_second:.1f}", f"{run.job_wall_seconds:.2f}",
                      f"{run.client_seconds:.2f}", f"{_ratio(run, report.cli):.2f}")
    console.print(table)
    if report.repeats > 1:
        console.print(f"median of {report.repeats} runs each; prompts/s of every run: {report.rates}")
    if (poll := report.polling) is not None:
        pause = f"{poll.pause_ms:g} ms pause after each status + records" if poll.pause_ms else "no pause"
        ptable = Table(title=f"{poll.clients} pollers, {pause}, {poll.seconds:.1f} s")
        for col in ("endpoint", "requests", "requests/s", "p50 ms", "p99 ms", "max ms", "errors"):
            ptable.add_column(col, justify="right" if ptable.columns else "left")
        for name, lat in (("status", poll.status), (f"records ({RECORDS_PAGE})", poll.records), ("all", poll.all)):
            ptable.add_row(name, str(lat.requests), f"{lat.requests / poll.seconds if poll.seconds else 0:.1f}",
                           f"{lat.p50_ms:.0f}", f"{lat.p99_ms:.0f}", f"{lat.max_ms:.0f}",
                           f"[red]{lat.errors}[/]" if lat.errors else "0")
        console.print(ptable)
    goal = lambda v: "n/a" if v is None else f"[{'green' if v >= 0.9 else 'red'}]{v:.2f}[/]"  # noqa: E731
    console.print(f"service / cli = {goal(report.service_vs_cli)}   polled / cli = {goal(report.polled_vs_cli)}   "
                  f"polled / unpolled = {goal(report.polled_vs_unpolled)}   (goal >= 0.90; rates: each job's "
                  "generation_seconds, the same field on both paths)")
    if out is not None:
        atomic_write_json(out, report.model_dump(mode="json"))


def _setting(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    return key, yaml.safe_load(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=500, help="prompts in the job (the source repeated)")
    parser.add_argument("--pollers", type=int, default=24, help="clients polling a third run (0: none)")
    parser.add_argument("--stub-latency-ms", type=float, default=10.0, help="the stub's answer time")
    parser.add_argument("--poll-interval-ms", type=float, default=0.0,
                        help="each poller's pause after its status + records requests (default 0: none)")
    parser.add_argument("--concurrency", type=int, default=16, help="openai backend: requests in flight")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="prompts per engine call")
    parser.add_argument("--rounds", type=int, default=1, help="critique -> revision rounds")
    parser.add_argument("--repeats", type=int, default=1, help="run the three in turn N times; show each's median")
    parser.add_argument("--source", default="redteam", help="prompt source (as for `cai generate sft`)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the job directories here (default: temp)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report as JSON here")
    parser.add_argument("--setting", dest="server", action="append", type=_setting, default=[], metavar="KEY=VALUE",
                        help="a server setting (serve.app.Settings, YAML value), e.g. job_processes=false, api_nice=0")
    parser.add_argument("--poller-nice", type=int, default=0, choices=range(20), metavar="0-19",
                        help="pollers' CPU priority (Linux): 19 stands for clients on other machines")
    args = parser.parse_args(argv)
    if min(args.prompts, args.concurrency, args.batch_size, args.rounds, args.repeats) < 1 or min(
            args.pollers, args.poll_interval_ms, args.stub_latency_ms) < 0:
        parser.error("--prompts, --concurrency, --batch-size, --rounds, --repeats: >= 1; the others: >= 0")
    args.server = dict(args.server)
    print_service_bench(run_service_bench(**{k: v for k, v in vars(args).items() if k != "out"}), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
