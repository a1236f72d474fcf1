"""`python -m serve.bench`: the same phase-1 job from the CLI code path, through `cai serve` and through
`cai serve` while clients poll it, against a local stub server; a small run, no timing thresholds."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve.bench import JobRun, ServiceBenchReport, bench_prompts, main  # noqa: E402

pytestmark = pytest.mark.timeout(180)


def test_bench_prompts_are_distinct_and_repeat_the_source():
    prompts = bench_prompts("redteam", 40)
    texts = [p.messages[-1].content for p in prompts]
    assert len(prompts) == 40 and len(set(texts)) == 40 and len({p.id for p in prompts}) == 40
    assert texts[32].startswith(texts[0]) and texts[32].endswith("(variant 1)")


def test_service_bench_runs_every_job_to_the_end_and_reports_its_own_numbers(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--prompts", "24", "--pollers", "4", "--poll-interval-ms", "20", "--stub-latency-ms", "0",
                 "--concurrency", "4", "--batch-size", "16", "--workdir", str(tmp_path / "work"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    runs = [report["cli"], report["service"], report["polled"]]
    assert [r["name"] for r in runs] == ["cli", "service", "service + 4 pollers"]
    for run in runs:
        assert (run["prompts"], run["records"], run["errors"]) == (24, 24, {}), run
        assert 0 < run["generation_seconds"] <= run["job_wall_seconds"] <= run["client_seconds"]
        assert run["prompts_per_second"] == pytest.approx(24 / run["generation_seconds"])
    assert report["repeats"] == 1 and {k: len(v) for k, v in report["rates"].items()} == {
        "cli": 1, "service": 1, "polled": 1}
    rate = {r["name"]: r["prompts_per_second"] for r in runs}
    assert report["service_vs_cli"] == pytest.approx(rate["service"] / rate["cli"])
    assert report["polled_vs_cli"] == pytest.approx(rate["service + 4 pollers"] / rate["cli"])
    assert report["polled_vs_unpolled"] == pytest.approx(rate["service + 4 pollers"] / rate["service"])

    polling = report["polling"]
    assert polling["clients"] == 4 and polling["pause_ms"] == 20 and polling["seconds"] > 0
    status, records, both = polling["status"], polling["records"], polling["all"]
    assert status["requests"] > 0 and records["requests"] > 0 and status["errors"] == records["errors"] == 0
    assert both["requests"] == status["requests"] + records["requests"] and both["errors"] == 0
    assert 0 < both["p50_ms"] <= both["p99_ms"] <= both["max_ms"]
    assert polling["requests_per_second"] == pytest.approx(both["requests"] / polling["seconds"])
    # both service jobs wrote their directories under the server's jobs root, the CLI job its own
    assert len([p for p in (tmp_path / "work" / "jobs").iterdir() if p.is_dir()]) == 2
    assert (tmp_path / "work" / "cli-0" / "sft.jsonl").is_file()
    printed = capsys.readouterr().out
    assert "service / cli" in printed and "polled / unpolled" in printed
    assert "4 pollers" in printed


def test_the_median_run_of_each_path_is_reported():
    from serve.bench import _median

    runs = [JobRun(name="cli", prompts=10, records=10, errors={}, generation_seconds=s, job_wall_seconds=s,
                   client_seconds=s) for s in (1.0, 4.0, 2.0)]
    assert _median(runs).generation_seconds == 2.0 and _median(runs[:2]).generation_seconds == 4.0


def test_without_pollers_the_report_has_no_polled_run():
    run = lambda name, seconds: JobRun(name=name, prompts=10, records=10, errors={}, generation_seconds=seconds,
                                       job_wall_seconds=seconds, client_seconds=seconds)
    report = ServiceBenchReport(source="redteam", prompts=10, rounds=1, batch_size=256, concurrency=16,
                                stub_latency_ms=10, cli=run("cli", 2.0), service=run("service", 2.5))
    data = report.model_dump(mode="json")
    assert data["service_vs_cli"] == pytest.approx(0.8) and data["cli"]["prompts_per_second"] == 5.0
    assert data["polled"] is None and data["polling"] is None
    assert data["polled_vs_cli"] is None and data["polled_vs_unpolled"] is None


def test_a_workdir_that_is_not_empty_is_refused(tmp_path):
    from cai.errors import CaiError
    from serve.bench import run_service_bench

    (tmp_path / "old").mkdir()
    with pytest.raises(CaiError, match="not empty"):
        run_service_bench(prompts=4, pollers=0, stub_latency_ms=0, workdir=tmp_path)


def test_records_pages_from_the_shard_index_match_a_full_scan_and_follow_a_replaced_shard(tmp_path):
    """The fix the bench measured: a records page parses its own rows only (serve.results' shard index)."""
    from helpers import HARMLESS, write_prompts

    from cai.engine.fake import FakeEngine
    from cai.files import atomic_write_lines
    from cai.pipeline import generate_sft
    from cai.recipe import Phase1Config, SFTJob
    from serve.results import _scanned_page, page

    prompts = write_prompts(tmp_path / "p.jsonl", [f"question number {i}" for i in range(7)])
    job = SFTJob(constitution=HARMLESS, prompts=str(prompts), out=str(tmp_path / "job"), batch_size=3,
                 parquet=False, phase1=Phase1Config(rounds=1))
    generate_sft(job, engine=FakeEngine())
    row = {"dir": str(tmp_path / "job"), "kind": "sft", "recipe": "{}"}
    principle = page(row, [], None, None, 0, 1)[1][0]["lineage"]["principle_ids"][0]
    for status, wanted, offset, limit in ((None, None, 0, 10), (None, None, 2, 3), ("ok", None, 1, 4),
                                          ("error", None, 0, 5), (None, principle, 0, 10)):
        assert page(row, [], status, wanted, offset, limit)[0] == _scanned_page(row, status, wanted, offset, limit)[0]
        ids = [r["id"] for r in page(row, [], status, wanted, offset, limit)[1]]
        assert ids == [r["id"] for r in _scanned_page(row, status, wanted, offset, limit)[1]]
    total, items = page(row, [], None, None, 0, 10)
    assert total == 7 and len({r["id"] for r in items}) == 7 and all(r["review"] is None for r in items)

    first = sorted((tmp_path / "job" / "shards").glob("sft-*.jsonl"))[0]
    lines = first.read_text().splitlines(keepends=True)
    atomic_write_lines(first, lines[1:])  # replaced (a resumed job rewrites a shard so): read again
    total, items = page(row, [], None, None, 0, 10)
    assert total == 6 and [r["id"] for r in items] == [r["id"] for r in _scanned_page(row, None, None, 0, 10)[1]]


def test_cli_bench_service_runs_the_job_through_cli_and_service(tmp_path):
    from typer.testing import CliRunner

    from cai.cli import app

    out = tmp_path / "service.json"
    result = CliRunner().invoke(app, ["bench", "--service", "--limit", "8", "--pollers", "0", "--stub-latency-ms", "0",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["service"]["records"] == 8 and report["cli"]["records"] == 8
