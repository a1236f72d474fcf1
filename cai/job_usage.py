"""Token usage and its estimated cost, for a job's data card.

Two counts: the tokens its rows record (every backend reports them per completion; phase 2's judge
keeps none in its rows), and, for engines of the `openai_batch` backend, what their batches
returned, summed over every run of the job into `usage.json`. The job's `price_per_mtok` (list
prices in dollars per million input and output tokens; not part of its fingerprint, so a rerun may
change it) is kept there too, as the last run set it. The arithmetic is
cai.engine.openai_batch.estimate_cost's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from cai.engine.openai_batch import BATCH_DISCOUNT, BatchUsage, estimate_cost
from cai.files import atomic_write_text
from cai.store import JobStore

USAGE_FILE = "usage.json"


class JobUsage(BaseModel):
    price_per_mtok: tuple[float, float] | None = Field(None, description="$ per million input, output tokens")
    batch: dict[str, BatchUsage] = Field(default_factory=dict, description="engine role -> its Batch API usage, "
                                                                           "summed over the job's runs")


def read_usage(root: Path) -> JobUsage:
    path = root / USAGE_FILE
    return JobUsage.model_validate_json(path.read_text(encoding="utf-8")) if path.is_file() else JobUsage()


def add(total: BatchUsage, more: BatchUsage) -> BatchUsage:
    return BatchUsage(**{name: getattr(total, name) + getattr(more, name) for name in BatchUsage.model_fields})


def record_usage(root: Path, price: tuple[float, float] | None, used: dict[str, BatchUsage]) -> None:
    """Add one run's Batch API usage to ROOT/usage.json and keep the run's price setting (nothing is
    written for a job without either)."""
    usage = read_usage(root)
    if not used and price is None and not (root / USAGE_FILE).is_file():
        return
    for role, more in used.items():
        usage.batch[role] = add(usage.batch.get(role, BatchUsage()), more)
    usage.price_per_mtok = price
    atomic_write_text(root / USAGE_FILE, usage.model_dump_json(indent=2) + "\n")


class UsageMeter:
    """The Batch API usage of a job's engines during one run: each engine (one with a BatchUsage
    `usage`) is watched from when the job gets it, so an engine shared with other jobs counts only
    this job's calls. An engine in two roles (a policy that judges) is counted once."""

    def __init__(self) -> None:
        self.watched: dict[str, tuple[Any, BatchUsage]] = {}

    def watch(self, role: str, engine: Any) -> Any:
        usage = getattr(engine, "usage", None)
        if isinstance(usage, BatchUsage) and role not in self.watched and \
                all(seen.usage is not usage for seen, _ in self.watched.values()):
            self.watched[role] = (engine, usage.model_copy())
        return engine

    def metered(self, role: str, build: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """`build`, with each engine it builds watched in `role`."""
        return lambda spec: self.watch(role, build(spec))

    def used(self) -> dict[str, BatchUsage]:
        return {role: BatchUsage(**{name: getattr(engine.usage, name) - getattr(base, name)
                                    for name in BatchUsage.model_fields})
                for role, (engine, base) in self.watched.items()}


def sampled_tokens(store: JobStore) -> BatchUsage:
    """Prompt and completion tokens of every answer a phase-2 job's policy sampled (its pass 1)."""
    usage = BatchUsage()
    for row in store.read("samples"):
        for answer in row["answers"]:
            usage.prompt_tokens += answer["prompt_tokens"]
            usage.completion_tokens += answer["completion_tokens"]
    return usage


def usage_section(usage: JobUsage, rows: BatchUsage, what: str) -> str:
    """The data card's token usage table and, when the job has a price, its estimated cost. `what`:
    which requests the rows' counts cover."""
    lines = [f"| in the rows ({what}) | {rows.prompt_tokens} | {rows.completion_tokens} |"]
    lines += [f"| Batch API, {role} ({u.requests} requests in {u.batches} batches, summed over the job's runs) | "
              f"{u.prompt_tokens} | {u.completion_tokens} |" for role, u in sorted(usage.batch.items())]
    return f"""## Token usage and cost

| tokens | prompt | completion |
| --- | --- | --- |
{chr(10).join(lines)}

{cost_line(usage, rows)}
"""


def cost_line(usage: JobUsage, rows: BatchUsage) -> str:
    """The estimated cost at the job's price: of the Batch API usage at its discount when the job used
    the Batch API, else of the rows' tokens at the synchronous price."""
    if usage.price_per_mtok is None:
        return "No price given (`--price-per-mtok IN,OUT` adds an estimated cost here)."
    price_in, price_out = usage.price_per_mtok
    prices = f"${price_in:g} / ${price_out:g} per million input / output tokens"
    if usage.batch:
        total = BatchUsage()
        for more in usage.batch.values():
            total = add(total, more)
        cost = estimate_cost(total, price_in, price_out)
        return (f"Estimated cost at {prices}: ${cost['batch_usd']:.4f} at the Batch API's "
                f"{1 - BATCH_DISCOUNT:.0%} discount (${cost['synchronous_usd']:.4f} at synchronous prices).")
    cost = estimate_cost(rows, price_in, price_out)
    return f"Estimated cost at {prices}: ${cost['synchronous_usd']:.4f} for the tokens in the rows."
