"""Online RLAIF: GRPO (TRL's GRPOTrainer) with the constitutional judge as the reward.

For each prompt the policy samples a group of G answers (`num_generations` in TRL's config); the
judge compares them pairwise under a principle drawn per group, in both orders, and each answer's
reward is its soft win rate in the group, or a Bradley-Terry score (cai.train.group_reward, which
also says what happens to a group the judge fails on). A reward model folder (`cai train rm`) can
be the reward instead: TRL scores `prompt + completion` rendered by the chat template, as the
reward model was trained.

GRPO's advantage is each answer's reward minus its group's mean (over the group's std, TRL's
`scale_rewards`), so only the ranking inside a group matters: exactly what a pairwise judge
measures. A consequence: the judge reward's batch mean (TRL's `reward`) is 0.5 by construction
(each pair's two win probabilities sum to 1), so progress shows in the groups' spread, in the KL to
the reference and in the judge's verdicts (OUT/groups.jsonl), not in a rising mean reward.

cai's defaults over TRL's: `beta=0.04` (TRL's is 0: no reference model, no KL), so the policy is
anchored to where it started and TRL logs `kl`; a judge, a 135M one above all, is easy to exploit.
`max_completion_length=192` (phase 2's answer budget). Everything else is TRL's GRPOConfig, set
through `trl_args`. The judge engine runs inside the training process, next to the policy.

Writes OUT (reloads with AutoModelForCausalLM), OUT/log.jsonl (TRL's log history: reward,
reward_std, kl, entropy, completion lengths, judge/skipped_groups), OUT/groups.jsonl (judge reward
only) and OUT/metrics.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cai.constitution_plan import load_plan
from cai.engine.base import Engine
from cai.recipe import EngineSpec, JudgeConfig
from cai.sources import dedupe, read_prompts
from cai.train.common import (
    TrainError,
    TrainResult,
    align_generation_config,
    check_chat_format,
    describe,
    load_model,
    load_tokenizer,
    lora_config,
    make_config,
    model_path,
    resume_checkpoint,
    run_trainer,
    set_threads,
)
from cai.train.distributed import world_size
from cai.train.group_reward import GroupJudgeReward, GroupRewardKind

GRPO_DEFAULTS: dict[str, Any] = dict(logging_steps=1, save_steps=200, beta=0.04, max_completion_length=192)


def load_grpo_prompts(data: str | Path):
    """(datasets.Dataset with `prompt` (a chat), `prompt_id`, `prompt_group`; prompts dropped as
    repeats). Prompts come from anything cai.sources reads: a bundled set, a prompt / SFT / preference
    JSONL (an SFT row loses its final assistant turn), HH transcripts, a save_to_disk folder."""
    import datasets

    kept, dropped = dedupe(read_prompts(str(data)))
    rows = [{"prompt": [{"role": m.role, "content": m.content} for m in p.messages], "prompt_id": p.id,
             "prompt_group": p.group} for p in kept]
    return datasets.Dataset.from_list(rows), dropped


def _judge_engine(judge: Engine | EngineSpec | None, policy: str) -> tuple[Engine, bool]:
    """(engine, whether this trainer opened it and must close it)."""
    if judge is None:
        judge = EngineSpec(model=policy)
    if isinstance(judge, EngineSpec):
        from cai.engine import build_engine

        return build_engine(judge), True
    return judge, False


def _judge_reward(dataset, out: Path, args, judge, judge_config, group_reward, constitution,
                  constitution_by_group, principle_seed, policy) -> tuple[GroupJudgeReward, Engine, bool]:
    if world_size() > 1:
        raise TrainError("GRPO with the judge reward runs in one process (a group's G completions must be judged "
                         "together, and each process would hold a judge); use --reward-model for accelerate launch")
    plan = load_plan(constitution, constitution_by_group or {}, allow_unrevised=False)
    plan.check_groups(set(dataset["prompt_group"]), "GRPO prompts")
    engine, owned = _judge_engine(judge, policy)
    reward = GroupJudgeReward(engine, plan, args.num_generations, judge_config, group_reward, principle_seed,
                              lineage=Path(out) / "groups.jsonl")
    return reward, engine, owned


def train_grpo(
    data: str | Path,
    model: str | None = None,
    out: str | Path = "runs/grpo",
    *,
    constitution: str = "harmless",
    constitution_by_group: dict[str, str] | None = None,
    judge: Engine | EngineSpec | None = None,
    judge_config: JudgeConfig | None = None,
    group_reward: GroupRewardKind = "win_rate",
    principle_seed: int = 0,
    reward_model: str | None = None,
    lora: bool | dict[str, Any] = False,
    trl_args: dict[str, Any] | None = None,
    resume: bool | str = False,
    threads: int | None = None,
) -> TrainResult:
    """GRPO of `model` (usually the SFT output) on the prompts in `data`, rewarded by the judge
    (default) or by `reward_model` (a `cai train rm` folder).

    `judge`: an engine (the caller closes it), an EngineSpec (opened here and closed at the end),
    or None: the policy's starting model on the default backend. `judge_config`: how it judges
    (mode, orders, ...; cai.recipe.JudgeConfig). Principles come from `constitution`, or
    `constitution_by_group[prompt group]`. `trl_args` go into `trl.GRPOConfig` as they are
    (num_generations, max_completion_length, beta, temperature, loss_type, ...)."""
    from trl import GRPOConfig, GRPOTrainer

    dataset, dropped = load_grpo_prompts(data)
    trl_args = dict(trl_args or {})
    n_threads = set_threads(threads)
    path = model_path(model)
    tokenizer = load_tokenizer(path, padding_side="left")
    end_ids = check_chat_format(tokenizer)
    args = make_config(GRPOConfig, out, GRPO_DEFAULTS, trl_args)
    policy = load_model(path, init_kwargs=trl_args.get("model_init_kwargs"))
    align_generation_config(policy, tokenizer, end_ids)  # every turn-end token ends a completion
    if reward_model is not None:
        engine, owned, reward = None, False, None
        reward_funcs, processing = _reward_model(reward_model)
    else:
        reward, engine, owned = _judge_reward(dataset, Path(out), args, judge, judge_config, group_reward,
                                              constitution, constitution_by_group, principle_seed, path)
        reward_funcs, processing = [reward], None
    try:
        trainer = GRPOTrainer(model=policy, reward_funcs=reward_funcs, args=args, train_dataset=dataset,
                              processing_class=tokenizer, reward_processing_classes=processing,
                              peft_config=lora_config(lora, "CAUSAL_LM"))
        if reward is not None:  # a fresh run starts a new lineage; a resumed one keeps the groups before it
            reward.resume_lineage(_checkpoint_step(resume_checkpoint(resume, out) if resume else None))
        summary = {
            "trainer": "grpo", "model": path, "data": describe(data), "prompts": len(dataset),
            "repeated_prompts_dropped": dropped, "lora": bool(lora), "threads": n_threads,
            "reward": "reward_model" if reward_model else "judge", "reward_model": reward_model,
            "judge_model": engine.model.model_dump() if engine is not None else None,
            "num_generations": args.num_generations, "beta": args.beta,
        }
        finish = lambda: _finish(trainer, tokenizer, reward)  # noqa: E731
        metrics = run_trainer(trainer, tokenizer, out, resume, end_ids, summary, finish)
    finally:
        if owned:
            engine.close()
    return TrainResult(out=str(out), metrics=metrics)


def _reward_model(folder: str) -> tuple[list, list]:
    """TRL's reward function and processing class for a `cai train rm` folder."""
    path = model_path(folder)
    tokenizer = load_tokenizer(path)
    return [load_model(path, "reward", pad_token_id=tokenizer.pad_token_id)], [tokenizer]


def _finish(trainer, tokenizer, reward: GroupJudgeReward | None) -> dict[str, Any]:
    """After training, before saving: the last logged reward / KL and the judge's counts."""
    tokenizer.padding_side = "right"  # saved as the other trainers save it; engines pad themselves
    last = {k: v for row in trainer.state.log_history for k, v in row.items()
            if k in ("reward", "reward_std", "kl", "entropy")}
    return {"last": last or None, **(reward.summary() if reward is not None else {})}


def _checkpoint_step(checkpoint: str | None) -> int:
    """The global step a checkpoint-N folder resumes from (0 for a fresh run)."""
    if checkpoint is None:
        return 0
    name = Path(checkpoint).name
    return int(name.split("-")[1]) if name.startswith("checkpoint-") and name.split("-")[1].isdigit() else 0

