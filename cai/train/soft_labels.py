"""The judge's soft label per pair, s = P(chosen preferred) (the `score` column), as the reward
model and DPO trainers read it; the losses themselves are in cai.train.soft_trainers.

Two identities make the soft losses thin over TRL. With Δ = r(chosen) - r(rejected) (or
x = β·h for DPO) and -log σ(-Δ) = -log σ(Δ) + Δ:

    -[s·log σ(Δ) + (1-s)·log σ(-Δ)]  =  -log σ(Δ) + (1-s)·Δ

so the soft reward-model loss is TRL's Bradley-Terry loss plus one linear term, and the
conservative DPO loss (1-ε)·(-log σ(x)) + ε·(-log σ(-x)) = -log σ(x) + ε·x equals TRL's
`robust` loss evaluated with label_smoothing ε' = -ε/(1-2ε) (TRL's robust loss is
-log σ(x) - ε'/(1-2ε')·x). The reparametrisation is singular at a tie (ε = 0.5, score 0.5),
so ε is capped at 0.5 - 1e-6 (a change of at most 1e-6·x in a pair's loss).

Nothing here imports TRL, so `cai.train.reward` and `cai.train.dpo` prepare data without it.
"""

from __future__ import annotations

from typing import Any

import datasets
import torch

from cai.train.data import TrainError

SCORE = "score"
MAX_EPSILON = 0.5 - 1e-6


def pair_scores(ds: datasets.Dataset, source: str) -> list[float] | None:
    """Per pair s = P(chosen), or None when the dataset has no `score` column (hard labels).

    `ds` comes from `load_preferences`: a human-reviewed pair already has score 1.0 and every
    other score is in [0.5, 1]. A pair with an empty score is a TrainError naming it: a soft
    label has no default."""
    if SCORE not in ds.column_names:
        return None
    scores = ds[SCORE]
    for i, value in enumerate(scores):
        if value is None:
            meta = ds[i]["metadata"] if "metadata" in ds.column_names else None
            row_id = f" (id {meta['id']})" if isinstance(meta, dict) and meta.get("id") else ""
            raise TrainError(
                f"{source}: pair {i + 1}{row_id} has no score, so it has no soft label; fill the score, "
                "drop the row, or train on hard labels (rm: loss='margin'; dpo: soft_label='none')"
            )
    return [float(s) for s in scores]


def label_summary(scores: list[float] | None) -> dict[str, Any]:
    """What metrics.json records about the labels a soft loss trained on."""
    if scores is None:
        return {"uses_scores": False, "labels": "hard: no score column, so s = 1 for every pair"}
    return {"uses_scores": True, "labels": "soft: s = the judge's P(chosen) per pair (human labels: 1.0)",
            "mean_score": sum(scores) / len(scores)}


def conservative_as_robust(epsilon: torch.Tensor) -> torch.Tensor:
    """The label_smoothing ε' for which TRL's `robust` loss is conservative DPO with ε (see above)."""
    eps = epsilon.clamp(0.0, MAX_EPSILON)
    return -eps / (1.0 - 2.0 * eps)


class ScoreCollator:
    """A TRL collator whose batch also holds each pair's `score` (TRL's collators read only their own keys)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        if examples and SCORE in examples[0]:
            batch[SCORE] = torch.tensor([float(e[SCORE]) for e in examples], dtype=torch.float32)
        return batch
