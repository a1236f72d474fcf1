"""Constitutions in code review: the version-bump check against any git revision (pre-commit's base
ref, `origin/main`), and a principle-level diff as Markdown for a pull-request comment."""

from __future__ import annotations

import re

import yaml
from pydantic import BaseModel

from cai.constitution import (
    ConstitutionError,
    LoadedConstitution,
    load_constitution,
    validate_constitution,
)
from cai.constitution_diff import ConstitutionDiff
from cai.constitution_source import read_source, split_spec

# --- the version-bump check against a base revision


def _short(rev: str) -> str:
    return rev[:12] if re.fullmatch(r"[0-9a-f]{40}", rev) else rev


def _version_line(spec: str) -> int | None:
    try:
        root = yaml.compose(read_source(spec)[1], Loader=yaml.SafeLoader)
    except (yaml.YAMLError, ConstitutionError):
        return None
    if isinstance(root, yaml.MappingNode):
        for key, value in root.value:
            if key.value == "version":
                return value.start_mark.line + 1
    return None


def bump_error(spec: str, current: LoadedConstitution, against: str) -> ConstitutionError | None:
    """Error when the content differs from the file at `against` but the version was not raised.
    None when the file did not exist (or did not parse) at that revision: a new file needs no bump."""
    try:
        base = load_constitution(f"{split_spec(spec)[0]}@{against}")
    except ConstitutionError:
        return None
    old, new = base.constitution, current.constitution
    if base.ref.sha256 == current.ref.sha256 or new.version_tuple > old.version_tuple:
        return None
    major, minor, _ = old.version_tuple
    return ConstitutionError(
        str(spec), _version_line(spec), "version",
        f"content changed since {_short(against)} (version {old.version}) but version is {new.version}"
        f" — bump it, e.g. to \"{major}.{minor + 1}.0\"",
    )


def validate_against(spec: str, against: str = "HEAD") -> list[ConstitutionError]:
    """Every problem in one file, with the version-bump check made against `against` instead of HEAD
    (a `path@REV` spec gets no bump check, as in validate_constitution)."""
    if against == "HEAD" or split_spec(spec)[1] is not None:
        return validate_constitution(spec)
    errors = validate_constitution(spec)
    try:
        current = load_constitution(spec)
    except ConstitutionError:
        return errors  # schema errors: the bump check never ran
    # The file is valid, so any error left is validate_constitution's own check against HEAD, which
    # a base revision replaces: a pull request bumps the version once, not at every commit.
    bump = bump_error(spec, current, against)
    return [bump] if bump is not None else []


# --- rows of a job that each principle touches (computed by cai.constitution_impact)


class JobImpact(BaseModel):
    """How a job's rows use a constitution's principles: `by_principle[id]` rows have `id` among their
    lineage principle ids; `touched` rows use at least one removed or reworded principle."""

    job: str
    kind: str
    rows: int
    rows_of_constitution: int
    versions: dict[str, int]
    by_principle: dict[str, int]
    touched: int


def changed_ids(diff: ConstitutionDiff) -> list[str]:
    """Principles whose rows a change makes stale: removed and reworded ones."""
    return [*diff.removed, *(item.id for item in diff.reworded)]


def impact_lines(diff: ConstitutionDiff, impact: JobImpact) -> list[str]:
    """The row-count summary as plain lines (shared by the text and Markdown outputs)."""
    versions = ", ".join(f"v{v}: {n}" for v, n in sorted(impact.versions.items()))
    lines = [f"job {impact.job} ({impact.kind}): {impact.rows} rows, {impact.rows_of_constitution} made with "
             f"{diff.old.name}" + (f" ({versions})" if versions else "")]
    share = f" ({impact.touched / impact.rows_of_constitution:.0%})" if impact.rows_of_constitution else ""
    lines.append(f"{impact.touched} of {impact.rows_of_constitution} rows{share} use a removed or reworded "
                 "principle")
    return lines


# --- Markdown for a pull-request comment


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _fence(text: str) -> str:
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _table(diff: ConstitutionDiff, impact: JobImpact | None) -> list[str]:
    rows: list[tuple[str, str, str]] = [("added", pid, "") for pid in diff.added]
    rows += [("removed", pid, "") for pid in diff.removed]
    rows += [("reworded", item.id, ", ".join(c.field for c in item.changes)) for item in diff.reworded]
    rows += [("retagged", t.id, " ".join([*(f"+{x}" for x in t.added), *(f"−{x}" for x in t.removed)]))
             for t in diff.retagged]
    if not rows:
        return []
    header = "| change | principle | what | rows in job |" if impact else "| change | principle | what |"
    out = [header, "|---|---|---|---|" if impact else "|---|---|---|"]
    for change, pid, what in rows:
        line = f"| {change} | `{pid}` | {_cell(what)} |"
        if impact:
            line += " — |" if change == "added" else f" {impact.by_principle.get(pid, 0)} |"
        out.append(line)
    return out


def _details(diff: ConstitutionDiff) -> list[str]:
    out: list[str] = []
    for item in diff.reworded:
        out += ["", f"<details><summary><code>{item.id}</code>: {', '.join(c.field for c in item.changes)}"
                "</summary>", ""]
        for change in item.changes:
            body = "\n".join([*(f"- {line}" for line in change.old.splitlines() or [""]),
                              *(f"+ {line}" for line in change.new.splitlines() or [""])])
            fence = _fence(body)
            out += [f"**{change.field}**", "", f"{fence}diff", body, fence, ""]
        out.append("</details>")
    return out


def diff_markdown(diff: ConstitutionDiff, impact: JobImpact | None = None) -> str:
    """The diff as a pull-request comment: version change, a table of principle changes (with row
    counts given a job), the reworded fields as collapsed diffs, and a missing-bump warning."""
    old, new = diff.old, diff.new
    name = old.name if old.name == new.name else f"{old.name} → {new.name}"
    out = [f"### Constitution `{name}`: v{old.version} → v{new.version}", "",
           f"`{old.path}` → `{new.path}` (sha256 `{old.sha256[:12]}` → `{new.sha256[:12]}`)", ""]
    if diff.empty:
        return "\n".join([*out, "No content changes.", ""])
    if old.version == new.version:
        out += ["> [!WARNING]", "> The content changed but the version did not: bump it.", ""]
    out += [f"- **{c.field}** changed: {_cell(c.old)} → {_cell(c.new)}" for c in diff.metadata]
    if diff.reordered:
        out.append("- principles were reordered")
    if diff.metadata or diff.reordered:
        out.append("")
    if table := _table(diff, impact):
        out += [*table, ""]
    if impact is not None:
        out += [f"{line}." for line in impact_lines(diff, impact)] + [""]
    out += _details(diff)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).rstrip() + "\n"  # no blank-line runs
