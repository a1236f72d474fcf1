"""Soft labels used as labels: the reward model's soft cross-entropy and per-pair conservative DPO,
checked against losses and gradients computed by hand on two-pair batches (the trainers' own
compute_loss, fed known rewards / log-probs by a stub model), then a few training steps each."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import write_jsonl  # noqa: E402

from cai.train import TrainError, train_dpo, train_reward_model  # noqa: E402
from cai.train.dpo import prepare_dpo_data  # noqa: E402
from cai.train.reward import soft_pairs  # noqa: E402
from cai.train.soft_labels import conservative_as_robust  # noqa: E402

torch.set_num_threads(1)

FAST = dict(per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=1, save_strategy="no")


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def pair_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{
        "prompt": user(rng.choice(["please help me", "tell me a story"])),
        "chosen": [{"role": "assistant", "content": rng.choice(["sure i will help", "yes i will tell a story"])}],
        "rejected": [{"role": "assistant", "content": rng.choice(["no", "sorry i can not"])}],
        "score": round(rng.uniform(0.6, 1.0), 3), "metadata": {"id": f"pair-{i}"},
    } for i in range(n)]


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("soft") / "prefs.jsonl", pair_rows(16))


class Stub(torch.nn.Module):
    """A model whose forward returns fixed outputs (whatever the inputs), so a loss is known by hand."""

    def __init__(self, **outputs):
        super().__init__()
        self.outputs = SimpleNamespace(**outputs)

    def forward(self, **_):
        return self.outputs


# ---- reward model ----------------------------------------------------------------


def reward_trainer(tiny_chat_model, tmp_path, soft: bool = True, **config):
    from trl import RewardConfig, RewardTrainer

    from cai.train.common import load_model, load_tokenizer, make_config
    from cai.train.soft_trainers import SoftLabelRewardTrainer

    tok = load_tokenizer(str(tiny_chat_model))
    data, _ = soft_pairs(write_jsonl(tmp_path / "p.jsonl", pair_rows(2)))
    return (SoftLabelRewardTrainer if soft else RewardTrainer)(
        model=load_model(str(tiny_chat_model), "reward", pad_token_id=tok.pad_token_id),
        args=make_config(RewardConfig, tmp_path / "rm", {}, config), train_dataset=data, processing_class=tok)


def rm_batch(rewards: list[float], **extra) -> tuple[dict, torch.Tensor]:
    """Inputs for two pairs (rows: chosen 1, chosen 2, rejected 1, rejected 2) and the rewards leaf."""
    logits = torch.tensor([[r] for r in rewards], requires_grad=True)
    inputs = {"input_ids": torch.ones(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3, dtype=torch.long)}
    return inputs | {k: torch.tensor(v) for k, v in extra.items()}, logits


def test_soft_reward_loss_by_hand_with_centring(tiny_chat_model, tmp_path):
    trainer = reward_trainer(tiny_chat_model, tmp_path, center_rewards_coefficient=0.1)
    rc, rr, s = [1.5, 0.2], [-0.5, 0.4], [0.9, 0.6]
    inputs, logits = rm_batch(rc + rr, score=s)
    loss = trainer.compute_loss(Stub(logits=logits), inputs)

    deltas = [c - r for c, r in zip(rc, rr)]  # 2.0 and -0.2
    soft = [-(si * log_sigmoid(d) + (1 - si) * log_sigmoid(-d)) for si, d in zip(s, deltas)]
    centring = 0.1 * sum((c + r) ** 2 for c, r in zip(rc, rr)) / 2
    assert loss.item() == pytest.approx(sum(soft) / 2 + centring, rel=1e-6)
    loss.backward()  # d/dΔ = σ(Δ) - s per pair, plus the centring term 2·0.1·(rc + rr)/2
    sigmoid = [1 / (1 + math.exp(-d)) for d in deltas]
    expected = [(sg - si) / 2 + 0.1 * (c + r) for sg, si, c, r in zip(sigmoid, s, rc, rr)]
    assert logits.grad[:2, 0].tolist() == pytest.approx(expected, rel=1e-5)


def test_margin_reward_loss_by_hand(tiny_chat_model, tmp_path):
    trainer = reward_trainer(tiny_chat_model, tmp_path, soft=False)
    rc, rr, m = [1.5, 0.2], [-0.5, 0.4], [0.8, 0.2]
    inputs, logits = rm_batch(rc + rr, margin=m)
    loss = trainer.compute_loss(Stub(logits=logits), inputs)
    expected = sum(-log_sigmoid(c - r - mi) for c, r, mi in zip(rc, rr, m)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_near_tie_has_no_gradient_under_the_soft_loss_only(tiny_chat_model, tmp_path):
    """s = 0.5 at Δ = 0 is the soft loss's minimum; the margin loss (margin 2s - 1 = 0) still pushes Δ up."""
    soft = reward_trainer(tiny_chat_model, tmp_path)
    inputs, logits = rm_batch([0.3, 1.0, 0.3, 0.0], score=[0.5, 0.8])
    soft.compute_loss(Stub(logits=logits), inputs).backward()
    assert logits.grad[0, 0].item() == 0.0 and logits.grad[2, 0].item() == 0.0
    assert logits.grad[1, 0].item() == pytest.approx((1 / (1 + math.exp(-1.0)) - 0.8) / 2, rel=1e-5)

    margin = reward_trainer(tiny_chat_model, tmp_path, soft=False)
    inputs, logits = rm_batch([0.3, 1.0, 0.3, 0.0], margin=[0.0, 0.6])
    margin.compute_loss(Stub(logits=logits), inputs).backward()
    assert logits.grad[0, 0].item() == pytest.approx(-0.25)  # -σ(0)/2: the tie is trained as a win


def test_the_score_reaches_the_batch(tiny_chat_model, tmp_path):
    trainer = reward_trainer(tiny_chat_model, tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    assert sorted(batch["score"].tolist()) == pytest.approx(sorted(r["score"] for r in pair_rows(2)))


# ---- DPO --------------------------------------------------------------------------


def dpo_trainer(tiny_chat_model, tmp_path, beta: float):
    from trl import DPOConfig

    from cai.train.common import load_model, load_tokenizer, make_config
    from cai.train.soft_trainers import PerPairDPOTrainer

    path = write_jsonl(tmp_path / "p.jsonl", pair_rows(2))
    data, extra, _ = prepare_dpo_data(path, "per_pair")
    assert extra == {"loss_type": ["robust"], "label_smoothing": 0.0}
    args = make_config(DPOConfig, tmp_path / "dpo", {}, extra | {"beta": beta})
    return PerPairDPOTrainer(model=load_model(str(tiny_chat_model)), args=args, train_dataset=data,
                             processing_class=load_tokenizer(str(tiny_chat_model)))


def dpo_loss(trainer, policy: list[float], ref: list[float], score: list[float] | None):
    """TRL's DPO loss on two pairs whose completions' summed log-probs are `policy` and `ref`
    (rows: chosen 1, chosen 2, rejected 1, rejected 2); the per-row policy log-probs leaf."""
    log_probs = torch.tensor([[p / 2, p / 2] for p in policy], requires_grad=True)  # two completion tokens a row
    stub = Stub(log_probs=log_probs, entropy=torch.zeros(4, 2), mean_logits=torch.zeros(4, 2),
                is_top1=torch.zeros(4, 2, dtype=torch.bool))
    inputs = {"input_ids": torch.ones(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3, dtype=torch.long),
              "completion_mask": torch.tensor([[0, 1, 1]] * 4),
              "ref_chosen_logps": torch.tensor(ref[:2]), "ref_rejected_logps": torch.tensor(ref[2:])}
    if score is not None:
        inputs["score"] = torch.tensor(score)
    trainer.precompute_ref_logps = True  # read the reference log-probs from the batch
    return trainer.compute_loss(stub, inputs), log_probs


POLICY, REF, BETA = [-3.0, -5.0, -6.0, -4.5], [-4.0, -5.5, -5.0, -4.0], 0.5


def x_by_hand() -> list[float]:
    return [BETA * ((POLICY[i] - REF[i]) - (POLICY[i + 2] - REF[i + 2])) for i in range(2)]  # 1.0 and 0.5


def test_per_pair_conservative_dpo_by_hand(tiny_chat_model, tmp_path):
    trainer = dpo_trainer(tiny_chat_model, tmp_path, BETA)
    s = [0.9, 0.7]
    loss, log_probs = dpo_loss(trainer, POLICY, REF, s)
    eps = [1 - si for si in s]
    expected = [(1 - e) * -log_sigmoid(x) + e * -log_sigmoid(-x) for e, x in zip(eps, x_by_hand())]
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert trainer.label_smoothing == 0.0  # the per-batch ε is not left behind
    loss.backward()  # d loss_i / d x_i = σ(x_i) - s_i; each chosen token carries β/2 of it
    grads = [BETA * (1 / (1 + math.exp(-x)) - si) / 2 for x, si in zip(x_by_hand(), s)]
    assert log_probs.grad[:2, 0].tolist() == pytest.approx(grads, rel=1e-5)
    assert log_probs.grad[2:, 0].tolist() == pytest.approx([-g for g in grads], rel=1e-5)


def test_per_pair_tie_and_certain_pairs(tiny_chat_model, tmp_path):
    """A tie (score 0.5; ε capped just below 0.5) and, without scores, plain DPO (ε = 0)."""
    trainer = dpo_trainer(tiny_chat_model, tmp_path, BETA)
    x = x_by_hand()
    tie, _ = dpo_loss(trainer, POLICY, REF, [0.5, 1.0])
    expected = (0.5 * (-log_sigmoid(x[0]) - log_sigmoid(-x[0])) - log_sigmoid(x[1])) / 2
    assert tie.item() == pytest.approx(expected, rel=1e-5)
    plain, _ = dpo_loss(trainer, POLICY, REF, None)
    assert plain.item() == pytest.approx(-(log_sigmoid(x[0]) + log_sigmoid(x[1])) / 2, rel=1e-6)
    assert conservative_as_robust(torch.tensor([0.0, 0.1])).tolist() == pytest.approx([0.0, -0.125])


def test_per_pair_refuses_what_it_cannot_apply(tmp_path):
    rows = pair_rows(3)
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(TrainError, match="per_pair.*loss_type \\['ipo'\\]"):
        prepare_dpo_data(path, "per_pair", {"loss_type": "ipo"})
    rows[1]["score"] = 0.3
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(TrainError, match=r"bad\.jsonl: row 2 \(id pair-1\) has score = 0\.3"):
        prepare_dpo_data(bad, "per_pair")
    rows[1]["score"] = None
    empty = write_jsonl(tmp_path / "empty.jsonl", rows)
    with pytest.raises(TrainError, match=r"empty\.jsonl: pair 2 \(id pair-1\) has no score"):
        prepare_dpo_data(empty, "per_pair")
    with pytest.raises(TrainError, match="pair 2 \\(id pair-1\\) has no score"):
        soft_pairs(empty)
    with pytest.raises(TrainError, match="margin_scale=2.0 applies to loss='margin'"):
        train_reward_model(path, out=tmp_path / "rm", margin_scale=2.0)
    hard = write_jsonl(tmp_path / "hard.jsonl", [{k: v for k, v in r.items() if k != "score"} for r in rows])
    data, extra, _ = prepare_dpo_data(hard, "per_pair")
    assert extra == {} and "score" not in data.column_names


# ---- a few steps each ---------------------------------------------------------------


def test_soft_reward_model_trains(tiny_chat_model, pref_data, tmp_path):
    out = tmp_path / "rm"
    result = train_reward_model(pref_data, str(tiny_chat_model), out, eval_fraction=0.25,
                                trl_args=FAST | dict(max_steps=3))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == result.metrics and metrics["global_step"] == 3
    assert metrics["loss"] == "soft" and metrics["uses_scores"] is True and metrics["uses_margin"] is False
    scores = [r["score"] for r in pair_rows(16)]
    assert metrics["mean_score"] == pytest.approx(sum(scores) / len(scores))
    assert "heldout_accuracy" in metrics


def test_per_pair_dpo_trains(tiny_chat_model, pref_data, tmp_path):
    out = tmp_path / "dpo"
    result = train_dpo(pref_data, str(tiny_chat_model), out, trl_args=FAST | dict(max_steps=2))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == result.metrics and metrics["global_step"] == 2
    assert metrics["soft_label"] == "per_pair" and metrics["uses_scores"] is True
    scores = [r["score"] for r in pair_rows(16)]
    assert metrics["mean_epsilon"] == pytest.approx(sum(1 - s for s in scores) / len(scores))
    losses = [row["loss"] for row in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in row]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_the_new_score_head_is_seeded_so_two_runs_in_one_process_agree(tiny_chat_model, pref_data, tmp_path):
    torch.manual_seed(1)  # whatever state the process is in, the head follows the config's seed
    first = train_reward_model(pref_data, str(tiny_chat_model), tmp_path / "a", trl_args=FAST | dict(max_steps=1))
    torch.rand(7)
    second = train_reward_model(pref_data, str(tiny_chat_model), tmp_path / "b", trl_args=FAST | dict(max_steps=1))
    assert first.metrics["train_loss"] == pytest.approx(second.metrics["train_loss"], abs=1e-6)
    assert first.metrics["heldout_mean_gap"] == pytest.approx(second.metrics["heldout_mean_gap"], abs=1e-6)
