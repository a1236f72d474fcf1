"""What a request may name (constitutions, datasets, engine profiles) and its recipe.

A `JobRequest` becomes cai's own recipe (`SFTJob`, `PrefsJob`) or an `EvalJob`,
after the limits are checked; inline prompts and constitutions are written into the
job directory's `input/` folder first, so the pipeline reads files as it always does.
Every refusal is a `Refused(status, detail)`: 400 for names that are not plain names
under a root, 413 for sizes, 422 for caps and bad fields.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cai.constitution import ConstitutionError, LoadedConstitution, load_constitution
from cai.constitution_plan import UNREVISED, PlanError, check_groups
from cai.errors import CaiError
from cai.evaluate import read_eval_items
from cai.files import atomic_write_jsonl, atomic_write_text
from cai.judge_eval import EvalJob
from cai.kinds import KINDS
from cai.recipe import (
    EngineSpec,
    ExecutorConfig,
    JudgeConfig,
    Phase1Config,
    Phase2Config,
    PrefsJob,
    SFTJob,
)
from cai.records import SamplingParams
from cai.sources import BUNDLED, BUNDLED_DIR, SourceError, read_prompts
from serve.auth import PathRefused, check_name, list_names, resolve_name
from serve.protocol import InlinePrompt, JobRequest

_SPEC = re.compile(r"^([a-z0-9]+(?:-[a-z0-9]+)*)(?:@((?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*)){2}))?$")
_cache: dict[tuple[str, int, int], LoadedConstitution] = {}
_cache_lock = threading.Lock()


class Refused(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


# ---------------------------------------------------------------- constitutions


def _load(path: Path) -> LoadedConstitution:
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    with _cache_lock:
        if key not in _cache:
            _cache[key] = load_constitution(path)  # safe YAML only (cai.constitution uses SafeLoader)
        return _cache[key]


def list_constitutions(folder: Path) -> list[LoadedConstitution]:
    found = []
    for name in list_names(folder, "*.y*ml"):
        try:
            found.append(_load((folder / name).resolve()))
        except (ConstitutionError, OSError):
            continue  # an invalid file is left out of the catalogue; `cai constitution validate` explains it
    return sorted(found, key=lambda c: (c.ref.name, c.constitution.version_tuple))


def find_constitution(folder: Path, spec: str) -> LoadedConstitution:
    """NAME or NAME@VERSION -> the constitution in `folder/NAME.yaml` (400 bad name, 404 unknown)."""
    return _find_constitution(folder, spec)[1]


def _find_constitution(folder: Path, spec: str) -> tuple[Path, LoadedConstitution]:
    """(the file, the constitution) of NAME or NAME@VERSION."""
    try:
        check_name(spec.partition("@")[0], "constitution")
    except PathRefused as exc:
        raise Refused(400, str(exc)) from None
    match = _SPEC.match(spec)
    if match is None:
        raise Refused(400, f"constitution {spec!r}: expected NAME or NAME@VERSION, e.g. harmless@1.0.0")
    name, version = match.groups()
    try:
        path = resolve_name(folder, name, (".yaml", ".yml"), "constitution")
    except PathRefused as exc:
        raise Refused(400, str(exc)) from None
    if path is None:
        known = ", ".join(f"{c.ref.name}@{c.ref.version}" for c in list_constitutions(folder)) or "none"
        raise Refused(404, f"no constitution {name!r} on this server (available: {known})")
    try:
        loaded = _load(path)
    except ConstitutionError as exc:
        raise Refused(422, f"the server's constitution {name!r} is invalid: "
                           f"{str(exc).replace(exc.file, path.name)}") from None
    if version is not None and loaded.ref.version != version:
        raise Refused(404, f"{name}@{version} not found: this server has {name}@{loaded.ref.version}")
    return path, loaded


# ---------------------------------------------------------------- datasets


def list_datasets(data_root: Path) -> list[str]:
    names = [n.removesuffix(".jsonl") if n.endswith(".jsonl") else n
             for n in list_names(data_root) if n.endswith(".jsonl") or (data_root / n).is_dir()]
    return sorted(set(names) | set(BUNDLED))


def find_dataset(data_root: Path, name: str) -> Path:
    try:
        path = resolve_name(data_root, name, ("", ".jsonl"), "dataset")
    except PathRefused as exc:
        raise Refused(400, str(exc)) from None
    if path is None and name in BUNDLED:
        return BUNDLED_DIR / f"{name}.jsonl"
    if path is None:
        raise Refused(422, f"dataset {name!r} not found under the server's data root; GET /v1/datasets lists them")
    return path


# ---------------------------------------------------------------- limits


def _cap(value: int | None, cap: int, what: str) -> None:
    if value is not None and value > cap:
        raise Refused(422, f"{what} = {value} is over this server's limit of {cap}")


def _check_sampling(params: dict[str, SamplingParams], cap: int) -> None:
    for name, p in params.items():
        _cap(p.max_tokens, cap, f"{name}.max_tokens")


def _check_judge(judge: JudgeConfig, limits, where: str) -> None:
    """The judge's token budgets and its re-asks of a malformed verdict (each one upstream call per order)."""
    for name, value in judge.max_token_settings().items():
        _cap(value, limits.max_tokens, f"{where}.{name}")
    _cap(judge.structured_retries, limits.max_retries, f"{where}.structured_retries")


def _measure(path: Path, req: JobRequest, limits) -> tuple[int, int]:
    """(prompts in the source, read up to max_rows + 1; characters of the prompts the job uses), with
    the turns of each prompt it uses checked against max_turns (a dataset's too, not only inline ones)."""
    used, count, chars = req.limit or limits.max_rows, 0, 0
    for n, prompt in enumerate(read_prompts(path, limit=limits.max_rows + 1)):
        count += 1
        if n < used:
            _cap(len(prompt.messages), limits.max_turns, f"turns of prompts[{n}]")
            chars += sum(len(m.content) for m in prompt.messages)
    return count, chars


def _prompt_chars(prompt: str | InlinePrompt) -> int:
    return len(prompt) if isinstance(prompt, str) else sum(len(m.content) for m in prompt.messages)


def _check_system_prompt(config, limit: int, where: str) -> None:
    text = getattr(config, "system_prompt", None) or ""
    if len(text) > limit:
        raise Refused(413, f"{where}.system_prompt has {len(text)} characters, over {limit}")


def _with_max_tokens(config, fields: tuple[str, ...], max_tokens: int | None):
    if max_tokens is None:
        return config
    return config.model_copy(update={f: getattr(config, f).model_copy(update={"max_tokens": max_tokens})
                                     for f in fields})


# ---------------------------------------------------------------- request -> recipe


def engine_spec(settings, name: str | None) -> EngineSpec:
    """The operator's engine profile `name` (default: the server's default profile)."""
    name = name or settings.default_engine
    if name not in settings.engines:
        raise Refused(422, f"engine {name!r} is not offered here; choose one of {sorted(settings.engines)} "
                           "(GET /v1/engines)")
    return settings.engines[name]


def _profile(settings, name: str | None) -> dict[str, str]:
    """How a recipe names an engine: by its profile, `{"profile": NAME}`, never by its spec.

    The spec (backend, model, options: base_url, api_key...) stays in the server's settings and is
    looked up when the job runs (resolve_engines), so no key or internal URL reaches the job table or
    the job directory, and a job resumed after the operator rotated a key uses the new one."""
    engine_spec(settings, name)
    return {"profile": name or settings.default_engine}


ENGINE_FIELDS = tuple(dict.fromkeys(f for kind in KINDS.values() for f in kind.engine_fields))  # hold EngineSpecs


def resolve_engines(recipe: dict[str, Any], settings) -> dict[str, Any]:
    """The recipe with each `{"profile": NAME}` replaced by that profile's EngineSpec (422 if gone)."""
    return {k: engine_spec(settings, v["profile"]).model_dump(mode="json")
            if k in ENGINE_FIELDS and isinstance(v, dict) and "profile" in v else v for k, v in recipe.items()}


def _shown_path(value: str, settings, job_dir: Path) -> str:
    """A recipe path as a client sees it: relative to the job directory, the data root, the
    constitutions folder or the bundled sets (`input/prompts.jsonl`, `questions.jsonl`), else its name."""
    if value == UNREVISED or not value:
        return value
    for root in (job_dir, settings.data_root, settings.constitutions_dir, BUNDLED_DIR):
        for base, path in ((Path(os.path.abspath(root)), Path(os.path.abspath(value))),
                           (Path(root).resolve(), Path(value).resolve())):
            if path.is_relative_to(base):
                return path.relative_to(base).as_posix()
    return Path(value).name


def client_recipe(recipe: dict[str, Any], settings, job_dir: Path) -> dict[str, Any]:
    """The recipe a job's manifest.json records (clients export it): engines by profile name, paths
    relative to the job directory or the server's roots, no engine option, no absolute server path."""
    out = {}
    for key, value in recipe.items():
        if key == "executor":  # where the server ran the batches: not the client's, nor the job's identity
            continue
        if key in ("constitution", "prompts", "data", "out") and isinstance(value, str):
            value = _shown_path(value, settings, job_dir)
        elif key == "constitution_by_group" and isinstance(value, dict):
            value = {g: _shown_path(v, settings, job_dir) for g, v in value.items()}
        elif key in ENGINE_FIELDS and isinstance(value, dict) and "options" in value:  # a job from before profiles
            names = [n for n, spec in settings.engines.items() if spec.model_dump(mode="json") == value]
            value = {"profile": names[0] if names else "(no longer offered)"}
        out[key] = value
    return out


def _invalid(exc: ValidationError) -> str:
    """A validation error's locations and messages, without the input values (which hold server paths)."""
    return "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'job'}: {e['msg']}" for e in exc.errors())


def _constitution(req: JobRequest, settings, input_dir: Path) -> str:
    if req.constitution_yaml is None:
        return str(_find_constitution(settings.constitutions_dir, req.constitution)[0])
    size = len(req.constitution_yaml.encode())
    if size > settings.limits.max_constitution_bytes:
        raise Refused(413, f"inline constitution of {size} bytes is over {settings.limits.max_constitution_bytes}")
    path = input_dir / "constitution.yaml"
    atomic_write_text(path, req.constitution_yaml)
    try:
        load_constitution(path)
    except ConstitutionError as exc:
        raise Refused(422, f"inline constitution: {str(exc).replace(str(path), 'constitution_yaml')}") from None
    return str(path)


def _constitution_for(req: JobRequest, settings) -> dict[str, str]:
    """Each group's constitution as a path under the server's constitutions/ (or `none`, sft only)."""
    out = {}
    for group, spec in (req.constitution_for or {}).items():
        if not 0 < len(group) <= 100:
            raise Refused(422, "constitution_for: a group name has 1 to 100 characters")
        if spec == UNREVISED:
            if req.kind != "sft":
                raise Refused(422, f"constitution_for.{group}: `none` (keep answers unrevised) is for sft jobs; "
                                   "a prefs job judges every pair under a constitution")
            out[group] = UNREVISED
        else:
            out[group] = str(_find_constitution(settings.constitutions_dir, spec)[0])
    return out


def _prompts(req: JobRequest, settings, input_dir: Path) -> str:
    limits = settings.limits
    if (req.prompts is None) == (req.dataset is None):
        raise Refused(422, "give prompts inline (`prompts`) or by name (`dataset`), exactly one of them")
    if req.prompts is not None:
        _cap(len(req.prompts), limits.max_rows, "number of prompts")
        for n, prompt in enumerate(req.prompts):
            if (chars := _prompt_chars(prompt)) > limits.max_prompt_chars:
                raise Refused(413, f"prompts[{n}] has {chars} characters, over {limits.max_prompt_chars}")
            _cap(1 if isinstance(prompt, str) else len(prompt.messages), limits.max_turns, f"turns of prompts[{n}]")
        path = input_dir / "prompts.jsonl"
        rows = ({"prompt": p} if isinstance(p, str) else p.model_dump(exclude_none=True) for p in req.prompts)
        atomic_write_jsonl(path, rows)
    else:
        path = find_dataset(settings.data_root, req.dataset)
    try:
        count, chars = _measure(path, req, limits)
    except SourceError as exc:
        raise Refused(422, f"prompts: {str(exc).replace(str(path), req.dataset or 'prompts')}") from None
    if count == 0:
        raise Refused(422, "no prompts given")
    if count > limits.max_rows and req.limit is None:
        raise Refused(422, f"dataset {req.dataset!r} has more than {limits.max_rows} prompts (this server's "
                           f"rows-per-job limit): pass limit <= {limits.max_rows}")
    if chars > limits.max_job_chars:
        raise Refused(413, f"the job's prompts have {chars} characters in all, over this server's limit of "
                           f"{limits.max_job_chars} per job" + (": pass a smaller limit" if req.dataset else ""))
    return str(path)


def _eval_data(req: JobRequest, settings) -> str:
    if req.prompts is not None or req.dataset is None:
        raise Refused(422, "judge-eval reads labelled pairs by name: give `dataset` (HH-RLHF chosen/rejected or "
                           "multiple-choice JSONL), not `prompts`")
    path = find_dataset(settings.data_root, req.dataset)
    try:
        items = read_eval_items(path, limit=settings.limits.max_rows + 1, seed=req.seed)
    except (CaiError, ValueError, OSError) as exc:
        raise Refused(422, f"dataset {req.dataset!r}: {str(exc).replace(str(path), req.dataset)}") from None
    if len(items.items) > settings.limits.max_rows and req.limit is None:
        raise Refused(422, f"dataset {req.dataset!r} has more than {settings.limits.max_rows} items: "
                           f"pass limit <= {settings.limits.max_rows}")
    return str(path)


def _sft_job(req: JobRequest, settings, job_dir: Path, input_dir: Path) -> tuple[SFTJob, dict[str, Any]]:
    limits, common = settings.limits, _common(req, settings, job_dir, input_dir)
    phase1 = _with_max_tokens(req.phase1 or Phase1Config(), ("answer", "critique", "revision"), req.max_tokens)
    _cap(phase1.rounds, limits.max_rounds, "phase1.rounds")
    _check_system_prompt(phase1, limits.max_prompt_chars, "phase1")
    _check_sampling({f"phase1.{k}": getattr(phase1, k) for k in ("answer", "critique", "revision")}, limits.max_tokens)
    job = SFTJob(prompts=_prompts(req, settings, input_dir), phase1=phase1, **common)
    _check_prompt_groups(job, settings)
    return job, {"engine": _profile(settings, req.engine)}


def _prefs_job(req: JobRequest, settings, job_dir: Path, input_dir: Path) -> tuple[PrefsJob, dict[str, Any]]:
    limits, common = settings.limits, _common(req, settings, job_dir, input_dir)
    phase2 = _with_max_tokens(req.phase2 or Phase2Config(), ("policy",), req.max_tokens)
    _cap(phase2.samples, limits.max_samples, "phase2.samples")
    _check_system_prompt(phase2, limits.max_prompt_chars, "phase2")
    _check_sampling({"phase2.policy": phase2.policy}, limits.max_tokens)
    _check_judge(phase2.judge, limits, "phase2.judge")
    job = PrefsJob(prompts=_prompts(req, settings, input_dir), phase2=phase2, min_confidence=req.min_confidence,
                   require_consistent=req.require_consistent, **common)
    _check_prompt_groups(job, settings)
    return job, {"policy": _profile(settings, req.engine),
                 "judge": _profile(settings, req.judge_engine) if req.judge_engine else None}


def _judge_eval_job(req: JobRequest, settings, job_dir: Path, input_dir: Path) -> tuple[EvalJob, dict[str, Any]]:
    judge = req.judge or JudgeConfig()
    _check_judge(judge, settings.limits, "judge")
    job = EvalJob(data=_eval_data(req, settings), out=str(job_dir), judge=judge, limit=req.limit,
                  seed=req.seed, baseline=req.baseline, executor=_executor(settings))
    return job, {"engine": _profile(settings, req.engine)}


def _common(req: JobRequest, settings, job_dir: Path, input_dir: Path) -> dict[str, Any]:
    """The settings sft and prefs jobs share."""
    return dict(constitution=_constitution(req, settings, input_dir), out=str(job_dir), limit=req.limit,
                constitution_by_group=_constitution_for(req, settings), batch_size=req.batch_size,
                parquet=True, new_job=False, executor=_executor(settings))


def _executor(settings) -> ExecutorConfig:
    """Where the server's jobs run their batches: its `executor` setting (local when it has none)."""
    return getattr(settings, "executor", None) or ExecutorConfig()


def _check_prompt_groups(job: SFTJob | PrefsJob, settings) -> None:
    groups = {p.group for p in read_prompts(job.prompts, limit=job.limit or settings.limits.max_rows)}
    check_groups(job.constitution_by_group, groups, "constitution_for")


# Per job kind (cai.kinds): the request fields it does not take, and how its request becomes its job.
REQUEST_KINDS = {
    "sft": (("phase2", "judge", "judge_engine"), _sft_job),
    "prefs": (("phase1", "judge"), _prefs_job),
    "judge-eval": (("phase1", "phase2", "judge_engine", "max_tokens", "constitution_for"), _judge_eval_job),
}


def build_recipe(req: JobRequest, settings, job_dir: Path) -> dict[str, Any]:
    """Check the request against the limits and turn it into the job's recipe (JSON data): the job's
    settings, with its engines named by profile."""
    limits = settings.limits
    _cap(req.limit, limits.max_rows, "limit")
    _cap(req.batch_size, limits.max_batch_size, "batch_size")
    _cap(req.max_tokens, limits.max_tokens, "max_tokens")
    unused, build = REQUEST_KINDS[req.kind]
    given = [f for f in unused if getattr(req, f) is not None]
    if given:
        raise Refused(422, f"{', '.join(given)} do not apply to a {req.kind} job")
    input_dir = job_dir / "input"
    input_dir.mkdir(parents=True, exist_ok=True)
    try:
        job, engines = build(req, settings, job_dir, input_dir)
    except ValidationError as exc:
        raise Refused(422, _invalid(exc)) from None
    except PlanError as exc:
        raise Refused(422, str(exc)) from None
    return job.model_dump(mode="json") | engines
