"""How many rows of a job (sft or prefs) each principle of a constitution diff touches, from the
rows' lineage principle ids."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from cai.constitution_diff import ConstitutionDiff
from cai.constitution_review import JobImpact, changed_ids
from cai.constitution_source import display_path
from cai.errors import CaiError
from cai.kinds import open_store


def job_impact(job_dir: str | Path, diff: ConstitutionDiff) -> JobImpact:
    """Rows of the job's result stage made with the diffed constitution (by name, old or new), counted
    per principle id in their lineage (error rows included: they were made with it too)."""
    kind, store = open_store(job_dir)
    names = {diff.old.name, diff.new.name}
    changed = set(changed_ids(diff))
    rows = ours = touched = 0
    versions: Counter[str] = Counter()
    by_principle: Counter[str] = Counter()
    for record in store.records(kind.result_stage):
        rows += 1
        lineage = getattr(record, "lineage", None)
        if lineage is None or not hasattr(lineage, "principle_ids"):
            raise CaiError(f"{job_dir}: a {kind.name} job's rows carry no principle lineage; give an sft or "
                           "prefs job directory to --job")
        if lineage.constitution is None or lineage.constitution.name not in names:
            continue
        ours += 1
        versions[lineage.constitution.version] += 1
        ids = set(lineage.principle_ids)
        by_principle.update(ids)
        touched += bool(ids & changed)
    return JobImpact(job=display_path(job_dir), kind=kind.name, rows=rows, rows_of_constitution=ours,
                     versions=dict(versions), by_principle=dict(by_principle), touched=touched)
