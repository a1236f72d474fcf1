"""The openai_batch backend in a job: its batch ids kept in the job directory, its token usage and
estimated cost on the data card, and a price that is not part of the job's fingerprint."""

from __future__ import annotations

import json

import pytest
from batchapi_fake import FakeBatchAPI
from helpers import write_prompts
from typer.testing import CliRunner

from cai.cli import app
from cai.engine.openai_batch import STATE_FILE


@pytest.fixture
def prompts(tmp_path):
    return write_prompts(tmp_path / "p.jsonl", [f"question {i}" for i in range(4)])


def sft_args(api, prompts, job, *extra):
    return ["generate", "sft", "--engine", "openai_batch", "--model", "m", "--engine-option", f"base_url={api.url}",
            "--engine-option", "poll_initial=0.01", "--engine-option", "poll_max=0.02", "--prompts", str(prompts),
            "--out", str(job), "--rounds", "1", "--show", "0", *extra]


def test_batch_ids_live_in_the_job_and_the_card_reports_usage_and_cost(tmp_path, prompts, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    job = tmp_path / "job"
    with FakeBatchAPI() as api:
        result = CliRunner().invoke(app, sft_args(api, prompts, job, "--price-per-mtok", "2.5,10"))
        assert result.exit_code == 0, result.output
        submitted = len(api.created)
        assert submitted == 3  # answer, critique, revision
        state = json.loads((job / "openai-batch" / STATE_FILE).read_text())
        assert [b["batch_id"] for b in state["batches"].values()] == ["batch_1", "batch_2", "batch_3"]
        assert not (tmp_path / "cache").exists()  # nothing in the default state folder
        usage = json.loads((job / "usage.json").read_text())
        engine = usage["batch"]["engine"]
        assert (engine["requests"], engine["batches"]) == (12, 3) and usage["price_per_mtok"] == [2.5, 10.0]
        rows = [json.loads(line) for s in (job / "shards").glob("sft-*.jsonl") for line in s.open()]
        steps = [step for row in rows for step in row["trajectory"]]
        assert engine["prompt_tokens"] == sum(s["prompt_tokens"] for s in steps) > 0
        assert engine["completion_tokens"] == sum(s["completion_tokens"] for s in steps) > 0
        card = (job / "README.md").read_text()
        batch_usd = (engine["prompt_tokens"] * 2.5 + engine["completion_tokens"] * 10) / 1e6 * 0.5
        assert f"| Batch API, engine (12 requests in 3 batches, summed over the job's runs) | " \
               f"{engine['prompt_tokens']} | {engine['completion_tokens']} |" in card
        assert f"${batch_usd:.4f} at the Batch API's 50% discount (${2 * batch_usd:.4f} at synchronous prices)" in card

        # only the price changes: the same job resumes (nothing submitted) and its card uses the new price
        fingerprint = json.loads((job / "manifest.json").read_text())["fingerprint"]
        again = CliRunner().invoke(app, sft_args(api, prompts, job, "--price-per-mtok", "5,20"))
        assert again.exit_code == 0, again.output
        assert len(api.created) == submitted and "0 prompts now, 4 resumed" in again.output
        assert json.loads((job / "manifest.json").read_text())["fingerprint"] == fingerprint
        assert f"${2 * batch_usd:.4f} at the Batch API's 50% discount" in (job / "README.md").read_text()
        assert json.loads((job / "usage.json").read_text())["batch"]["engine"] == engine  # counted once


@pytest.mark.parametrize("price", ["2.5", "1,2,3", "-1,2", "a,b", "inf,1"])
def test_a_bad_price_is_refused_naming_the_flag(tmp_path, prompts, price):
    result = CliRunner().invoke(app, ["generate", "sft", "--engine", "fake", "--prompts", str(prompts),
                                      "--out", str(tmp_path / "job"), "--price-per-mtok", price])
    text = " ".join(result.output.replace("│", " ").split())  # the message as one line, without its box
    assert result.exit_code == 2 and "--price-per-mtok" in text and "two non-negative numbers" in text
    assert not (tmp_path / "job").exists()


def test_a_price_without_the_batch_api_prices_the_rows_tokens(tmp_path, prompts):
    job = tmp_path / "job"
    result = CliRunner().invoke(app, ["generate", "sft", "--engine", "fake", "--prompts", str(prompts), "--out",
                                      str(job), "--rounds", "1", "--show", "0", "--price-per-mtok", "1,1"])
    assert result.exit_code == 0, result.output
    card = (job / "README.md").read_text()
    rows = [json.loads(line) for s in (job / "shards").glob("sft-*.jsonl") for line in s.open()]
    tokens = sum(s["prompt_tokens"] + s["completion_tokens"] for row in rows for s in row["trajectory"])
    assert f"${tokens / 1e6:.4f} for the tokens in the rows" in card and "Batch API," not in card
    assert not (job / "openai-batch").exists()
