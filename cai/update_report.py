"""What `cai generate sft|prefs --update-from OLD` reused and regenerated, kept in the new job's
`update.json` and shown in its data card (cai.cards), with the constitution diff."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from cai.constitution_diff import ConstitutionDiff
from cai.constitution_review import diff_markdown
from cai.files import atomic_write_text

UPDATE_FILE = "update.json"

REASONS = {
    "changed": "used a reworded or removed principle",
    "redrawn": "the new constitution draws other principles for it (principles added, removed or reordered)",
    "constitution": "its prompt group changed between a constitution and `none`",
    "error": "an error row in the old job",
    "new": "not in the old job",
}
"""Why a row was regenerated rather than carried over."""


class PrincipleCounts(BaseModel):
    reused: int = Field(0, description="carried-over rows that used the principle")
    regenerated: int = Field(0, description="rows regenerated because the principle was reworded or removed")


class UpdateReport(BaseModel):
    """One update: the old job, what was reused and regenerated (by reason, by principle), the diffs."""

    old_job: str
    old_fingerprint: str
    unit: str = Field("rows", description="what was counted: rows (sft) or prompts (prefs)")
    reused: int = 0
    regenerated: dict[str, int] = Field(default_factory=dict, description="reason (REASONS) -> count")
    resampled: int | None = Field(None, description="prefs: prompts whose answers were sampled again")
    by_principle: dict[str, PrincipleCounts] = Field(default_factory=dict)
    diffs: list[ConstitutionDiff] = Field(default_factory=list, description="old -> new, per changed constitution")

    @property
    def regenerated_total(self) -> int:
        return sum(self.regenerated.values())

    def count(self, reused: bool, reason: str | None, principles: list[str]) -> None:
        """Count one row: carried over (`principles`: its own) or regenerated (`principles`: the stale ones)."""
        if reused:
            self.reused += 1
        else:
            self.regenerated[reason] = self.regenerated.get(reason, 0) + 1
        for pid in principles:
            counts = self.by_principle.setdefault(pid, PrincipleCounts())
            if reused:
                counts.reused += 1
            else:
                counts.regenerated += 1


def write_update_report(root: Path, report: UpdateReport) -> None:
    report.by_principle = dict(sorted(report.by_principle.items()))
    atomic_write_text(root / UPDATE_FILE, report.model_dump_json(indent=2) + "\n")


def read_update_report(root: Path) -> UpdateReport | None:
    path = root / UPDATE_FILE
    return UpdateReport.model_validate_json(path.read_text(encoding="utf-8")) if path.is_file() else None


def _change(pid: str, diffs: list[ConstitutionDiff]) -> str:
    for diff in diffs:
        if pid in diff.removed:
            return "removed"
        if any(item.id == pid for item in diff.reworded):
            return "reworded"
    return "unchanged"


def update_section(report: UpdateReport | None) -> str:
    """The data card's "Updated from" section ("" for a job made in full)."""
    if report is None:
        return ""
    unit = report.unit
    reasons = "; ".join(f"{REASONS.get(reason, reason)}: {n}" for reason, n in sorted(report.regenerated.items()))
    resampled = "" if report.resampled is None else f" ({report.resampled} of them with their answers sampled again)"
    rows = "\n".join(f"| {pid} | {_change(pid, report.diffs)} | {c.reused} | {c.regenerated} |"
                     for pid, c in report.by_principle.items()) or "| - | - | 0 | 0 |"
    diffs = "\n".join(diff_markdown(diff) for diff in report.diffs) or "The constitution did not change.\n"
    return f"""## Updated from `{report.old_job}`

This job updated the job in `{report.old_job}` (fingerprint `{report.old_fingerprint}`) to its
constitution: {unit} whose principles are drawn and worded the same under the new constitution
were carried over as they were (lineage included, no engine call); the others were generated again
with the job's seeds, as a full run would generate them. (The tokens "in the rows" above include
the carried-over rows' tokens, which the old job spent.)

- {unit} reused: {report.reused}
- {unit} regenerated: {report.regenerated_total}{resampled}{f" ({reasons})" if reasons else ""}

| principle | change | {unit} reused | {unit} regenerated because it changed |
| --- | --- | --- | --- |
{rows}

{diffs}"""
