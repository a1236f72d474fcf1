"""No engine option, key or server path reaches a client or a job directory (hardening items 1 and 12).

The service's engine profiles hold a planted secret in every option; every byte every route
returns is scanned for it and for the server's absolute paths, and so is every file under the
jobs root. The CLI writes no `--engine-option api_key=...` into its job directory, and
`cai jobs retry-errors` rebuilds the job with the key from the environment.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fakes import judge_preferring
from fakeserver import FakeServer, error_body, ok_body
from fastapi.testclient import TestClient
from helpers import ROOT, write_prompts
from serve_helpers import A, responder

from cai.constitution import CONSTITUTIONS_DIR
from cai.engine import is_secret_option, redact_options
from cai.engine.fake import FakeEngine
from cai.pipeline import manifest_recipe
from cai.recipe import EngineSpec, SFTJob
from cai.records import Completion, ErrorCode, ErrorInfo
from serve.app import Limits, Settings, create_app
from serve.routes import ASSETS

SECRET = "sEcReT-9f3a1c77d2"
LEAKY = "a prompt whose backend error names the server's files"


def planted(tag: str) -> dict:
    """Engine options, each holding the secret: the key, an internal URL, any other option."""
    return {"api_key": f"{SECRET}-{tag}-key", "base_url": f"https://{SECRET}-{tag}.internal:8443/v1",
            "organization": f"{SECRET}-{tag}-org", "api_key_env": f"{SECRET}-{tag}",
            "default_headers": {"Authorization": f"Bearer {SECRET}-{tag}"}}


def secret_settings(root: Path) -> Settings:
    consts = root / "constitutions"
    consts.mkdir(exist_ok=True)
    for name in ("harmless.yaml", "helpful.yaml"):
        shutil.copy(CONSTITUTIONS_DIR / name, consts / name)
    return Settings(jobs_root=root / "jobs", data_root=root / "data", constitutions_dir=consts,
                    keys_file=root / "keys.txt", keys_from_env=False, limits=Limits(max_rows=20, max_active_jobs=8),
                    shutdown_grace_s=30, docs=True, default_engine="upstream",
                    engines={"upstream": EngineSpec(backend="openai", model="served-7b", options=planted("a")),
                             "judge": EngineSpec(backend="openai", model="judge-70b", options=planted("b")),
                             "broken": EngineSpec(backend="openai", model="gone", options=planted("c"))})


def forbidden(root: Path) -> list[str]:
    """What no response may contain: the secret and the server's absolute paths."""
    paths = {str(root), str(root.resolve()), str(ROOT), str(CONSTITUTIONS_DIR)}
    return [SECRET, *sorted(paths, key=len, reverse=True)]


def leaky_responder(root: Path):
    """Phase-1/2 replies; the LEAKY prompt's answer fails with an error naming the server's jobs root."""
    base = responder()

    def respond(chat, params):
        if chat[-1].content == LEAKY:
            error = ErrorInfo(code=ErrorCode.INTERNAL, message=f"cannot open {root / 'jobs' / 'x.bin'}")
            return Completion(finish_reason="error", error=error)
        return base(chat, params)

    return respond


def wait_all(client: TestClient, ids: list[str], timeout: float = 90.0) -> dict[str, dict]:
    deadline, done = time.monotonic() + timeout, {}
    while len(done) < len(ids):
        assert time.monotonic() < deadline, done
        for job_id in set(ids) - set(done):
            job = client.get(f"/v1/jobs/{job_id}", headers=A).json()
            if job["state"] in ("completed", "failed", "cancelled"):
                done[job_id] = job
        time.sleep(0.05)
    return done


def submit_all(client: TestClient) -> tuple[list[str], list]:
    """The jobs (sft inline + dataset, prefs with a judge profile, judge_eval, one failing) and refusals."""
    bodies = [
        {"kind": "sft", "prompts": ["hello", LEAKY], "phase1": {"rounds": 1}, "max_tokens": 32},
        {"kind": "sft", "dataset": "questions", "constitution_yaml": (CONSTITUTIONS_DIR / "harmless.yaml").read_text(),
         "phase1": {"rounds": 1}, "limit": 2},
        {"kind": "prefs", "dataset": "questions", "judge_engine": "judge", "limit": 3, "max_tokens": 16},
        {"kind": "judge_eval", "dataset": "hh"},
        {"kind": "sft", "prompts": ["x"], "engine": "broken", "phase1": {"rounds": 1}},
    ]
    ids, responses = [], []
    for body in bodies:
        r = client.post("/v1/jobs", json=body, headers=A)
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
        responses.append(r)
    refused = [  # refusals that used to echo the recipe (paths, engine specs) or name the files
        {"kind": "prefs", "dataset": "questions", "min_confidence": 0.99, "phase2": {"judge": {"mode": "cot"}}},
        {"kind": "sft", "prompts": ["x"], "engine": "nope"},
        {"kind": "sft", "dataset": "leak"},
        {"kind": "sft", "dataset": "missing"},
        {"kind": "sft", "prompts": ["x"], "constitution_yaml": "name: ["},
    ]
    for body in refused:
        r = client.post("/v1/jobs", json=body, headers=A)
        assert 400 <= r.status_code < 500, r.text
        responses.append(r)
    return ids, responses


def read_everything(client: TestClient, ids: list[str]) -> list:
    """Every route a client can read, for every job, every export file and record filter."""
    responses = []

    def get(url: str, **params):
        responses.append(client.get(url, params=params, headers=A))
        return responses[-1]

    for route in client.app.routes:
        if "GET" in getattr(route, "methods", set()) and "{" not in route.path:
            get(route.path)
    for asset in ASSETS:
        get(f"/ui/{asset}")
    for c in get("/v1/constitutions").json()["constitutions"]:
        get(f"/v1/constitutions/{c['name']}")
        get(f"/v1/constitutions/{c['name']}@{c['version']}")
    for job_id in ids:
        job = get(f"/v1/jobs/{job_id}").json()
        for status in (None, "ok", "error"):
            get(f"/v1/jobs/{job_id}/records", **({"status": status} if status else {}), limit=200)
        get(f"/v1/jobs/{job_id}/reviews")
        get(f"/v1/jobs/{job_id}/constitution")
        get(f"/v1/jobs/{job_id}/export")
        for name in job["files"]:
            assert get(f"/v1/jobs/{job_id}/export", file=name).status_code == 200, name
    get("/v1/jobs", state="failed")
    return responses


def test_no_engine_option_key_or_server_path_in_any_response_or_job_directory(roots):  # noqa: F811
    settings = secret_settings(roots)
    seen: list[EngineSpec] = []
    engine = FakeEngine(leaky_responder(roots), chooser=judge_preferring("good", 0.9))

    def factory(spec: EngineSpec):
        seen.append(spec)
        if spec.model == "gone":
            raise ConnectionError(f"{spec.options['base_url']} refused {spec.options['api_key']} "
                                  f"(cache {settings.jobs_root / 'engines'})")
        return engine

    with TestClient(create_app(settings, engine_factory=factory)) as client:
        ids, responses = submit_all(client)
        states = {job_id: job["state"] for job_id, job in wait_all(client, ids).items()}
        assert [states[i] for i in ids] == ["completed"] * 4 + ["failed"], states
        prefs = client.get(f"/v1/jobs/{ids[2]}/records", headers=A).json()["items"][0]
        responses.append(client.post(f"/v1/jobs/{ids[2]}/reviews", json={"record_id": prefs["id"], "label": "flip"},
                                     headers=A))
        responses += read_everything(client, ids)
    # the engines were built from the operator's full profiles, looked up when the jobs ran
    assert {s.options["api_key"] for s in seen} == {f"{SECRET}-{t}-key" for t in "abc"}
    failed = client_json(responses, f"/v1/jobs/{ids[4]}")
    assert failed["message"].startswith("ConnectionError") and "<engine option>" in failed["message"]
    manifest = client_json(responses, f"/v1/jobs/{ids[2]}/export", file="manifest.json")
    assert manifest["recipe"]["policy"] == {"profile": "upstream"} and manifest["recipe"]["judge"] == {"profile": "judge"}
    assert manifest["recipe"]["prompts"] == "questions.jsonl" and manifest["recipe"]["out"] == "."
    leaky = client_json(responses, f"/v1/jobs/{ids[0]}/records", status="error", limit=200)["items"]
    assert leaky and "x.bin" in leaky[0]["error"]["message"]
    assert len(responses) > 60
    needles = forbidden(roots)
    for r in responses:
        for needle in needles:
            assert needle.encode() not in r.content, (r.request.url, needle, r.content[:2000])
    # nothing secret on the server's disk either: job directories, inputs, exports, the job table
    for path in (roots / "jobs").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def client_json(responses: list, path: str, **params) -> dict:
    for r in responses:
        if r.request.url.path == path and all(r.request.url.params.get(k) == str(v) for k, v in params.items()):
            return r.json()
    raise AssertionError(f"no response for {path} {params}")


# ---------------------------------------------------------------- the CLI's job directories


def test_secret_option_names_and_redaction():
    for name in ("api_key", "apiKey", "hf_token", "password", "client-secret", "Authorization", "x.auth.token"):
        assert is_secret_option(name), name
    for name in ("api_key_env", "base_url", "max_num_batched_tokens", "tokenizer", "concurrency", "keys_file_env"):
        assert not is_secret_option(name), name
    options = {"api_key": "k", "base_url": "https://user:pw@host:1/v1", "headers": {"X-Api-Key": "k", "a": 1},
               "concurrency": 4}
    assert redact_options(options) == {"base_url": "https://host:1/v1", "headers": {"a": 1}, "concurrency": 4}
    job = SFTJob(constitution="harmless", out="o", engine=EngineSpec(backend="openai", options=options))
    assert manifest_recipe(job)["engine"]["options"] == {"base_url": "https://host:1/v1", "headers": {"a": 1},
                                                         "concurrency": 4}


def test_openai_engine_reads_its_key_from_the_named_environment_variable(monkeypatch):
    from cai.engine.openai_engine import OpenAIEngine

    monkeypatch.setenv("OPENAI_API_KEY", "from-default-env")
    monkeypatch.setenv("MY_UPSTREAM_KEY", "from-named-env")
    assert OpenAIEngine("m", base_url="http://127.0.0.1:9/v1").api_key == "from-default-env"
    assert OpenAIEngine("m", base_url="http://127.0.0.1:9/v1", api_key_env="MY_UPSTREAM_KEY").api_key == "from-named-env"
    assert OpenAIEngine("m", base_url="http://127.0.0.1:9/v1", api_key="given").api_key == "given"


def test_cli_job_directory_holds_no_key_and_retry_errors_takes_it_from_the_environment(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cai.cli import app
    from cai.engine import openai_engine

    keys: list[str] = []
    init = openai_engine.OpenAIEngine.__init__

    def recording_init(self, *args, **kw):
        init(self, *args, **kw)
        keys.append(self.api_key)

    monkeypatch.setattr(openai_engine.OpenAIEngine, "__init__", recording_init)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    prompts = tmp_path / "p.jsonl"
    write_prompts(prompts, ["question one", "BAD question", "three"])
    job = tmp_path / "job"
    healthy = {"on": False}

    def script(body, n):
        if "BAD" in body["messages"][-1]["content"] and not healthy["on"]:
            return 400, {}, error_body("bad request"), 0
        return 200, {}, ok_body(f"answer {n}"), 0

    runner = CliRunner()
    with FakeServer(script) as server:
        args = ["generate", "sft", "--engine", "openai", "--model", "m", "--engine-option", f"base_url={server.url}",
                "--engine-option", f"api_key={SECRET}", "--prompts", str(prompts), "--out", str(job), "--rounds", "1",
                "--show", "0"]
        first = runner.invoke(app, args)
        assert first.exit_code == 0, first.output
        assert keys == [SECRET]
        manifest = json.loads((job / "manifest.json").read_text())
        assert manifest["recipe"]["engine"]["options"] == {"base_url": server.url}
        assert_no_secret(job, SECRET)
        rows = [json.loads(line) for s in sorted((job / "shards").glob("sft-*.jsonl")) for line in s.open()]
        assert sum(1 for r in rows if r["error"]) == 1

        healthy["on"] = True
        monkeypatch.setenv("OPENAI_API_KEY", "key-from-the-environment")
        retry = runner.invoke(app, ["jobs", "retry-errors", str(job)])
        assert retry.exit_code == 0, retry.output
    assert keys[-1] == "key-from-the-environment"
    rows = [json.loads(line) for s in sorted((job / "shards").glob("sft-*.jsonl")) for line in s.open()]
    assert len(rows) == 3 and not any(r["error"] for r in rows)
    assert_no_secret(job, SECRET)
    assert_no_secret(job, "key-from-the-environment")


def assert_no_secret(folder: Path, secret: str) -> None:
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert secret.encode() not in path.read_bytes(), path


def test_retry_errors_sends_a_service_job_back_to_the_service(tmp_path):
    from cai.kinds import retry_errors
    from cai.store import JobError, Manifest

    (tmp_path / "manifest.json").write_text(Manifest(
        stage="sft", fingerprint="0" * 16, fingerprint_inputs={},
        recipe={"engine": {"profile": "upstream"}, "prompts": "questions.jsonl", "out": "."}).model_dump_json())
    with pytest.raises(JobError, match="cai serve.*upstream.*resume"):
        retry_errors(tmp_path)
