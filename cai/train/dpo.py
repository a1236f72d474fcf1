"""Direct preference optimisation on phase-2 pairs with TRL's DPOTrainer.

cai's `score` is the judge's P(chosen preferred), averaged over both option
orders. h = (log π(chosen) - log π_ref(chosen)) - (log π(rejected) -
log π_ref(rejected)) and x = β·h, as in TRL.

Default, `soft_label="per_pair"`: conservative (label-smoothed) DPO with each
pair's own confidence, ε_i = 1 - score_i:

    loss_i = (1 - ε_i)·(-log σ(x_i)) + ε_i·(-log σ(-x_i))

This is the expected DPO loss when the pair's label is drawn from the judge's
P(chosen), the soft-label cross-entropy RLAIF (Lee et al., 2023) trains its
reward model with, applied to DPO's implicit reward. Its minimum is at
σ(x_i) = score_i: a pair the judge scored 0.6 asks for a small implicit
reward gap, one it scored 0.99 (or a human label) for a large one. Plain DPO
takes every pair as certain and pushes every gap on without bound, near-ties
included. Why this is the default, and what it assumes: it is plain DPO
wherever a pair is certain (ε = 0), and it is exact only as far as the judge
is calibrated; an over-confident judge makes it closer to plain DPO, an
under-confident one holds confident pairs back. A dataset without a `score`
column has ε = 0 for every pair: plain DPO (TRL's `sigmoid` loss), and
metrics.json says so (`uses_scores`, `labels`). It runs as TRL's `robust`
loss with a per-pair label_smoothing that makes it exactly this loss
(cai.train.soft_labels, cai.train.soft_trainers), so `loss_type` must be
left at `sigmoid`; another loss needs `soft_label="none"` (or "smoothing"),
and cai refuses rather than dropping the soft labels. metrics.json records
`mean_epsilon`.

`soft_label="smoothing"`: one dataset-wide ε. If the judge is calibrated, a
pair's label is wrong with probability 1 - score, so `mean(1 - score)` over
the training pairs estimates the rate of flipped labels in the dataset. That
is exactly the parameter of Robust DPO (Chowdhury et al., 2024), which TRL
implements as `loss_type="robust"` with `label_smoothing` = the flip rate: an
unbiased estimate of the clean-label DPO loss under that noise rate. So cai
sets `label_smoothing = mean(1 - score)` and, unless the caller chose a loss
that reads `label_smoothing` (`exo_pair`, `aot`, ...), `loss_type="robust"`.
A rate of 0.5 or more means the labels carry no signal and is refused.
Robust DPO assumes hard labels flipped at random; per_pair uses what the
judge measured about each pair, which is why it is the default.

`soft_label="none"`: plain DPO (or whatever `loss_type` says), every exported
pair a hard label.

Human labels. A pair a reviewer decided in cai serve (`metadata.review.label`
agree or flip) is taken as noise-free: its score counts as 1.0 (ε = 0 per
pair; nothing added to the flip rate), and a row a reviewer discarded is
dropped (`cai.train.common.load_preferences`, applying
`cai.formats.apply_review`; it also repairs older exports that stored a flip
as score = 1 - score). An unreviewed row with score < 0.5 or a negative
margin is an error naming the file and row, in every mode: its chosen answer
is not the preferred one. So is an unreviewed row with an empty score under
per_pair.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from cai.train.common import (
    TrainError,
    TrainResult,
    check_chat_format,
    describe,
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
from cai.train.soft_labels import SCORE, pair_scores

DPO_DEFAULTS: dict[str, Any] = dict(logging_steps=1, save_steps=200)
SMOOTHING_LOSSES = {"robust", "exo_pair", "aot", "aot_unpaired"}
SOFT_LABELS = ("per_pair", "smoothing", "none")


def soft_label_args(dataset, trl_args: dict[str, Any]) -> dict[str, Any]:
    """label_smoothing = mean(1 - score), with a loss that uses it (see the module docstring).

    A human-reviewed row counts as score 1.0 (a confident label), whatever its `score` says."""
    if "score" not in dataset.column_names:
        raise TrainError("soft_label='smoothing' needs a `score` column (the judge's P(chosen))")
    human = human_labelled(dataset)
    scores = [1.0 if h else float(s) for s, h in zip(dataset["score"], human) if h or s is not None]
    if not scores:
        raise TrainError("soft_label='smoothing': the `score` column is empty")
    flip_rate = sum(1.0 - s for s in scores) / len(scores)
    if not 0.0 <= flip_rate < 0.5:
        raise TrainError(f"mean(1 - score) = {flip_rate:.3f}: the judge's labels are no better than chance")
    loss = trl_args.get("loss_type", ["robust"])
    losses = [loss] if isinstance(loss, str) else list(loss)
    if not SMOOTHING_LOSSES & set(losses):
        raise TrainError(f"loss_type {losses} ignores label_smoothing; use one of {sorted(SMOOTHING_LOSSES)}")
    return {"loss_type": losses, "label_smoothing": flip_rate}


def per_pair_args(scores: list[float] | None, trl_args: dict[str, Any]) -> dict[str, Any]:
    """The config PerPairDPOTrainer runs (TRL's robust loss, label_smoothing set per batch);
    nothing without scores (plain DPO). A loss_type other than sigmoid is refused either way."""
    loss = trl_args.get("loss_type", ["sigmoid"])
    losses = [loss] if isinstance(loss, str) else list(loss)
    if losses != ["sigmoid"] or trl_args.get("label_smoothing"):
        raise TrainError(
            f"soft_label='per_pair' is conservative DPO on TRL's sigmoid loss, with ε per pair from the score; "
            f"it cannot apply to loss_type {losses} (label_smoothing {trl_args.get('label_smoothing', 0.0)}). "
            "Use soft_label='none' for that loss, or 'smoothing' for one that reads label_smoothing"
        )
    return {"loss_type": ["robust"], "label_smoothing": 0.0} if scores is not None else {}


def per_pair_summary(scores: list[float] | None) -> dict[str, Any]:
    """What metrics.json records about per_pair's labels."""
    if scores is None:
        return {"uses_scores": False, "labels": "hard: no score column, so ε = 0 for every pair (plain DPO)"}
    return {"uses_scores": True, "labels": "soft: ε = 1 - the judge's score per pair (human labels: 0)",
            "mean_epsilon": sum(1.0 - s for s in scores) / len(scores)}


def prepare_dpo_data(data, soft_label: str = "none", trl_args: dict[str, Any] | None = None):
    """(TRL-column pairs, config fields the soft label sets, human-labelled rows): the data
    `train_dpo` trains on, its labels checked by `load_preferences`. Under per_pair the pairs
    keep their `score` column when they have one."""
    if soft_label not in SOFT_LABELS:
        raise TrainError(f"soft_label must be one of {list(SOFT_LABELS)}, not {soft_label!r}")
    raw = load_preferences(data)
    trl_args = dict(trl_args or {})
    if soft_label == "per_pair":
        scores = pair_scores(raw, describe(data))
        return keep_columns(raw, extra=(SCORE,)), per_pair_args(scores, trl_args), sum(human_labelled(raw))
    extra = soft_label_args(raw, trl_args) if soft_label == "smoothing" else {}
    return keep_columns(raw), extra, sum(human_labelled(raw))


def train_dpo(
    data: str | Path,
    model: str | None = None,
    out: str | Path = "runs/dpo",
    *,
    ref_model: str | None = None,
    lora: bool | dict[str, Any] = False,
    trl_args: dict[str, Any] | None = None,
    resume: bool | str = False,
    threads: int | None = None,
    soft_label: Literal["none", "smoothing", "per_pair"] = "per_pair",
) -> TrainResult:
    """DPO of `model` (usually the SFT output) against `ref_model` (default: a
    frozen copy of `model`; with LoRA, the model with its adapter disabled).

    `trl_args` go into `trl.DPOConfig` as they are (beta, loss_type,
    max_length, learning_rate, ...), over cai's CPU-safe defaults.
    `soft_label` ("per_pair", "smoothing" or "none") uses the judge's score as
    described in the module docstring. Writes OUT (reloads with
    AutoModelForCausalLM), OUT/log.jsonl and OUT/metrics.json.
    """
    trl_args = dict(trl_args or {})
    dataset, extra, human = prepare_dpo_data(data, soft_label, trl_args)  # bad labels fail before a model loads
    from trl import DPOConfig, DPOTrainer

    from cai.train.soft_trainers import PerPairDPOTrainer

    per_pair = soft_label == "per_pair" and SCORE in dataset.column_names
    labels = per_pair_summary(dataset[SCORE] if per_pair else None) if soft_label == "per_pair" else extra
    n_threads = set_threads(threads)
    path = model_path(model)
    tokenizer = load_tokenizer(path)
    end_ids = check_chat_format(tokenizer)
    args = make_config(DPOConfig, out, DPO_DEFAULTS | extra, trl_args | extra)
    init = trl_args.get("model_init_kwargs")
    trainer = (PerPairDPOTrainer if per_pair else DPOTrainer)(
        model=load_model(path, init_kwargs=init),
        ref_model=load_model(model_path(ref_model), init_kwargs=init) if ref_model else None,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(lora, "CAUSAL_LM"),
    )
    summary = {
        "trainer": "dpo", "model": path, "ref_model": ref_model or path, "data": describe(data),
        "rows": len(dataset), "lora": bool(lora), "threads": n_threads, "soft_label": soft_label,
        "human_labels": human, **labels,
    }
    metrics = run_trainer(trainer, tokenizer, out, resume, end_ids, summary)
    return TrainResult(out=str(out), metrics=metrics)
