"""`cai generate sft|prefs --update-from OLD`: a new job that carries over the rows of an earlier job
whose principles did not change, and generates the others again.

A row is reused iff the new constitution draws exactly the same principles for it (same ids, in the
same rounds or pairs) and none of them was reworded or removed (`cai.constitution_impact`'s rule);
its prompt group keeps a constitution (or keeps `none`); and it is no error row. The draw depends on
the job's seed, the prompt and the constitution's list of principles, so adding, removing or
reordering principles can change it for rows that never used the changed ones: those are
regenerated too. Every row then equals what a full run under the new constitution would write, up
to the carried rows' lineage (kept as it was, with the constitution version that made them).

Phase 2 goes prompt by prompt: labeller `judge` samples its answers without any principle, so the
old answers are carried whenever they were usable and only the judging is redone; the contrastive
labellers steer the answers by the principle, so those are sampled again when it changed.

The old job must have the same prompts, model(s) and settings but the constitution (its
fingerprint inputs are compared). Its constitutions' text comes from its `constitutions.json`
(written by every job), else from the spec its manifest names or that file's git history,
whichever has the content hash its rows record. Regenerated prompts run at their place in the
same batches a full run would plan, with the seeds they have there (`cai.reuse`), so sampled
answers are the same too.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cai.constitution import (
    Constitution,
    LoadedConstitution,
    load_constitution,
    sample_principle,
)
from cai.constitution_diff import ConstitutionDiff, diff_constitutions
from cai.constitution_impact import stale_principles
from cai.constitution_plan import UNREVISED, ConstitutionPlan
from cai.constitution_review import changed_ids
from cai.constitution_source import (
    ConstitutionError,
    display_path,
    git,
    git_location,
    split_spec,
)
from cai.contrastive import contrast_principle
from cai.engine.openai_batch import with_state_dir
from cai.errors import CaiError
from cai.files import atomic_write_json
from cai.recipe import EngineSpec
from cai.records import ConstitutionRef, SourcePrompt
from cai.reuse import Reusing
from cai.store import IdSet, JobStore, Manifest, RecordModels, read_manifest
from cai.update_report import UpdateReport, write_update_report

SNAPSHOT_FILE = "constitutions.json"
NOT_COMPARED = frozenset({"constitution", "constitutions_by_group", "updated_from"})
GIT_HISTORY = 200  # commits of a constitution file searched for an old job's version


# ---------------------------------------------------------------- constitution snapshots


def save_constitutions(root: Path, plan: ConstitutionPlan) -> None:
    """Keep the text of the job's constitutions in ROOT/constitutions.json (by content sha256), so an
    update of this job finds them after the files have changed."""
    path = root / SNAPSHOT_FILE
    known = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    mine = {c.ref.sha256: c.constitution.model_dump(mode="json", exclude_none=True)
            for c in [plan.default, *plan.groups.values()] if c is not None}
    if any(sha not in known for sha in mine):
        atomic_write_json(path, {**known, **mine})


def _from_snapshot(root: Path, sha: str) -> LoadedConstitution | None:
    path = root / SNAPSHOT_FILE
    data = json.loads(path.read_text(encoding="utf-8")).get(sha) if path.is_file() else None
    if data is None:
        return None
    constitution = Constitution.model_validate(data)
    ref = ConstitutionRef(name=constitution.name, version=constitution.version, sha256=constitution.content_sha256(),
                          path=display_path(path))
    return LoadedConstitution(constitution=constitution, ref=ref)


def _candidates(spec: str) -> Iterator[str]:
    """`spec`, then the same file at each commit of its git history (newest first)."""
    yield spec
    path, rev = split_spec(spec)
    location = git_location(path) if rev is None and path.is_file() else None
    if location is not None:
        log = git(location[0], "log", f"-n{GIT_HISTORY}", "--format=%H", "--", location[1]) or ""
        yield from (f"{path}@{commit}" for commit in log.split())


def find_constitution(root: Path, ref: dict, specs: Iterable[str]) -> LoadedConstitution:
    """The constitution whose content hash `ref` records: from the job's snapshot, else the specs
    its manifest names or their git history."""
    found = _from_snapshot(root, ref["sha256"])
    for spec in (s for s in specs if found is None):
        for candidate in _candidates(spec):
            try:
                loaded = load_constitution(candidate)
            except ConstitutionError:
                continue
            if loaded.ref.sha256 == ref["sha256"]:
                found = loaded
                break
    if found is None:
        raise CaiError(
            f"--update-from {root}: cannot find the text of constitution `{ref['name']}` v{ref['version']} "
            f"(sha256 {ref['sha256'][:12]}) that the job was made with: it has no {SNAPSHOT_FILE}, and neither "
            f"{', '.join(specs) or 'its constitution file'} nor that file's git history has that content. Commit "
            "or restore that version of the file so its git history holds it, then run the update again")
    return found


# ---------------------------------------------------------------- the old job


class OldJob:
    """The job an update reads: its manifest, its constitutions by prompt group and its rows by input
    (indexed in a temporary SQLite file, so memory stays flat whatever the job's size)."""

    def __init__(self, root: str | Path, models: RecordModels):
        self.root = Path(root)
        if not (self.root / "manifest.json").is_file():
            raise CaiError(f"--update-from {root}: not a job directory (no manifest.json)")
        self.manifest = read_manifest(self.root)
        self.models = models
        self._db = sqlite3.connect("")
        self._db.execute("CREATE TABLE rows (stage TEXT, key TEXT, seq INTEGER, row TEXT)")
        self._constitutions: dict[str, LoadedConstitution] = {}

    def index(self, keys: dict[str, Callable[[dict], str]]) -> OldJob:
        """Index the rows of each stage in `keys` by the input they belong to (`keys[stage](row)`)."""
        store = JobStore.at(self.root, self.models)
        for stage, key in keys.items():
            self._db.executemany("INSERT INTO rows VALUES (?, ?, ?, ?)",
                                 ((stage, key(row), n, json.dumps(row)) for n, row in enumerate(store.read(stage))))
        self._db.execute("CREATE INDEX by_key ON rows (stage, key)")
        return self

    def rows(self, stage: str, key: str) -> list[dict]:
        cursor = self._db.execute("SELECT row FROM rows WHERE stage = ? AND key = ? ORDER BY seq", (stage, key))
        return [json.loads(text) for (text,) in cursor]

    def records(self, stage: str, key: str) -> list:
        model = self.models[stage]
        return [model.model_validate(row) for row in self.rows(stage, key)]

    def ref_for(self, group: str) -> dict | str:
        """The identity of the constitution the old job used for a prompt group, or `none`."""
        inputs = self.manifest.fingerprint_inputs
        return inputs.get("constitutions_by_group", {}).get(group, inputs["constitution"])

    def constitution_for(self, group: str) -> LoadedConstitution | None:
        """The constitution the old job used for a prompt group (None: `none`, left unrevised)."""
        ref = self.ref_for(group)
        if ref == UNREVISED:
            return None
        if ref["sha256"] not in self._constitutions:
            recipe = self.manifest.recipe
            specs = [recipe.get("constitution"), *(recipe.get("constitution_by_group") or {}).values()]
            specs = [s for s in specs if isinstance(s, str) and s != UNREVISED]
            self._constitutions[ref["sha256"]] = find_constitution(self.root, ref, specs)
        return self._constitutions[ref["sha256"]]

    def check_compatible(self, new: Manifest, out: str | Path) -> None:
        """CaiError unless the new job differs from this one in its constitutions alone."""
        if self.root.resolve() == Path(out).resolve():
            raise CaiError(f"--update-from {self.root} is the job's own --out: give the updated job a new directory")
        if self.manifest.stage != new.stage:
            raise CaiError(f"--update-from {self.root}: a {self.manifest.stage} job; a {new.stage} update "
                           f"needs a {new.stage} job")
        old = self.manifest.fingerprint_inputs
        now = json.loads(json.dumps(new.fingerprint_inputs, default=str))  # as manifest.json stores it (tuples: lists)
        changed = sorted(k for k in old.keys() | now.keys() if k not in NOT_COMPARED and old.get(k) != now.get(k))
        if changed:
            raise CaiError(
                f"--update-from {self.root}: that job was made with other settings than this one besides the "
                f"constitution (changed: {', '.join(changed)}). An update reuses rows of a job with the same "
                "prompts, model(s) and settings; run this job in full instead (without --update-from)")

    def close(self) -> None:
        self._db.close()


# ---------------------------------------------------------------- decisions


@dataclass
class Decision:
    """Reuse a row, or regenerate it (`reason`: see cai.update_report.REASONS). `principles`: a reused
    row's own, a row regenerated for a changed principle the stale ones."""

    reuse: bool
    reason: str | None = None
    principles: list[str] = field(default_factory=list)


def _unusable(rows: list[dict]) -> Decision | None:
    """Why the old job's rows for an input cannot be carried over: none, or any is an error row."""
    if not rows:
        return _redo("new")
    if any(row["error"] is not None for row in rows):
        return _redo("error")
    return None


def _redo(reason: str, principles: Iterable[str] = ()) -> Decision:
    return Decision(False, reason, list(principles))


@dataclass
class Update:
    """The rows of an update to carry over, decided prompt by prompt before any batch runs."""

    old: OldJob
    plan: ConstitutionPlan
    report: UpdateReport
    reused: dict[str, IdSet] = field(default_factory=dict)
    _diffs: dict[tuple[str, str], ConstitutionDiff] = field(default_factory=dict)

    def changed(self, group: str) -> tuple[LoadedConstitution | None, LoadedConstitution | None, list[str]]:
        """(old constitution, new constitution, principle ids reworded or removed) of a prompt group."""
        new, ref = self.plan.for_group(group), self.old.ref_for(group)
        if new is not None and ref != UNREVISED and ref["sha256"] == new.ref.sha256:
            return new, new, []  # the same text: nothing to look up
        old = self.old.constitution_for(group)
        if old is None or new is None:
            return old, new, []
        pair = (old.ref.sha256, new.ref.sha256)
        if pair not in self._diffs:
            self._diffs[pair] = diff_constitutions(old, new)
            self.report.diffs.append(self._diffs[pair])
        return old, new, changed_ids(self._diffs[pair])

    def sft(self, source: SourcePrompt, key: str, rounds: int, seed: int) -> Decision:
        rows = self.old.rows("sft", key)
        if missing := _unusable(rows):
            return missing
        old, new, changed = self.changed(source.group)
        ids = rows[0]["lineage"]["principle_ids"]
        if (old is None) != (new is None):
            return _redo("constitution")
        if stale := stale_principles(ids, changed):
            return _redo("changed", stale)
        if new is not None and ids != [sample_principle(new, seed, key, r).id for r in range(1, rounds + 1)]:
            return _redo("redrawn")
        return Decision(True, principles=ids)

    def samples(self, source: SourcePrompt, key: str, labeller: str, seed: int) -> Decision:
        """Phase 2's pass 1: labeller judge's answers use no principle; a contrastive pair's do."""
        rows = self.old.rows("samples", key)
        if missing := _unusable(rows):
            return missing
        if labeller == "judge":
            return Decision(True)
        _, new, changed = self.changed(source.group)
        pid = rows[0]["contrast"]["principle_id"]
        if stale := stale_principles([pid], changed):
            return _redo("changed", stale)
        if contrast_principle(new, seed, key).id != pid:
            return _redo("redrawn")
        return Decision(True, principles=[pid])

    def prefs(self, source: SourcePrompt, key: str, labeller: str, seed: int) -> Decision:
        """Phase 2's pass 2, once the prompt's answers are carried over: each pair's principle."""
        rows = self.old.rows("prefs", key)
        if missing := _unusable(rows):
            return missing
        _, new, changed = self.changed(source.group)
        ids = sorted({pid for row in rows for pid in row["lineage"]["principle_ids"]})
        if stale := stale_principles(ids, changed):
            return _redo("changed", stale)
        pairs = [] if labeller != "judge" else [c for row in rows for c in row["comparisons"]]
        if any(sample_principle(new, seed, key, [c["a"], c["b"]]).id != c["judgement"]["principle_id"]
               for c in pairs):
            return _redo("redrawn")
        return Decision(True, principles=ids)

    def has_work(self, stage: str) -> bool:
        """Whether any input of `stage` is regenerated (its engine is needed)."""
        return bool(self.report.resampled if stage == "samples" else self.report.regenerated_total)

    def reusing(self, stage: str, process, key: Callable, record_key: Callable,
                per_prompt: int | None = None) -> Reusing:
        """`process` (a stage call) for this update's batches of `stage` (see cai.reuse.Reusing)."""
        return Reusing(process, self.reused[stage], key, lambda k: self.old.records(stage, k), record_key, per_prompt)

    def close(self) -> None:
        self.old.close()


def _first_occurrences(prompts: Iterable[SourcePrompt], key: Callable[[SourcePrompt], str],
                       dedupe: Callable[[SourcePrompt], str] | None) -> Iterator[tuple[str, SourcePrompt]]:
    """(id, prompt) for the prompts the job's plan keeps (duplicates merged as cai.batches does)."""
    seen = IdSet()
    for prompt in prompts:
        item_id = key(prompt)
        dup = dedupe(prompt) if dedupe else item_id
        if dup not in seen:
            seen.add(dup)
            yield item_id, prompt


def plan_sft_update(old: OldJob, plan: ConstitutionPlan, prompts: Iterable[SourcePrompt],
                    key: Callable[[SourcePrompt], str], dedupe, rounds: int, seed: int) -> Update:
    """Decide every prompt of a phase-1 update: `reused["sft"]` holds the ids carried over."""
    update = Update(old, plan, UpdateReport(old_job=str(old.root), old_fingerprint=old.manifest.fingerprint))
    update.reused["sft"] = IdSet()
    for item_id, source in _first_occurrences(prompts, key, dedupe):
        decision = update.sft(source, item_id, rounds, seed)
        update.report.count(decision.reuse, decision.reason, decision.principles)
        if decision.reuse:
            update.reused["sft"].add(item_id)
    return update


def plan_prefs_update(old: OldJob, plan: ConstitutionPlan, prompts: Iterable[SourcePrompt],
                      key: Callable[[SourcePrompt], str], dedupe, labeller: str, seed: int) -> Update:
    """Decide every prompt of a phase-2 update: `reused["samples"]` and `reused["prefs"]` hold the
    prompt ids whose answers, and whose labelled rows, are carried over."""
    report = UpdateReport(old_job=str(old.root), old_fingerprint=old.manifest.fingerprint, unit="prompts",
                          resampled=0)
    update = Update(old, plan, report)
    update.reused.update(samples=IdSet(), prefs=IdSet())
    for item_id, source in _first_occurrences(prompts, key, dedupe):
        decision = update.samples(source, item_id, labeller, seed)
        if decision.reuse:
            update.reused["samples"].add(item_id)
            decision = update.prefs(source, item_id, labeller, seed)
        else:
            report.resampled += 1
        report.count(decision.reuse, decision.reason, decision.principles)
        if decision.reuse:
            update.reused["prefs"].add(item_id)
    return update


def start_update(root: Path, update: Update) -> Update:
    """Record the update's decisions in the new job ROOT: update.json, its data card's section."""
    update.report.old_job = display_path(update.old.root)
    write_update_report(root, update.report)
    return update


def job_dir_spec(spec: EngineSpec, root: Path, plan: ConstitutionPlan) -> EngineSpec:
    """The engine spec a job builds from, keeping what belongs to the job in its directory ROOT: the
    constitutions' text (for a later update) and an openai_batch engine's submitted batches."""
    save_constitutions(root, plan)
    return with_state_dir(spec, root)


def open_update(job, models: RecordModels) -> OldJob | None:
    """The old job of a job with `update_from` (its manifest read, its rows not yet); None otherwise."""
    source = job.update_from
    return None if source is None else OldJob(source, models)


def update_inputs(old: OldJob | None) -> dict:
    """What an update adds to the new job's fingerprint inputs: the old job's fingerprint."""
    if old is None:
        return {}
    return {"updated_from": {"stage": old.manifest.stage, "fingerprint": old.manifest.fingerprint}}
