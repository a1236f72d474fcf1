"""cai's PPO on the tiny random Llama: reward normalisation (no length push from a reward offset),
explicit sampling (the first-minibatch ratio), truncated completions, separate gradient clipping,
checkpointing on CPU, and exact resume."""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import write_jsonl  # noqa: E402

from cai.train import PPOConfig, TrainError, train_ppo  # noqa: E402
from cai.train import ppo as ppo_module  # noqa: E402
from cai.train.ppo import build_run, final_scores, resolve_config  # noqa: E402
from cai.train.ppo_core import RewardNorm, advantages, forward  # noqa: E402
from cai.train.ppo_rollout import reward_ids, rollout  # noqa: E402

torch.set_num_threads(1)

PROMPTS = ["please help me", "tell me a story", "can you help", "write a poem", "hello how are you", "why is the cat bad"]
# A small fast setting: 16 completions of up to 16 tokens, 2 minibatches, 4 epochs.
FAST = dict(batch_size=16, minibatch_size=8, max_new_tokens=16, learning_rate=3e-3, kl_coef=0.05, save_steps=100)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("ppo-prompts") / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def first_yes(offset: float):
    """offset + 1 when the completion starts with "yes": a reward that does not depend on length."""
    return lambda chats, texts: [offset + (1.0 if t.split()[:1] == ["yes"] else 0.0) for t in texts]


# ---- reward normalisation ----------------------------------------------------------


def test_reward_moments_by_hand():
    norm = RewardNorm()
    norm.update([1.0, 2.0, 3.0])
    norm.update([10.0])
    assert norm.count == 4 and norm.mean == pytest.approx(4.0)
    assert norm.std == pytest.approx(math.sqrt((9 + 4 + 1 + 36) / 3))  # unbiased, over all four
    assert norm.normalise(torch.tensor([4.0, 10.0])).tolist() == pytest.approx([0.0, 6 / math.sqrt(50 / 3)])
    constant = RewardNorm()
    constant.update([50.0] * 8)
    assert constant.normalise(torch.tensor([50.0, 51.0])).tolist() == [0.0, 1.0]  # std 0: only centred


def test_missing_eos_penalty_in_normalised_units():
    norm = RewardNorm()
    norm.update([1.0, 2.0, 3.0])  # mean 2, std 1
    run = {"cfg": PPOConfig(), "norm": norm}
    assert PPOConfig().missing_eos_penalty == 1.0
    scores = final_scores(run, torch.tensor([3.0, 3.0]), torch.tensor([True, False]))
    assert scores.tolist() == [1.0, 0.0]


def test_equal_scores_give_no_advantage_to_short_or_long():
    """The issue's measurement: the same score for a 2-token and a 6-token completion. Raw, GAE
    (gamma 1, lam 0.95, zero values) and whitening give both end tokens +1.19 and the long one's
    first token -1.68, whatever the score's size (a push towards ending early; -3 pushes the other
    way). Normalised, or with the value head's bias at the mean score, every advantage is 0."""
    cfg = PPOConfig(kl_coef=0.0)
    mask = torch.tensor([[1.0, 1, 0, 0, 0, 0], [1.0] * 6])
    zeros = torch.zeros(2, 6)
    raw = torch.tensor([3.0, 3.0])
    by_hand = [3 * 0.95, 3] + [3 * 0.95**k for k in range(5, -1, -1)]
    mean, std = statistics.fmean(by_hand), statistics.pstdev(by_hand)
    adv = advantages(raw, zeros, zeros, mask, cfg)[0]
    assert adv[0, 1].item() == pytest.approx((3 - mean) / std, rel=1e-4)
    assert adv[1, 0].item() == pytest.approx((3 * 0.95**5 - mean) / std, rel=1e-4)
    assert adv[0, 1].item() > 1.1 and adv[1, 0].item() < -1.5
    norm = RewardNorm()
    norm.update(raw.tolist())
    assert advantages(norm.normalise(raw), zeros, zeros, mask, cfg)[0].abs().max().item() == 0.0
    assert advantages(raw, 3.0 * mask, zeros, mask, cfg)[0].abs().max().item() == 0.0  # value bias = mean


def test_constant_reward_offset_does_not_change_length(tiny_chat_model, prompts, tmp_path):
    """+50 on every score must not move completion length. Before normalisation it did: the end token
    got the largest advantage and completions fell from 14 to 3 tokens in 8 steps (zero offset: 13)."""
    lengths = {}
    for offset in (0.0, 50.0):
        out = tmp_path / f"offset-{offset:g}"
        cfg = FAST | dict(steps=8, missing_eos_penalty=0.0)
        train_ppo(prompts, str(tiny_chat_model), out, reward_fn=first_yes(offset), config=cfg)
        lengths[offset] = [r["completion_tokens"] for r in read_log(out)]
    late = {k: statistics.fmean(v[-3:]) for k, v in lengths.items()}
    assert late[0.0] > 9, lengths  # the zero-offset run keeps long completions
    assert abs(late[50.0] - late[0.0]) < 1.5, lengths


def test_reward_norm_modes(tiny_chat_model, prompts, tmp_path):
    """warmup: the moments of the warm-up batches only, then fixed; none: raw scores minus the penalty."""
    fixed = train_ppo(prompts, str(tiny_chat_model), tmp_path / "fixed", reward_fn=first_yes(5.0),
                      config=FAST | dict(steps=2, max_new_tokens=4, reward_norm="warmup", reward_norm_warmup=2))
    assert fixed.metrics["reward_norm"]["count"] == 2 * 16
    assert fixed.metrics["reward_warmup"]["batches"] == 2
    raw = train_ppo(prompts, str(tiny_chat_model), tmp_path / "raw", reward_fn=first_yes(5.0),
                    config=FAST | dict(steps=1, max_new_tokens=4, reward_norm="none"))
    row = read_log(tmp_path / "raw")[0]
    assert raw.metrics["reward_norm"]["count"] == 0
    assert row["score"] == pytest.approx(row["reward"] - 1.0 * (1 - row["ended_rate"]), abs=1e-5)
    assert raw.metrics["reward_warmup"]["value_bias"] > 3  # the value head starts near the raw mean (about 5)


# ---- sampling ----------------------------------------------------------------------


@pytest.fixture
def model_with_generation_defaults(tiny_chat_model, tmp_path) -> Path:
    """The tiny model with a generation_config that would change sampling if it leaked into rollouts."""
    folder = Path(shutil.copytree(tiny_chat_model, tmp_path / "gen-defaults"))
    gen = json.loads((folder / "generation_config.json").read_text())
    gen |= {"repetition_penalty": 2.0, "no_repeat_ngram_size": 1, "top_k": 5, "min_p": 0.9, "do_sample": True}
    (folder / "generation_config.json").write_text(json.dumps(gen))
    return folder


def test_rollout_ignores_model_generation_config(model_with_generation_defaults, prompts):
    cfg = resolve_config(FAST | dict(max_new_tokens=24))
    run = build_run(prompts, str(model_with_generation_defaults), None, first_yes(0.0), None, False, cfg)
    assert run["policy"].generation_config.repetition_penalty == 2.0  # the model keeps its own defaults
    torch.manual_seed(0)
    batch = rollout(run, [[{"role": "user", "content": p}] for p in PROMPTS * 3])
    assert run["policy"].generation_config.no_repeat_ngram_size == 1  # restored after the call
    n = batch["n_prompt"]
    completions = [row[n:][m.bool()].tolist() for row, m in zip(batch["seq"], batch["cmask"])]
    # no_repeat_ngram_size=1 would forbid any repeated token; a 42-word model repeats often
    assert sum(len(c) != len(set(c)) for c in completions) >= 5
    logp, entropy, _ = forward(run["policy"], None, batch["seq"], batch["mask"], n, cfg.temperature)
    mask = batch["cmask"]
    gap = ((logp - batch["sample_logp"]) * mask).abs().max().item()
    assert gap < 1e-4  # every token's recorded sampling probability is the one the update computes
    # ... and tokens were drawn from that distribution: E[log p(token)] = -entropy. A warper after the
    # recorder (top_k=5, min_p=0.9) would draw only likely tokens: mean log p ~ -3.0 against -3.7.
    drawn = (logp * mask).sum() / mask.sum()
    assert abs(drawn.item() + ((entropy * mask).sum() / mask.sum()).item()) < 0.15


def test_leaked_sampling_setting_fails_the_ratio_check(model_with_generation_defaults, prompts, tmp_path, monkeypatch):
    """Simulate the old rollout (a GenerationConfig that leaves repetition_penalty etc. unset, merged
    with the model's): the first-minibatch ratio check stops the run and says why."""
    import contextlib

    from transformers import GenerationConfig

    from cai.train import ppo_rollout

    def leaky(cfg, tok, end_ids):
        return GenerationConfig(do_sample=True, top_k=0, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
                                eos_token_id=end_ids, pad_token_id=tok.pad_token_id)

    monkeypatch.setattr(ppo_module, "generation_config", leaky)
    monkeypatch.setattr(ppo_rollout, "blank_model_generation_config", lambda model: contextlib.nullcontext())
    cfg = FAST | dict(steps=1, reward_norm_warmup=0)
    with pytest.raises(TrainError, match="first_ratio"):
        train_ppo(prompts, str(model_with_generation_defaults), tmp_path / "leak", reward_fn=first_yes(0.0), config=cfg)
    train_ppo(prompts, str(model_with_generation_defaults), tmp_path / "warn", reward_fn=first_yes(0.0),
              config=cfg | dict(ratio_check="warn"))
    assert read_log(tmp_path / "warn")[0]["first_ratio"] < 0.9


# ---- truncated completions ---------------------------------------------------------


def test_cut_off_completion_is_not_scored_as_a_finished_turn(tiny_chat_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    prompt = [{"role": "user", "content": "tell me a story"}]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    finished = reward_ids(tok, prompt, "yes a cat", ended=True)
    cut = reward_ids(tok, prompt, "yes a cat", ended=False)
    assert finished[-1] == end and end not in cut[-4:]
    assert tok.decode(cut[-4:]) == "assistant yes a cat"  # generation prompt + raw text, nothing after
    assert finished[: len(cut)] == cut


def test_default_max_new_tokens_matches_phase_two():
    from cai.recipe import Phase2Config

    assert PPOConfig().max_new_tokens == Phase2Config().policy.max_tokens == 192


# ---- the update --------------------------------------------------------------------


def test_value_head_clipped_apart_from_the_policy(tiny_chat_model, prompts, tmp_path):
    """A value-head clip of 1e-12 freezes the head (Adam's step is ~ lr * g / eps) while the policy,
    clipped at 1.0, still moves; with one joint clip the head would move as much as the policy."""
    out = tmp_path / "clip"
    train_ppo(prompts, str(tiny_chat_model), out, reward_fn=first_yes(0.0),
              config=FAST | dict(steps=2, value_max_grad_norm=1e-12, reward_norm_warmup=0))
    head = torch.load(out / "value_head.pt")["state_dict"]
    bias_at_start = read_log(out)[0]["score"]  # the first batch's mean score set the bias
    assert head["linear.weight"].abs().max().item() < 1e-5
    assert head["linear.bias"].item() == pytest.approx(bias_at_start, abs=1e-5)
    assert all(r["value_grad_norm"] > 1e-6 for r in read_log(out))  # logged before clipping


def test_checkpointing_and_bf16_on_cpu(tiny_chat_model, prompts, tmp_path):
    """Gradient checkpointing changes nothing but memory: the same losses to 1e-5. bf16 autocast runs
    (sampling and update both in bf16) and passes the ratio check."""
    rows = {}
    for name, extra in (("plain", {}), ("ckpt", dict(gradient_checkpointing=True)), ("bf16", dict(bf16=True))):
        out = tmp_path / name
        train_ppo(prompts, str(tiny_chat_model), out, reward_fn=first_yes(0.0), config=FAST | dict(steps=1) | extra)
        rows[name] = read_log(out)[0]
    assert json.loads((tmp_path / "ckpt" / "ppo_config.json").read_text())["gradient_checkpointing"] is True
    for key in ("pg_loss", "vf_loss", "kl"):
        assert rows["ckpt"][key] == pytest.approx(rows["plain"][key], abs=1e-5)
    assert abs(rows["bf16"]["first_ratio"] - 1) < 0.05


def test_cpu_defaults_resolve_off():
    if torch.cuda.is_available():
        pytest.skip("CPU defaults")
    cfg = resolve_config(None)
    assert cfg.bf16 is False and cfg.gradient_checkpointing is False
    with pytest.raises(TrainError, match="reward_norm_warmup"):
        resolve_config({"reward_norm": "warmup", "reward_norm_warmup": 0})


def test_resume_is_exact(tiny_chat_model, prompts, tmp_path):
    """3 steps straight == 2 steps, then resume for the third: the same log row (reward moments,
    weights, optimiser and seeds all come back)."""
    cfg = FAST | dict(steps=3, save_steps=1, max_new_tokens=8)
    straight = tmp_path / "straight"
    train_ppo(prompts, str(tiny_chat_model), straight, reward_fn=first_yes(0.0), config=cfg)
    resumed = tmp_path / "resumed"
    train_ppo(prompts, str(tiny_chat_model), resumed, reward_fn=first_yes(0.0), config=cfg | dict(steps=2))
    result = train_ppo(prompts, str(tiny_chat_model), resumed, reward_fn=first_yes(0.0), config=cfg, resume=True)
    assert result.metrics["resumed_from"].endswith("checkpoint-2") and result.metrics["reward_warmup"] is None
    a, b = read_log(straight)[-1], read_log(resumed)[-1]
    assert a["reward_running_mean"] == b["reward_running_mean"]
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    state = json.loads((resumed / "checkpoint-3" / "state.json").read_text())
    assert state["reward_norm"]["count"] == 16 * 4  # one warm-up batch and three steps
