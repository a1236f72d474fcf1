"""What the four trainers share: models, LoRA, CPU-safe TRL
defaults, the chat-format check, saving, logs and resume (datasets and labels: cai.train.data).

Nothing here copies TRL's fields: a trainer builds its TRL config as
`ConfigClass(**cpu_safe_defaults | trainer_defaults | trl_args)`, so every TRL
field can be set by the caller and TRL validates it.
"""

from __future__ import annotations

import os

# torch's OpenMP workers spin by default; on a small busy CPU that stalls them.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import contextlib  # noqa: E402
import logging  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from cai.engine.models import resolve_model  # noqa: E402
from cai.files import atomic_write_json, atomic_write_jsonl  # noqa: E402
from cai.train.data import (  # noqa: E402,F401  (the trainers' data helpers, re-exported)
    DATA_SUFFIXES,
    REVIEW_COLUMNS,
    TRL_COLUMNS,
    TrainError,
    check_labels,
    describe,
    heldout_split,
    human_labelled,
    keep_columns,
    load_data,
    load_preferences,
    require_columns,
    reviewed_rows,
    without_discarded,
)
from cai.train.distributed import is_main  # noqa: E402

log = logging.getLogger("cai.train")

class TrainResult(BaseModel):
    out: str
    metrics: dict[str, Any]


# ---- devices, threads, TRL configs -------------------------------------------------


def cpu_safe_defaults(out: str | Path) -> dict[str, Any]:
    """Defaults applied under the caller's `trl_args`. On a machine without CUDA:
    no bf16 (emulated bf16 is ~10x slower on CPU), `use_cpu`, no gradient
    checkpointing (it trades speed for memory a CPU run rarely lacks)."""
    defaults: dict[str, Any] = dict(output_dir=str(out), report_to="none", save_total_limit=2, seed=0)
    if not torch.cuda.is_available():
        defaults.update(bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False)
    return defaults


def make_config(config_cls, out: str | Path, defaults: dict[str, Any], trl_args: dict[str, Any] | None):
    """`config_cls(**cpu_safe_defaults | defaults | trl_args)`, with unknown fields reported by name."""
    kwargs = cpu_safe_defaults(out) | defaults | dict(trl_args or {})
    kwargs.pop("model_init_kwargs", None)  # cai loads the model itself: see load_model()
    try:
        return config_cls(**kwargs)
    except TypeError as exc:
        raise TrainError(f"{config_cls.__name__}: {exc}") from None


def set_threads(threads: int | None) -> int:
    """torch's CPU threads: `threads` if given; else, on a CPU-only machine that
    is already busy (1-minute load average above cores - 1), one thread. torch
    threads synchronise at every op, so on an oversubscribed machine two
    threads can be several times slower than one (PPO on SmolLM2-135M on a
    loaded 2-core box: 196 s/step with 2 threads, 25 s/step with 1)."""
    if threads:
        torch.set_num_threads(threads)
    elif not torch.cuda.is_available() and hasattr(os, "getloadavg"):
        cores = os.cpu_count() or 1
        if os.getloadavg()[0] > cores - 1 and torch.get_num_threads() > 1:
            log.info("busy CPU (load %.1f on %d cores): training with one thread", os.getloadavg()[0], cores)
            torch.set_num_threads(1)
    return torch.get_num_threads()


# ---- models, tokenizers, LoRA ------------------------------------------------------


def model_path(spec: str | None) -> str:
    """None/"embedded" -> the embedded SmolLM2 folder; a folder -> itself."""
    try:
        path = resolve_model(spec)
    except RuntimeError as exc:
        raise TrainError(str(exc)) from None
    if not Path(path).is_dir():
        raise TrainError(f"model folder not found: {spec} (trainers load local folders only)")
    return path


def load_tokenizer(path: str, padding_side: str = "right"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_model(path: str, kind: str = "causal", init_kwargs: dict[str, Any] | None = None, pad_token_id=None):
    """A local model in float32 (TRL's own default), `kind` "causal" or "reward"
    (AutoModelForSequenceClassification, num_labels=1, pad token set so the
    score is read at the last real token)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = {"dtype": torch.float32, **(init_kwargs or {}), "local_files_only": True}
    if kind == "reward":
        kwargs["num_labels"] = 1
        with _quiet_new_score_head():
            model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
        model.config.pad_token_id = pad_token_id
        return model
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def _quiet_new_score_head():
    """A causal LM loaded as a reward model gets a new `score` head: expected, so not
    reported (TRL's own guard for the same case, when this TRL has it)."""
    try:
        from trl.trainer.reward_trainer import suppress_seqcls_warning
    except ImportError:
        return contextlib.nullcontext()
    return suppress_seqcls_warning()


def lora_config(lora: bool | dict[str, Any], task_type: str):
    """None for full fine-tuning; else a peft LoraConfig (dict keys go to it as is)."""
    if not lora:
        return None
    from peft import LoraConfig

    settings = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    settings |= lora if isinstance(lora, dict) else {}
    try:
        return LoraConfig(task_type=task_type, **settings)
    except TypeError as exc:
        raise TrainError(f"LoRA settings: {exc}") from None


# ---- chat template and EOS ---------------------------------------------------------


def check_chat_format(tokenizer) -> list[int]:
    """Check that training will see the tokens generation sees; return the ids
    that end an assistant turn (generation must stop on them).

    - The template exists and renders the same ids whether tokenized by
      `apply_chat_template` (what TRL does) or rendered to text and encoded
      without special tokens (what cai's engines do): no double BOS.
    - The assistant turn ends with a special token; when it is not the
      tokenizer's EOS (Llama 3's <|eot_id|>, Gemma's <end_of_turn>) it is
      returned with EOS so saved models stop there.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise TrainError("the tokenizer has no chat template; cai trains chat models")
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Fine, thanks"}]
    ids = list(tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    if ids != list(tokenizer(text, add_special_tokens=False)["input_ids"]):
        log.warning("the chat template tokenizes differently as text; generation and training may differ")
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:2] == [bos, bos]:
        raise TrainError("the chat template and the tokenizer both add BOS (double BOS)")
    parts = text.split("Fine, thanks", 1)
    after = parts[1].lstrip() if len(parts) == 2 else ""
    specials = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()), key=len, reverse=True)
    turn_end = next((s for s in specials if after.startswith(s)), None)
    if turn_end is None:
        log.warning("the chat template ends an assistant turn with no special token: the model cannot learn to stop")
    end_ids = [tokenizer.convert_tokens_to_ids(turn_end)] if turn_end else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in end_ids:
        end_ids.append(tokenizer.eos_token_id)
    return end_ids


def align_generation_config(model, tokenizer, end_ids: list[int]) -> None:
    """Saved causal models stop on the turn end they were trained to emit."""
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return
    gen.eos_token_id = end_ids if len(end_ids) > 1 else end_ids[0]
    gen.pad_token_id = tokenizer.pad_token_id


# ---- saving, logs, resume ----------------------------------------------------------


def resume_checkpoint(resume: bool | str, out: str | Path) -> str | None:
    """`True`: the last checkpoint-N under OUT (None, with a log line, if there is none);
    a path: that checkpoint; False: None."""
    if not resume:
        return None
    if isinstance(resume, (str, os.PathLike)) and not isinstance(resume, bool):
        if not Path(resume).is_dir():
            raise TrainError(f"checkpoint not found: {resume}")
        return str(resume)
    last = last_checkpoint(out)
    if last is None and is_main():
        log.warning("no checkpoint under %s: starting from the beginning", out)
    return last


def last_checkpoint(out: str | Path) -> str | None:
    folder = Path(out)
    if not folder.is_dir():
        return None
    steps = [(int(p.name.split("-")[1]), p) for p in folder.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return str(max(steps)[1]) if steps else None


def save_model(model, tokenizer, out: str | Path, end_ids: list[int] | None = None) -> None:
    """OUT/ as a plain HF folder. A peft model is saved as OUT/adapter/ and merged
    into OUT/, so OUT reloads with AutoModelFor... and serves in vLLM as is."""
    out = Path(out)
    if hasattr(model, "merge_and_unload"):
        model.save_pretrained(out / "adapter")
        tokenizer.save_pretrained(out / "adapter")
        model = model.merge_and_unload()
    if end_ids:
        align_generation_config(model, tokenizer, end_ids)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def write_log_history(trainer, out: str | Path) -> Path:
    """TRL's log history (loss, lr, reward margins, ...) as OUT/log.jsonl, one line per log event."""
    path = Path(out) / "log.jsonl"
    atomic_write_jsonl(path, trainer.state.log_history)
    return path


def run_trainer(trainer, tokenizer, out, resume, end_ids, summary: dict[str, Any], evaluate=None):
    """Train (resuming if asked), run `evaluate()` on the trained model, save OUT/
    (merged when LoRA), write log.jsonl and metrics.json; return the metrics.

    Under `accelerate launch` every process trains and evaluates (a sharded model's forward
    needs them all), only the main one writes, and none returns before the outputs exist."""
    checkpoint = resume_checkpoint(resume, out)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    args = trainer.args
    metrics = {**summary, "world_size": args.world_size, "resumed_from": checkpoint,
               "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
               "global_step": trainer.state.global_step, **result.metrics}
    metrics |= evaluate() if evaluate else {}
    save_trained(trainer, tokenizer, out, end_ids, summary)
    if trainer.accelerator.is_main_process:
        write_log_history(trainer, out)
        atomic_write_json(Path(out) / "metrics.json", metrics)
    trainer.accelerator.wait_for_everyone()
    return metrics


def save_trained(trainer, tokenizer, out: str | Path, end_ids: list[int] | None, summary: dict[str, Any]) -> None:
    """`save_model` of the trained model, by the main process. Weights sharded over the processes
    (FSDP, DeepSpeed) are gathered by TRL's own `trainer.save_model`, which every process must
    call; a LoRA adapter saved that way is then merged into a fresh copy of the base model."""
    accelerator = trainer.accelerator
    if not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        if accelerator.is_main_process:
            save_model(trainer.model, tokenizer, out, end_ids)
        return
    unwrapped = accelerator.unwrap_model(trainer.model)
    peft = hasattr(unwrapped, "peft_config")
    if end_ids and not peft:
        align_generation_config(unwrapped, tokenizer, end_ids)
    trainer.save_model(str(Path(out) / "adapter" if peft else out))
    if accelerator.is_main_process:
        tokenizer.save_pretrained(Path(out) / "adapter" if peft else out)
        if peft:
            from peft import PeftModel

            kind = "reward" if summary.get("trainer") == "rm" else "causal"
            base = load_model(summary["model"], kind, pad_token_id=tokenizer.pad_token_id)
            save_model(PeftModel.from_pretrained(base, Path(out) / "adapter").merge_and_unload(), tokenizer, out, end_ids)
    accelerator.wait_for_everyone()
