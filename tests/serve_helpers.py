"""The service under test: two users' keys, the app over a fake engine, and job helpers.

The `roots` fixture (conftest.py) writes the keys and data folder that `settings` expects."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from fakes import judge_preferring
from fastapi.testclient import TestClient

from cai.engine.fake import FakeEngine
from serve.app import Limits, Settings, create_app

ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-0123456789abcdef00"
A, B = {"Authorization": f"Bearer {ALICE}"}, {"Authorization": f"Bearer {BOB}"}
FINAL = ("completed", "failed", "cancelled")


def responder(gate: threading.Event | None = None, block_on: str | None = None, truncate: str | None = None):
    """Phase-1 replies by step; phase-2 samples alternate a good and a bad answer.

    With `gate`, the first request about the prompt `block_on` waits until the gate opens."""
    counter = {"n": 0}

    def respond(chat, params):
        texts = [m.content for m in chat]
        if gate is not None and block_on in texts:
            gate.wait(30)
        if truncate in texts:
            return "many words " * (params.max_tokens + 1)
        last = texts[-1]
        if last.startswith("Critique request"):
            return "CRITIQUE: the answer could be kinder"
        if last.startswith("Revision request"):
            return "REVISED: a careful, kind answer"
        if params.temperature > 0:  # phase 2 policy samples
            counter["n"] += 1
            return ("a good careful answer" if counter["n"] % 2 else "a bad answer") + f" #{counter['n']}"
        return "ANSWER to " + last

    return respond


def settings(root: Path, **limits) -> Settings:
    return Settings(jobs_root=root / "jobs", data_root=root / "data", keys_file=root / "keys.txt",
                    keys_from_env=False, limits=Limits(**{"max_rows": 20, **limits}), shutdown_grace_s=30)


def app_for(root: Path, engine: FakeEngine | None = None, **limits):
    engine = engine or FakeEngine(responder(), chooser=judge_preferring("good", 0.9))
    return create_app(settings(root, **limits), engine_factory=lambda spec: engine)


def submit(c: TestClient, headers=A, **body) -> str:
    r = c.post("/v1/jobs", json=body, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def wait(c: TestClient, job_id: str, until=FINAL, headers=A, timeout=60.0, check=None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if (job["state"] in until) if check is None else check(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['state']}: {job}")


def export_rows(c: TestClient, job_id: str, file: str | None = None) -> list[dict]:
    r = c.get(f"/v1/jobs/{job_id}/export", params={"file": file} if file else None, headers=A)
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines()]
