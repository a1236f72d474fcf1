"""The service runs a phase-2 job whose judge is another model with one engine resident at a time."""

from __future__ import annotations

import time
from pathlib import Path

from fakes import LoggedEngine, alternating_sampler, judge_preferring
from fastapi.testclient import TestClient
from helpers import write_prompts

from cai.recipe import EngineSpec
from serve.app import Limits, Settings, create_app

KEY = "k-" + "a" * 40


def test_prefs_job_with_a_judge_profile_closes_the_policy_before_the_judge_starts(tmp_path: Path):
    (tmp_path / "keys.txt").write_text(f"alice:{KEY}\n")
    (tmp_path / "data").mkdir()
    write_prompts(tmp_path / "data" / "q.jsonl", [f"q{i}" for i in range(3)])
    settings = Settings(
        jobs_root=tmp_path / "jobs", data_root=tmp_path / "data", keys_file=tmp_path / "keys.txt",
        keys_from_env=False, limits=Limits(max_rows=20), shutdown_grace_s=5, default_engine="policy",
        engines={"policy": EngineSpec(backend="openai", model="policy-7b"),
                 "judge": EngineSpec(backend="openai", model="judge-70b")})
    log: list[str] = []

    def factory(spec: EngineSpec):
        if spec.model == "policy-7b":
            return LoggedEngine("policy-7b", log, responder=alternating_sampler())
        return LoggedEngine("judge-70b", log, chooser=judge_preferring("good"))

    auth = {"Authorization": f"Bearer {KEY}"}
    with TestClient(create_app(settings, engine_factory=factory)) as client:
        r = client.post("/v1/jobs", json={"kind": "prefs", "dataset": "q.jsonl", "engine": "policy",
                                          "judge_engine": "judge"}, headers=auth)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 30
        while (job := client.get(f"/v1/jobs/{job_id}", headers=auth).json())["state"] not in ("completed", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert job["state"] == "completed", job
    starts = [e for e in log if e.startswith(("start", "close"))]
    assert starts[:3] == ["start policy-7b", "close policy-7b", "start judge-70b"]
    assert log.index("close policy-7b") < log.index("score judge-70b")
