"""Human reviews end to end: a prefs job reviewed in cai serve (agree, flip, discard), exported
through the API, then prepared for `cai train rm` and `cai train dpo`. A reviewed pair must reach
the trainers as a confident label (chosen per the reviewer, score = margin = 1.0), with the
judge's verdict kept in `metadata.judge_verdict`."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from serve_helpers import A, app_for, export_rows, submit, wait  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from cai.cli.train import app as train_app  # noqa: E402
from cai.train import load_data  # noqa: E402
from cai.train.dpo import prepare_dpo_data  # noqa: E402
from cai.train.reward import prepare_pairs  # noqa: E402


@pytest.fixture
def reviewed(roots: Path, tmp_path: Path) -> dict:
    """A 4-pair prefs job: one flipped, one discarded, one agreed, one not reviewed; its exports on disk."""
    with TestClient(app_for(roots)) as c:
        job_id = submit(c, kind="prefs", dataset="questions", phase2={"samples": 2}, max_tokens=32)
        assert wait(c, job_id)["state"] == "completed"
        judged = {row["metadata"]["id"]: row for row in export_rows(c, job_id)}
        flip, drop, agree, plain = sorted(judged)
        for rid, label in ((flip, "flip"), (drop, "discard"), (agree, "agree")):
            r = c.post(f"/v1/jobs/{job_id}/reviews", json={"record_id": rid, "label": label, "note": "n"}, headers=A)
            assert r.status_code == 201, r.text
        files = {}
        for name in ("prefs.jsonl", "prefs.parquet"):
            r = c.get(f"/v1/jobs/{job_id}/export", params={"file": name}, headers=A)
            assert r.status_code == 200, r.text
            files[name] = tmp_path / "export" / name
            files[name].parent.mkdir(exist_ok=True)
            files[name].write_bytes(r.content)
    rows = [json.loads(line) for line in files["prefs.jsonl"].read_text().splitlines()]
    return dict(judged=judged, rows=rows, files=files, flip=flip, drop=drop, agree=agree, plain=plain)


def test_reviewed_export_rows_are_confident_human_labels(reviewed):
    judged, rows = reviewed["judged"], {r["metadata"]["id"]: r for r in reviewed["rows"]}
    assert set(rows) == {reviewed["flip"], reviewed["agree"], reviewed["plain"]}  # discard dropped
    before, after = judged[reviewed["flip"]], rows[reviewed["flip"]]
    assert before["score"] > 0.5  # the judge preferred the other answer
    assert after["chosen"] == before["rejected"] and after["rejected"] == before["chosen"]
    assert (after["score"], after["margin"]) == (1.0, 1.0)
    meta = after["metadata"]
    assert meta["label_source"] == "human" and meta["confidence"] == 1.0
    assert meta["review"]["label"] == "flip" and meta["review"]["reviewer"] == "alice" and meta["review"]["note"] == "n"
    assert (meta["chosen_index"], meta["rejected_index"]) == (before["metadata"]["rejected_index"],
                                                              before["metadata"]["chosen_index"])
    verdict = meta["judge_verdict"]
    assert verdict["score"] == before["score"] and verdict["margin"] == before["margin"]
    assert verdict["chosen_index"] == before["metadata"]["chosen_index"] and verdict["p_a"] == before["metadata"]["p_a"]
    agreed = rows[reviewed["agree"]]
    assert agreed["chosen"] == judged[reviewed["agree"]]["chosen"] and (agreed["score"], agreed["margin"]) == (1.0, 1.0)
    plain = rows[reviewed["plain"]]
    assert plain["score"] == judged[reviewed["plain"]]["score"] and plain["metadata"]["label_source"] == "judge"


@pytest.mark.parametrize("name", ["prefs.jsonl", "prefs.parquet"])
def test_rm_pairs_from_the_reviewed_export(reviewed, name):
    """`cai train rm`'s data: the flipped pair keeps the reviewer's chosen answer and asks for a full margin."""
    path = reviewed["files"][name]
    ids = [m["id"] for m in load_data(path)["metadata"]]
    pairs = prepare_pairs(path, margin_scale=1.0)
    assert set(pairs.column_names) == {"prompt", "chosen", "rejected", "margin"}
    by_id = dict(zip(ids, pairs))
    flip = by_id[reviewed["flip"]]
    assert flip["chosen"] == reviewed["judged"][reviewed["flip"]]["rejected"] and flip["margin"] == 1.0
    assert by_id[reviewed["agree"]]["margin"] == 1.0
    assert by_id[reviewed["plain"]]["margin"] == pytest.approx(reviewed["judged"][reviewed["plain"]]["margin"])
    assert min(pairs["margin"]) >= 0.0
    assert prepare_pairs(path, margin_scale=2.0)["margin"][ids.index(reviewed["flip"])] == 2.0


def test_dpo_data_from_the_reviewed_export(reviewed):
    """`cai train dpo`'s data: reviewed pairs count as noise-free in the soft label."""
    path = reviewed["files"]["prefs.jsonl"]
    ids = [m["id"] for m in load_data(path)["metadata"]]
    dataset, extra, human = prepare_dpo_data(path, "smoothing")
    assert human == 2 and set(dataset.column_names) == {"prompt", "chosen", "rejected"}
    assert dataset[ids.index(reviewed["flip"])]["chosen"] == reviewed["judged"][reviewed["flip"]]["rejected"]
    plain_score = reviewed["judged"][reviewed["plain"]]["score"]
    assert extra == {"loss_type": ["robust"], "label_smoothing": pytest.approx((1 - plain_score) / 3)}
    plain, none, _ = prepare_dpo_data(path)
    assert none == {} and plain["chosen"] == dataset["chosen"]


def test_cli_rm_and_dpo_train_on_the_reviewed_export(reviewed, tiny_chat_model, tmp_path):
    """One step of each trainer on a tiny model, through the CLI: metrics count the human labels."""
    data = str(reviewed["files"]["prefs.jsonl"])
    common = ["--data", data, "--model", str(tiny_chat_model), "--max-steps", "1", "--batch-size", "3",
              "--trl", "save_strategy=no"]
    runs = {"rm": ["--eval-fraction", "0"], "dpo": ["--soft-label", "smoothing"]}
    for command, extra in runs.items():
        out = tmp_path / command
        result = CliRunner().invoke(train_app, [command, *common, "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["human_labels"] == 2 and metrics["global_step"] == 1
    plain_score = reviewed["judged"][reviewed["plain"]]["score"]
    assert metrics["label_smoothing"] == pytest.approx((1 - plain_score) / 3)
