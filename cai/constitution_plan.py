"""Which constitution each prompt uses: a default, plus one per prompt group.

Red-team prompts and ordinary requests need different constitutions: critiquing a
recipe request with "point out anything that could help someone hurt people", or
judging it with "which response gives less help with weapons", trains the model
toward refusing it. A job maps prompt groups (see `cai.sources.prompt_group`) to a
constitution, or to `none`: in phase 1 that group's answers are kept unrevised, as
the CAI paper did with its helpfulness samples. Phase 2 needs a constitution for
every group, since its comparison questions are the labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cai.constitution import LoadedConstitution, load_constitution
from cai.errors import CaiError

UNREVISED = "none"


class PlanError(CaiError, ValueError):
    """A group-to-constitution mapping that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class ConstitutionPlan:
    default: LoadedConstitution
    groups: dict[str, LoadedConstitution | None] = field(default_factory=dict)

    @classmethod
    def of(cls, constitution: LoadedConstitution | ConstitutionPlan) -> ConstitutionPlan:
        """A plan as is, or one constitution for every group."""
        return constitution if isinstance(constitution, ConstitutionPlan) else cls(default=constitution)

    def for_group(self, group: str) -> LoadedConstitution | None:
        """The prompt group's constitution; None means "leave unrevised" (phase 1 only)."""
        return self.groups[group] if group in self.groups else self.default

    def fingerprint_inputs(self) -> dict[str, Any]:
        """Identity of every constitution used (paths and git commits left out: content decides)."""
        ref = lambda c: c.ref.model_dump(exclude={"path", "git_commit"})  # noqa: E731
        inputs: dict[str, Any] = {"constitution": ref(self.default)}
        if self.groups:
            inputs["constitutions_by_group"] = {g: UNREVISED if c is None else ref(c)
                                                for g, c in sorted(self.groups.items())}
        return inputs

    def check_groups(self, seen: Iterable[str], where: str) -> None:
        check_groups(self.groups, seen, where)


def check_groups(mapped: Iterable[str], seen: Iterable[str], where: str) -> None:
    """Refuse a mapped group no prompt belongs to: a typo would silently apply the default."""
    seen = set(seen)
    unknown = sorted(set(mapped) - seen)
    if unknown:
        raise PlanError(
            f"{where}: group(s) {', '.join(unknown)} match no prompt; the prompts' groups are "
            f"{', '.join(sorted(seen)) or 'none'} (a bundled set's name, a file's name without "
            "suffix, or a row's `source` field)")


def load_plan(default: str, by_group: Mapping[str, str], allow_unrevised: bool) -> ConstitutionPlan:
    """Load the default and each group's constitution (`none`: unrevised, phase 1 only)."""
    groups: dict[str, LoadedConstitution | None] = {}
    for group, spec in by_group.items():
        if spec == UNREVISED:
            if not allow_unrevised:
                raise PlanError(f"constitution for group {group!r}: `{UNREVISED}` is only for phase 1 "
                                "(answers kept unrevised); phase 2 judges every pair under a constitution's "
                                "comparison questions, so name one (e.g. helpful)")
            groups[group] = None
        else:
            groups[group] = load_constitution(spec)
    return ConstitutionPlan(default=load_constitution(default), groups=groups)


def describe(inputs: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(group, "name vX" or "unrevised") rows from a manifest's fingerprint inputs, default last."""
    label = lambda ref: "unrevised (answer kept as is)" if ref == UNREVISED else (  # noqa: E731
        f"`{ref.get('name')}` v{ref.get('version')}")
    rows = [(g, label(ref)) for g, ref in inputs.get("constitutions_by_group", {}).items()]
    return [*rows, ("(every other group)", label(inputs.get("constitution", {})))]
