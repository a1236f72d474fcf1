"""Job directory safety: kill -9 at random points, disk errors, fingerprints, locking."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import HARMLESS, ROOT, write_jsonl, write_prompts

from cai.engine.fake import FakeEngine
from cai.pipeline import generate_sft
from cai.recipe import SFTJob
from cai.store import JobError, JobStore, Manifest, batch_id

WORKER = textwrap.dedent(
    """
    import sys, time
    from cai.engine.fake import FakeEngine
    from cai.pipeline import generate_sft
    from cai.recipe import SFTJob

    def slow(chat, params):
        time.sleep(0.02)
        return "reply " + chat[-1].content[:20]

    job = SFTJob(constitution=sys.argv[1], prompts=sys.argv[2], out=sys.argv[3], batch_size=4)
    generate_sft(job, engine=FakeEngine(slow))
    print("FINISHED")
    """
)


JUDGE_WORKER = textwrap.dedent(
    """
    import sys, time
    from cai.engine.fake import FakeEngine
    from cai.judge_eval import EvalJob, run_judge_eval

    def slow_choice(chat, options, prefix):
        time.sleep(0.05)
        return {"A": -0.2, "B": -1.7}

    def slow_verdict(chat, params):
        time.sleep(0.05)
        return '{"choice": "B"}'

    job = EvalJob(data=sys.argv[2], out=sys.argv[3], batch_size=4)
    run_judge_eval(job, FakeEngine(slow_verdict, chooser=slow_choice))
    print("FINISHED")
    """
)


def shard_rows(job_dir: Path, stage: str = "sft") -> list[dict]:
    rows = []
    for shard in sorted((job_dir / "shards").glob(f"{stage}-*.jsonl")):
        text = shard.read_text()
        assert text.endswith("\n"), f"{shard} is truncated"
        rows += [json.loads(line) for line in text.splitlines()]
    return rows


def export_ids(job_dir: Path) -> list[str]:
    return [json.loads(line)["metadata"]["id"] for line in (job_dir / "sft.jsonl").open()]


def kill_at_random_points_then_finish(cmd: list[str], count_rows, total: int) -> None:
    """Start `cmd` 8 times, SIGKILL each at a random moment, then let it finish once."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rng = random.Random(1234)
    kills_mid_job = 0
    for _ in range(8):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(0.8, 2.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills_mid_job += 0 < count_rows() < total
        proc.wait()
    final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert "FINISHED" in final.stdout, final.stderr
    assert kills_mid_job >= 1, "no kill landed while the job was half done"


def test_kill_at_random_points_then_resume_is_exactly_once(tmp_path):
    prompts = tmp_path / "p.jsonl"
    write_prompts(prompts, [f"question number {i}" for i in range(60)])
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    job_dir = tmp_path / "job"
    cmd = [sys.executable, str(script), HARMLESS, str(prompts), str(job_dir)]
    kill_at_random_points_then_finish(cmd, lambda: len(shard_rows(job_dir)) if job_dir.exists() else 0, 60)
    ids = [r["id"] for r in shard_rows(job_dir)]
    assert len(ids) == len(set(ids)) == 60
    assert not list((job_dir / "shards").glob(".*tmp*"))

    clean = tmp_path / "clean"
    subprocess.run([*cmd[:-1], str(clean)], env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True,
                   capture_output=True, timeout=120)
    assert sorted(export_ids(job_dir)) == sorted(export_ids(clean))


def test_killed_judge_evaluation_resumes_exactly_once_to_the_same_report(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: yes {i}",
                                                   "rejected": f"\n\nHuman: q{i}\n\nAssistant: no {i}"}
                                                  for i in range(40)])
    script = tmp_path / "judge_worker.py"
    script.write_text(JUDGE_WORKER)
    job_dir = tmp_path / "eval"
    cmd = [sys.executable, str(script), HARMLESS, str(data), str(job_dir)]
    kill_at_random_points_then_finish(
        cmd, lambda: len(shard_rows(job_dir, "judge-eval")) if job_dir.exists() else 0, 80)
    ids = [r["id"] for r in shard_rows(job_dir, "judge-eval")]
    assert len(ids) == len(set(ids)) == 80  # 40 pairs x (cai's judge, the baseline)

    clean = tmp_path / "clean"
    subprocess.run([*cmd[:-1], str(clean)], env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True,
                   capture_output=True, timeout=120)
    assert (job_dir / "predictions.jsonl").read_text() == (clean / "predictions.jsonl").read_text()
    report, clean_report = (json.loads((d / "report.json").read_text()) for d in (job_dir, clean))
    for judge in ("cai", "baseline"):
        report[judge].pop("seconds"), clean_report[judge].pop("seconds")
        assert report[judge] == clean_report[judge]


def _manifest(fp: str = "f1") -> Manifest:
    return Manifest(stage="sft", fingerprint=fp, fingerprint_inputs={"model": fp}, recipe={})


def test_disk_full_fails_loudly_and_keeps_earlier_shards(tmp_path, monkeypatch):
    store = JobStore.open(tmp_path / "job", _manifest())
    job_rows = [_manifest("a")]  # any pydantic model serialises
    with store:
        first = store.commit("sft", batch_id(0, ["a"]), job_rows)

        def full(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fsync", full)
        with pytest.raises(OSError, match="No space left"):
            store.commit("sft", batch_id(1, ["b"]), job_rows)
    assert store.shard_paths("sft") == [first]
    assert first.read_text().endswith("\n")
    assert not [p for p in store.shards.iterdir() if p.name.startswith(".")]


def test_fingerprint_mismatch_names_what_changed(tmp_path):
    JobStore.open(tmp_path / "job", _manifest("f1"))
    with pytest.raises(JobError, match="changed: model"):
        JobStore.open(tmp_path / "job", _manifest("f2"))


def test_one_process_at_a_time(tmp_path):
    store = JobStore.open(tmp_path / "job", _manifest())
    with store:
        with pytest.raises(JobError, match="another process"):
            with JobStore.open(tmp_path / "job", _manifest()):
                pass


def test_killed_export_is_redone(tmp_path, monkeypatch):
    prompts = tmp_path / "p.jsonl"
    write_prompts(prompts, [f"q{i}" for i in range(5)])
    job = SFTJob(constitution=HARMLESS, prompts=str(prompts), out=str(tmp_path / "job"))
    import cai.pipeline as pipeline

    def crash(store, parquet=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "export_sft", crash)
    with pytest.raises(KeyboardInterrupt):
        generate_sft(job, engine=FakeEngine())
    monkeypatch.undo()
    engine = FakeEngine()
    summary = generate_sft(job, engine=engine)
    assert engine.batches == [] and summary.export.rows == 5


MEMORY_WORKER = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    from cai.engine.fake import FakeEngine
    from cai.pipeline import generate_prefs, generate_sft
    from cai.recipe import Phase1Config, PrefsJob, SFTJob

    n, out = int(sys.argv[2]), Path(sys.argv[3])
    out.mkdir(parents=True)
    prompts = out / "p.jsonl"
    with open(prompts, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"prompt {i}: how would I do thing number {i}?"}) + "\\n")
    if sys.argv[4] == "sft":
        engine = FakeEngine(lambda chat, params: "ok " + chat[-1].content[:30], keep_batches=False)
        job = SFTJob(constitution=sys.argv[1], prompts=str(prompts), out=str(out / "job"),
                     phase1=Phase1Config(rounds=1), parquet=False)
        summary = generate_sft(job, engine=engine)
        assert summary.export.rows == n, summary
    else:
        from fakes import alternating_sampler, judge_preferring
        engine = FakeEngine(alternating_sampler(), chooser=judge_preferring("good", 0.9), keep_batches=False)
        job = PrefsJob(constitution=sys.argv[1], prompts=str(prompts), out=str(out / "job"), parquet=False)
        summary = generate_prefs(job, policy_engine=engine, judge_engine=engine)
        assert summary.stats.records == n and summary.stats.exported > 0, summary.stats
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """
)


@pytest.mark.parametrize("stage", ["sft", "prefs"])
def test_peak_memory_does_not_grow_with_the_number_of_prompts(tmp_path, stage):
    script = tmp_path / "mem.py"
    script.write_text(MEMORY_WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}

    def peak_kib(n: int) -> int:
        out = subprocess.run(
            [sys.executable, str(script), HARMLESS, str(n), str(tmp_path / f"n{n}"), stage],
            env=env, capture_output=True, text=True, timeout=600, check=True,
        )
        return int(out.stdout.split()[-1])

    small, large = peak_kib(1_000), peak_kib(100_000)
    assert large <= small * 1.10, f"peak RSS 1k prompts: {small} KiB, 100k prompts: {large} KiB"
