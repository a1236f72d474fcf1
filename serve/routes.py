"""HTTP routes. `public`: health probe and the review page's static files; `api`: everything
else, behind an API key (`Authorization: Bearer KEY`). A key sees only its own jobs: another
owner's job answers 404, exactly like a job that does not exist."""

from __future__ import annotations

import json
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, RedirectResponse

from cai.kinds import kind
from cai.store import JobStore
from serve.auth import PathRefused, check_name, require_owner
from serve.jobs import ClientView, JobDB, TooManyActive
from serve.protocol import (
    ACTIVE_STATES,
    AgreementReport,
    ConstitutionDetail,
    ConstitutionInfo,
    ConstitutionList,
    DatasetList,
    EngineInfo,
    EngineList,
    JobCreated,
    JobList,
    JobRequest,
    JobStatus,
    PrincipleInfo,
    Progress,
    RecordPage,
    Review,
    ReviewCounts,
    ReviewList,
    ReviewRequest,
    SampleStrategy,
)
from serve.resolve import (
    Refused,
    build_recipe,
    find_constitution,
    list_constitutions,
    list_datasets,
)
from serve.results import MEDIA, export_file, find_record, page, review_counts
from serve.review_stats import agreement, sample_page

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = {"app.js": "text/javascript; charset=utf-8", "diff.js": "text/javascript; charset=utf-8",
          "keys.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
_JOB_ID = re.compile(r"^[0-9a-f]{16}$")

public = APIRouter()
api = APIRouter(prefix="/v1", dependencies=[Depends(require_owner)])


# ---------------------------------------------------------------- public


@public.get("/healthz", tags=["public"])
def healthz() -> dict[str, str]:
    """Liveness probe; the only API route without a key."""
    return {"status": "ok"}


@public.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    return RedirectResponse("/ui")


@public.get("/ui", include_in_schema=False)
def ui() -> FileResponse:
    """The review page (static HTML; it asks for a key and holds no data itself)."""
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")


@public.get("/ui/{asset}", include_in_schema=False)
def ui_asset(asset: str) -> FileResponse:
    if asset not in ASSETS:  # a fixed set of names: nothing is looked up from the request
        raise HTTPException(404, "no such asset")
    return FileResponse(STATIC / asset, media_type=ASSETS[asset])


# ---------------------------------------------------------------- helpers


def _db(request: Request) -> JobDB:
    return request.app.state.db


def _job(request: Request, job_id: str, owner: str) -> dict[str, Any]:
    if not _JOB_ID.match(job_id):
        raise HTTPException(400, "malformed job id (16 hex digits)")
    job = _db(request).get(job_id, owner)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    return job


def _request_summary(body: dict[str, Any]) -> dict[str, Any]:
    """The submitted request without its bulk (inline prompts and constitution text are in the job directory)."""
    out = {k: v for k, v in body.items() if k not in ("prompts", "constitution_yaml")}
    if "prompts" in body:
        out["inline_prompts"] = len(body["prompts"])
    if "constitution_yaml" in body:
        out["constitution"] = "inline"
    return out


def _exports(job: dict[str, Any]) -> list[str]:
    """Export files a completed job has written."""
    if job["state"] != "completed":
        return []
    return JobStore.at(job["dir"]).exports(kind(job["kind"]).export_files)


def _status(request: Request, job: dict[str, Any]) -> JobStatus:
    job_kind = kind(job["kind"])
    reviews = _db(request).reviews(job["id"]) if job_kind.reviewable else []
    view = ClientView(request.app.state.settings, Path(job["dir"]))  # also for rows written by an older server
    return JobStatus(
        id=job["id"], kind=job["kind"], state=job["state"], owner=job["owner"], created_at=job["created_at"],
        started_at=job["started_at"], finished_at=job["finished_at"],
        progress=Progress(total=job["total"], done=job["done"], resumed=job["resumed"], step=job["step"]),
        records=job["records"], errors=json.loads(job["errors"]), tokens=job["tokens"],
        tokens_per_second=job["tokens_per_second"], cancel_requested=bool(job["cancel_requested"]),
        message=view(job["message"]), files=_exports(job),
        reviews=ReviewCounts(**review_counts(reviews, judged=job_kind.judged_pairs)),
        summary=view(json.loads(job["summary"])) if job["summary"] else None,
        request=_request_summary(json.loads(job["request"])),
    )


def _refused(exc: Refused) -> HTTPException:
    return HTTPException(exc.status, exc.detail)


# ---------------------------------------------------------------- jobs


@api.post("/jobs", status_code=201, response_model=JobCreated, tags=["jobs"],
          responses={400: {"description": "a name is not a plain name under the server's roots"},
                     413: {"description": "body, prompt or inline constitution too large"},
                     422: {"description": "invalid field or over a cap"},
                     429: {"description": "too many queued or running jobs for this key"}})
def submit(body: JobRequest, request: Request, owner: str = Depends(require_owner)) -> JobCreated:
    """Submit a phase-1 (sft), phase-2 (prefs) or judge-evaluation (judge-eval) job; it is queued."""
    settings, db = request.app.state.settings, _db(request)
    if db.count_active(owner) >= settings.limits.max_active_jobs:
        raise HTTPException(429, f"{owner} already has {settings.limits.max_active_jobs} queued or running jobs")
    job_id = secrets.token_hex(8)
    job_dir = settings.jobs_root / job_id
    try:
        recipe = build_recipe(body, settings, job_dir)
        db.insert(id=job_id, owner=owner, kind=body.kind, request=body.model_dump(mode="json", exclude_none=True),
                  recipe=recipe, dir=str(job_dir.resolve()), max_active=settings.limits.max_active_jobs)
    except Refused as exc:
        shutil.rmtree(job_dir, ignore_errors=True)
        raise _refused(exc) from None
    except TooManyActive as exc:
        shutil.rmtree(job_dir, ignore_errors=True)
        raise HTTPException(429, str(exc)) from None
    except BaseException:
        shutil.rmtree(job_dir, ignore_errors=True)
        raise
    request.app.state.manager.notify()
    return JobCreated(id=job_id, state="queued")


@api.get("/jobs", response_model=JobList, tags=["jobs"])
def list_jobs(request: Request, owner: str = Depends(require_owner),
              state: Literal["queued", "running", "completed", "failed", "cancelled"] | None = None,
              limit: int = Query(100, ge=1, le=1000)) -> JobList:
    """This key's jobs, newest first."""
    return JobList(jobs=[_status(request, j) for j in _db(request).list(owner, state, limit)])


@api.get("/jobs/{job_id}", response_model=JobStatus, tags=["jobs"])
def get_job(job_id: str, request: Request, owner: str = Depends(require_owner)) -> JobStatus:
    """State, progress counts, errors by kind, tokens/s, export files and review agreement."""
    return _status(request, _job(request, job_id, owner))


@api.post("/jobs/{job_id}/cancel", response_model=JobStatus, tags=["jobs"])
def cancel(job_id: str, request: Request, owner: str = Depends(require_owner)) -> JobStatus:
    """Cancel a queued job, or stop a running one after its current batch (finished batches are kept)."""
    job = _job(request, job_id, owner)
    if job["state"] not in ACTIVE_STATES:
        raise HTTPException(409, f"job {job_id} is {job['state']}; only queued or running jobs can be cancelled")
    request.app.state.manager.cancel(job_id)
    return _status(request, _job(request, job_id, owner))


@api.post("/jobs/{job_id}/resume", response_model=JobStatus, tags=["jobs"])
def resume(job_id: str, request: Request, owner: str = Depends(require_owner)) -> JobStatus:
    """Queue a cancelled or failed job again; it resumes from its directory (finished batches are skipped)."""
    job = _job(request, job_id, owner)
    settings, db = request.app.state.settings, _db(request)
    if job["state"] not in ("cancelled", "failed"):
        raise HTTPException(409, f"job {job_id} is {job['state']}; only cancelled or failed jobs resume")
    if db.count_active(owner) >= settings.limits.max_active_jobs:
        raise HTTPException(429, f"{owner} already has {settings.limits.max_active_jobs} queued or running jobs")
    db.transition(job_id, ("cancelled", "failed"), state="queued", finished_at=None, message="resumed")
    request.app.state.manager.notify()
    return _status(request, _job(request, job_id, owner))


@api.get("/jobs/{job_id}/records", response_model=RecordPage, tags=["records"])
def records(job_id: str, request: Request, owner: str = Depends(require_owner),
            status: Literal["ok", "error"] | None = Query(None, description="only records without / with an error"),
            principle: str | None = Query(None, max_length=100, description="only records that used this principle"),
            offset: int = Query(0, ge=0), limit: int = Query(20, ge=1),
            sample: int | None = Query(None, ge=1, description="draw this many rows to review instead of a page "
                                                               "(error rows are never drawn; at most the page limit)"),
            strategy: SampleStrategy = Query("stratified", description="random, or stratified by principle and "
                                                                        "judge-confidence tertile"),
            seed: int = Query(0, ge=0, le=2**32 - 1, description="the same seed draws the same rows")) -> RecordPage:
    """The job's records with their full trajectories / judgements (finished batches, also while running),
    a page at a time or, with `sample`, a sample for review (serve.review_stats)."""
    job = _job(request, job_id, owner)
    cap = request.app.state.settings.limits.max_page
    if limit > cap:
        raise HTTPException(422, f"limit = {limit} is over this server's page limit of {cap}")
    reviews = _db(request).reviews(job_id) if kind(job["kind"]).reviewable else []
    if sample is not None:
        return _sample(request, job, reviews, principle, status, sample, strategy, seed)
    total, items = page(job, reviews, status, principle, offset, limit)
    items = ClientView(request.app.state.settings, Path(job["dir"]))(items)  # e.g. a backend's error text
    return RecordPage(total=total, offset=offset, limit=limit, items=items)


def _sample(request: Request, job: dict[str, Any], reviews: list[dict[str, Any]], principle: str | None,
            status: str | None, n: int, strategy: str, seed: int) -> RecordPage:
    cap = request.app.state.settings.limits.max_page
    if n > cap:
        raise HTTPException(422, f"sample = {n} is over this server's page limit of {cap}")
    if not kind(job["kind"]).reviewable:
        raise HTTPException(422, f"a {job['kind']} job's records are not reviewed: sample applies to sft and prefs")
    if status == "error":
        raise HTTPException(422, "error rows are not reviewed: a sample draws from rows without an error")
    total, items, info = sample_page(job, reviews, principle, n, strategy, seed)
    items = ClientView(request.app.state.settings, Path(job["dir"]))(items)
    return RecordPage(total=total, offset=0, limit=n, items=items, sample=info)


@api.get("/jobs/{job_id}/agreement", response_model=AgreementReport, tags=["reviews"])
def job_agreement(job_id: str, request: Request, owner: str = Depends(require_owner)) -> AgreementReport:
    """Reviewer-judge agreement per judged principle: agree / (agree + flip) over the reviewed rows (the
    review in force of each), with n and a 95% Wilson interval (prefs jobs)."""
    job = _job(request, job_id, owner)
    if not kind(job["kind"]).judged_pairs:
        raise HTTPException(422, f"a {job['kind']} job has no judge to agree with: agreement applies to prefs jobs")
    return agreement(job, _db(request).reviews(job_id))


@api.get("/jobs/{job_id}/export", tags=["jobs"], response_class=FileResponse,
         responses={200: {"description": "the file", "content": {"application/jsonl": {}}}})
def export(job_id: str, request: Request, owner: str = Depends(require_owner),
           file: str | None = Query(None, description="export name from the job's `files` (default: the dataset)")):
    """A dataset file of a completed job, with the reviews applied (prefs: agree / flip make a pair a
    confident human label, score = margin = 1.0, flip swapping chosen and rejected; discard drops)."""
    job = _job(request, job_id, owner)
    exports = kind(job["kind"]).export_files
    name = file or exports[0]
    try:
        check_name(name, "file")
    except PathRefused as exc:
        raise HTTPException(400, str(exc)) from None
    if name not in exports:
        raise HTTPException(404, f"no export {name!r}; a {job['kind']} job has {', '.join(exports)}")
    if job["state"] != "completed":
        raise HTTPException(409, f"job {job_id} is {job['state']}; exports exist once it completed")
    if name not in _exports(job):
        raise HTTPException(404, f"{name}: not written for this job (no rows exported?)")
    try:
        path = export_file(job, name, _db(request).reviews(job_id))
    except FileNotFoundError as exc:
        raise HTTPException(404, str(exc)) from None
    return FileResponse(path, media_type=MEDIA[path.suffix], filename=f"{job_id}-{name}")


@api.get("/jobs/{job_id}/reviews", response_model=ReviewList, tags=["reviews"])
def list_reviews(job_id: str, request: Request, owner: str = Depends(require_owner)) -> ReviewList:
    job = _job(request, job_id, owner)
    reviews = _db(request).reviews(job["id"])
    counts = review_counts(reviews, judged=kind(job["kind"]).judged_pairs)
    return ReviewList(reviews=[Review(**r) for r in reviews], counts=ReviewCounts(**counts))


@api.post("/jobs/{job_id}/reviews", response_model=Review, status_code=201, tags=["reviews"])
def add_review(job_id: str, body: ReviewRequest, request: Request, owner: str = Depends(require_owner)) -> Review:
    """Label a record: agree / flip (prefs only) / discard. The reviewer is the API key's name; its new
    label of a record replaces its old one, so a key holds at most one review per record of a job."""
    if body.reviewer is not None and body.reviewer != owner:
        raise HTTPException(422, f"reviewer {body.reviewer!r}: the reviewer is the API key's name ({owner!r}); "
                                 "leave the field out")
    job = _job(request, job_id, owner)
    job_kind = kind(job["kind"])
    if not job_kind.reviewable:
        raise HTTPException(422, "only sft and prefs records are reviewed")
    if body.label == "flip" and not job_kind.judged_pairs:
        raise HTTPException(422, "flip swaps a preference pair: it applies to prefs jobs only")
    record = find_record(job, body.record_id)
    if record is None:
        raise HTTPException(404, f"no record {body.record_id!r} in job {job_id}")
    if record.get("error") is not None:
        raise HTTPException(422, f"record {body.record_id} is an error row ({record['error']['code']}); "
                                 "it is never exported")
    return Review(**_db(request).put_review(job_id, body.record_id, owner, body.label, body.note))


@api.get("/jobs/{job_id}/constitution", response_model=ConstitutionDetail, tags=["constitutions"])
def job_constitution(job_id: str, request: Request, owner: str = Depends(require_owner)) -> ConstitutionDetail:
    """The constitution a job was made with (its principles, for the record viewer)."""
    job = _job(request, job_id, owner)
    recipe = json.loads(job["recipe"])
    if "constitution" not in recipe:
        raise HTTPException(404, f"a {job['kind']} job has no constitution")
    from cai.constitution import load_constitution

    return _detail(load_constitution(Path(recipe["constitution"])))


# ---------------------------------------------------------------- catalogue


def _info(c) -> dict[str, Any]:
    return dict(name=c.ref.name, version=c.ref.version, sha256=c.ref.sha256, git_commit=c.ref.git_commit,
                description=c.constitution.description)


def _detail(c) -> ConstitutionDetail:
    return ConstitutionDetail(**_info(c), principles=[PrincipleInfo(**p.model_dump(exclude={"examples"}))
                                                      for p in c.constitution.principles])


@api.get("/constitutions", response_model=ConstitutionList, tags=["constitutions"])
def constitutions(request: Request) -> ConstitutionList:
    """Constitutions in the server's constitutions folder: name, version, content sha256."""
    found = list_constitutions(request.app.state.settings.constitutions_dir)
    return ConstitutionList(constitutions=[ConstitutionInfo(**_info(c), principles=len(c.constitution.principles))
                                           for c in found])


@api.get("/constitutions/{name:path}", response_model=ConstitutionDetail, tags=["constitutions"])
def constitution(name: str, request: Request) -> ConstitutionDetail:
    """One constitution (NAME or NAME@VERSION) with its principles."""
    try:
        return _detail(find_constitution(request.app.state.settings.constitutions_dir, name))
    except Refused as exc:
        raise _refused(exc) from None


@api.get("/engines", response_model=EngineList, tags=["catalogue"])
def engines(request: Request) -> EngineList:
    """Engine profiles a job may name (set by the server's operator): name, backend and model only; a
    profile's options (base_url, api_key...) are never shown, and a model folder shows by its name."""
    settings = request.app.state.settings
    shown = lambda model: Path(model).name if model and Path(model).is_absolute() else model
    return EngineList(engines=[EngineInfo(name=n, backend=s.backend, model=shown(s.model),
                                          default=n == settings.default_engine)
                               for n, s in settings.engines.items()])


@api.get("/datasets", response_model=DatasetList, tags=["catalogue"])
def datasets(request: Request) -> DatasetList:
    """Dataset names under the server's data root (plus the bundled prompt sets)."""
    return DatasetList(datasets=list_datasets(request.app.state.settings.data_root))
