"""serve.review_stats: the review sample (random / stratified by principle and judge-confidence tertile)
and reviewer-judge agreement per principle, as functions and through the API (no browser)."""

from __future__ import annotations

import math
import random
import re
from collections import Counter

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient
from serve_helpers import A, app_for, responder, submit, wait

from cai.engine.fake import FakeEngine
from cai.evaluate import wilson
from serve.review_stats import Candidate, allocate, confidence_bin, draw, tertile_cuts


def graded_judge(chat, options, prefix):
    """P(good answer) grows with the prompt's number (q0 ... q29): confidences spread over the job."""
    text = chat[-1].content
    number = int(re.search(r"\bq(\d+)\b", text).group(1))
    p = 0.52 + 0.46 * (number % 10) / 9
    first, second = text.index("(A)\n"), text.index("(B)\n")
    good_first = "good" in text[first:second]
    return {"A": math.log(p if good_first else 1 - p), "B": math.log(1 - p if good_first else p)}


@pytest.fixture
def client(roots):
    engine = FakeEngine(responder(truncate="q7"), chooser=graded_judge)
    with TestClient(app_for(roots, engine, max_rows=40)) as c:
        yield c


def records(c, job_id, **params):
    r = c.get(f"/v1/jobs/{job_id}/records", params=params, headers=A)
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------- the functions


def test_allocate_gives_each_stratum_one_then_shares_in_proportion():
    assert allocate([10, 5, 1], 16) == [10, 5, 1] and allocate([10, 5, 1], 99) == [10, 5, 1]
    assert allocate([10, 5, 1], 8) == [4, 3, 1]  # one each, then 5 seats over 9:4:0 (3.46, 1.54 -> 3, 2)
    assert allocate([10, 5, 1], 2) == [1, 1, 0]  # fewer seats than strata: proportional only (1.25, .63, .13)
    rng = random.Random(0)
    for _ in range(300):
        sizes = [rng.randint(1, 30) for _ in range(rng.randint(1, 8))]
        n = rng.randint(1, 120)
        got = allocate(sizes, n)
        assert sum(got) == min(n, sum(sizes)) and all(0 <= g <= s for g, s in zip(got, sizes))
        if n >= len(sizes):
            assert all(g >= 1 for g in got)


def test_tertile_bins():
    cuts = tertile_cuts([float(x) for x in range(9)])
    assert cuts == [3.0, 6.0]
    assert [confidence_bin(float(x), cuts) for x in range(9)] == ["low"] * 3 + ["mid"] * 3 + ["high"] * 3
    assert confidence_bin(None, cuts) == "n/a" and tertile_cuts([]) == [] and confidence_bin(0.5, []) == "n/a"


def test_stratified_draw_covers_rare_strata_and_is_seeded():
    # 90 rows of principle "common" with spread confidences, 3 rows of "rare"
    candidates = [Candidate("common", i / 90) for i in range(90)] + [Candidate("rare", 0.5)] * 3
    for seed in range(20):
        chosen, info = draw(candidates, 10, "stratified", seed)
        assert len(set(chosen)) == 10 and any(candidates[i].principle == "rare" for i in chosen)
        assert sum(s.drawn for s in info.strata) == 10 and sum(s.population for s in info.strata) == 93
        assert {(s.principle, s.confidence) for s in info.strata} >= {("common", "low"), ("common", "mid"),
                                                                      ("common", "high")}
        assert all(s.drawn >= 1 for s in info.strata)
    assert draw(candidates, 10, "stratified", 5)[0] == draw(candidates, 10, "stratified", 5)[0]
    assert draw(candidates, 10, "stratified", 5)[0] != draw(candidates, 10, "stratified", 6)[0]
    chosen, info = draw(candidates, 10, "random", 1)
    assert chosen == draw(candidates, 10, "random", 1)[0] and len(set(chosen)) == 10 and info.drawn == 10
    assert draw(candidates, 500, "stratified", 0)[1].drawn == 93  # all there is


# ---------------------------------------------------------------- through the API


def test_sample_endpoint_is_seeded_stratified_capped_and_skips_error_rows(client):
    job_id = submit(client, kind="prefs", dataset="big", phase2={"samples": 2}, max_tokens=32)
    job = wait(client, job_id)
    assert job["state"] == "completed" and job["records"] == 30, job
    pool = records(client, job_id, status="ok", limit=30)
    ok_ids = {r["id"] for r in pool["items"]}
    assert len(ok_ids) == pool["total"]
    principles = Counter(r["judgement"]["principle_id"] for r in pool["items"])

    first = records(client, job_id, sample=12, strategy="stratified", seed=3)
    again = records(client, job_id, sample=12, strategy="stratified", seed=3)
    other = records(client, job_id, sample=12, strategy="stratified", seed=4)
    ids = [r["id"] for r in first["items"]]
    assert ids == [r["id"] for r in again["items"]] and ids != [r["id"] for r in other["items"]]
    assert len(set(ids)) == 12 and set(ids) <= ok_ids and first["total"] == len(ok_ids)
    info = first["sample"]
    assert info["strategy"] == "stratified" and info["drawn"] == 12 and info["population"] == len(ok_ids)
    assert len(info["confidence_cuts"]) == 2 and info["confidence_cuts"][0] < info["confidence_cuts"][1]
    strata = {(s["principle"], s["confidence"]): s for s in info["strata"]}
    assert {p for p, _ in strata} == set(principles)
    assert {b for _, b in strata} == {"low", "mid", "high"}
    assert sum(s["drawn"] for s in info["strata"]) == 12
    drawn = Counter(r["judgement"]["principle_id"] for r in first["items"])
    assert all(drawn[p] == sum(s["drawn"] for (q, _), s in strata.items() if q == p) for p in principles)
    assert all("review" in r and "exported" in r for r in first["items"])

    rand = records(client, job_id, sample=5, strategy="random", seed=9)
    assert len(rand["items"]) == 5 and rand["sample"]["strategy"] == "random"
    assert {r["id"] for r in rand["items"]} <= ok_ids
    some = next(iter(principles))
    assert records(client, job_id, sample=50, principle=some)["total"] == principles[some]

    for params, status, needle in (({"sample": 201}, 422, "page limit of 200"), ({"sample": 0}, 422, "sample"),
                                   ({"sample": 3, "status": "error"}, 422, "error rows are not reviewed"),
                                   ({"sample": 3, "strategy": "first"}, 422, "strategy"),
                                   ({"sample": 3, "seed": -1}, 422, "seed")):
        r = client.get(f"/v1/jobs/{job_id}/records", params=params, headers=A)
        assert r.status_code == status and needle in r.text, (params, r.text)


def test_sft_sample_draws_no_error_row_and_has_no_confidence(client):
    job_id = submit(client, kind="sft", prompts=[f"q{i}" for i in range(8)], phase1={"rounds": 1}, max_tokens=8)
    job = wait(client, job_id)
    assert job["state"] == "completed" and job["errors"] == {"truncated": 1}, job
    sample = records(client, job_id, sample=8, seed=1)
    assert len(sample["items"]) == 7 and all(r["error"] is None for r in sample["items"])
    assert {s["confidence"] for s in sample["sample"]["strata"]} == {"n/a"}
    assert client.get(f"/v1/jobs/{job_id}/agreement", headers=A).status_code == 422


def test_agreement_per_principle_counts_the_review_in_force_with_wilson_intervals(client):
    job_id = submit(client, kind="prefs", dataset="big", limit=12, phase2={"samples": 2}, max_tokens=32)
    assert wait(client, job_id)["state"] == "completed"
    items = records(client, job_id, status="ok", limit=30)["items"]
    empty = client.get(f"/v1/jobs/{job_id}/agreement", headers=A).json()
    assert empty["overall"] == {"principle": None, "agree": 0, "flip": 0, "n": 0, "rate": None, "ci": None}
    assert empty["principles"] == [] and empty["discarded"] == 0

    labels = ["agree", "flip", "agree", "discard", "agree", "agree", "flip", "agree"]
    for record, label in zip(items, labels):
        r = client.post(f"/v1/jobs/{job_id}/reviews", json={"record_id": record["id"], "label": label}, headers=A)
        assert r.status_code == 201, r.text
    # a changed mind: the later label is the one counted
    client.post(f"/v1/jobs/{job_id}/reviews", json={"record_id": items[0]["id"], "label": "flip"}, headers=A)
    labels[0] = "flip"

    expected: dict[str, Counter] = {}
    for record, label in zip(items, labels):
        expected.setdefault(record["judgement"]["principle_id"], Counter())[label] += 1
    got = client.get(f"/v1/jobs/{job_id}/agreement", headers=A).json()
    assert got["discarded"] == 1
    judged = sorted(p for p, c in expected.items() if c["agree"] + c["flip"])
    assert [a["principle"] for a in got["principles"]] == judged
    for row in got["principles"]:
        c = expected[row["principle"]]
        n = c["agree"] + c["flip"]
        assert (row["agree"], row["flip"], row["n"]) == (c["agree"], c["flip"], n)
        assert row["rate"] == pytest.approx(c["agree"] / n)
        assert row["ci"] == wilson(c["agree"], n).model_dump()
        assert row["ci"]["low"] <= row["rate"] <= row["ci"]["high"]
    overall = got["overall"]
    assert (overall["agree"], overall["flip"], overall["n"]) == (4, 3, 7)
    assert overall["ci"] == wilson(4, 7).model_dump() and overall["rate"] == pytest.approx(4 / 7)
