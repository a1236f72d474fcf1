"""Reward model on phase-2 preference pairs with TRL's RewardTrainer.

The model is `AutoModelForSequenceClassification(num_labels=1)` over the same
chat template as the policy: a pair's two rows are `prompt + chosen` and
`prompt + rejected`, rendered exactly as TRL renders them (and as `cai train
ppo` renders a rollout before scoring it). Δ = r(chosen) - r(rejected).

Soft labels, `loss="soft"` (the default). cai's `score` is the judge's
P(chosen preferred), averaged over both option orders. The loss is the
cross-entropy against it, -[s·log σ(Δ) + (1-s)·log σ(-Δ)], as RLAIF (Lee et
al., 2023) trains its reward model: its minimum is at σ(Δ) = s, so a pair
the judge could barely tell apart (s near 0.5) asks for a gap near 0 and a
confident one for a large gap, and near-ties are not trained as certain. A
dataset without a `score` column has s = 1 for every pair, i.e. plain
Bradley-Terry, and metrics.json says so (`uses_scores`, `labels`). The loss is
TRL's Bradley-Terry loss plus (1-s)·Δ (cai.train.soft_trainers), so TRL's
`center_rewards_coefficient` (set it in `trl_args`) still adds its reward
centring term. `margin_scale` belongs to the margin loss and is refused here.

Margin, `loss="margin"`. With a `margin` column TRL's loss is
`-log sigmoid(Δ - margin)` (Llama 2's margin loss): a pair keeps a large
gradient until it is won by about `margin`. cai's judge writes
`margin = 2*score - 1` = P(chosen) - P(rejected), in [0, 1], and it is passed
through times `margin_scale` (a dataset with `score` but no `margin` gets the
same `2*score - 1`; another dataset's own `margin` is used as TRL would use
it). It pushes every won pair's gap on without bound, near-ties included (a
tie asks for gap 0 but still has gradient -1/2 at Δ = 0). `margin_scale=0` is
plain Bradley-Terry.

Human labels. A pair a reviewer decided in cai serve (`metadata.review.label`
agree or flip) is a confident label: its score and margin are 1.0 (the soft
loss's s = 1; the margin loss's full `margin_scale` gap), and a row a
reviewer discarded is dropped (`cai.train.common.load_preferences`, applying
`cai.formats.apply_review`; it also repairs older exports that stored a flip
as score = 1 - score). An unreviewed row with score < 0.5 or a negative margin
is an error naming the file and row: it would train the model toward the
rejected answer's side. So is an unreviewed row with an empty score under the
soft loss. metrics.json counts the human labels (`human_labels`).

Held-out accuracy. A seeded `eval_fraction` of the pairs (10% by default) is
kept out of training; the fraction of held-out pairs with
r(chosen) > r(rejected) is measured before and after training and written to
OUT/metrics.json (`heldout_accuracy`, `heldout_accuracy_before`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch

from cai.train.common import (
    TrainError,
    TrainResult,
    check_chat_format,
    describe,
    heldout_split,
    human_labelled,
    keep_columns,
    load_model,
    load_preferences,
    load_tokenizer,
    lora_config,
    make_config,
    model_path,
    run_trainer,
    set_threads,
)
from cai.train.soft_labels import SCORE, label_summary, pair_scores

log = logging.getLogger("cai.train")

RM_DEFAULTS: dict[str, Any] = dict(logging_steps=1, save_steps=200)


def prepare_pairs(path: str | Path, margin_scale: float):
    """The pairs with TRL's columns only, plus `margin` when `margin_scale` is not 0.

    Labels as `load_preferences` checks them: human-reviewed rows have margin 1.0 (times the scale)."""
    ds = load_preferences(path)
    if margin_scale and "margin" in ds.column_names:
        ds = ds.map(lambda row: {"margin": margin_scale * float(row["margin"] or 0.0)})
    elif margin_scale and "score" in ds.column_names:
        ds = ds.map(lambda row: {"margin": margin_scale * (2.0 * float(row["score"]) - 1.0)})
    return keep_columns(ds, extra=("margin",) if margin_scale else ())


def soft_pairs(path: str | Path, source: str | None = None):
    """(pairs with TRL's columns plus `score`, the scores or None): the soft loss's data.

    Labels as `load_preferences` checks them: human-reviewed rows have score 1.0. Without a
    `score` column the pairs are hard labels (s = 1) and the scores are None."""
    ds = load_preferences(path)
    scores = pair_scores(ds, source or describe(path))
    if scores is None and "margin" in ds.column_names:
        log.warning("the pairs have a `margin` but no `score`: the soft loss trains them as hard labels "
                    "(s = 1); loss='margin' uses the margins")
    return keep_columns(ds, extra=(SCORE,)), scores


@torch.no_grad()
def pairwise_accuracy(trainer, dataset, batch_size: int = 8) -> dict[str, float]:
    """Fraction of (tokenized) pairs with r(chosen) > r(rejected), and the mean reward gap."""
    model = trainer.model
    was_training = model.training
    model.eval()
    wins, gaps = [], []
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = trainer.data_collator([{k: r[k] for k in ("chosen_ids", "rejected_ids")} for r in rows])
        device = next(model.parameters()).device
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        chosen, rejected = logits.squeeze(-1).float().chunk(2)
        wins += (chosen > rejected).tolist()
        gaps += (chosen - rejected).tolist()
    model.train(was_training)
    n = len(wins)
    return {"accuracy": sum(wins) / n if n else float("nan"), "mean_gap": sum(gaps) / n if n else float("nan"), "n": n}


def train_reward_model(
    data: str | Path,
    model: str | None = None,
    out: str | Path = "runs/rm",
    *,
    lora: bool | dict[str, Any] = False,
    trl_args: dict[str, Any] | None = None,
    resume: bool | str = False,
    threads: int | None = None,
    eval_fraction: float = 0.1,
    loss: Literal["soft", "margin"] = "soft",
    margin_scale: float = 1.0,
) -> TrainResult:
    """Train a reward model on preference pairs with the soft-label or the margin loss
    (see the module docstring).

    `trl_args` go into `trl.RewardConfig` as they are, over cai's CPU-safe
    defaults. `lora` as in `train_sft` (task SEQ_CLS: the score head is trained
    in full). The held-out split is seeded by the config's `seed`. Writes OUT
    (reloads with AutoModelForSequenceClassification), OUT/log.jsonl and
    OUT/metrics.json with the held-out pairwise accuracy.
    """
    if loss not in ("soft", "margin"):
        raise TrainError(f"loss must be 'soft' or 'margin', not {loss!r}")
    if loss == "soft" and margin_scale != 1.0:
        raise TrainError(f"margin_scale={margin_scale} applies to loss='margin'; the soft loss takes no margin")
    from trl import RewardConfig, RewardTrainer

    from cai.train.soft_trainers import SoftLabelRewardTrainer

    raw = load_preferences(data)  # bad labels fail before a model loads
    if loss == "soft":
        pairs, scores = soft_pairs(raw, describe(data))
        labels = {"uses_margin": False, **label_summary(scores)}
    else:
        pairs = prepare_pairs(raw, margin_scale)
        labels = {"margin_scale": margin_scale, "uses_margin": "margin" in pairs.column_names}
    n_threads = set_threads(threads)
    path = model_path(model)
    tokenizer = load_tokenizer(path)
    check_chat_format(tokenizer)
    args = make_config(RewardConfig, out, RM_DEFAULTS, trl_args)
    train, heldout = heldout_split(pairs, eval_fraction, args.seed)
    init = (trl_args or {}).get("model_init_kwargs")
    torch.manual_seed(args.seed)  # the new score head is drawn here, before the Trainer seeds anything
    trainer = (SoftLabelRewardTrainer if loss == "soft" else RewardTrainer)(
        model=load_model(path, "reward", init, pad_token_id=tokenizer.pad_token_id),
        args=args,
        train_dataset=train,
        eval_dataset=heldout,
        processing_class=tokenizer,
        peft_config=lora_config(lora, "SEQ_CLS"),
    )
    before = pairwise_accuracy(trainer, trainer.eval_dataset) if heldout is not None else None
    summary = {
        "trainer": "rm", "model": path, "data": describe(data), "rows": len(train),
        "lora": bool(lora), "threads": n_threads, "loss": loss, **labels,
        "center_rewards_coefficient": args.center_rewards_coefficient, "human_labels": sum(human_labelled(raw)),
    }

    def evaluate() -> dict[str, Any]:
        if heldout is None:
            return {}
        after = pairwise_accuracy(trainer, trainer.eval_dataset)
        return {
            "heldout_pairs": after["n"],
            "heldout_accuracy": after["accuracy"],
            "heldout_mean_gap": after["mean_gap"],
            "heldout_accuracy_before": before["accuracy"],
        }

    metrics = run_trainer(trainer, tokenizer, out, resume, None, summary, evaluate)
    return TrainResult(out=str(out), metrics=metrics)
