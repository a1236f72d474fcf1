"""What made a trained model, read from its folder and the folders it names, for its model card.

- the trainer and its settings: OUT/train_job.json, which `cai train` and `cai run` write after
  training (a job file, engine secrets left out), else a `cai run` stage's OUT/job.json; PPO's full
  configuration in OUT/ppo_config.json; the results in OUT/metrics.json;
- the base model: the embedded SmolLM2 (its Hub id), a folder pushed before (its hub.json), a Hub
  cache folder (models--ORG--NAME), else a local folder named as such;
- the data: a cai job's export (its manifest.json names the constitution of each prompt group, its
  hub.json the Hub dataset it was pushed as), else the constitutions in the rows' lineage;
- GRPO's judge: the constitution of each judged group (OUT/groups.jsonl); a PPO or GRPO reward
  model: the constitutions of the data that trained it.

Nothing here loads torch: a card is written from these files alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from cai.engine import redact_options
from cai.engine.models import embedded_model_dir
from cai.errors import CaiError
from cai.files import atomic_write_json, read_jsonl
from cai.sources import BUNDLED
from cai.store import read_manifest

HUB_RECORD = "hub.json"
TRAIN_RECORD = "train_job.json"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Settings that say where from and to, not how: named in the card's lineage, not its hyper-parameters.
NOT_HYPERPARAMETERS = {"data", "model", "out", "resume", "threads", "ref_model", "reward_model", "reward_fn",
                       "constitution", "constitution_by_group", "judge_model", "judge_backend", "judge_options"}
NOT_RESULTS = {"trainer", "model", "data", "ref_model", "reward_model", "judge_model", "resumed_from", "threads", "lora"}


class HubError(CaiError):
    """A push that cannot be done as asked; the message says why and what to do (never the token)."""


# ---------------------------------------------------------------- records: hub.json, train_job.json


def hub_pushes(root: Path) -> list[dict[str, Any]]:
    """The pushes ROOT/hub.json records, oldest first ([] when none)."""
    path = Path(root) / HUB_RECORD
    if not path.is_file():
        return []
    try:
        pushes = json.loads(path.read_text(encoding="utf-8"))["pushes"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise HubError(f"{path}: not a push record ({{\"pushes\": [...]}}); remove it and push again") from None
    return [p for p in pushes if isinstance(p, dict)]


def hub_repo(root: Path, repo_type: str) -> str | None:
    """The Hub repo of that type ROOT was last pushed to, if any."""
    found = [p["repo_id"] for p in hub_pushes(root) if p.get("repo_type") == repo_type and p.get("repo_id")]
    return found[-1] if found else None


def write_train_record(job: BaseModel, out: str | Path) -> Path:
    """OUT/train_job.json: the train job as a job file (`cai run OUT/train_job.json` runs it again), its
    data as an absolute path (so a later `cai push` finds it from any folder), engine secrets left out."""
    settings = job.model_dump(mode="json")
    for key, value in settings.items():
        if key.endswith("options") and isinstance(value, dict):
            settings[key] = redact_options(value)
    data = Path(settings.get("data") or "")
    if settings.get("data") and data.exists():
        settings["data"] = str(data.resolve())
    path = Path(out) / TRAIN_RECORD
    atomic_write_json(path, {"kind": job.kind, "job": settings})
    return path


def read_train_record(model_dir: Path) -> dict[str, Any]:
    """{"kind", "job"} of OUT/train_job.json, else of a `cai run` stage's OUT/job.json; {} when neither."""
    for name in (TRAIN_RECORD, "job.json"):
        path = model_dir / name
        if path.is_file():
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(record, dict) and isinstance(record.get("job"), dict):
                return record
    return {}


# ---------------------------------------------------------------- lineage


class ConstitutionUse(BaseModel):
    """A constitution that shaped the model, and how (`used_for`)."""

    name: str
    version: str
    sha256: str | None = None
    used_for: str


class DataSource(BaseModel):
    """The data a model was trained on, as its card names it (no local absolute path)."""

    name: str
    job_kind: str | None = None
    fingerprint: str | None = None
    rows: int | None = None
    hub_repo: str | None = None
    constitutions: list[ConstitutionUse] = Field(default_factory=list)


class ModelLineage(BaseModel):
    trainer: str
    base_model: str | None = None
    base_model_name: str
    data: DataSource | None = None
    reward_model: str | None = None
    judge_model: str | None = None
    constitutions: list[ConstitutionUse] = Field(default_factory=list)
    datasets: list[str] = Field(default_factory=list)
    settings: dict[str, Any] = Field(default_factory=dict)
    results: dict[str, Any] = Field(default_factory=dict)


def read_metrics(model_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((model_dir / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HubError(f"{model_dir / 'metrics.json'}: not readable ({exc}); train again or restore it") from None


def model_lineage(model_dir: Path, base_model: str | None = None, datasets: list[str] | tuple = ()) -> ModelLineage:
    """The lineage of a `cai train` output folder. `base_model` / `datasets`: Hub ids given by the user,
    which win over what the folders say."""
    metrics = read_metrics(model_dir)
    record = read_train_record(model_dir)
    job = record.get("job", {})
    trainer = metrics.get("trainer") or str(record.get("kind", "")).removeprefix("train-") or "unknown"
    found_base, base_name = base_model_ref(metrics.get("model") or job.get("model"))
    data = data_source(str(job.get("data") or metrics.get("data") or ""))
    constitutions = [*data.constitutions, *judge_constitutions(model_dir)]
    reward = metrics.get("reward_model") or job.get("reward_model")
    reward_name = f"reward function `{job['reward_fn']}`" if job.get("reward_fn") else None
    if reward and Path(reward).is_dir() and (Path(reward) / "metrics.json").is_file():
        inner = model_lineage(Path(reward))
        reward_name = hub_repo(Path(reward), "model") or f"local folder `{Path(reward).name}`"
        constitutions += [c.model_copy(update={"used_for": f"reward model's {c.used_for}"})
                          for c in inner.constitutions]
    judge = metrics.get("judge_model")
    linked = [*datasets] or ([data.hub_repo] if data.hub_repo else [])
    return ModelLineage(
        trainer=trainer, base_model=base_model or found_base, base_model_name=base_model or base_name, data=data,
        reward_model=reward_name, judge_model=model_name(judge.get("id")) if isinstance(judge, dict) else None,
        constitutions=_unique(constitutions), datasets=linked,
        settings=hyperparameters(model_dir, job), results=results(metrics))


def base_model_ref(path: str | None) -> tuple[str | None, str]:
    """(Hub id or None, how the card names it) of the folder a model was trained from."""
    if not path:
        return None, "unknown"
    folder = Path(path)
    if folder.is_dir() and folder.resolve() == embedded_model_dir().resolve():
        return EMBEDDED_HUB_ID, EMBEDDED_HUB_ID
    if folder.is_dir() and (repo := hub_repo(folder, "model")):
        return repo, repo
    if cached := re.search(r"models--([^/]+)--([^/]+)/snapshots/", folder.as_posix()):
        return f"{cached[1]}/{cached[2]}", f"{cached[1]}/{cached[2]}"
    return None, f"local folder `{folder.name}`"


def model_name(spec: str | None) -> str | None:
    """A model as a card names it: a folder by its Hub id or its name, never its local path."""
    if not spec:
        return None
    if Path(spec).is_dir():
        return base_model_ref(spec)[1]
    return f"`{Path(spec).name}`" if Path(spec).is_absolute() else f"`{spec}`"


def data_source(spec: str) -> DataSource:
    """What the card says of a train job's `data`: a cai job's export, another file, a bundled prompt set."""
    path = Path(spec)
    if not spec or not path.exists():
        if spec in BUNDLED:
            return DataSource(name=f"bundled prompt set `{spec}`")
        return DataSource(name=f"`{path.name or 'unknown'}` (not found here: its lineage is unknown)")
    job_dir = next((d for d in (path, path.parent) if (d / "manifest.json").is_file()), None)
    file = _data_file(path)
    rows = _count_rows(file) if file else None
    if job_dir is None:
        return DataSource(name=f"`{path.name}`", rows=rows, constitutions=row_constitutions(file) if file else [])
    manifest = read_manifest(job_dir)
    phase = {"sft": "phase 1 (critique and revision) data", "prefs": "phase 2 (preference) data"}.get(
        manifest.stage, f"{manifest.stage} data")
    return DataSource(name=f"`{file.name if file else path.name}` of cai job `{job_dir.name}`",
                      job_kind=manifest.stage, fingerprint=manifest.fingerprint, rows=rows,
                      hub_repo=hub_repo(job_dir, "dataset"),
                      constitutions=manifest_constitutions(manifest.fingerprint_inputs, phase))


def manifest_constitutions(inputs: dict[str, Any], used_for: str) -> list[ConstitutionUse]:
    """The constitution of each prompt group of a job, from its manifest's fingerprint inputs."""
    found = [(f"{used_for}, prompt group `{group}`", ref)
             for group, ref in inputs.get("constitutions_by_group", {}).items()]
    found.append((used_for, inputs.get("constitution")))
    return [ConstitutionUse(name=ref["name"], version=str(ref["version"]), sha256=ref.get("sha256"), used_for=why)
            for why, ref in found if isinstance(ref, dict) and ref.get("name")]  # an unrevised group: "none"


def row_constitutions(file: Path) -> list[ConstitutionUse]:
    """The constitutions in the rows' `metadata.constitution` (cai's exported rows carry it)."""
    seen = {}
    for meta in _row_metadata(file):
        ref = meta.get("constitution") if isinstance(meta, dict) else None
        if isinstance(ref, dict) and ref.get("name"):
            seen.setdefault((ref["name"], str(ref.get("version")), ref.get("sha256")), None)
    return [ConstitutionUse(name=n, version=v, sha256=s, used_for="training data (rows' lineage)") for n, v, s in seen]


def judge_constitutions(model_dir: Path) -> list[ConstitutionUse]:
    """GRPO: the constitution under which the judge ranked each group (OUT/groups.jsonl)."""
    path = model_dir / "groups.jsonl"
    if not path.is_file():
        return []
    seen = {}
    for row in read_jsonl(path):
        ref = row.get("constitution")
        if isinstance(ref, dict) and ref.get("name"):
            seen.setdefault((ref["name"], str(ref.get("version")), ref.get("sha256")), None)
    return [ConstitutionUse(name=n, version=v, sha256=s, used_for="the GRPO judge's principles (online reward)")
            for n, v, s in seen]


def hyperparameters(model_dir: Path, job: dict[str, Any]) -> dict[str, Any]:
    """The settings that say how it was trained: the job's (unset ones are the trainer's defaults), its
    `trl` fields by their own names, and for PPO every field of the configuration it ran with."""
    out = {k: v for k, v in job.items() if k not in NOT_HYPERPARAMETERS and k != "trl" and v is not None
           and not isinstance(v, dict)}
    out |= {f"judge_config.{k}": v for k, v in (job.get("judge_config") or {}).items() if v is not None
            and not isinstance(v, dict)}
    out.pop("judge_config", None)
    if not job.get("lora"):
        out = {k: v for k, v in out.items() if k not in ("lora_r", "lora_alpha")}
    out |= {f"trl.{k}": v for k, v in (job.get("trl") or {}).items()}
    ppo = model_dir / "ppo_config.json"
    if ppo.is_file():
        out |= {f"ppo.{k}": v for k, v in json.loads(ppo.read_text(encoding="utf-8")).items()
                if not isinstance(v, (dict, list))}
    return {k: v for k, v in out.items() if not _path_like(v)}


def _path_like(value: Any) -> bool:
    """A value that may be a local path: not written into a card."""
    return isinstance(value, str) and ("/" in value or "\\" in value)


def results(metrics: dict[str, Any]) -> dict[str, Any]:
    """metrics.json's scalar results (and the last logged step's), without local paths."""
    flat = {k: v for k, v in metrics.items() if k not in NOT_RESULTS}
    flat |= {f"last.{k}": v for k, v in (metrics.get("last") or {}).items()}
    return {k: v for k, v in flat.items()
            if isinstance(v, (int, float, bool)) or (isinstance(v, str) and not _path_like(v))}


def _unique(uses: list[ConstitutionUse]) -> list[ConstitutionUse]:
    return list({(u.name, u.version, u.sha256, u.used_for): u for u in uses}.values())


def _data_file(path: Path) -> Path | None:
    """The dataset file of a data argument: the file, or a folder's one .parquet or .jsonl export."""
    if path.is_file():
        return path
    for pattern in ("*.parquet", "*.jsonl"):
        found = sorted(p for p in path.glob(pattern) if not p.name.startswith("."))
        if found:
            return found[0]
    return None


def _count_rows(file: Path) -> int | None:
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(file).metadata.num_rows
    if file.suffix in (".jsonl", ".json"):
        with open(file, "rb") as f:
            return sum(1 for line in f if line.strip())
    return None


def _row_metadata(file: Path):
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(file)
        if "metadata" not in parquet.schema_arrow.names:
            return
        for batch in parquet.iter_batches(columns=["metadata"]):
            yield from batch.column("metadata").to_pylist()
    elif file.suffix == ".jsonl":
        for row in read_jsonl(file):
            yield row.get("metadata")
