"""Direct preference optimisation on phase-2 pairs with TRL's DPOTrainer.

Default: plain DPO (TRL's `sigmoid` loss), every exported pair taken as a hard label.

The judge's soft label, `soft_label="smoothing"`. cai's `score` is the
judge's P(chosen preferred), averaged over both option orders. If the judge
is calibrated, a pair's label is wrong with probability 1 - score, so
`mean(1 - score)` over the training pairs estimates the rate of flipped labels
in the dataset. That is exactly the parameter of Robust DPO (Chowdhury et al.,
2024), which TRL implements as `loss_type="robust"` with `label_smoothing` =
the flip rate: an unbiased estimate of the clean-label DPO loss under that
noise rate. So cai sets `label_smoothing = mean(1 - score)` and, unless the
caller chose a loss that reads `label_smoothing` (`exo_pair`, `aot`, ...),
`loss_type="robust"`. It is a TRL config field, not a trainer subclass, which
is why cai uses the dataset-wide rate rather than a per-pair weight (TRL's DPO
has no per-example weights; a subclass would have to copy its loss code).
Pairs are usually exported only above a confidence threshold, so the rate is
small (0.05-0.2); a rate of 0.5 or more means the labels carry no signal and
is refused. (TRL >= 1.0's `sigmoid` loss ignores `label_smoothing`, so the
older "conservative DPO" setting would silently do nothing.)

Human labels. A pair a reviewer decided in cai serve (`metadata.review.label`
agree or flip) is taken as noise-free: its score counts as 1.0, so it adds
nothing to the flip rate, and a row a reviewer discarded is dropped
(`cai.train.common.load_preferences`, applying `cai.formats.apply_review`; it also
repairs older exports that stored a flip as score = 1 - score). An unreviewed
row with score < 0.5 or a negative margin is an error naming the file and
row, in both modes: its chosen answer is not the preferred one.
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

DPO_DEFAULTS: dict[str, Any] = dict(logging_steps=1, save_steps=200)
SMOOTHING_LOSSES = {"robust", "exo_pair", "aot", "aot_unpaired"}


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


def prepare_dpo_data(data, soft_label: str = "none", trl_args: dict[str, Any] | None = None):
    """(TRL-column pairs, config fields the soft label sets, human-labelled rows): the data
    `train_dpo` trains on, its labels checked by `load_preferences`."""
    if soft_label not in ("none", "smoothing"):
        raise TrainError(f"soft_label must be 'none' or 'smoothing', not {soft_label!r}")
    raw = load_preferences(data)
    extra = soft_label_args(raw, dict(trl_args or {})) if soft_label == "smoothing" else {}
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
    soft_label: Literal["none", "smoothing"] = "none",
) -> TrainResult:
    """DPO of `model` (usually the SFT output) against `ref_model` (default: a
    frozen copy of `model`; with LoRA, the model with its adapter disabled).

    `trl_args` go into `trl.DPOConfig` as they are (beta, loss_type,
    max_length, learning_rate, ...), over cai's CPU-safe defaults.
    `soft_label="smoothing"` uses the judge's score as described in the module
    docstring. Writes OUT (reloads with AutoModelForCausalLM), OUT/log.jsonl
    and OUT/metrics.json.
    """
    from trl import DPOConfig, DPOTrainer

    trl_args = dict(trl_args or {})
    dataset, extra, human = prepare_dpo_data(data, soft_label, trl_args)  # bad labels fail before a model loads
    n_threads = set_threads(threads)
    path = model_path(model)
    tokenizer = load_tokenizer(path)
    end_ids = check_chat_format(tokenizer)
    args = make_config(DPOConfig, out, DPO_DEFAULTS | extra, trl_args | extra)
    init = trl_args.get("model_init_kwargs")
    trainer = DPOTrainer(
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
        "human_labels": human, **extra,
    }
    metrics = run_trainer(trainer, tokenizer, out, resume, end_ids, summary)
    return TrainResult(out=str(out), metrics=metrics)
