"""Reward model on phase-2 preference pairs with TRL's RewardTrainer.

The model is `AutoModelForSequenceClassification(num_labels=1)` over the same
chat template as the policy: a pair's two rows are `prompt + chosen` and
`prompt + rejected`, rendered exactly as TRL renders them (and as `cai train
ppo` renders a rollout before scoring it).

The judge's margin. With a `margin` column TRL's loss is
`-log sigmoid(r(chosen) - r(rejected) - margin)` (Llama 2's margin loss): a
pair keeps a large gradient until it is won by about `margin`. cai's judge
writes `margin = 2*score - 1` = P(chosen) - P(rejected), in [0, 1], and it is
passed through times `margin_scale` (a dataset with `score` but no `margin`
gets the same `2*score - 1`; another dataset's own `margin` is used as TRL
would use it). Near-ties ask for almost no reward gap and confident pairs for
up to `margin_scale`, so the model is not pushed to separate answers the judge
could barely tell apart. `margin_scale=0` is plain Bradley-Terry.

Human labels. A pair a reviewer decided in cai serve (`metadata.review.label`
agree or flip) is a confident label: its score and margin are 1.0, so it asks
for the full `margin_scale` reward gap, and a row a reviewer discarded is
dropped (`cai.train.common.load_preferences`, applying `cai.formats.apply_review`;
it also repairs older exports that stored a flip as score = 1 - score). An
unreviewed row with score < 0.5 or a negative margin is an error naming the
file and row: a negative margin would train the model toward the rejected
answer's side. metrics.json counts the human labels (`human_labels`).

Held-out accuracy. A seeded `eval_fraction` of the pairs (10% by default) is
kept out of training; the fraction of held-out pairs with
r(chosen) > r(rejected) is measured before and after training and written to
OUT/metrics.json (`heldout_accuracy`, `heldout_accuracy_before`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cai.train.common import (
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
    margin_scale: float = 1.0,
) -> TrainResult:
    """Train a reward model on preference pairs (see the module docstring for margins).

    `trl_args` go into `trl.RewardConfig` as they are, over cai's CPU-safe
    defaults. `lora` as in `train_sft` (task SEQ_CLS: the score head is trained
    in full). The held-out split is seeded by the config's `seed`. Writes OUT
    (reloads with AutoModelForSequenceClassification), OUT/log.jsonl and
    OUT/metrics.json with the held-out pairwise accuracy.
    """
    from trl import RewardConfig, RewardTrainer

    raw = load_preferences(data)  # bad labels fail before a model loads
    n_threads = set_threads(threads)
    path = model_path(model)
    tokenizer = load_tokenizer(path)
    check_chat_format(tokenizer)
    args = make_config(RewardConfig, out, RM_DEFAULTS, trl_args)
    train, heldout = heldout_split(prepare_pairs(raw, margin_scale), eval_fraction, args.seed)
    init = (trl_args or {}).get("model_init_kwargs")
    trainer = RewardTrainer(
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
        "lora": bool(lora), "threads": n_threads, "margin_scale": margin_scale, "uses_margin": "margin" in train.column_names,
        "human_labels": sum(human_labelled(raw)),
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
