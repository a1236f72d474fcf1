"""Pushing to the Hugging Face Hub (cai.hub) against a local HTTP endpoint that answers the calls
huggingface_hub makes (the Hub cannot be reached here): create the repo, validate the card's metadata,
preupload (regular or LFS), the LFS batch and upload, the branch, the commit. Each request is recorded
with its Authorization header, so the tests check the call sequence, what was uploaded, and that the
token goes in the header and nowhere else."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from fakes import alternating_sampler, judge_preferring
from helpers import HARMLESS, HELPFUL, write_jsonl, write_prompts
from typer.testing import CliRunner

from cai.cli import app
from cai.constitution import load_constitution
from cai.engine.fake import FakeEngine
from cai.hub import HubError, push_dir, push_job_dir, push_model_dir
from cai.hub_lineage import EMBEDDED_HUB_ID, model_lineage, write_train_record
from cai.pipeline import JobCancelled, generate_prefs, generate_sft
from cai.recipe import PrefsJob, SFTJob
from cai.train.jobs import SFTTrainJob

TOKEN = "hf_TESTtoken0123456789abcdefSECRET"
PREFIX = {"dataset": "datasets/", "model": ""}


class FakeHub:
    """The Hub endpoints huggingface_hub calls for a push, with repos, branches and files in memory.
    `calls`: (method, path, Authorization header) of every request; `fail_commit`: answer commits 403,
    echoing the caller's Authorization header in the message (as a careless server might)."""

    def __init__(self, lfs_suffixes: tuple[str, ...] = (".safetensors",)):
        self.calls: list[tuple[str, str, str | None]] = []
        self.repos: dict[tuple[str, str], dict] = {}  # (type, id) -> {"private", "branches": {name: {path: bytes}}}
        self.cards: list[dict] = []
        self.lfs: dict[str, bytes] = {}
        self.lfs_suffixes, self.fail_commit = lfs_suffixes, False
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.calls.append((self.command, self.path.split("?")[0], self.headers.get("Authorization")))
                self._reply(*hub.route(self.command, self.path.split("?")[0], body, self.headers))

            do_POST = do_PUT = do_GET = _handle

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def route(self, method: str, path: str, body: bytes, headers) -> tuple[int, dict]:
        parts = path.strip("/").split("/")
        if path == "/api/repos/create":
            return self.create(json.loads(body))
        if path == "/api/validate-yaml":
            return self.validate(json.loads(body))
        if method == "PUT" and parts[0] == "lfs-upload":
            ok = hashlib.sha256(body).hexdigest() == parts[1]
            self.lfs[parts[1]] = body
            return (200, {}) if ok else (400, {"error": "sha256 mismatch"})
        if path.endswith(".git/info/lfs/objects/batch"):
            return 200, {"transfer": "basic", "objects": [
                {"oid": o["oid"], "size": o["size"], "actions": {"upload": {"href": f"{self.url}/lfs-upload/{o['oid']}"}}}
                for o in json.loads(body)["objects"]]}
        if parts[0] == "api" and len(parts) >= 6:
            repo = self.repos.get((parts[1].rstrip("s"), f"{parts[2]}/{parts[3]}"))
            if repo is None:
                return 404, {"error": "Repository not found"}
            action, revision = parts[4], "/".join(parts[5:])
            if action == "preupload":
                return 200, {"files": [{"path": f["path"], "shouldIgnore": False, "uploadMode":
                                        "lfs" if f["path"].endswith(self.lfs_suffixes) else "regular"}
                                       for f in json.loads(body)["files"]]}
            if action == "branch":
                if revision in repo["branches"]:
                    return 409, {"error": "Reference already exists"}
                repo["branches"][revision] = dict(repo["branches"]["main"])
                return 200, {}
            if action == "commit":
                return self.commit(parts, repo, revision, body, headers)
        return 404, {"error": f"no route {method} {path}"}

    def create(self, payload: dict) -> tuple[int, dict]:
        kind = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or 'tester'}/{payload['name']}"
        url = f"{self.url}/{PREFIX[kind]}{repo_id}"
        if (kind, repo_id) in self.repos:
            return 409, {"error": "You already created this repo", "url": url}
        self.repos[(kind, repo_id)] = {"private": payload.get("visibility") == "private", "branches": {"main": {}}}
        return 200, {"url": url}

    def validate(self, payload: dict) -> tuple[int, dict]:
        content = payload["content"]
        try:
            meta = yaml.safe_load(content.split("---\n")[1]) if content.startswith("---\n") else None
        except yaml.YAMLError as exc:
            return 400, {"errors": [{"message": str(exc)}]}
        if not isinstance(meta, dict) or "license" not in meta:
            return 400, {"errors": [{"message": "metadata needs a license"}]}
        self.cards.append({"repo_type": payload["repoType"], "meta": meta, "content": content})
        return 200, {"errors": [], "warnings": []}

    def commit(self, parts, repo: dict, revision: str, body: bytes, headers) -> tuple[int, dict]:
        if self.fail_commit:
            return 403, {"error": f"{headers.get('Authorization')} may not write to {parts[2]}/{parts[3]}"}
        if revision not in repo["branches"]:
            return 404, {"error": f"Invalid rev id: {revision}"}
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        assert lines[0]["key"] == "header" and lines[0]["value"]["summary"]
        files = repo["branches"][revision]
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    return 400, {"error": f"LFS object {value['oid']} was not uploaded"}
                files[value["path"]] = self.lfs[value["oid"]]
        oid = hashlib.sha1(body).hexdigest()
        return 200, {"commitUrl": f"{self.url}/{parts[1]}/{parts[2]}/{parts[3]}/commit/{oid}", "commitOid": oid}

    def files(self, kind: str, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[(kind, repo_id)]["branches"][branch]

    def sequence(self) -> list[str]:
        return [f"{method} {path.split('/')[-2] if '/api/' in path and len(path.split('/')) > 6 else path}"
                for method, path, _ in self.calls]


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The local endpoint as $HF_ENDPOINT, the token in $HF_TOKEN; LFS files go by the basic LFS
    transfer (huggingface_hub would use the Xet protocol when hf_xet is installed, which no local
    endpoint here answers)."""
    import huggingface_hub._commit_api as commit_api

    monkeypatch.setattr(commit_api, "is_xet_available", lambda: False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("CAI_CACHE_DIR", str(tmp_path / "cai-cache"))
    with FakeHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def sft_job(tmp_path: Path, name: str = "job") -> Path:
    prompts = write_prompts(tmp_path / "prompts.jsonl", [f"question {i}" for i in range(3)])
    job = SFTJob(constitution=HARMLESS, prompts=str(prompts), out=str(tmp_path / name))
    return Path(generate_sft(job, engine=FakeEngine(lambda chat, params: "an answer")).out)


def model_folder(tmp_path: Path, data: Path, *, checkpoint: bool = True) -> Path:
    """A `cai train sft` output as the trainer leaves it (weights are opaque bytes: nothing loads them)."""
    base = tmp_path / "cai-cache" / "models" / "SmolLM2-135M-Instruct"  # the embedded model's folder
    base.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "model"
    (out / "adapter").mkdir(parents=True)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        (out / name).write_text(json.dumps({"name": name}))
    (out / "model.safetensors").write_bytes(os.urandom(4096))
    (out / "adapter" / "adapter_config.json").write_text("{}")
    (out / "adapter" / "README.md").write_text("peft's own card")
    (out / "log.jsonl").write_text('{"loss": 1.0}\n')
    if checkpoint:
        (out / "checkpoint-2").mkdir()
        (out / "checkpoint-2" / "optimizer.pt").write_bytes(b"optimiser state")
    time.sleep(0.01)
    job = SFTTrainJob(data=str(data), out=str(out), lr=1e-4, epochs=2.0, lora=True, lora_r=8)
    write_train_record(job, out)
    (out / "metrics.json").write_text(json.dumps({"trainer": "sft", "model": str(base), "data": str(data),
                                                  "rows": 3, "global_step": 2, "train_loss": 0.5, "lora": True}))
    return out


def leaked(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]


def test_dataset_push_sends_the_export_and_card_with_the_token_only_in_the_header(hub, tmp_path):
    job = sft_job(tmp_path)
    result = push_job_dir(job, "tester/cai-data", private=True)
    assert hub.sequence() == ["POST /api/repos/create", "POST /api/validate-yaml", "POST preupload", "POST commit"]
    assert {auth for _, _, auth in hub.calls} == {f"Bearer {TOKEN}"}
    assert hub.repos[("dataset", "tester/cai-data")]["private"]
    files = hub.files("dataset", "tester/cai-data")
    assert sorted(files) == ["README.md", "sft.jsonl", "sft.parquet"]  # no manifest, shards or lock
    assert files["sft.jsonl"] == (job / "sft.jsonl").read_bytes()
    card = files["README.md"].decode()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["license"] == "unknown" and meta["task_categories"] == ["text-generation"]
    assert {"constitutional-ai", "sft"} <= set(meta["tags"]) and meta["size_categories"] == ["n<1K"]
    assert meta["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "sft.parquet"}]}]
    version = load_constitution(HARMLESS).ref.version
    assert meta["constitution"]["name"] == "harmless" and meta["constitution"]["version"] == version
    local = (job / "README.md").read_text().split("---\n", 2)[2]
    assert local.strip() in card and 'load_dataset("tester/cai-data", split="train")' in card
    assert hub.cards[0]["content"] == card and hub.cards[0]["repo_type"] == "dataset"
    record = json.loads((job / "hub.json").read_text())["pushes"]
    assert record[0]["repo_id"] == "tester/cai-data" and record[0]["commit_oid"] == result.commit_oid
    assert not leaked(tmp_path) and not any(TOKEN.encode() in data for data in files.values())


def test_a_second_push_keeps_the_repo_and_a_revision_gets_its_branch(hub, tmp_path):
    job = sft_job(tmp_path)
    push_job_dir(job, "cai-data")  # no namespace: the Hub's answer names it
    result = push_dir(job, "cai-data", revision="dev", license="cc-by-4.0")
    assert result.repo_id == "tester/cai-data" and result.revision == "dev"
    assert [s for s in hub.sequence() if "create" in s or "branch" in s] == [
        "POST /api/repos/create", "POST /api/repos/create", "POST branch"]
    assert yaml.safe_load(hub.files("dataset", "tester/cai-data", "dev")["README.md"].decode().split("---\n")[1])[
        "license"] == "cc-by-4.0"
    assert len(json.loads((job / "hub.json").read_text())["pushes"]) == 2


def test_model_push_uploads_weights_by_lfs_and_a_card_naming_constitution_and_data(hub, tmp_path):
    job = sft_job(tmp_path)
    push_job_dir(job, "tester/cai-data")
    model = model_folder(tmp_path, job / "sft.jsonl")
    hub.calls.clear()
    push_model_dir(model, "tester/cai-sft")
    assert hub.sequence() == ["POST /api/repos/create", "POST /api/validate-yaml", "POST preupload",
                              "POST /tester/cai-sft.git/info/lfs/objects/batch",
                              f"PUT /lfs-upload/{hashlib.sha256((model / 'model.safetensors').read_bytes()).hexdigest()}",
                              "POST commit"]
    assert all(auth == f"Bearer {TOKEN}" for method, path, auth in hub.calls if method == "POST")
    files = hub.files("model", "tester/cai-sft")
    assert sorted(files) == ["README.md", "adapter/adapter_config.json", "config.json", "generation_config.json",
                             "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert files["model.safetensors"] == (model / "model.safetensors").read_bytes()
    card = files["README.md"].decode()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == EMBEDDED_HUB_ID and meta["datasets"] == ["tester/cai-data"]
    assert meta["pipeline_tag"] == "text-generation" and {"constitutional-ai", "sft", "trl"} <= set(meta["tags"])
    version = load_constitution(HARMLESS).ref.version
    assert meta["constitutions"][0]["name"] == "harmless" and meta["constitutions"][0]["version"] == version
    assert f"under `harmless` v{version}" in card and "`sft.jsonl` of cai job `job`" in card
    for setting in ("| lr | 0.0001 |", "| epochs | 2 |", "| lora_r | 8 |", "| train_loss | 0.5 |"):
        assert setting in card
    assert str(tmp_path) not in card and not leaked(tmp_path)


def test_preference_data_push(hub, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [f"question {i}" for i in range(3)])
    engine = FakeEngine(alternating_sampler(), chooser=judge_preferring("good", 0.9))
    job = generate_prefs(PrefsJob(constitution=HELPFUL, prompts=str(prompts), out=str(tmp_path / "prefs")),
                         policy_engine=engine, judge_engine=engine).out
    push_dir(job, "tester/cai-prefs", license="apache-2.0")
    files = hub.files("dataset", "tester/cai-prefs")
    assert sorted(files) == ["README.md", "prefs.jsonl", "prefs.parquet"]
    meta = yaml.safe_load(files["README.md"].decode().split("---\n")[1])
    assert meta["license"] == "apache-2.0" and {"rlaif", "preferences", "constitutional-ai"} <= set(meta["tags"])
    assert meta["configs"][0]["data_files"][0]["path"] == "prefs.parquet" and meta["constitution"]["name"] == "helpful"
    assert "consistency rate" in files["README.md"].decode()


def test_lineage_of_ppo_and_grpo_names_the_reward_models_and_judges_constitutions(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", ["q1", "q2"])
    engine = FakeEngine(alternating_sampler(), chooser=judge_preferring("good", 0.9))
    prefs = Path(generate_prefs(PrefsJob(constitution=HELPFUL, prompts=str(prompts), out=str(tmp_path / "prefs")),
                                policy_engine=engine, judge_engine=engine).out) / "prefs.jsonl"
    rm, ppo, grpo = (tmp_path / name for name in ("rm", "ppo", "grpo"))
    for folder, metrics in ((rm, {"trainer": "rm", "data": str(prefs), "model": "/elsewhere/base"}),
                            (ppo, {"trainer": "ppo", "data": str(prefs), "reward_model": str(rm)}),
                            (grpo, {"trainer": "grpo", "data": "redteam", "num_generations": 4, "beta": 0.04,
                                    "judge_model": {"id": str(tmp_path / "judge-dir"), "engine": "vllm"}})):
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps(metrics))
    (rm / "hub.json").write_text(json.dumps({"pushes": [{"repo_id": "tester/rm", "repo_type": "model"}]}))
    (ppo / "ppo_config.json").write_text(json.dumps({"kl_coef": 0.05, "batch_size": 4}))
    write_jsonl(grpo / "groups.jsonl", [{"constitution": {"name": "harmless", "version": "9.9", "sha256": "ab"}}] * 3)
    lineage = model_lineage(ppo)
    assert lineage.reward_model == "tester/rm" and lineage.settings == {"ppo.kl_coef": 0.05, "ppo.batch_size": 4}
    assert [(c.name, c.used_for) for c in lineage.constitutions] == [
        ("helpful", "phase 2 (preference) data"), ("helpful", "reward model's phase 2 (preference) data")]
    assert model_lineage(rm).base_model is None and model_lineage(rm).base_model_name == "local folder `base`"
    judged = model_lineage(grpo)
    assert [(c.name, c.version) for c in judged.constitutions] == [("harmless", "9.9")]
    assert judged.judge_model == "`judge-dir`"  # the folder's name, not its local path
    assert judged.data.name == "bundled prompt set `redteam`" and judged.results == {"num_generations": 4, "beta": 0.04}


def test_checkpoints_are_uploaded_only_when_asked(hub, tmp_path):
    model = model_folder(tmp_path, sft_job(tmp_path) / "sft.jsonl")
    push_model_dir(model, "tester/with-state", include_checkpoints=True, base_model="org/base", datasets=["org/d"])
    files = hub.files("model", "tester/with-state")
    assert "checkpoint-2/optimizer.pt" in files
    meta = yaml.safe_load(files["README.md"].decode().split("---\n")[1])
    assert meta["base_model"] == "org/base" and meta["datasets"] == ["org/d"]


def test_refusals_name_the_problem_and_make_no_request(hub, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(HubError, match="neither a cai job directory"):
        push_dir(tmp_path / "empty", "tester/x")
    job = sft_job(tmp_path)
    with pytest.raises(HubError, match="not a Hub repo id"):
        push_dir(job, "a/b/c")
    shard = next((job / "shards").glob("*.jsonl"))
    os.utime(shard, ns=(time.time_ns() + 10**9,) * 2)
    with pytest.raises(HubError, match="unfinished: its shards are newer"):
        push_dir(job, "tester/x")
    (job / "sft.jsonl").unlink()
    with pytest.raises(HubError, match="no export yet"):
        push_dir(job, "tester/x")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match=r"\$HF_TOKEN is not set") as refused:
        push_dir(sft_job(tmp_path, "other"), "tester/x")
    assert TOKEN not in str(refused.value)
    assert hub.calls == []


def test_a_stopped_job_and_a_judge_evaluation_are_not_datasets(hub, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", ["q1", "q2"])
    with pytest.raises(JobCancelled):
        generate_sft(SFTJob(constitution=HARMLESS, prompts=str(prompts), out=str(tmp_path / "stopped")),
                     engine=FakeEngine(lambda chat, params: "x"), stop=lambda: True)
    with pytest.raises(HubError, match="unfinished: 2 inputs were cancelled"):
        push_dir(tmp_path / "stopped", "tester/x")
    job = sft_job(tmp_path)
    manifest = json.loads((job / "manifest.json").read_text())
    (job / "manifest.json").write_text(json.dumps({**manifest, "stage": "judge-eval"}))
    with pytest.raises(HubError, match="holds a report, not a dataset"):
        push_dir(job, "tester/x")
    failed = generate_sft(SFTJob(constitution=HARMLESS, prompts=str(prompts), out=str(tmp_path / "failed")),
                          engine=FakeEngine(lambda chat, params: ""))  # empty answers: every row an error row
    with pytest.raises(HubError, match="holds no rows"):
        push_dir(failed.out, "tester/x")
    assert hub.calls == []


def test_unfinished_training_is_refused(hub, tmp_path):
    model = model_folder(tmp_path, tmp_path / "missing.jsonl")
    time.sleep(0.01)
    (model / "checkpoint-3").mkdir()
    with pytest.raises(HubError, match="checkpoint-3 is newer than metrics.json"):
        push_dir(model, "tester/m")
    (model / "metrics.json").unlink()
    with pytest.raises(HubError, match="has no metrics.json"):
        push_dir(model, "tester/m")
    (model / "model.safetensors").unlink()
    with pytest.raises(HubError, match="checkpoints but no saved model"):
        push_dir(model, "tester/m")
    assert hub.calls == []


def test_a_hub_error_is_one_line_and_never_echoes_the_token(hub, tmp_path):
    hub.fail_commit = True
    with pytest.raises(HubError, match="403") as failed:
        push_job_dir(sft_job(tmp_path), "tester/cai-data")
    assert TOKEN not in str(failed.value) and "<token>" in str(failed.value)


def test_cli_push_and_a_missing_token(hub, tmp_path, monkeypatch):
    job = sft_job(tmp_path)
    ok = CliRunner().invoke(app, ["push", str(job), "tester/cli-data", "--private", "--branch", "v1"])
    assert ok.exit_code == 0, ok.output
    assert "pushed" in ok.output and "tester/cli-data" in ok.output
    assert "README.md" in hub.files("dataset", "tester/cli-data", "v1")
    monkeypatch.setenv("MY_TOKEN", TOKEN)
    monkeypatch.delenv("HF_TOKEN")
    other = CliRunner().invoke(app, ["push", str(job), "tester/cli-data", "--token-env", "MY_TOKEN"])
    assert other.exit_code == 0, other.output
    assert hub.calls[-1][2] == f"Bearer {TOKEN}"
    missing = CliRunner().invoke(app, ["push", str(job), "tester/cli-data"])
    assert missing.exit_code == 2 and "HF_TOKEN" in missing.output and TOKEN not in missing.output


def test_train_push_to_hub_checks_the_token_before_training(hub, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    out = tmp_path / "never"
    result = CliRunner().invoke(app, ["train", "sft", "--data", str(tmp_path / "d.jsonl"), "--out", str(out),
                                      "--push-to-hub", "tester/m"])
    assert result.exit_code == 2 and "HF_TOKEN" in result.output
    assert not out.exists() and hub.calls == []


def test_train_sft_push_to_hub_pushes_the_trained_model(hub, tmp_path, tiny_chat_model, monkeypatch):
    """`cai train sft --push-to-hub` end to end on a tiny model, with offline mode on as cai's model
    loading may leave it: the push lifts it for its own calls only."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    job = sft_job(tmp_path)
    out = tmp_path / "sft-model"
    result = CliRunner().invoke(app, ["train", "sft", "--data", str(job / "sft.jsonl"), "--model", str(tiny_chat_model),
                                      "--out", str(out), "--max-steps", "1", "--lr", "0.001", "--threads", "1",
                                      "--trl", "save_strategy=no", "--push-to-hub", "tester/tiny-sft"])
    assert result.exit_code == 0, result.output
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True
    record = json.loads((out / "train_job.json").read_text())
    assert record["kind"] == "train-sft" and record["job"]["data"] == str((job / "sft.jsonl").resolve())
    files = hub.files("model", "tester/tiny-sft")
    assert {"config.json", "model.safetensors", "README.md"} <= set(files) and "metrics.json" not in files
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    card = files["README.md"].decode()
    assert "| lr | 0.001 |" in card and "| trl.save_strategy | no |" in card and "`harmless` v" in card
    assert "tester/tiny-sft" in result.output and not leaked(tmp_path)
