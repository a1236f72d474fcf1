"""The constitutional judge as an online reward: each prompt's G answers ranked within their group.

TRL's GRPOTrainer samples G completions per prompt (`num_generations`, consecutive in a batch)
and calls its reward functions on the whole batch. `GroupJudgeReward` is such a function:

1. per group, one principle of the prompt group's constitution, drawn with
   `sample_principle(seed, prompt id, global step, occurrence)`: seeded, the same after a resume;
2. every pair of the G answers judged under that principle's comparison question, in both
   orders (`JudgeConfig.orders`), all pairs of the batch in one engine call (cai.judge.judge_pairs:
   P(first preferred) per order, averaged over the orders into P(a beats b));
3. each answer's reward: its soft win rate in the group, the mean over the other G-1 answers of
   its P(win) (`win_rate`; a group's rewards then always average 0.5, so only the spread carries
   signal, which is what GRPO's group-normalised advantage uses), or a Bradley-Terry score
   (`bradley_terry`: the scores that best explain the soft outcomes, centred at 0).

A judge failure (an engine error row, an unparseable verdict, too little mass on the options) in
any pair of a group skips the whole group: its rewards are None, which TRL turns into NaN and
then an advantage of exactly 0, so its completions give no reward gradient (TRL still applies its
KL term to them when beta > 0). The failure is logged, never replaced by a default reward.

Lineage: one row per group in OUT/groups.jsonl (`GroupRecord`): step, prompt id and hash, prompt
group, principle, constitution name/version/sha, judge model and mode, the completions, each
pair's P(a beats b), the rewards and the error.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from cai.constitution import sample_principle
from cai.constitution_plan import ConstitutionPlan
from cai.engine.base import Engine
from cai.files import BadLine, atomic_write_jsonl, parse_json_line
from cai.judge import JudgeItem, judge_pairs
from cai.recipe import JudgeConfig
from cai.records import ConstitutionRef, ErrorInfo, ModelRef, stable_id
from cai.train.data import TrainError

log = logging.getLogger("cai.train")

GroupRewardKind = Literal["win_rate", "bradley_terry"]
BT_L2 = 0.01
"""Bradley-Terry's weak Gaussian prior: answers that always win (P = 1) get finite scores."""
MAX_FAILED_CALLS = 3
"""Consecutive batches in which every group failed before the trainer stops (a judge that is down)."""


# ---- the two group rewards ---------------------------------------------------------


def soft_win_rates(p_win: dict[tuple[int, int], float], n: int) -> list[float]:
    """Mean over the other n-1 answers of P(i beats j); `p_win[a, b]` = P(a beats b) for a < b."""
    wins = [0.0] * n
    for (a, b), p in p_win.items():
        wins[a] += p
        wins[b] += 1.0 - p
    return [w / (n - 1) for w in wins]


def bradley_terry(p_win: dict[tuple[int, int], float], n: int, l2: float = BT_L2, iters: int = 50) -> list[float]:
    """Scores s maximising sum_{a<b} [p log σ(s_a - s_b) + (1 - p) log σ(s_b - s_a)] - l2/2 |s|²
    (Newton's method: the objective is strictly concave). The optimum sums to 0: the gradient terms
    of a pair cancel, leaving l2 * sum(s) = 0."""
    import torch

    s = torch.zeros(n, dtype=torch.float64)
    for _ in range(iters):
        grad, hess = -l2 * s, -l2 * torch.eye(n, dtype=torch.float64)
        for (a, b), p in p_win.items():
            q = torch.sigmoid(s[a] - s[b])
            grad[a] += p - q
            grad[b] -= p - q
            w = q * (1 - q)
            hess[a, a] -= w
            hess[b, b] -= w
            hess[a, b] += w
            hess[b, a] += w
        step = torch.linalg.solve(hess, grad)
        s = s - step
        if step.abs().max() < 1e-10:
            break
    return s.tolist()


REWARDS = {"win_rate": soft_win_rates, "bradley_terry": bradley_terry}


# ---- lineage -----------------------------------------------------------------------


class PairVerdict(BaseModel):
    a: int
    b: int
    p_a: float | None = Field(description="P(answer a beats b), averaged over the orders")
    consistent: bool | None = None
    error: ErrorInfo | None = None


class GroupRecord(BaseModel):
    """One group of G completions of one prompt, as judged (a row of OUT/groups.jsonl)."""

    step: int = Field(description="the trainer's global step when the group was generated")
    prompt_id: str
    prompt_hash: str
    prompt_group: str
    principle_id: str
    constitution: ConstitutionRef
    judge_model: ModelRef
    judge_mode: str
    reward: GroupRewardKind
    completions: list[str]
    pairs: list[PairVerdict]
    rewards: list[float | None]
    error: ErrorInfo | None = None


def _text(completion: Any) -> str:
    """A completion's text: TRL passes [{"role": "assistant", "content": ...}] for chat prompts."""
    if isinstance(completion, list):
        return str(completion[-1]["content"]) if completion else ""
    return str(completion)


def _chat(prompt: Any) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


class GroupJudgeReward:
    """TRL reward function (`reward_funcs=[GroupJudgeReward(...)]`): see the module docstring.

    `engine` is the judge (any cai engine; the caller opens and closes it). Rows go to `lineage`
    (OUT/groups.jsonl) as each batch is judged; `records` keeps them in memory too."""

    __name__ = "judge"  # TRL names its reward metrics after it: rewards/judge/mean

    def __init__(self, engine: Engine, constitution: ConstitutionPlan, num_generations: int,
                 config: JudgeConfig | None = None, reward: GroupRewardKind = "win_rate", seed: int = 0,
                 lineage: str | Path | None = None):
        if num_generations < 2:
            raise TrainError(f"the judge compares answers within a group: num_generations must be >= 2, "
                           f"got {num_generations}")
        if reward not in REWARDS:
            raise TrainError(f"group reward must be one of {', '.join(REWARDS)}, not {reward!r}")
        self.engine, self.plan, self.g = engine, constitution, num_generations
        self.config, self.reward, self.seed = config or JudgeConfig(), reward, seed
        self.lineage = Path(lineage) if lineage else None
        self.records: list[GroupRecord] = []
        self.failed_calls = 0

    def resume_lineage(self, step: int) -> None:
        """Keep the rows of groups generated before `step` (a resumed run regenerates the rest)."""
        if self.lineage is None:
            return
        rows = []
        if self.lineage.is_file():
            with open(self.lineage, "rb") as f:
                for raw in f:
                    try:
                        row = parse_json_line(raw)
                    except BadLine:  # the partial last line of a killed run
                        continue
                    if isinstance(row, dict) and row.get("step", 0) < step:
                        rows.append(row)
        atomic_write_jsonl(self.lineage, rows)

    def __call__(self, prompts: list, completions: list, prompt_id: list | None = None,
                 prompt_group: list | None = None, trainer_state=None, log_metric=None, **_: Any) -> list[float | None]:
        step = int(getattr(trainer_state, "global_step", 0) or 0)
        groups = self._groups(prompts, completions, prompt_id, prompt_group)
        items, owners, principles = [], [], []
        seen: dict[str, int] = {}
        for k, (pid, chat, texts, group) in enumerate(groups):
            seen[pid] = seen.get(pid, -1) + 1  # the same prompt twice in one batch: another draw
            constitution = self.plan.for_group(group)
            principle = sample_principle(constitution, self.seed, pid, step, seen[pid])
            principles.append((principle.id, constitution.ref))
            for a, b in combinations(range(self.g), 2):
                items.append(JudgeItem.for_principle(chat, texts[a], texts[b], principle))
                owners.append((k, a, b))
        judgements = judge_pairs(self.engine, items, self.config)
        verdicts: list[list[PairVerdict]] = [[] for _ in groups]
        for (k, a, b), j in zip(owners, judgements):
            verdicts[k].append(PairVerdict(a=a, b=b, p_a=j.p_a, consistent=j.consistent, error=j.error))
        rewards: list[float | None] = []
        rows = []
        for k, (pid, chat, texts, group) in enumerate(groups):
            row = self._record(step, pid, chat, texts, group, principles[k], verdicts[k])
            rewards += row.rewards
            rows.append(row)
        self._finish(rows, log_metric)
        return rewards

    def _groups(self, prompts, completions, ids, groups) -> list[tuple[str, list[dict], list[str], str]]:
        """(prompt id, chat, G texts, prompt group) per group of G consecutive completions."""
        if len(prompts) % self.g:
            raise TrainError(f"the judge reward got {len(prompts)} completions, not whole groups of "
                           f"num_generations={self.g}; it needs every group in one process")
        out = []
        for start in range(0, len(prompts), self.g):
            chat = _chat(prompts[start])
            if any(_chat(p) != chat for p in prompts[start:start + self.g]):
                raise TrainError("the judge reward got a group of completions of different prompts; it needs the "
                               "G completions of a prompt together in one process (one training process)")
            pid = str(ids[start]) if ids else stable_id("prompt", chat)
            group = str(groups[start]) if groups and groups[start] is not None else ""
            out.append((pid, chat, [_text(c) for c in completions[start:start + self.g]], group))
        return out

    def _record(self, step, pid, chat, texts, group, principle, verdicts: list[PairVerdict]) -> GroupRecord:
        failed = next((v for v in verdicts if v.error is not None), None)
        error, rewards = None, [None] * self.g
        if failed is not None:
            where = f"pair ({failed.a}, {failed.b})"
            error = failed.error.model_copy(update={"message": f"{where}: {failed.error.message}"})
            log.warning("judge failed on a group of prompt %s at step %d (%s: %s); the group is skipped (no reward)",
                        pid, step, error.code.value, error.message)
        else:
            rewards = REWARDS[self.reward]({(v.a, v.b): v.p_a for v in verdicts}, self.g)
        return GroupRecord(
            step=step, prompt_id=pid, prompt_hash=stable_id("prompt", chat), prompt_group=group,
            principle_id=principle[0], constitution=principle[1], judge_model=self.engine.model,
            judge_mode=self.config.mode, reward=self.reward, completions=texts, pairs=verdicts,
            rewards=rewards, error=error)

    def _finish(self, rows: list[GroupRecord], log_metric) -> None:
        skipped = sum(r.error is not None for r in rows)
        self.records += rows
        if self.lineage is not None:
            _append_jsonl(self.lineage, [r.model_dump(mode="json") for r in rows])
        if log_metric is not None:
            log_metric("judge/skipped_groups", float(skipped))
            consistent = [v.consistent for r in rows for v in r.pairs if v.consistent is not None]
            if consistent:
                log_metric("judge/consistency", sum(consistent) / len(consistent))
        self.failed_calls = self.failed_calls + 1 if rows and skipped == len(rows) else 0
        if self.failed_calls >= MAX_FAILED_CALLS:
            last = rows[-1].error
            raise TrainError(f"the judge failed on every group of {MAX_FAILED_CALLS} batches in a row (last: "
                           f"{last.code.value}: {last.message}); is the judge engine up? The lineage is in "
                           f"{self.lineage or 'memory'}; rerun with --resume to continue from the last checkpoint")

    def summary(self) -> dict[str, Any]:
        """Counts for metrics.json."""
        judged = [r for r in self.records if r.error is None]
        errors: dict[str, int] = {}
        for r in self.records:
            if r.error is not None:
                errors[r.error.code.value] = errors.get(r.error.code.value, 0) + 1
        spread = [max(r.rewards) - min(r.rewards) for r in judged]
        return {"groups_judged": len(judged), "groups_skipped": len(self.records) - len(judged),
                "judge_errors": errors, "group_reward": self.reward,
                "mean_group_spread": sum(spread) / len(spread) if spread else None}


def _append_jsonl(path: Path, rows: Sequence[dict]) -> None:
    """Append rows as one write, flushed to disk. Not atomic_write_jsonl: rewriting the whole lineage
    every batch grows quadratically with the run. A kill mid-write can leave one partial last line;
    `resume_lineage` rewrites the file atomically from its complete rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
