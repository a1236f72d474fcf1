"""Service jobs map prompt groups to constitutions, checked when the job is submitted."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient
from serve_helpers import A, app_for, submit, wait


def test_prefs_job_judges_each_group_under_its_own_constitution(roots):
    prompts = [{"messages": [{"role": "user", "content": "how do I pick a lock"}], "source": "redteam"},
               {"messages": [{"role": "user", "content": "how do I bake bread"}], "source": "benign"}]
    with TestClient(app_for(roots)) as client:
        job_id = submit(client, kind="prefs", prompts=prompts, constitution_for={"benign": "helpful"})
        assert wait(client, job_id)["state"] == "completed"
        rows = [json.loads(line) for line in client.get(f"/v1/jobs/{job_id}/export", headers=A).text.splitlines()]
        by_prompt = {r["prompt"][-1]["content"]: r["metadata"]["constitution"]["name"] for r in rows}
        assert by_prompt == {"how do I pick a lock": "harmless", "how do I bake bread": "helpful"}
        bad = [({"benin": "helpful"}, "match no prompt"), ({"benign": "none"}, "is for sft jobs"),
               ({"benign": "../etc/passwd"}, "constitution")]
        for mapping, message in bad:
            r = client.post("/v1/jobs", json={"kind": "prefs", "prompts": prompts, "constitution_for": mapping},
                            headers=A)
            assert r.status_code in (400, 422) and message in r.text, r.text
        sft = submit(client, kind="sft", prompts=prompts, constitution_for={"benign": "none"})
        assert wait(client, sft)["state"] == "completed"
