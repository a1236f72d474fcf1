"""Principle-level diff between two constitutions (files or git revisions)."""

from __future__ import annotations

import json

from pydantic import BaseModel

from cai.constitution import LoadedConstitution, Principle
from cai.records import ConstitutionRef


class FieldChange(BaseModel):
    field: str
    old: str
    new: str


class PrincipleChange(BaseModel):
    id: str
    changes: list[FieldChange]


class TagChange(BaseModel):
    id: str
    added: list[str]
    removed: list[str]


class ConstitutionDiff(BaseModel):
    old: ConstitutionRef
    new: ConstitutionRef
    added: list[str] = []
    removed: list[str] = []
    reworded: list[PrincipleChange] = []
    retagged: list[TagChange] = []
    metadata: list[FieldChange] = []  # name / description changes
    reordered: bool = False

    @property
    def empty(self) -> bool:
        return self.old.sha256 == self.new.sha256


_WORDING = ("critique_request", "revision_request", "comparison_question")


def _change(old: BaseModel, new: BaseModel, field: str) -> FieldChange:
    def text(model: BaseModel) -> str:
        value = getattr(model, field)
        return value if isinstance(value, str) else json.dumps([v.model_dump() for v in value], ensure_ascii=False)
    return FieldChange(field=field, old=text(old), new=text(new))


def _principle_changes(old: Principle, new: Principle) -> list[FieldChange]:
    changes = [_change(old, new, f) for f in _WORDING if getattr(old, f) != getattr(new, f)]
    if old.directions != new.directions:
        text = lambda p: json.dumps(p.directions and p.directions.model_dump(), ensure_ascii=False)  # noqa: E731
        changes.append(FieldChange(field="directions", old=text(old), new=text(new)))
    if old.examples != new.examples:
        changes.append(_change(old, new, "examples"))
    return changes


def diff_constitutions(old: LoadedConstitution, new: LoadedConstitution) -> ConstitutionDiff:
    """Principle-level diff: added / removed ids, reworded fields, tag changes, metadata."""
    a, b = old.constitution, new.constitution
    old_by_id, new_by_id = {p.id: p for p in a.principles}, {p.id: p for p in b.principles}
    diff = ConstitutionDiff(
        old=old.ref,
        new=new.ref,
        added=[i for i in b.ids if i not in old_by_id],
        removed=[i for i in a.ids if i not in new_by_id],
        metadata=[_change(a, b, f) for f in ("name", "description") if getattr(a, f) != getattr(b, f)],
    )
    common = [i for i in b.ids if i in old_by_id]
    diff.reordered = common != [i for i in a.ids if i in new_by_id]
    for pid in common:
        before, after = old_by_id[pid], new_by_id[pid]
        if changes := _principle_changes(before, after):
            diff.reworded.append(PrincipleChange(id=pid, changes=changes))
        if before.tags != after.tags:
            diff.retagged.append(TagChange(
                id=pid,
                added=[t for t in after.tags if t not in before.tags],
                removed=[t for t in before.tags if t not in after.tags],
            ))
    return diff
