"""TRL's RewardTrainer and DPOTrainer with each pair's soft label in the loss (the formulas and
why they are exact: cai.train.soft_labels).

Each subclass wraps TRL's own collator so the batch carries the pair's `score`, keeps the
column through `remove_unused_columns`, takes it out of the batch before TRL sees it, and lets
TRL compute the loss and every logged metric:

- SoftLabelRewardTrainer adds (1-s)·Δ per pair to TRL's loss, which is then the soft
  cross-entropy; TRL's `center_rewards_coefficient` term is TRL's and still applies.
- PerPairDPOTrainer runs TRL's `robust` loss with a per-pair label_smoothing tensor
  ε' = -ε/(1-2ε), ε = 1 - s, for this batch only: conservative DPO per pair. TRL 1.16 computes
  every DPO loss inside one method with no per-loss hook, and `robust` is the one branch that
  reads label_smoothing elementwise and unsorted, so this overrides only `compute_loss`.

A batch without scores is TRL's plain loss (s = 1, ε = 0).
"""

from __future__ import annotations

from trl import DPOTrainer, RewardTrainer

from cai.train.soft_labels import SCORE, ScoreCollator, conservative_as_robust


class _CarriesScore:
    """The batch keeps each pair's `score` (TRL's collator and column filter would drop it)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.data_collator = ScoreCollator(self.data_collator)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if SCORE not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, SCORE]


class SoftLabelRewardTrainer(_CarriesScore, RewardTrainer):
    """RewardTrainer with the loss -[s·log σ(Δ) + (1-s)·log σ(-Δ)], s = the pair's score."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        score = inputs.pop(SCORE, None)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if score is not None:
            chosen, rejected = outputs.logits.squeeze(-1).float().chunk(2)
            loss = loss + ((1.0 - score) * (chosen - rejected)).mean()
        return (loss, outputs) if return_outputs else loss


class PerPairDPOTrainer(_CarriesScore, DPOTrainer):
    """DPOTrainer with (1-ε_i)·(-log σ(x_i)) + ε_i·(-log σ(-x_i)) per pair, ε_i = 1 - score_i.

    Built with `loss_type=["robust"]` and `label_smoothing=0` (cai.train.dpo does it)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.loss_types != ["robust"] or self.label_smoothing != 0.0:
            raise ValueError("PerPairDPOTrainer needs DPOConfig(loss_type=['robust'], label_smoothing=0.0)")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        score = inputs.pop(SCORE, None)
        if score is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.label_smoothing = conservative_as_robust(1.0 - score)
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self.label_smoothing = self.args.label_smoothing

    def compute_ref_log_probs(self, model, inputs):
        # `evaluate()` precomputes reference log-probs through the (score-carrying) collator
        return super().compute_ref_log_probs(model, {k: v for k, v in inputs.items() if k != SCORE})
