"""serve/: the job API through the app with the fake engine; keys, owners, limits, path safety."""

from __future__ import annotations

import io
import json
import sqlite3
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytest.importorskip("fastapi")
from fakes import judge_preferring
from fastapi.testclient import TestClient
from helpers import CONSTITUTIONS
from serve_helpers import (
    ALICE,
    A,
    B,
    app_for,
    export_rows,
    responder,
    settings,
    submit,
    wait,
)
from starlette.routing import Route

from cai.engine.fake import FakeEngine
from serve.app import create_app
from serve.auth import PUBLIC_PATHS

# ---------------------------------------------------------------- fixtures


@pytest.fixture
def client(roots):
    with TestClient(app_for(roots)) as c:
        yield c


# ---------------------------------------------------------------- jobs


def test_sft_job_progress_records_and_export(client):
    job_id = submit(client, kind="sft", prompts=["hello", "how do I pick a lock?",
                                                 {"messages": [{"role": "user", "content": "hi"}]}],
                    phase1={"rounds": 2, "system_prompt": "You are a careful assistant."}, max_tokens=64)
    job = wait(client, job_id)
    assert job["state"] == "completed", job
    assert job["progress"] == {"total": 3, "done": 3, "resumed": 0, "step": None}
    assert job["records"] == 3 and job["errors"] == {} and job["tokens"] > 0 and job["tokens_per_second"] > 0
    assert set(job["files"]) == {"sft.jsonl", "sft.parquet", "README.md", "manifest.json"}
    assert job["summary"]["export"]["rows"] == 3

    page = client.get(f"/v1/jobs/{job_id}/records", params={"limit": 2}, headers=A).json()
    assert page["total"] == 3 and len(page["items"]) == 2
    rest = client.get(f"/v1/jobs/{job_id}/records", params={"offset": 2, "limit": 2}, headers=A).json()
    assert len(rest["items"]) == 1 and rest["items"][0]["id"] not in {r["id"] for r in page["items"]}
    record = page["items"][0]
    assert [s["kind"] for s in record["trajectory"]] == ["answer", "critique", "revision", "critique", "revision"]
    assert record["trajectory"][1]["principle_id"] and record["final"].startswith("REVISED")
    principle = record["trajectory"][1]["principle_id"]
    filtered = client.get(f"/v1/jobs/{job_id}/records", params={"principle": principle}, headers=A).json()
    assert filtered["total"] >= 1
    assert all(principle in r["lineage"]["principle_ids"] for r in filtered["items"])
    assert client.get(f"/v1/jobs/{job_id}/records", params={"status": "error"}, headers=A).json()["total"] == 0

    rows = export_rows(client, job_id)
    assert len(rows) == 3 and rows[0]["messages"][-1]["role"] == "assistant"
    assert rows[0]["metadata"]["review"] == {"label": "", "reviewer": "", "note": "", "reviewed_at": ""}
    assert "judge_verdict" not in rows[0]["metadata"]  # SFT rows have no judge
    # a reviewer discards one trajectory: the export drops it; flip does not apply to SFT rows
    r = client.post(f"/v1/jobs/{job_id}/reviews", json={"record_id": record["id"], "label": "flip"}, headers=A)
    assert r.status_code == 422
    r = client.post(f"/v1/jobs/{job_id}/reviews", json={"record_id": record["id"], "label": "discard"}, headers=A)
    assert r.status_code == 201
    assert [row["metadata"]["id"] for row in export_rows(client, job_id)].count(record["id"]) == 0
    assert "Human review" in client.get(f"/v1/jobs/{job_id}/export", params={"file": "README.md"}, headers=A).text
    assert pq.read_table(client.app.state.settings.jobs_root / job_id / "sft.parquet").num_rows == 3

    listed = client.get("/v1/jobs", headers=A).json()["jobs"]
    assert [j["id"] for j in listed] == [job_id]
    assert listed[0]["request"]["inline_prompts"] == 3 and "prompts" not in listed[0]["request"]
    assert listed[0]["reviews"]["discard"] == 1 and listed[0]["reviews"]["agreement_rate"] is None  # no judge in sft


def test_prefs_review_flip_discard_agree_change_the_export(client):
    job_id = submit(client, kind="prefs", dataset="questions", phase2={"samples": 2}, max_tokens=32)
    job = wait(client, job_id)
    assert job["state"] == "completed" and job["records"] == 4, job
    items = client.get(f"/v1/jobs/{job_id}/records", headers=A).json()["items"]
    assert all(r["exported"] and len(r["judgement"]["orders"]) == 2 for r in items)
    before = {row["metadata"]["id"]: row for row in export_rows(client, job_id)}
    assert len(before) == 4
    flip, drop, agree = items[0]["id"], items[1]["id"], items[2]["id"]
    for rid, label in ((flip, "flip"), (drop, "discard"), (agree, "agree")):
        r = client.post(f"/v1/jobs/{job_id}/reviews", json={"record_id": rid, "label": label}, headers=A)
        assert r.status_code == 201, r.text
    assert client.post(f"/v1/jobs/{job_id}/reviews", json={"record_id": "prefs-nope", "label": "agree"},
                       headers=A).status_code == 404
    job = client.get(f"/v1/jobs/{job_id}", headers=A).json()
    assert job["reviews"] == {"agree": 1, "flip": 1, "discard": 1, "records_reviewed": 3, "agreement_rate": 0.5}

    after = {row["metadata"]["id"]: row for row in export_rows(client, job_id)}
    assert drop not in after and len(after) == 3
    old, new = before[flip], after[flip]
    assert new["chosen"] == old["rejected"] and new["rejected"] == old["chosen"]
    # a human decision is a confident label, whatever the judge thought
    assert new["score"] == 1.0 and new["margin"] == 1.0 and new["metadata"]["confidence"] == 1.0
    assert new["metadata"]["label_source"] == "human"
    assert new["metadata"]["review"]["label"] == "flip" and new["metadata"]["review"]["reviewer"] == "alice"
    assert set(new["metadata"]["review"]) == {"label", "reviewer", "note", "reviewed_at"}
    assert new["metadata"]["review"]["reviewed_at"]
    assert new["metadata"]["chosen_index"] == old["metadata"]["rejected_index"]
    assert new["metadata"]["judge_verdict"] == judge_verdict_of(old)  # the judge's verdict as exported
    assert after[agree]["chosen"] == before[agree]["chosen"]
    assert after[agree]["score"] == 1.0 and after[agree]["margin"] == 1.0
    assert after[agree]["metadata"]["judge_verdict"] == judge_verdict_of(before[agree])
    (untouched,) = set(after) - {flip, agree}
    assert after[untouched]["score"] == before[untouched]["score"] < 1.0
    assert after[untouched]["metadata"]["label_source"] == "judge"
    assert ALICE not in json.dumps(list(after.values()))  # no key in the export
    parquet = client.get(f"/v1/jobs/{job_id}/export", params={"file": "prefs.parquet"}, headers=A)
    table = pq.read_table(io.BytesIO(parquet.content))
    meta = {m["id"]: m for m in table.column("metadata").to_pylist()}
    assert table.num_rows == 3 and meta[flip]["review"]["label"] == "flip"
    assert meta[flip]["judge_verdict"]["score"] == pytest.approx(old["score"])  # one schema for every row
    card = client.get(f"/v1/jobs/{job_id}/export", params={"file": "README.md"}, headers=A).text
    assert "`score` = `margin` = 1.0" in card and "metadata.judge_verdict" in card

    # the reviewer is the key's name (another name is refused); the key's later label replaces its earlier one
    r = client.post(f"/v1/jobs/{job_id}/reviews", json={"record_id": flip, "label": "agree", "reviewer": "carol"},
                    headers=A)
    assert r.status_code == 422
    client.post(f"/v1/jobs/{job_id}/reviews", json={"record_id": flip, "label": "agree"}, headers=A)
    again = {row["metadata"]["id"]: row for row in export_rows(client, job_id)}
    assert again[flip]["chosen"] == before[flip]["chosen"] and again[flip]["score"] == 1.0
    assert again[flip]["metadata"]["review"]["reviewer"] == "alice"
    reviews = client.get(f"/v1/jobs/{job_id}/reviews", headers=A).json()
    assert reviews["counts"]["agreement_rate"] == 1.0 and len(reviews["reviews"]) == 3


def judge_verdict_of(row: dict) -> dict:
    """What a reviewed export keeps of the judge's label of an unreviewed row."""
    keys = ("chosen_index", "rejected_index", "p_a", "p_a_orders", "first_shown", "confidence")
    return {"score": row["score"], "margin": row["margin"], "consistent": row["consistent"],
            **{k: row["metadata"][k] for k in keys}}


def test_error_rows_counted_by_kind_and_filtered(roots):
    engine = FakeEngine(responder(truncate="too long"), chooser=judge_preferring("good", 0.9))
    with TestClient(app_for(roots, engine)) as c:
        job_id = submit(c, kind="sft", prompts=["fine", "too long"], phase1={"rounds": 1}, max_tokens=8)
        job = wait(c, job_id)
        assert job["state"] == "completed" and job["errors"] == {"truncated": 1} and job["records"] == 2
        errors = c.get(f"/v1/jobs/{job_id}/records", params={"status": "error"}, headers=A).json()
        assert errors["total"] == 1 and errors["items"][0]["error"]["code"] == "truncated"
        assert c.get(f"/v1/jobs/{job_id}/records", params={"status": "ok"}, headers=A).json()["total"] == 1
        r = c.post(f"/v1/jobs/{job_id}/reviews", json={"record_id": errors["items"][0]["id"], "label": "agree"},
                   headers=A)
        assert r.status_code == 422
        assert len(export_rows(c, job_id)) == 1


def test_cancel_running_and_queued_jobs_then_resume(roots):
    gate = threading.Event()
    engine = FakeEngine(responder(gate, block_on="q2"), chooser=judge_preferring("good", 0.9))
    with TestClient(app_for(roots, engine)) as c:
        running = submit(c, kind="sft", prompts=["q0", "q1", "q2", "q3"], phase1={"rounds": 1}, batch_size=1)
        queued = submit(c, kind="sft", prompts=["other"], phase1={"rounds": 1})
        wait(c, running, check=lambda j: j["progress"]["done"] >= 2)
        assert c.post(f"/v1/jobs/{queued}/cancel", headers=A).json()["state"] == "cancelled"
        job = c.post(f"/v1/jobs/{running}/cancel", headers=A).json()
        assert job["state"] == "running" and job["cancel_requested"]
        gate.set()  # the batch in flight finishes and is kept; the job stops before the next one
        job = wait(c, running)
        assert job["state"] == "cancelled" and job["records"] == 3, job
        rows = c.get(f"/v1/jobs/{running}/records", params={"status": "error"}, headers=A).json()["items"]
        assert [(r["prompt"][0]["content"], r["error"]["code"]) for r in rows] == [("q3", "cancelled")]
        assert c.get(f"/v1/jobs/{running}/export", headers=A).status_code == 409
        assert c.post(f"/v1/jobs/{running}/cancel", headers=A).status_code == 409
        assert c.post(f"/v1/jobs/{running}/resume", headers=A).json()["state"] == "queued"
        job = wait(c, running)
        assert job["state"] == "completed" and job["progress"]["resumed"] == 3
        assert job["summary"]["done_before"] == 3 and job["summary"]["done_now"] == 1
        assert c.get(f"/v1/jobs/{queued}", headers=A).json()["state"] == "cancelled"


def test_restart_resumes_queued_and_running_jobs(roots):
    gate = threading.Event()
    blocking = FakeEngine(responder(gate, block_on="q1"), chooser=judge_preferring("good", 0.9))
    with TestClient(app_for(roots, blocking)) as c:
        first = submit(c, kind="sft", prompts=["q0", "q1", "q2"], phase1={"rounds": 1}, batch_size=1)
        second = submit(c, kind="prefs", prompts=["p0", "p1"], max_tokens=16)
        wait(c, first, check=lambda j: j["progress"]["done"] >= 1)
        threading.Timer(0.3, gate.set).start()  # shut-down waits for the batch in flight
    db = sqlite3.connect(roots / "jobs" / "jobs.sqlite3")
    states = dict(db.execute("SELECT id, state FROM jobs").fetchall())
    assert states == {first: "queued", second: "queued"}
    db.execute("UPDATE jobs SET state = 'running' WHERE id = ?", (first,))  # as if the server had been killed
    db.commit()
    db.close()

    with TestClient(app_for(roots)) as c:  # a new server over the same database and job directories
        job = wait(c, first)
        assert job["state"] == "completed", job
        assert job["summary"]["done_before"] == 2 and job["summary"]["done_now"] == 1
        records = c.get(f"/v1/jobs/{first}/records", headers=A).json()
        assert records["total"] == 3 and len({r["id"] for r in records["items"]}) == 3
        assert wait(c, second)["state"] == "completed"


def test_judge_eval_job(client):
    job_id = submit(client, kind="judge_eval", dataset="hh", baseline=False)
    job = wait(client, job_id)
    assert job["state"] == "completed", job
    assert job["summary"]["cai"]["accuracy"] == 1.0 and job["records"] == 3
    assert {"report.json", "report.md", "predictions.jsonl"} <= set(job["files"])
    items = client.get(f"/v1/jobs/{job_id}/records", headers=A).json()["items"]
    assert len(items) == 3 and items[0]["cai"]["p_a"] is not None
    assert json.loads(client.get(f"/v1/jobs/{job_id}/export", headers=A).text)["n"] == 3


def test_constitutions_engines_datasets(client):
    listed = client.get("/v1/constitutions", headers=A).json()["constitutions"]
    harmless = next(c for c in listed if c["name"] == "harmless")
    assert len(harmless["sha256"]) == 64 and harmless["principles"] > 0
    detail = client.get(f"/v1/constitutions/harmless@{harmless['version']}", headers=A).json()
    assert detail["principles"][0]["comparison_question"]
    assert client.get("/v1/constitutions/harmless@9.9.9", headers=A).status_code == 404
    assert client.get("/v1/constitutions/nope", headers=A).status_code == 404
    assert client.get("/v1/engines", headers=A).json()["engines"] == [
        {"name": "embedded", "backend": "auto", "model": None, "default": True}]
    assert {"questions", "hh", "redteam"} <= set(client.get("/v1/datasets", headers=A).json()["datasets"])
    job_id = submit(client, kind="sft", constitution=f"harmless@{harmless['version']}", prompts=["x"],
                    phase1={"rounds": 1})
    assert wait(client, job_id)["state"] == "completed"
    assert client.get(f"/v1/jobs/{job_id}/constitution", headers=A).json()["name"] == "harmless"


def test_inline_constitution_and_safe_yaml(client, tmp_path):
    text = Path(client.app.state.settings.constitutions_dir / "helpful.yaml").read_text()
    job_id = submit(client, kind="sft", constitution_yaml=text, prompts=["x"], phase1={"rounds": 1})
    assert wait(client, job_id)["state"] == "completed"
    assert client.get(f"/v1/jobs/{job_id}/constitution", headers=A).json()["name"] == "helpful"
    marker = tmp_path / "pwned"
    evil = f'!!python/object/apply:os.system ["touch {marker}"]\n'
    r = client.post("/v1/jobs", json={"kind": "sft", "constitution_yaml": evil, "prompts": ["x"]}, headers=A)
    assert r.status_code == 422 and not marker.exists()
    r = client.post("/v1/jobs", json={"kind": "sft", "constitution_yaml": "name: [", "prompts": ["x"]}, headers=A)
    assert r.status_code == 422 and "invalid YAML" in r.json()["detail"]


# ---------------------------------------------------------------- keys and owners


def _concrete(path: str) -> str:
    return path.replace("{job_id}", "0123456789abcdef").replace("{name:path}", "harmless").replace("{asset}", "app.js")


def test_every_route_needs_a_key_except_the_public_ones(client):
    seen_public = set()
    checked = 0
    for route in client.app.routes:
        assert isinstance(route, Route), route  # no mounts: every path is walked here
        for method in sorted(route.methods - {"HEAD"}):
            url = _concrete(route.path)
            if route.path in PUBLIC_PATHS:
                seen_public.add(route.path)
                assert client.request(method, url, follow_redirects=False).status_code < 400, route.path
                continue
            checked += 1
            for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": f"Basic {ALICE}"},
                            {"Authorization": f"Bearer {ALICE[:-1]}"}):
                r = client.request(method, url, headers=headers, json={} if method == "POST" else None)
                assert r.status_code == 401, (method, route.path, headers, r.status_code)
                assert r.headers["www-authenticate"] == "Bearer"
    assert checked >= 14 and seen_public == PUBLIC_PATHS
    assert client.get("/healthz").json() == {"status": "ok"}
    ui = client.get("/ui")
    assert "cai review" in ui.text and "default-src 'self'" in ui.headers["content-security-policy"]
    assert client.get("/ui/secret.txt").status_code == 404


def test_another_keys_job_is_404(client):
    job_id = submit(client, kind="prefs", prompts=["a", "b"], max_tokens=16)
    wait(client, job_id)
    item = client.get(f"/v1/jobs/{job_id}/records", headers=A).json()["items"][0]
    for method, path, body in [("GET", "", None), ("GET", "/records", None), ("GET", "/export", None),
                               ("POST", "/cancel", None), ("POST", "/resume", None), ("GET", "/reviews", None),
                               ("GET", "/constitution", None),
                               ("POST", "/reviews", {"record_id": item["id"], "label": "flip"})]:
        r = client.request(method, f"/v1/jobs/{job_id}{path}", headers=B, json=body)
        assert r.status_code == 404, (method, path, r.status_code)
    assert client.get("/v1/jobs", headers=B).json()["jobs"] == []
    assert client.get(f"/v1/jobs/{job_id}/reviews", headers=A).json()["reviews"] == []
    assert client.get("/v1/jobs/not-a-job-id", headers=A).status_code == 400


def test_keys_hashed_file_env_and_constant_time(roots, monkeypatch):
    import hmac

    from serve import auth
    from serve.keys import create_key, list_keys, main

    keys = roots / "made-keys.txt"
    key = create_key("carol", keys)
    assert key not in keys.read_text() and (keys.stat().st_mode & 0o777) == 0o600
    assert main(["create", "dave", "--file", str(keys)]) == 0 and list_keys(keys) == ["carol", "dave"]
    store = auth.KeyStore(keys, f"erin:{'e' * 20}")
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    assert store.authenticate(key) == "carol" and len(calls) == 3  # every entry compared, match or not
    assert store.authenticate("e" * 20) == "erin" and store.authenticate("nope") is None
    with pytest.raises(ValueError, match="shorter"):
        auth.KeyStore(None, "frank:short")


def test_cli_serve_binds_loopback_and_refuses_without_keys(roots, monkeypatch):
    import typer
    import uvicorn
    from typer.testing import CliRunner

    from cai.cli.serve import keys_app, serve

    app = typer.Typer()
    app.command()(serve)
    runner = CliRunner()
    monkeypatch.delenv("CAI_API_KEYS", raising=False)
    result = runner.invoke(app, ["--keys-file", str(roots / "none.txt"), "--jobs-root", str(roots / "j")])
    assert result.exit_code == 2 and "no API keys" in result.output
    made = runner.invoke(keys_app, ["create", "gina", "--file", str(roots / "k.txt")])
    assert made.exit_code == 0 and made.stdout.strip().startswith("cai-")
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw, app=app))
    result = runner.invoke(app, ["--keys-file", str(roots / "k.txt"), "--jobs-root", str(roots / "j"),
                                 "--data-root", str(roots / "data")])
    assert result.exit_code == 0, result.output
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8000
    assert seen["app"].state.settings.workers == 1
    config = roots / "serve.yaml"
    config.write_text(f"jobs_root: {roots / 'j2'}\nworkers: 2\nlimits: {{max_rows: 7}}\n"
                      "engines: {small: {backend: transformers}}\ndefault_engine: small\n")
    result = runner.invoke(app, ["--config", str(config), "--keys-file", str(roots / "k.txt"), "--port", "8765"])
    assert result.exit_code == 0, result.output
    settings = seen["app"].state.settings
    assert (settings.workers, settings.limits.max_rows, seen["port"]) == (2, 7, 8765)
    assert settings.engines["small"].backend == "transformers"


# ---------------------------------------------------------------- limits


def test_size_limits_413(roots):
    with TestClient(app_for(roots, max_body_bytes=4096, max_prompt_chars=100, max_constitution_bytes=200)) as c:
        r = c.post("/v1/jobs", content=b'{"kind": "sft", "prompts": ["' + b"x" * 5000 + b'"]}',
                   headers={**A, "Content-Type": "application/json"})
        assert r.status_code == 413
        r = c.post("/v1/jobs", json={"kind": "sft", "prompts": ["x" * 101]}, headers=A)
        assert r.status_code == 413 and "prompts[0]" in r.json()["detail"]
        r = c.post("/v1/jobs", json={"kind": "sft", "prompts": [{"messages": [{"role": "user", "content": "y" * 101}]}]},
                   headers=A)
        assert r.status_code == 413
        r = c.post("/v1/jobs", json={"kind": "sft", "prompts": ["x"], "constitution_yaml": "#" * 300}, headers=A)
        assert r.status_code == 413
        r = c.post("/v1/jobs", json={"kind": "prefs", "prompts": ["x"], "phase2": {"system_prompt": "s" * 101}},
                   headers=A)
        assert r.status_code == 413 and "system_prompt" in r.json()["detail"]

        def chunks():
            for _ in range(10):
                yield b"x" * 1000

        assert c.post("/v1/jobs", content=chunks(), headers=A).status_code == 413  # streamed, no length


@pytest.mark.parametrize("body, needle", [
    ({"kind": "sft", "prompts": ["x"], "max_tokens": 5000}, "max_tokens"),
    ({"kind": "sft", "prompts": ["x"], "phase1": {"answer": {"max_tokens": 5000}}}, "phase1.answer.max_tokens"),
    ({"kind": "sft", "prompts": ["x"], "phase1": {"rounds": 9}}, "rounds"),
    ({"kind": "prefs", "prompts": ["x"], "phase2": {"samples": 50}}, "samples"),
    ({"kind": "prefs", "prompts": ["x"], "phase2": {"judge": {"mode": "cot", "cot_max_tokens": 9000}}}, "cot_max"),
    ({"kind": "sft", "prompts": ["x"], "limit": 21}, "limit"),
    ({"kind": "sft", "prompts": ["x"] * 21}, "number of prompts"),
    ({"kind": "sft", "dataset": "big"}, "pass limit"),
    ({"kind": "sft", "prompts": ["x"], "batch_size": 100000}, "batch_size"),
    ({"kind": "sft", "prompts": ["x"], "engine": "gpt-9"}, "not offered"),
    ({"kind": "sft", "prompts": ["x"], "trust_remote_code": True}, "trust_remote_code"),
    ({"kind": "sft", "prompts": ["x"], "engine": {"backend": "transformers", "options": {"trust_remote_code": True}}},
     "engine"),
    ({"kind": "sft", "prompts": ["x"], "phase1": {"trust_remote_code": True}}, "trust_remote_code"),
    ({"kind": "sft", "prompts": ["x"], "out": "/tmp/elsewhere"}, "out"),
    ({"kind": "sft", "prompts": ["x"], "phase2": {"samples": 2}}, "do not apply"),
    ({"kind": "sft"}, "exactly one"),
])
def test_caps_422(client, body, needle):
    r = client.post("/v1/jobs", json=body, headers=A)
    assert r.status_code == 422, r.text
    assert needle in json.dumps(r.json()["detail"])


def test_big_dataset_allowed_with_a_limit_and_page_cap(client):
    job_id = submit(client, kind="sft", dataset="big", limit=2, phase1={"rounds": 1})
    assert wait(client, job_id)["records"] == 2
    assert client.get(f"/v1/jobs/{job_id}/records", params={"limit": 201}, headers=A).status_code == 422


def test_active_jobs_per_key_429(roots):
    gate = threading.Event()
    engine = FakeEngine(responder(gate, block_on="slow"), chooser=judge_preferring("good", 0.9))
    with TestClient(app_for(roots, engine, max_active_jobs=2)) as c:
        first = submit(c, kind="sft", prompts=["slow"], phase1={"rounds": 1})
        submit(c, kind="sft", prompts=["two"], phase1={"rounds": 1})
        r = c.post("/v1/jobs", json={"kind": "sft", "prompts": ["three"]}, headers=A)
        assert r.status_code == 429
        submit(c, headers=B, kind="sft", prompts=["bob's"], phase1={"rounds": 1})  # per key
        gate.set()
        wait(c, first)
    assert len(list((roots / "jobs").glob("*/input"))) == 3  # the refused job left no directory behind


# ---------------------------------------------------------------- paths


@pytest.mark.parametrize("dataset", ["../outside/secret", "..", "%2e%2e/outside/secret", "%252e%252e%252fsecret",
                                     "..%2foutside%2fsecret", "/etc/passwd", "~/secret", "data/../../outside/secret",
                                     "leak", "leak.jsonl", "C:\\secret", "./questions"])
def test_dataset_traversal_400(client, dataset):
    r = client.post("/v1/jobs", json={"kind": "sft", "dataset": dataset}, headers=A)
    assert r.status_code == 400, (dataset, r.text)


@pytest.mark.parametrize("name", ["../../etc/passwd", "%2e%2e", "harmless/../../x", "/etc/passwd", "HARM LESS"])
def test_constitution_name_traversal_400(client, name):
    r = client.post("/v1/jobs", json={"kind": "sft", "constitution": name, "prompts": ["x"]}, headers=A)
    assert r.status_code == 400, (name, r.text)


@pytest.mark.parametrize("url", ["/v1/constitutions/..%2F..%2Fetc%2Fpasswd", "/v1/constitutions/%2e%2e",
                                 "/v1/constitutions/%252e%252e%252fetc", "/v1/constitutions/..%5c..%5cx",
                                 "/v1/constitutions/%2Fetc%2Fpasswd"])
def test_constitution_route_traversal_400(client, url):
    assert client.get(url, headers=A).status_code == 400, url


def test_constitution_symlink_out_of_root_400(roots):
    folder = roots / "constitutions"
    folder.mkdir()
    (roots / "outside" / "evil.yaml").write_text((CONSTITUTIONS / "harmless.yaml").read_text())
    (folder / "evil.yaml").symlink_to(roots / "outside" / "evil.yaml")
    s = settings(roots).model_copy(update={"constitutions_dir": folder})
    with TestClient(create_app(s, engine_factory=lambda spec: FakeEngine())) as c:
        assert c.get("/v1/constitutions", headers=A).json()["constitutions"] == []
        assert c.get("/v1/constitutions/evil", headers=A).status_code == 400
        r = c.post("/v1/jobs", json={"kind": "sft", "constitution": "evil", "prompts": ["x"]}, headers=A)
        assert r.status_code == 400


@pytest.mark.parametrize("file", ["../manifest.json", "%2e%2e%2fmanifest.json", "/etc/passwd", "shards/sft-000000.jsonl",
                                  "..", "input/../../x"])
def test_export_file_traversal_400(client, file):
    job_id = submit(client, kind="sft", prompts=["x"], phase1={"rounds": 1})
    wait(client, job_id)
    r = client.get(f"/v1/jobs/{job_id}/export", params={"file": file}, headers=A)
    expected = 404 if file.startswith("shards/") else 400  # a plain name that is not an export: 404
    assert r.status_code == expected, (file, r.text)
