"""The job-kind registry: every kind is one entry, and the places that used to dispatch on a kind's
name (retry-errors, the service's worker, requests and routes, the CLI) look it up."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from fakes import alternating_sampler, judge_preferring
from helpers import HARMLESS, write_jsonl, write_prompts

from cai.engine.fake import FakeEngine
from cai.jobdir import JobSummary
from cai.kinds import (
    KINDS,
    UnknownKind,
    canonical,
    kind,
    kind_of_job,
    open_store,
    retry_errors,
)
from cai.recipe import Phase1Config


def test_the_registry_lists_every_kind_once_spelled_one_way():
    assert list(KINDS) == ["sft", "prefs", "judge-eval"]
    assert kind("judge_eval") is kind("judge-eval") and canonical("judge_eval") == "judge-eval"
    assert canonical("something-else") == "something-else"
    with pytest.raises(UnknownKind, match="kinds: sft, prefs, judge-eval"):
        kind("nope")
    for k in KINDS.values():
        assert k.result_stage in k.record_models and k.record_model is k.record_models[k.result_stage]
        assert k.dataset == k.export_files[0] and k.retry_codes
        assert {"out", "new_job", "batch_size", *k.engine_fields} <= set(k.job_model.model_fields)


def test_dispatch_sites_cover_every_kind():
    from cai.cli.summaries import SUMMARY_PRINTERS
    from serve.protocol import JobRequest, JobStatus
    from serve.resolve import ENGINE_FIELDS, REQUEST_KINDS

    assert set(REQUEST_KINDS) == set(KINDS) and set(SUMMARY_PRINTERS) <= set(KINDS)
    assert set(ENGINE_FIELDS) == {f for k in KINDS.values() for f in k.engine_fields}
    for name in [*KINDS, "judge_eval"]:  # the service's older spelling is still accepted, and read as cai's
        assert JobRequest(kind=name).kind == canonical(name)
    assert JobStatus.model_fields["kind"].annotation is JobRequest.model_fields["kind"].annotation


def test_the_service_database_reads_older_kind_names_as_cai_spells_them(tmp_path):
    from serve.jobs import SCHEMA, JobDB

    path = tmp_path / "jobs.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA)
        db.execute("INSERT INTO jobs (id, owner, kind, state, request, recipe, dir, created_at) VALUES "
                   "('j1', 'alice', 'judge_eval', 'completed', '{}', '{}', '/x', 'now')")
    assert JobDB(path).get("j1")["kind"] == "judge-eval"


def _jobs(tmp_path: Path) -> dict[str, object]:
    prompts = tmp_path / "p.jsonl"
    write_prompts(prompts, [f"question {i}" for i in range(3)])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: good {i}",
                                                    "rejected": f"\n\nHuman: q{i}\n\nAssistant: bad {i}"}
                                                   for i in range(3)])
    common = dict(constitution=HARMLESS, prompts=str(prompts), parquet=False)
    return {
        "sft": KINDS["sft"].job_model(out=str(tmp_path / "sft"), phase1=Phase1Config(rounds=1), **common),
        "prefs": KINDS["prefs"].job_model(out=str(tmp_path / "prefs"), **common),
        "judge-eval": KINDS["judge-eval"].job_model(data=str(pairs), out=str(tmp_path / "judge-eval")),
    }


@pytest.mark.parametrize("name", list(KINDS))
def test_each_kind_runs_and_retries_through_the_registry(tmp_path, name):
    job = _jobs(tmp_path)[name]
    found = kind_of_job(job)
    assert found.name == name
    engine = FakeEngine(alternating_sampler(), chooser=judge_preferring("good", 0.9))
    engines = dict.fromkeys(found.engine_args, engine)
    first = found.run(job, **engines)
    assert isinstance(first, JobSummary) and first.kind == name and first.done_now > 0
    assert [Path(f).name for f in first.files if Path(f).name in found.export_files]
    redone, again = retry_errors(job.out, **engines)
    assert redone == {} and again.kind == name and (again.done_before, again.done_now) == (first.done_now, 0)
    assert open_store(job.out)[0] is found
    assert json.loads(json.dumps(again.flat()))["kind"] == name
