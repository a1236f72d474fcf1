"""The child of `cai bench --train` (cai.bench_train): one trainer, run by cai or by plain TRL, timed
step by step in lock step with its twin; `python -m cai.bench_train_child SPEC.json`."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from cai.bench_train import ChildSpec


def bench_trl_args(spec: ChildSpec) -> dict[str, Any]:
    """The TRL fields the bench sets, for cai and plain alike."""
    return dict(per_device_train_batch_size=spec.batch_size, max_steps=spec.warmup + spec.steps,
                save_strategy="no", logging_steps=1)


def plain_trl_args(spec: ChildSpec) -> dict[str, Any]:
    """What a TRL user writes to train as cai does on this machine: cai's defaults, spelt out."""
    import torch

    args = dict(output_dir=spec.out, report_to="none", seed=0, save_steps=200, save_total_limit=2, **bench_trl_args(spec))
    if not torch.cuda.is_available():
        args.update(use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False)
    return args | (dict(completion_only_loss=True) if spec.trainer == "sft" else {})


class Turns:
    """The lock-step turn (see the module docstring): one byte passed through two FIFOs. Opened
    read-write, so opening never blocks and a byte written waits in the pipe for its reader."""

    def __init__(self, spec: ChildSpec):
        self.fd_in = os.open(spec.turn_in, os.O_RDWR) if spec.turn_in else None
        self.fd_out = os.open(spec.turn_out, os.O_RDWR) if spec.turn_out else None
        if spec.first and self.fd_in is not None:
            os.write(self.fd_in, b"t")

    def take(self) -> None:
        if self.fd_in is not None:
            os.read(self.fd_in, 1)

    def give(self) -> None:
        if self.fd_out is not None:
            os.write(self.fd_out, b"t")


def step_timer(turns: Turns):
    """A Trainer callback recording when training begins, its config, and each step's time, a step
    beginning only with the turn and passing it on when the next one begins."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin, self.started, self.spans, self.config = None, None, [], {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin, self.config = time.monotonic(), json.loads(json.dumps(args.to_dict(), default=str))

        def on_step_begin(self, args, state, control, **kwargs):
            if self.started is not None:
                self.spans.append((self.started, time.monotonic()))
                turns.give()
            turns.take()
            self.started = time.monotonic()

        def on_train_end(self, args, state, control, **kwargs):
            if self.started is not None:  # the last step; the turn passes when this run has finished
                self.spans.append((self.started, time.monotonic()))
                self.started = None

    return StepTimer()


def run_plain(spec: ChildSpec) -> None:
    """The plain TRL script: no cai code from here on."""
    import datasets
    import torch
    import trl
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    torch.set_num_threads(spec.threads)
    tokenizer = AutoTokenizer.from_pretrained(spec.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = datasets.load_dataset("json", data_files=spec.data, split="train")
    args = plain_trl_args(spec)
    if spec.trainer == "sft":
        data = data.map(lambda row: {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]},
                        remove_columns=data.column_names)
        model = AutoModelForCausalLM.from_pretrained(spec.model, dtype=torch.float32)
        trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(**args), train_dataset=data, processing_class=tokenizer)
    elif spec.trainer == "rm":
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(spec.model, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        trainer = trl.RewardTrainer(model=model, args=trl.RewardConfig(**args), processing_class=tokenizer,
                                    train_dataset=data.select_columns(["prompt", "chosen", "rejected"]))
    else:
        model = AutoModelForCausalLM.from_pretrained(spec.model, dtype=torch.float32)
        trainer = trl.DPOTrainer(model=model, args=trl.DPOConfig(**args), processing_class=tokenizer,
                                 train_dataset=data.select_columns(["prompt", "chosen", "rejected"]))
    trainer.train()
    trainer.save_model()


def run_cai(spec: ChildSpec) -> None:
    from cai.train import train_dpo, train_reward_model, train_sft

    common = dict(trl_args=bench_trl_args(spec), threads=spec.threads)
    if spec.trainer == "sft":
        train_sft(spec.data, spec.model, spec.out, **common)
    elif spec.trainer == "rm":
        train_reward_model(spec.data, spec.model, spec.out, loss="margin", margin_scale=0.0, eval_fraction=0.0, **common)
    else:
        train_dpo(spec.data, spec.model, spec.out, soft_label="none", **common)


def run_ppo(spec: ChildSpec) -> list[float]:
    """cai's PPO for warmup + steps + 1 rollouts; the times of its reward calls, one per rollout."""
    from cai.train import train_ppo

    calls: list[float] = []

    def reward(prompts, completions):
        calls.append(time.monotonic())
        return [min(len(c.split()), 20) / 10 for c in completions]

    config = {"steps": spec.warmup + spec.steps + 1, "batch_size": spec.batch_size}
    train_ppo(spec.data, spec.model, spec.out, reward_fn=reward, config=config, threads=spec.threads)
    return calls


def child_main(spec_path: str) -> None:
    started = time.monotonic()
    spec = ChildSpec.model_validate_json(Path(spec_path).read_text(encoding="utf-8"))
    if spec.trainer == "ppo":
        calls = run_ppo(spec)
        steps = [b - a for a, b in zip(calls, calls[1:])][spec.warmup:]
        result = {"step_seconds": steps, "setup_seconds": calls[0] - started, "config": {}}
    else:
        import transformers.trainer

        turns = Turns(spec)
        timer = step_timer(turns)
        transformers.trainer.DEFAULT_CALLBACKS.append(timer)  # every Trainer built here gets it
        (run_cai if spec.runner == "cai" else run_plain)(spec)
        spans = timer.spans[spec.warmup:]
        result = {"step_seconds": [end - start for start, end in spans], "step_spans": spans,
                  "setup_seconds": timer.begin - started, "config": timer.config}
        turns.give()  # only now: the twin's last step does not overlap this run's saving
    Path(spec.result).write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    child_main(sys.argv[1])
