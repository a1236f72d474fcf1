"""Supervised fine-tuning on phase-1 data with TRL's SFTTrainer.

cai's SFT rows are `{"messages": [..., {"role": "assistant", "content": final}]}`.
They are rewritten to TRL's conversational prompt-completion format,
`{"prompt": messages[:-1], "completion": [messages[-1]]}`, so TRL's
`completion_only_loss` puts the loss on the final assistant turn only (its end
of turn token included, so the model learns to stop). That works with any chat
template, unlike `assistant_only_loss`, which needs `{% generation %}` markers
that SmolLM2's template lacks. Rows already in prompt-completion or plain
`text` format pass through unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cai.formats import FormatError, sft_prompt_completion
from cai.train.common import (
    TrainError,
    TrainResult,
    check_chat_format,
    describe,
    keep_columns,
    load_data,
    load_model,
    load_tokenizer,
    lora_config,
    make_config,
    model_path,
    run_trainer,
    set_threads,
    without_discarded,
)

SFT_DEFAULTS: dict[str, Any] = dict(completion_only_loss=True, logging_steps=1, save_steps=200)


def to_prompt_completion(example: dict) -> dict:
    """messages -> prompt (all turns before the last) + completion (the last, an assistant turn)."""
    try:
        return sft_prompt_completion(example)
    except FormatError as exc:
        raise TrainError(str(exc)) from None


def prepare_sft_data(path: str | Path):
    """TRL prompt-completion rows; rows a reviewer discarded (`metadata.review`) are left out."""
    ds = keep_columns(without_discarded(load_data(path), "sft", describe(path)))
    if "messages" in ds.column_names:
        ds = ds.map(to_prompt_completion, remove_columns=["messages"], desc="messages -> prompt/completion")
    elif not ({"prompt", "completion"} <= set(ds.column_names) or "text" in ds.column_names):
        raise TrainError(f"SFT needs `messages`, `prompt`+`completion` or `text` columns; got {ds.column_names}")
    return ds


def train_sft(
    data: str | Path,
    model: str | None = None,
    out: str | Path = "runs/sft",
    *,
    lora: bool | dict[str, Any] = False,
    trl_args: dict[str, Any] | None = None,
    resume: bool | str = False,
    threads: int | None = None,
) -> TrainResult:
    """Fine-tune `model` (a local folder; None = the embedded SmolLM2) on `data`.

    `trl_args` go into `trl.SFTConfig` as they are (num_train_epochs,
    learning_rate, per_device_train_batch_size, max_steps, max_length, ...),
    over cai's defaults: completion-only loss, logging every step, and the
    CPU-safe settings of `cpu_safe_defaults`. `lora=True` (or a dict of
    `peft.LoraConfig` fields) trains a LoRA adapter, saved in OUT/adapter and
    merged into OUT. `resume=True` continues from the last OUT/checkpoint-N.
    Writes OUT (a model that reloads with AutoModelForCausalLM), OUT/log.jsonl
    and OUT/metrics.json.
    """
    from trl import SFTConfig, SFTTrainer

    n_threads = set_threads(threads)
    path = model_path(model)
    tokenizer = load_tokenizer(path)
    end_ids = check_chat_format(tokenizer)
    dataset = prepare_sft_data(data)
    args = make_config(SFTConfig, out, SFT_DEFAULTS, trl_args)
    trainer = SFTTrainer(
        model=load_model(path, init_kwargs=(trl_args or {}).get("model_init_kwargs")),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(lora, "CAUSAL_LM"),
    )
    summary = {"trainer": "sft", "model": path, "data": describe(data), "rows": len(dataset), "lora": bool(lora), "threads": n_threads}
    metrics = run_trainer(trainer, tokenizer, out, resume, end_ids, summary)
    return TrainResult(out=str(out), metrics=metrics)
