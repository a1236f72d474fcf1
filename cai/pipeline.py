"""Wiring only: a job's settings -> stages -> job directory and exports."""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import BaseModel

from cai import __version__
from cai.constitution import load_constitution
from cai.critique import phase1_id, run_phase1
from cai.engine.base import Engine
from cai.engine.models import model_display_id, model_revision, resolve_model
from cai.export import SFTExportStats, export_sft
from cai.prompts import PHASE1_TEMPLATE_HASH
from cai.recipe import EngineSpec, SFTJob
from cai.records import ModelRef, SourcePrompt
from cai.sources import BUNDLED, BUNDLED_DIR, read_prompts
from cai.store import JobStore, Manifest, fingerprint

PHASE1_CODE_VERSION = "1"


class Phase1Summary(BaseModel):
    out: str
    done_before: int
    done_now: int
    duplicates_merged: int
    export: SFTExportStats
    generated_tokens_now: int
    generation_seconds: float
    wall_seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of engine work (model loading excluded)."""
        return self.generated_tokens_now / self.generation_seconds if self.generation_seconds else 0.0


ProgressHook = Callable[[str, int], None]
"""(event, count): "total" once with the number of prompts to do, "done" per finished prompt,
and "step <name>" per engine call."""


def source_digest(spec: str) -> str:
    """sha256 of the prompt source's bytes (a file, every file of a dataset folder, or a bundled set)."""
    path = BUNDLED_DIR / f"{spec}.jsonl" if spec in BUNDLED else Path(spec)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def engine_model_ref(spec: EngineSpec) -> ModelRef:
    """The model's identity without loading it (so a finished job starts no engine)."""
    resolved = resolve_model(spec.model)
    revision = model_revision(resolved) if Path(resolved).is_dir() else None
    return ModelRef(id=model_display_id(spec.model, resolved), revision=revision, engine=spec.backend)


def build_engine(spec: EngineSpec) -> Engine:
    from cai.engine import make_engine

    return make_engine(spec.backend, spec.model, **spec.options)


def _unique_new(
    prompts: Iterator[SourcePrompt], done: set[str], counts: dict[str, int]
) -> Iterator[SourcePrompt]:
    """Drop exact duplicates (same conversation -> same record id) and finished prompts."""
    seen: set[str] = set()
    for prompt in prompts:
        record_id = phase1_id(prompt)
        if record_id in seen:
            counts["duplicates"] += 1
            continue
        seen.add(record_id)
        if record_id not in done:
            yield prompt


def phase1_manifest(job: SFTJob, constitution_ref, model: ModelRef) -> Manifest:
    inputs = {
        "stage": f"sft/{PHASE1_CODE_VERSION}",
        "constitution": constitution_ref.model_dump(exclude={"path", "git_commit"}),
        "prompts": source_digest(job.prompts),
        "model": model.model_dump(),
        "phase1": job.phase1.model_dump(),
        "template_hash": PHASE1_TEMPLATE_HASH,
    }
    recipe = job.model_dump(mode="json")
    return Manifest(stage="sft", fingerprint=fingerprint(inputs), fingerprint_inputs=inputs, recipe=recipe)


def _open_store(job: SFTJob, manifest: Manifest) -> JobStore:
    out = Path(job.out)
    if job.new_job and (out / "manifest.json").exists():
        existing = Manifest.model_validate_json((out / "manifest.json").read_text())
        if existing.fingerprint != manifest.fingerprint:
            out = out.with_name(f"{out.name}-{manifest.fingerprint[:8]}")
    return JobStore.open(out, manifest)


def generate_sft(
    job: SFTJob, engine: Engine | None = None, progress: ProgressHook | None = None
) -> Phase1Summary:
    """Phase 1 end to end: resume-aware batches of critique-then-revise, then export."""
    started = time.perf_counter()
    constitution = load_constitution(job.constitution)
    model = engine.model if engine is not None else engine_model_ref(job.engine)
    manifest = phase1_manifest(job, constitution.ref, model)
    counts = {"duplicates": 0, "done": 0, "tokens": 0}
    generation_seconds = 0.0
    with _open_store(job, manifest) as store:
        done = store.done_ids("sft")
        todo = list(_unique_new(read_prompts(job.prompts, limit=job.limit), done, counts))
        if progress:
            progress("total", len(todo))
        if todo and engine is None:
            engine = build_engine(job.engine)
        hook = (lambda name, n: progress(f"step {name}", n)) if progress else None
        for start in range(0, len(todo), job.batch_size):
            batch = todo[start : start + job.batch_size]
            t0 = time.perf_counter()
            records = run_phase1(batch, constitution, engine, job.phase1, on_step=hook)
            generation_seconds += time.perf_counter() - t0
            store.append("sft", records)
            counts["done"] += len(records)
            counts["tokens"] += sum(s.completion_tokens for r in records for s in r.trajectory)
            if progress:
                progress("done", len(records))
        stats = export_sft(store)
    return Phase1Summary(
        out=str(store.root),
        done_before=len(done),
        done_now=counts["done"],
        duplicates_merged=counts["duplicates"],
        export=stats,
        generated_tokens_now=counts["tokens"],
        generation_seconds=generation_seconds,
        wall_seconds=time.perf_counter() - started,
    )
