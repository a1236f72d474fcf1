"""How many rows of a job (sft or prefs) each principle of a constitution diff touches, from the
rows' lineage principle ids. `stale_principles` is the one rule of which of a row's principles a
change makes stale (`cai generate --update-from` regenerates such rows)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable
from pathlib import Path

from cai.constitution_diff import ConstitutionDiff
from cai.constitution_review import JobImpact, changed_ids
from cai.constitution_source import display_path
from cai.errors import CaiError
from cai.store import JobStore


def stale_principles(principle_ids: Iterable[str], changed: Collection[str]) -> list[str]:
    """The principles of a row that a change makes stale (`changed`: changed_ids of a diff), sorted."""
    return sorted(set(principle_ids) & set(changed))


def job_impact(job_dir: str | Path, diff: ConstitutionDiff) -> JobImpact:
    """Rows of the job's result stage made with the diffed constitution (by name, old or new), counted
    per principle id in their lineage (error rows included: they were made with it too)."""
    store = JobStore.at(job_dir)
    kind = store.manifest.stage  # sft and prefs jobs: their result stage is named after the kind
    names = {diff.old.name, diff.new.name}
    changed = changed_ids(diff)
    rows = ours = touched = 0
    versions: Counter[str] = Counter()
    by_principle: Counter[str] = Counter()
    for row in store.read(kind):
        rows += 1
        lineage = row.get("lineage")
        if not isinstance(lineage, dict) or "principle_ids" not in lineage:
            raise CaiError(f"{job_dir}: a {kind} job's rows carry no principle lineage; give an sft or "
                           "prefs job directory to --job")
        constitution = lineage.get("constitution")
        if constitution is None or constitution["name"] not in names:
            continue
        ours += 1
        versions[constitution["version"]] += 1
        ids = set(lineage["principle_ids"])
        by_principle.update(ids)
        touched += bool(stale_principles(ids, changed))
    return JobImpact(job=display_path(job_dir), kind=kind, rows=rows, rows_of_constitution=ours,
                     versions=dict(versions), by_principle=dict(by_principle), touched=touched)
