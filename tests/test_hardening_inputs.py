"""Hardening of inputs and of cancellation: stop inside retry loops, capped counts, YAML aliases and
nesting, non-finite numbers and invalid Unicode, unreadable or empty prompt files, turns and job size."""

from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
from fakes import judge_preferring
from fakeserver import FakeServer, error_body, ok_body
from fastapi.testclient import TestClient
from helpers import write_jsonl
from serve_helpers import A, app_for
from typer.testing import CliRunner

from cai.cli import app as cli_app
from cai.constitution import ConstitutionError, load_constitution
from cai.engine.base import StopRequested, stop_scope
from cai.engine.fake import FakeEngine
from cai.engine.openai_engine import OpenAIEngine
from cai.judge import JudgeItem, judge_pairs
from cai.judge_eval import EvalJob, run_judge_eval
from cai.pipeline import JobCancelled
from cai.recipe import JudgeConfig, PrefsJob
from cai.records import Message, SamplingParams
from cai.sources import SourceError, read_prompts

pytestmark = pytest.mark.timeout(60)


def post(c: TestClient, raw: bytes):
    return c.post("/v1/jobs", content=raw, headers={**A, "Content-Type": "application/json"})


@pytest.fixture
def client(roots):
    with TestClient(app_for(roots, max_body_bytes=2_000_000, max_constitution_bytes=200_000)) as c:
        yield c


# ---------------------------------------------------------------- 2. stop inside retry loops, capped retries


def garbage(chat, params):
    return "no json here"


def test_structured_retry_loop_stops_when_the_job_stops():
    engine = FakeEngine(garbage)
    item = JudgeItem(prompt=[Message(role="user", content="q")], answer_a="a", answer_b="b", question="Which?")
    config = JudgeConfig(mode="structured", structured_retries=3000)
    with stop_scope(lambda: len(engine.batches) >= 3), pytest.raises(StopRequested):
        judge_pairs(engine, [item], config)
    assert len(engine.batches) == 3  # not 3001


def test_cancel_during_judge_retries_writes_cancelled_rows_for_the_batch_in_flight(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: good {i}",
                                                   "rejected": f"\n\nHuman: q{i}\n\nAssistant: bad {i}"}
                                                  for i in range(3)])
    engine = FakeEngine(garbage, chooser=judge_preferring("good", 0.9))
    job = EvalJob(data=str(data), out=str(tmp_path / "eval"), batch_size=10,
                  judge=JudgeConfig(mode="structured", structured_retries=3000))
    started = time.monotonic()
    with pytest.raises(JobCancelled):
        run_judge_eval(job, engine, stop=lambda: len(engine.batches) >= 2)
    assert len(engine.batches) == 2 and time.monotonic() - started < 10
    rows = [json.loads(line) for p in (tmp_path / "eval" / "shards").glob("*.jsonl") for line in p.open()]
    assert len(rows) == 6 and all(r["error"]["code"] == "cancelled" for r in rows)  # 3 pairs x (cai, baseline)


class Waits:
    def __init__(self):
        self.seconds: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)


def test_openai_retries_stop_when_the_job_stops():
    with FakeServer(lambda body, n: (503, {}, error_body("down"), 0)) as server:
        engine = OpenAIEngine("m", base_url=server.url, api_key="k", timeout=5, max_retries=1000)
        engine.sleep = Waits()
        with stop_scope(lambda: len(server.calls) >= 3), pytest.raises(StopRequested):
            engine.generate([[Message(role="user", content="x")]], SamplingParams(max_tokens=4))
    assert len(server.calls) == 3


def test_openai_request_in_flight_and_backoff_end_on_stop():
    stopped = threading.Event()
    with FakeServer(lambda body, n: (200, {}, ok_body("late"), 30)) as server:
        engine = OpenAIEngine("m", base_url=server.url, api_key="k", timeout=60)
        threading.Timer(0.3, stopped.set).start()
        started = time.monotonic()
        with stop_scope(stopped.is_set), pytest.raises(StopRequested):
            engine.generate([[Message(role="user", content="x")]], SamplingParams(max_tokens=4))
        assert time.monotonic() - started < 5
    stopped.clear()
    with FakeServer(lambda body, n: (429, {"Retry-After": "120"}, error_body("slow"), 0)) as server:
        engine = OpenAIEngine("m", base_url=server.url, api_key="k", timeout=5)  # real sleep: 120 s asked
        threading.Timer(0.3, stopped.set).start()
        started = time.monotonic()
        with stop_scope(stopped.is_set), pytest.raises(StopRequested):
            engine.generate([[Message(role="user", content="x")]], SamplingParams(max_tokens=4))
        assert time.monotonic() - started < 5 and len(server.calls) == 1


@pytest.mark.parametrize("body, needle", [
    ({"kind": "prefs", "prompts": ["x"], "phase2": {"judge": {"mode": "structured", "structured_retries": 3000}}},
     "phase2.judge.structured_retries"),
    ({"kind": "judge_eval", "dataset": "hh", "judge": {"mode": "structured", "structured_retries": 5}},
     "judge.structured_retries"),
])
def test_judge_retries_are_capped(client, body, needle):
    r = client.post("/v1/jobs", json=body, headers=A)
    assert r.status_code == 422 and needle in r.json()["detail"], r.text


# ---------------------------------------------------------------- 3. YAML aliases


def alias_bomb(levels: int = 8) -> str:
    names = "abcdefghijk"
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    lines += [f"{names[i + 1]}: &{names[i + 1]} [{', '.join([f'*{names[i]}'] * 9)}]" for i in range(levels)]
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_at_once(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    started = time.monotonic()
    with pytest.raises(ConstitutionError, match="aliases"):
        load_constitution(path)
    assert time.monotonic() - started < 1


def test_any_alias_is_refused_in_cli_and_service(tmp_path, client):
    path = tmp_path / "aliased.yaml"  # valid but for the alias: today's loader accepts it
    path.write_text("name: aliased\nversion: \"1.0.0\"\ndescription: &d Be careful.\n"
                    "principles:\n  - id: one\n    critique_request: *d\n    revision_request: Rewrite it.\n"
                    "    comparison_question: Which is better?\n")
    with pytest.raises(ConstitutionError, match=r"aliased.yaml:6: invalid YAML: aliases"):
        load_constitution(path)
    result = CliRunner().invoke(cli_app, ["constitution", "validate", str(path)])
    assert result.exit_code != 0 and "aliases" in result.output
    r = client.post("/v1/jobs", json={"kind": "sft", "prompts": ["x"], "constitution_yaml": alias_bomb(5)},
                    headers=A)
    assert r.status_code == 422 and "aliases" in r.json()["detail"], r.text


# ---------------------------------------------------------------- 6. non-finite numbers, invalid Unicode, nesting


@pytest.mark.parametrize("raw, field", [
    (b'{"kind": "sft", "prompts": ["x"], "phase1": {"answer": {"temperature": 1e999}}}', "temperature"),
    (b'{"kind": "prefs", "prompts": ["x"], "min_confidence": NaN}', "min_confidence"),
    (b'{"kind": "prefs", "prompts": ["x"], "phase2": {"judge": {"clamp": [0.1, Infinity]}}}', "clamp"),
    (b'{"kind": "sft", "prompts": ["x"], "max_tokens": NaN}', "max_tokens"),
    (b'{"kind": "sft", "prompts": ["a \\ud800 b"]}', "prompts"),
    (b'{"kind": "sft", "prompts": [{"messages": [{"role": "user", "content": "\\udc00"}]}]}', "content"),
    (b'{"kind": "sft", "prompts": ["x"], "constitution_yaml": "name: \\ud800"}', "constitution_yaml"),
    (b'{"kind": "sft", "prompts": ["x"], "phase1": {"system_prompt": "\\ud800"}}', "system_prompt"),
    (b'{"kind": "sft", "prompts": ["x"], "constitution_for": {"\\ud800": "harmless"}}', "constitution_for"),
    (b'{"kind": "sft", "prompts": ' + b"[" * 400 + b"]" * 400 + b"}", "prompts"),
])
def test_unrepresentable_values_are_422_naming_the_field(client, raw, field):
    r = post(client, raw)
    assert r.status_code == 422, r.text
    assert field in json.dumps(r.json()["detail"])


def test_deeply_nested_constitution_is_422_and_one_cli_line(client, tmp_path):
    nested = "name: " + "[" * 20000 + "]" * 20000 + "\n"
    r = client.post("/v1/jobs", json={"kind": "sft", "prompts": ["x"], "constitution_yaml": nested}, headers=A)
    assert r.status_code == 422 and "nested more than" in r.json()["detail"], r.text
    path = tmp_path / "deep.yaml"
    path.write_text(nested)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    for args in (["constitution", "validate", str(path)],
                 ["generate", "sft", "--constitution", str(path), "--prompts", str(prompts),
                  "--out", str(tmp_path / "job")]):
        result = CliRunner().invoke(cli_app, args)
        assert result.exit_code in (1, 2) and "nestedmorethan24" in "".join(result.output.split()), result.output
        assert "Traceback (most recent call last)" not in result.output and len(result.output.splitlines()) < 8


def test_recipe_models_refuse_non_finite_numbers():
    with pytest.raises(ValueError, match="finite"):
        SamplingParams(temperature=float("inf"))
    with pytest.raises(ValueError, match="finite"):
        JudgeConfig(min_option_mass=float("nan"))
    with pytest.raises(ValueError, match="finite"):
        PrefsJob(constitution="harmless", out="x", min_confidence=float("nan"))
    with pytest.raises(ValueError, match="lone surrogate"):
        Message(role="user", content="a\ud800")


def test_surrogate_escape_in_a_prompts_file_names_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine \\ud83d\\ude00"}\n{"prompt": "bad \\ud800"}\n')
    with pytest.raises(SourceError, match=r"p.jsonl:2: invalid Unicode"):
        list(read_prompts(path))


# ---------------------------------------------------------------- 9. unreadable and empty prompt files


def test_utf16_and_binary_prompt_files_name_the_file_and_the_fix(tmp_path):
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_text('{"prompt": "hi"}\n', encoding="utf-16")
    with pytest.raises(SourceError, match=r"utf16.jsonl: not UTF-8 text .*UTF-16.*iconv"):
        list(read_prompts(utf16))
    binary = tmp_path / "blob.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(SourceError, match=r"blob.jsonl: not UTF-8 text .*binary"):
        list(read_prompts(binary))
    result = CliRunner().invoke(cli_app, ["generate", "sft", "--prompts", str(utf16), "--out", str(tmp_path / "j")])
    flat = "".join(result.output.split())  # rich wraps long lines
    assert result.exit_code == 2 and "utf16.jsonl:notUTF-8text" in flat and "UTF-16" in flat, result.output


def test_empty_prompts_file_is_an_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(SourceError, match=r"empty.jsonl: no prompts"):
        list(read_prompts(empty))
    assert list(read_prompts(empty, limit=0)) == []
    result = CliRunner().invoke(cli_app, ["generate", "sft", "--prompts", str(empty), "--out", str(tmp_path / "j")])
    assert result.exit_code == 2 and "empty.jsonl:noprompts" in "".join(result.output.split()), result.output


# ---------------------------------------------------------------- 10. turns per prompt, characters per job


def test_turns_per_prompt_and_characters_per_job_are_bounded(roots):
    many = [{"role": "user" if i % 2 == 0 else "assistant", "content": ""} for i in range(25_000)]
    many.append({"role": "user", "content": "x"})  # 25,001 turns, 1 character: under max_prompt_chars
    write_jsonl(roots / "data" / "long.jsonl", [{"messages": many[:100] + many[-1:]}])
    with TestClient(app_for(roots, max_body_bytes=2_000_000, max_job_chars=45)) as c:
        r = c.post("/v1/jobs", json={"kind": "sft", "prompts": [{"messages": many}]}, headers=A)
        assert r.status_code == 422 and "turns of prompts[0] = 25001" in r.json()["detail"], r.text
        r = c.post("/v1/jobs", json={"kind": "sft", "dataset": "long"}, headers=A)
        assert r.status_code == 422 and "turns of prompts[0] = 101" in r.json()["detail"], r.text
        r = c.post("/v1/jobs", json={"kind": "sft", "prompts": ["y" * 20] * 3}, headers=A)
        assert r.status_code == 413 and "60 characters" in r.json()["detail"], r.text
        r = c.post("/v1/jobs", json={"kind": "sft", "prompts": ["y" * 20] * 2}, headers=A)
        assert r.status_code == 201, r.text
        r = c.post("/v1/jobs", json={"kind": "sft", "dataset": "questions"}, headers=A)  # 4 x 10 characters: 40
        assert r.status_code == 201, r.text
        r = c.post("/v1/jobs", json={"kind": "sft", "dataset": "big"}, headers=A)  # 30 rows, over max_rows 20
        assert r.status_code == 422, r.text
        r = c.post("/v1/jobs", json={"kind": "sft", "dataset": "big", "limit": 20}, headers=A)  # 50 characters
        assert r.status_code == 413 and "smaller limit" in r.json()["detail"], r.text
