"""Job directory hardening: the manifest under the lock, corrupt shards named and repaired,
an empty job re-planned (hardening issue items 4, 7, 8)."""

from __future__ import annotations

import fcntl
import json
import os
import re
from pathlib import Path

import pytest
from fastapi import HTTPException
from helpers import HARMLESS, write_prompts
from pydantic import BaseModel
from typer.testing import CliRunner

import cai.store as store_module
from cai.cli import app
from cai.engine.fake import FakeEngine
from cai.kinds import open_store, retry_errors
from cai.pipeline import generate_sft
from cai.recipe import Phase1Config, SFTJob
from cai.records import ErrorInfo
from cai.store import CorruptShard, JobError, JobStore, Manifest, batch_id
from serve.results import page


def _manifest(fp: str) -> Manifest:
    return Manifest(stage="sft", fingerprint=fp, fingerprint_inputs={"model": fp}, recipe={})


def _prompts(tmp_path: Path, n: int = 6) -> Path:
    return write_prompts(tmp_path / "p.jsonl", [f"question number {i}" for i in range(n)])


def _job(tmp_path: Path, rounds: int = 1, **kw) -> SFTJob:
    prompts = kw.pop("prompts", None) or _prompts(tmp_path)
    return SFTJob(constitution=HARMLESS, prompts=str(prompts),
                  out=str(tmp_path / "job"), batch_size=2, parquet=False, phase1=Phase1Config(rounds=rounds), **kw)


def _rows(job_dir: Path) -> list[dict]:
    return [json.loads(line) for shard in sorted((job_dir / "shards").glob("sft-*.jsonl"))
            for line in shard.read_text().splitlines()]


def _revisions(row: dict) -> int:
    return sum(step["kind"] == "revision" for step in row["trajectory"])


# ------------------------------------------------------------------ item 4: the manifest under the lock


def test_open_while_another_holds_the_lock_refuses_and_writes_no_manifest(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "LOCK_WAIT_SECONDS", 0.2)
    root = tmp_path / "job"
    root.mkdir()
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process's first run, before it wrote its manifest
    try:
        with pytest.raises(JobError, match="another process"):
            JobStore.open(root, _manifest("f2"))
        assert not (root / "manifest.json").exists()
    finally:
        os.close(fd)
    JobStore.open(root, _manifest("f2"))
    assert Manifest.model_validate_json((root / "manifest.json").read_text()).fingerprint == "f2"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks")
def test_a_lock_copied_into_a_forking_child_for_a_moment_does_not_fail_the_job(tmp_path):
    """Another thread's subprocess (git, ...) forks while a job holds its lock: the child keeps a copy
    of the lock's descriptor until it execs, so the job's next `with store:` finds the lock held."""
    store = JobStore.open(tmp_path / "job", _manifest("f1"))
    with store:
        child = os.fork()
        if child == 0:  # the forked child: holds the copy a moment, then goes (as exec would close it)
            import time

            time.sleep(0.3)
            os._exit(0)
    try:
        with store:  # the parent let go; the child still holds the lock for ~0.3 s
            assert (tmp_path / "job" / "manifest.json").exists()
    finally:
        os.waitpid(child, 0)


def test_manifest_is_checked_again_when_the_lock_is_taken(tmp_path):
    root = tmp_path / "job"
    store = JobStore.open(root, _manifest("f1"))
    # Between open() and `with store:` another first run (re)wrote the manifest with other settings.
    (root / "manifest.json").write_text(_manifest("f2").model_dump_json())
    with pytest.raises(JobError, match="changed: model"):
        with store:
            pass
    assert store._lock_fd is None  # the refused `with` let the lock go
    with JobStore.open(root, _manifest("f2")) as other:
        assert other.manifest.fingerprint == "f2"


def test_two_interleaved_first_runs_never_mix_settings(tmp_path, monkeypatch):
    """Run B (rounds=2) starts while run A (rounds=1) is writing its manifest: B is refused, and
    the manifest, the rows and a later resume all say rounds=1."""
    prompts = _prompts(tmp_path)
    real_write, refused = store_module.atomic_write_text, []

    def interleaved(path: Path, text: str) -> None:
        if path.name == "manifest.json" and not refused:
            refused.append(None)
            try:
                generate_sft(_job(tmp_path, rounds=2, prompts=prompts), engine=FakeEngine())
            except JobError as exc:
                refused[0] = exc
        real_write(path, text)

    monkeypatch.setattr(store_module, "atomic_write_text", interleaved)
    generate_sft(_job(tmp_path, rounds=1, prompts=prompts), engine=FakeEngine())
    monkeypatch.undo()
    manifest = json.loads((tmp_path / "job" / "manifest.json").read_text())
    assert manifest["recipe"]["phase1"]["rounds"] == 1
    assert {_revisions(row) for row in _rows(tmp_path / "job")} == {1}  # today's code: B's rounds=2 rows
    assert isinstance(refused[0], JobError) and "another process" in str(refused[0])
    engine = FakeEngine()
    assert generate_sft(_job(tmp_path, rounds=1, prompts=prompts), engine=engine).done_before == 6
    assert engine.batches == []


# ------------------------------------------------------------------ item 8: an empty job may be re-planned


def test_failed_first_run_without_rows_can_be_rerun_after_the_fix(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "question one"}\n{"prompt": "broken\n')
    with pytest.raises(Exception, match="p.jsonl"):
        generate_sft(_job(tmp_path, prompts=prompts), engine=FakeEngine())
    assert (tmp_path / "job" / "manifest.json").exists() and not _rows(tmp_path / "job")
    prompts.write_text('{"prompt": "question one"}\n{"prompt": "question two"}\n')
    summary = generate_sft(_job(tmp_path, prompts=prompts), engine=FakeEngine())
    assert summary.done_now == 2 and summary.export.rows == 2
    manifest = json.loads((tmp_path / "job" / "manifest.json").read_text())
    from cai.pipeline import source_digest

    assert manifest["fingerprint_inputs"]["prompts"] == source_digest(str(prompts))


def test_a_job_with_rows_still_refuses_other_settings(tmp_path):
    prompts = _prompts(tmp_path, 2)
    generate_sft(_job(tmp_path, rounds=1, prompts=prompts), engine=FakeEngine())
    with pytest.raises(JobError, match="changed: phase1"):
        generate_sft(_job(tmp_path, rounds=2, prompts=prompts), engine=FakeEngine())


# ------------------------------------------------------------------ item 7: corrupt shards


@pytest.fixture
def finished(tmp_path) -> tuple[SFTJob, Path]:
    job = _job(tmp_path)
    generate_sft(job, engine=FakeEngine())
    shards = sorted((tmp_path / "job" / "shards").glob("sft-*.jsonl"))
    assert len(shards) == 3 and len(_rows(tmp_path / "job")) == 6
    return job, tmp_path / "job"


def _shard(job_dir: Path, n: int) -> Path:
    """The job's n-th sft shard in plan order (shards are named by batch id: sft-00000N-DIGEST.jsonl)."""
    shard = sorted((job_dir / "shards").glob("sft-*.jsonl"))[n]
    assert shard.name.startswith(f"sft-{n:06d}-")
    return shard


def _truncate_last_line(shard: Path) -> None:
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 40])


def _status(job_dir: Path):
    return CliRunner().invoke(app, ["jobs", "status", str(job_dir)])


def _counts(output: str) -> dict:
    return json.JSONDecoder().raw_decode(output, output.index("{"))[0]


def test_truncated_last_line_is_named_by_resume_retry_status_and_records(finished):
    job, job_dir = finished
    last = _shard(job_dir, 2)
    _truncate_last_line(last)
    where = rf"{re.escape(last.name)}:2: unreadable row \(not JSON: .*truncated"
    with pytest.raises(JobError, match=where):
        generate_sft(job, engine=FakeEngine())
    with pytest.raises(JobError, match=where):
        retry_errors(job_dir, engine=FakeEngine())
    result = _status(job_dir)
    assert result.exit_code == 1 and f"{last.name}:2" in result.output and "cai jobs repair" in result.output
    counts = _counts(result.output)
    assert (counts["rows"], counts["ok"], counts["unreadable"]) == (5, 5, 1)
    with pytest.raises(HTTPException) as exc:
        page({"dir": str(job_dir), "kind": "sft", "recipe": "{}"}, [], None, None, 0, 20)
    assert exc.value.status_code == 409 and f"shards/{last.name} line 2" in exc.value.detail
    with pytest.raises(CorruptShard, match=f"{re.escape(last.name)}:2"):
        open_store(job_dir)[1].stats("sft").check()


def test_garbage_bytes_are_named_not_a_bare_unicode_error(finished):
    job, job_dir = finished
    first = _shard(job_dir, 0)
    with open(first, "ab") as f:
        f.write(b"\xff\xfe\x00 garbage\n")
    with pytest.raises(JobError, match=rf"{re.escape(first.name)}:3: unreadable row \(not UTF-8"):
        generate_sft(job, engine=FakeEngine())
    with pytest.raises(CorruptShard, match=rf"{re.escape(first.name)}:3"):
        list(JobStore(job_dir, Manifest.model_validate_json((job_dir / "manifest.json").read_text())).read("sft"))


def test_wrong_schema_line_is_not_an_ok_row(finished):
    job, job_dir = finished
    second = _shard(job_dir, 1)
    with open(second, "a") as f:
        f.write(json.dumps({"id": "sft-not-a-record", "error": None}) + "\n")
    result = _status(job_dir)
    counts = _counts(result.output)
    assert (counts["rows"], counts["ok"], counts["unreadable"]) == (6, 6, 1)
    assert f"{second.name}:3: not a SFTRecord" in result.output
    with pytest.raises(JobError, match=rf"{re.escape(second.name)}:3: unreadable row \(not a SFTRecord"):
        generate_sft(job, engine=FakeEngine())


def test_repair_quarantines_unreadable_lines_and_the_resume_redoes_their_ids(finished):
    job, job_dir = finished
    names = [_shard(job_dir, n).name for n in range(3)]
    shards = job_dir / "shards"
    kept = {s.name: s.read_bytes().splitlines(keepends=True) for s in sorted(shards.glob("sft-*.jsonl"))}
    before = {row["id"] for row in _rows(job_dir)}
    _truncate_last_line(shards / names[2])
    truncated = (shards / names[2]).read_bytes().splitlines(keepends=True)[-1]
    with open(shards / names[0], "ab") as f:
        f.write(b"\xff garbage\n")
    with open(shards / names[1], "a") as f:
        f.write(json.dumps({"id": "sft-not-a-record", "error": None}) + "\n")

    result = CliRunner().invoke(app, ["jobs", "repair", str(job_dir)])
    assert result.exit_code == 0, result.output
    assert "3 unreadable lines moved" in result.output and f"{names[2]}:2" in result.output
    quarantine = job_dir / "quarantine"
    assert (quarantine / f"{names[0]}.bad").read_bytes() == b"\xff garbage\n"
    assert (quarantine / f"{names[2]}.bad").read_bytes() == truncated + b"\n"
    assert json.loads((quarantine / f"{names[1]}.bad").read_text())["id"] == "sft-not-a-record"
    # nothing readable is lost: the good lines are byte for byte what they were
    assert shards.joinpath(names[0]).read_bytes() == b"".join(kept[names[0]])
    assert shards.joinpath(names[1]).read_bytes() == b"".join(kept[names[1]])
    assert shards.joinpath(names[2]).read_bytes() == kept[names[2]][0]
    assert _status(job_dir).exit_code == 0
    assert "no unreadable lines" in CliRunner().invoke(app, ["jobs", "repair", str(job_dir)]).output

    engine = FakeEngine()
    summary = generate_sft(job, engine=engine)
    assert (summary.done_before, summary.done_now, summary.export.rows) == (5, 1, 6)
    ids = [row["id"] for row in _rows(job_dir)]
    assert len(ids) == len(set(ids)) and set(ids) == before


def test_a_shard_with_only_unreadable_lines_is_removed_by_repair(finished):
    job, job_dir = finished
    second = _shard(job_dir, 1)
    second.write_bytes(b"\x00\x01\x02")
    with JobStore(job_dir, Manifest.model_validate_json((job_dir / "manifest.json").read_text())) as store:
        moved = store.repair()
    assert [(p.name, n) for p, n, _ in moved] == [(second.name, 1)]
    assert not second.exists()
    assert generate_sft(job, engine=FakeEngine()).done_now == 2


class _Row(BaseModel):
    id: str
    text: str
    error: ErrorInfo | None = None


def test_drop_errors_keeps_rows_whose_text_holds_unicode_line_separators(tmp_path):
    """A record's text may hold U+2028 / U+0085 (JSON writers keep them raw): a shard line ends at \\n only."""
    with JobStore.open(tmp_path / "job", _manifest("f1")) as store:
        store.commit("x", batch_id(0, ["a", "b"]), [_Row(id="a", text="one\u2028two\x85three"),
                                                    _Row(id="b", text="", error=ErrorInfo(code="cancelled",
                                                                                           message="stopped"))])
        assert store.drop_errors("x") == {"cancelled": 1}
        assert [row["text"] for row in store.read("x")] == ["one\u2028two\x85three"]
