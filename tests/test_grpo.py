"""GRPO with the constitutional judge as reward: the group rewards by hand, the judge's failures,
and training on the tiny random Llama with a scripted judge (cai.train.grpo, cai.train.group_reward)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import write_jsonl  # noqa: E402

from cai.constitution import load_constitution  # noqa: E402
from cai.constitution_plan import ConstitutionPlan  # noqa: E402
from cai.engine.base import ChoiceScores  # noqa: E402
from cai.engine.fake import FakeEngine  # noqa: E402
from cai.records import ErrorCode, ErrorInfo  # noqa: E402
from cai.train.common import TrainError  # noqa: E402
from cai.train.group_reward import GroupJudgeReward, bradley_terry, soft_win_rates  # noqa: E402

torch.set_num_threads(1)


def shown(chat) -> tuple[str, str]:
    """The two answers a judge chat shows, first and second (cai.prompts.judge_chat's quoting)."""
    text = chat[-1].content
    first, second = text.split("(A)\n", 1)[1].split("(B)\n", 1)[0], text.split("(B)\n", 1)[1]
    quoted = lambda part: part.split(">>>\n", 1)[1].split("\n<<<END", 1)[0]  # noqa: E731
    return quoted(first), quoted(second)


def prompt_of(chat) -> str:
    return chat[-1].content.split("Human: ", 1)[1].split("\n", 1)[0]


def scores(p_first: float) -> dict[str, float]:
    return {"A": math.log(p_first), "B": math.log(1 - p_first)}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def trl_call(reward, groups: list[tuple[str, list[str]]], step: int = 0):
    """Call the reward as TRL's GRPOTrainer does: G consecutive rows per prompt, extra columns as lists."""
    prompts = [user(p) for p, answers in groups for _ in answers]
    completions = [[{"role": "assistant", "content": a}] for _, answers in groups for a in answers]
    ids = [f"id-{p}" for p, answers in groups for _ in answers]
    logged: dict[str, float] = {}
    out = reward(prompts=prompts, completions=completions, completion_ids=None, prompt_id=ids,
                 prompt_group=["" for _ in ids], trainer_state=SimpleNamespace(global_step=step),
                 log_metric=logged.__setitem__, log_extra=lambda *a: None)
    return out, logged


@pytest.fixture(scope="module")
def harmless() -> ConstitutionPlan:
    return ConstitutionPlan(default=load_constitution("harmless"))


# ---- the group rewards, by hand --------------------------------------------------------


def test_soft_win_rate_by_hand():
    # P(0 beats 1) = 0.8, P(0 beats 2) = 0.6, P(1 beats 2) = 0.3
    rates = soft_win_rates({(0, 1): 0.8, (0, 2): 0.6, (1, 2): 0.3}, 3)
    assert rates == pytest.approx([(0.8 + 0.6) / 2, (0.2 + 0.3) / 2, (0.4 + 0.7) / 2])  # 0.7, 0.25, 0.55
    assert sum(rates) / 3 == pytest.approx(0.5)  # any group: each pair's two P(win) sum to 1


def test_bradley_terry_recovers_scores_and_stays_finite():
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    truth = [1.0, 0.0, -1.0]
    p = {(a, b): sig(truth[a] - truth[b]) for a, b in ((0, 1), (0, 2), (1, 2))}
    assert bradley_terry(p, 3, l2=1e-9) == pytest.approx(truth, abs=1e-5)
    fitted = bradley_terry(p, 3)  # the default weak prior shrinks a little, and centres
    assert sum(fitted) == pytest.approx(0.0, abs=1e-9) and fitted[0] > fitted[1] > fitted[2]
    # a hard vote in both orders: finite, where the prior's pull l2 * s balances 1 - σ(2s) (s = 1.957)
    certain = bradley_terry({(0, 1): 1.0}, 2)
    assert certain[0] == pytest.approx(-certain[1]) and certain[0] == pytest.approx(1.957, abs=1e-3)
    assert 1 - sig(2 * certain[0]) == pytest.approx(0.01 * certain[0])


def test_judge_reward_asks_both_orders_and_averages_them(harmless, tmp_path):
    # P(first shown preferred) per shown order; the reward must average each pair's two orders:
    # P(x>y) = (0.9 + 1 - 0.3) / 2 = 0.8, P(x>z) = (0.7 + 0.5) / 2 = 0.6, P(y>z) = (0.2 + 0.4) / 2 = 0.3
    table = {("x", "y"): 0.9, ("y", "x"): 0.3, ("x", "z"): 0.7, ("z", "x"): 0.5, ("y", "z"): 0.2, ("z", "y"): 0.6}
    asked = []

    def choose(chat, options, prefix):
        asked.append(shown(chat))
        return scores(table[shown(chat)])

    reward = GroupJudgeReward(FakeEngine(chooser=choose), harmless, 3, lineage=tmp_path / "groups.jsonl")
    rewards, logged = trl_call(reward, [("hello", ["x", "y", "z"])], step=7)
    assert rewards == pytest.approx([0.7, 0.25, 0.55])
    assert sorted(asked) == sorted(table)  # every pair in both orders, each once
    row = json.loads((tmp_path / "groups.jsonl").read_text())
    principles = {p.id for p in harmless.default.constitution.principles}
    assert row["step"] == 7 and row["prompt_id"] == "id-hello" and row["principle_id"] in principles
    assert (row["constitution"]["name"], row["constitution"]["version"]) == ("harmless", harmless.default.ref.version)
    assert [p["p_a"] for p in row["pairs"]] == pytest.approx([0.8, 0.6, 0.3]) and row["error"] is None
    assert row["completions"] == ["x", "y", "z"] and row["judge_mode"] == "logprob"
    assert logged["judge/skipped_groups"] == 0.0
    # the principle is seeded by (seed, prompt, step, occurrence): the same again, another at another step
    again = GroupJudgeReward(FakeEngine(chooser=choose), harmless, 3)
    trl_call(again, [("hello", ["x", "y", "z"])], step=7)
    assert again.records[0].principle_id == row["principle_id"]
    draws = set()
    for step in range(12):
        trl_call(again, [("hello", ["x", "y", "z"])], step=step)
        draws.add(again.records[-1].principle_id)
    assert len(draws) > 1


def test_a_failed_judgement_skips_its_group_not_the_batch(harmless, tmp_path, caplog):
    def choose(chat, options, prefix):
        if prompt_of(chat) == "broken":
            return ChoiceScores(error=ErrorInfo(code=ErrorCode.INTERNAL, message="engine fell over"))
        return prefers("yes")(chat, options, prefix)

    reward = GroupJudgeReward(FakeEngine(chooser=choose), harmless, 2, lineage=tmp_path / "groups.jsonl")
    rewards, logged = trl_call(reward, [("broken", ["yes", "no"]), ("fine", ["yes yes", "no"])])
    assert rewards[:2] == [None, None]  # never a default reward
    assert rewards[2:] == pytest.approx([0.9, 0.1])
    rows = [json.loads(line) for line in (tmp_path / "groups.jsonl").read_text().splitlines()]
    assert rows[0]["error"]["code"] == "internal" and "engine fell over" in rows[0]["error"]["message"]
    assert rows[0]["rewards"] == [None, None] and rows[1]["error"] is None
    assert logged["judge/skipped_groups"] == 1.0 and "the group is skipped" in caplog.text
    assert reward.summary()["groups_skipped"] == 1 and reward.summary()["judge_errors"] == {"internal": 1}
    # a judge that fails every group, batch after batch, stops the run rather than train on nothing
    with pytest.raises(TrainError, match="every group of 3 batches in a row"):
        for _ in range(3):
            trl_call(reward, [("broken", ["a", "b"])])


def test_resume_keeps_the_groups_before_the_checkpoint(harmless, tmp_path):
    path = tmp_path / "groups.jsonl"
    reward = GroupJudgeReward(FakeEngine(chooser=lambda c, o, p: scores(0.5)), harmless, 2, lineage=path)
    for step in range(4):
        trl_call(reward, [("q", ["a", "b"])], step=step)
    with open(path, "a") as f:
        f.write('{"step": 4, "prompt_id": "half a li')  # a run killed mid-write
    reward.resume_lineage(2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1]


# ---- training on the tiny model -----------------------------------------------------------

PROMPTS = ["please help me", "tell me a story", "can you help", "write a poem about a cat"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("grpo") / "prompts.jsonl",
                       [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)])


def prefers(word: str, calls: list | None = None):
    """A scripted judge: P = 0.9 for the shown answer with more `word`s, 0.5 on a tie."""

    def choose(chat, options, prefix):
        first, second = shown(chat)
        if calls is not None:
            calls.append((first, second))
        a, b = first.split().count(word), second.split().count(word)
        return scores(0.9 if a > b else 0.1 if a < b else 0.5)

    return choose


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_grpo_judge_reward_raises_the_preferred_word_with_bounded_kl(tiny_chat_model, prompts, tmp_path):
    """The scripted judge prefers answers with more "yes" (about 0.2 per 8-token answer for the random
    model). The win-rate reward averages 0.5 in every group by construction, so what rises is what
    the judge rewards: "yes" in the policy's answers; beta > 0 keeps the KL to the reference bounded."""
    from cai.train.grpo import train_grpo

    out = tmp_path / "grpo"
    steps = 24
    result = train_grpo(prompts, str(tiny_chat_model), out, judge=FakeEngine(chooser=prefers("yes")),
                        trl_args=dict(max_steps=steps, per_device_train_batch_size=16, num_generations=8,
                                      max_completion_length=8, learning_rate=3e-3, beta=0.1, save_strategy="no"))
    groups = read_rows(out / "groups.jsonl")
    assert len(groups) == steps * 2 and all(g["error"] is None for g in groups)
    yes = [sum(c.split().count("yes") for g in groups if g["step"] == s for c in g["completions"]) / 16
           for s in range(steps)]
    first, last = sum(yes[:4]) / 4, sum(yes[-4:]) / 4
    assert last > first + 1.2, yes  # measured: 0.33 -> 2.17 "yes" per answer
    log = read_rows(out / "log.jsonl")
    rows = [r for r in log if "reward" in r]
    assert len(rows) == steps
    assert all(r["reward"] == pytest.approx(0.5) for r in rows)  # the group mean of a win rate
    assert all("kl" in r for r in rows) and max(r["kl"] for r in rows) < 1.0  # measured max 0.52
    assert rows[-1]["kl"] > 0  # the policy moved
    assert result.metrics["groups_judged"] == steps * 2 and result.metrics["groups_skipped"] == 0
    assert result.metrics["last"]["kl"] == rows[-1]["kl"]


def test_grpo_skips_a_failed_group_with_zero_advantage(tiny_chat_model, prompts, tmp_path, monkeypatch):
    """TRL turns the skipped group's None rewards into NaN and its advantages into exactly 0;
    training goes on, the other groups keep their signal, and every judge call asked both orders."""
    from trl import GRPOTrainer

    from cai.train.grpo import train_grpo

    advantages = []
    original = GRPOTrainer._generate_and_score_completions

    def spy(self, inputs):
        output = original(self, inputs)
        advantages.append(output["advantages"].tolist())
        return output

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", spy)
    calls: list = []
    good = prefers("yes", calls)

    def choose(chat, options, prefix):
        if prompt_of(chat) == "tell me a story":
            return ChoiceScores(error=ErrorInfo(code=ErrorCode.BACKEND_UNAVAILABLE, message="judge down"))
        return good(chat, options, prefix)

    out = tmp_path / "grpo-fail"
    result = train_grpo(prompts, str(tiny_chat_model), out, judge=FakeEngine(chooser=choose),
                        trl_args=dict(max_steps=3, per_device_train_batch_size=16, num_generations=4,
                                      max_completion_length=6, beta=0.1, save_strategy="no"))
    assert result.metrics["global_step"] == 3
    groups = read_rows(out / "groups.jsonl")
    assert len(groups) == 12 and len(advantages) == 3
    failed = [g for g in groups if g["prompt_id"] == "p1"]
    assert failed and all(g["error"]["code"] == "backend_unavailable" and g["rewards"] == [None] * 4 for g in failed)
    for n, batch in enumerate(advantages):
        for k, group in enumerate(groups[4 * n:4 * n + 4]):
            mine = batch[4 * k:4 * k + 4]
            if group["error"] is not None:
                assert mine == [0.0] * 4
            elif len(set(group["rewards"])) > 1:
                assert any(abs(a) > 0.1 for a in mine)
    assert result.metrics["groups_skipped"] == len(failed)
    skipped = [r["judge/skipped_groups"] for r in read_rows(out / "log.jsonl") if "judge/skipped_groups" in r]
    assert skipped and sum(skipped) == len(failed)
    pairs = [(a, b) for a, b in calls]
    assert all((b, a) in pairs for a, b in pairs)  # both orders of every judged pair


def test_grpo_with_a_reward_model_instead_of_the_judge(tiny_chat_model, prompts, tmp_path):
    from cai.train.grpo import train_grpo

    out = tmp_path / "grpo-rm"
    # any sequence-classification folder is a reward model: the tiny LM gets a fresh score head
    result = train_grpo(prompts, str(tiny_chat_model), out, reward_model=str(tiny_chat_model),
                        trl_args=dict(max_steps=1, per_device_train_batch_size=8, num_generations=4,
                                      max_completion_length=4, save_strategy="no"))
    assert result.metrics["reward"] == "reward_model" and result.metrics["global_step"] == 1
    assert not (out / "groups.jsonl").exists()
    assert any("rewards/" in k for row in read_rows(out / "log.jsonl") for k in row)


# ---- the job, the CLI and the recipe ---------------------------------------------------------


def test_grpo_job_checks_trl_fields_and_defaults_the_judge_to_the_policy():
    from pydantic import ValidationError

    from cai.recipe import EngineSpec
    from cai.train.jobs import TRAIN_JOBS, GRPOTrainJob

    job = GRPOTrainJob(data="redteam", model="runs/sft", trl={"num_generations": 4})
    assert TRAIN_JOBS["train-grpo"] is GRPOTrainJob and job.out == "runs/grpo"
    assert job.judge_spec() == EngineSpec(backend="auto", model="runs/sft")
    assert job.config_args() == {"num_generations": 4}
    with pytest.raises(ValidationError, match="num_generationz.*did you mean num_generations"):
        GRPOTrainJob(data="x", trl={"num_generationz": 4})
    with pytest.raises(ValidationError):
        GRPOTrainJob(data="x", group_reward="elo")


def test_cli_grpo_with_the_fake_judge_backend(tiny_chat_model, prompts, tmp_path):
    from typer.testing import CliRunner

    from cai.cli.train import app

    out = tmp_path / "cli"
    args = ["grpo", "--data", str(prompts), "--model", str(tiny_chat_model), "--out", str(out), "--max-steps", "1",
            "--batch-size", "4", "--judge-backend", "fake", "--constitution-for", "prompts=helpful",
            "--trl", "num_generations=2", "--trl", "max_completion_length=4", "--trl", "save_strategy=no"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "groups_judged: 2" in result.output and "last kl" in result.output
    row = read_rows(out / "groups.jsonl")[0]
    assert row["constitution"]["name"] == "helpful" and row["judge_model"]["engine"] == "fake"
    typo = CliRunner().invoke(app, [a.replace("prompts=", "nope=") for a in args])
    assert typo.exit_code != 0 and "nope" in typo.output


def test_training_curves_show_grpo_reward_and_kl_and_ppo_value_loss(tmp_path):
    from cai.plots import _panels, plot_training_curves

    grpo = write_jsonl(tmp_path / "grpo.jsonl", [
        *({"step": s, "loss": 0.01, "reward": 0.5, "reward_std": 0.1 * s, "kl": 0.02 * s,
           "completions/mean_length": 7.0} for s in range(1, 5)), {"step": 4, "train_loss": 0.01}])
    ppo = write_jsonl(tmp_path / "ppo.jsonl", [{"step": s, "reward": 0.1 * s, "kl": 0.01 * s, "vf_loss": 1.0 / s,
                                                "entropy": 2.0, "pg_loss": 0.0} for s in range(1, 4)])
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"step": s, "loss": 2.0 - 0.1 * s} for s in range(1, 4)])
    panels = _panels({"grpo": grpo, "ppo": ppo, "sft": sft})
    assert [title for title, *_ in panels] == [
        "grpo: reward", "grpo: KL to reference", "grpo: completion tokens",
        "ppo: reward", "ppo: KL to reference", "ppo: value loss", "ppo: entropy", "sft: loss"]
    reward_lines = {name: ys for name, _, ys in panels[0][2]}
    assert reward_lines == {"reward": [0.5] * 4, "reward_std": pytest.approx([0.1, 0.2, 0.3, 0.4])}
    assert panels[5][2][0][2] == pytest.approx([1.0, 0.5, 1 / 3])
    png = plot_training_curves({"grpo": grpo, "ppo": ppo}, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
