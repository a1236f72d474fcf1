"""PNG plots of a run: training curves from the trainers' logs, and policy win rates.

matplotlib with the Agg backend (no display needed), imported only when a plot is drawn.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from cai.files import atomic_open

if TYPE_CHECKING:
    from cai.policy_records import PolicyReport

log = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_log(path: str | Path) -> list[dict]:
    """The rows of a trainer's log.jsonl (TRL's log history, or cai's PPO rows); bad lines skipped."""
    rows = []
    path = Path(path)
    if path.is_dir():
        path = path / "log.jsonl"
    if not path.is_file():
        log.warning("no training log at %s", path)
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key`; rows without a step use their position."""
    xs, ys = [], []
    for n, row in enumerate(rows):
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(row.get("step", n + 1))
            ys.append(float(value))
    return xs, ys


# Reinforcement-learning logs get one panel per quantity: (key, label, extra keys on the same axes).
PPO_PANELS = (("reward", "reward", ()), ("kl", "KL to reference", ()), ("vf_loss", "value loss", ()),
              ("entropy", "entropy", ()))
GRPO_PANELS = (("reward", "reward", ("reward_std",)), ("kl", "KL to reference", ()),
               ("completions/mean_length", "completion tokens", ()))


def _rl_panels(rows: list[dict]) -> tuple | None:
    """The panels of an RL log: cai's PPO rows (they have `vf_loss`) or TRL's GRPO history (`reward`
    next to `completions/mean_length`); None for a loss-only log (SFT, RM, DPO)."""
    if any("vf_loss" in r for r in rows):
        return PPO_PANELS
    if any("reward" in r and "completions/mean_length" in r for r in rows):
        return GRPO_PANELS
    if any("reward" in r and "kl" in r for r in rows):  # an RL log from elsewhere
        return PPO_PANELS
    return None


def _panels(log_files: Mapping[str, str | Path]) -> list[tuple[str, str, list[tuple[str, list, list]]]]:
    """(title, y label, [(legend, xs, ys)]) per panel: loss per stage; PPO's reward, KL, value loss and
    entropy; GRPO's reward (and its spread), KL and completion length."""
    panels = []
    for stage, path in log_files.items():
        rows = read_log(path)
        rl = _rl_panels(rows)
        if rl is not None:
            for key, label, extra in rl:
                lines = [(k, *_series(rows, k)) for k in (key, *extra)]
                lines = [line for line in lines if line[1]]
                if lines:
                    panels.append((f"{stage}: {label}", label, lines))
            continue
        lines = [(key, *_series(rows, key)) for key in ("loss", "eval_loss")]
        lines = [line for line in lines if line[1]]
        panels.append((f"{stage}: loss", "loss", lines))
    return panels


def plot_training_curves(log_files: Mapping[str, str | Path], out_png: str | Path) -> Path:
    """One PNG, a subplot per panel: the loss of each stage (SFT, RM, DPO: TRL's `loss`, and
    `eval_loss` when logged), PPO's reward, KL, value loss and entropy per step, and GRPO's reward
    (with `reward_std`: a judge's win-rate reward averages 0.5 in every group, so its spread is the
    signal), KL and completion length. A stage whose log is missing or empty gets an empty panel
    saying so."""
    plt = _pyplot()
    panels = _panels(log_files) or [("no training logs", "", [])]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, ylabel, lines) in zip(axes.flat, panels):
        for label, xs, ys in lines:
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=label)
        if not lines:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        elif len(lines) > 1:
            ax.legend(fontsize=7)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.title.set_fontsize(9)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    with atomic_open(out_png, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return Path(out_png)


def plot_win_rates(report: PolicyReport, out_png: str | Path) -> Path:
    """Left, per comparison (harmlessness on red-team, helpfulness on benign): bars are the hard
    win rate with its Wilson 95% interval, diamonds the mean P(win); a line at 0.5.
    Right: refusal rates per model on both sets."""
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 0.6 * max(3, len(report.win_rates)) + 2),
                                  gridspec_kw={"width_ratios": [3, 2]})
    pairs = list(dict.fromkeys((w.model, w.opponent) for w in report.win_rates))
    height = 0.38
    for k, (set_name, color) in enumerate((("redteam", "tab:red"), ("benign", "tab:blue"))):
        ys, hard, soft, lows, highs = [], [], [], [], []
        for i, (a, b) in enumerate(pairs):
            w = report.win_rate(a, b, set_name)
            if w is None or w.hard_win_rate is None:
                continue
            ys.append(i + (k - 0.5) * height)
            hard.append(w.hard_win_rate)
            soft.append(w.win_rate)
            lo, hi = (w.ci.low, w.ci.high) if w.ci else (w.hard_win_rate, w.hard_win_rate)
            lows.append(max(0.0, w.hard_win_rate - lo))
            highs.append(max(0.0, hi - w.hard_win_rate))
        label = "harmlessness (red-team)" if set_name == "redteam" else "helpfulness (benign)"
        ax.barh(ys, hard, height=height, color=color, alpha=0.6, label=label,
                xerr=[lows, highs] if ys else None, capsize=3)
        ax.plot(soft, ys, "D", color="black", markersize=4, label="mean P(win)" if k == 0 else None)
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(pairs)), [f"{a} vs {b}" for a, b in pairs])
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="win rate of the first model: bars (wins + ties/2) / judged, Wilson 95%; \u25c6 mean P(win)",
           title=f"Pairwise win rates (judge: {report.judge.model.id}"
                 f"{' = training judge' if report.judge.same_as_training_judge else ''})")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)

    names = list(report.models)
    for k, (set_name, color) in enumerate((("benign", "tab:blue"), ("redteam", "tab:red"))):
        stats = [report.stats(n, set_name) for n in names]
        values = [s.refusal_rate or 0.0 for s in stats]
        ax2.bar([i + (k - 0.5) * height for i in range(len(names))], values, width=height, color=color,
                alpha=0.75, label=f"{set_name} prompts")
    ax2.set_xticks(range(len(names)), names)
    ax2.set(ylim=(0, 1), ylabel="refusal rate", title="Refusals (phrase list)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    with atomic_open(out_png, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return Path(out_png)
