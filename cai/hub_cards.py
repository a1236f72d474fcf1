"""What a push uploads, and the README.md card it uploads with it.

A job directory: the exported dataset (JSONL, and Parquet when written) with the job's own data card
(cai.cards) under Hub metadata: license, task category, tags, size, and the `configs` that point the
Hub's loader and viewer at the export. The job must be finished: exported, nothing cancelled, no
shard newer than the export. The shards, manifest and quarantine stay local.

A trained model folder: the weights, tokenizer and config (and a LoRA run's adapter/) with a model card
naming the base model, the constitution(s) and version(s), the data and the method and settings that
trained it (cai.hub_lineage). Checkpoints (optimiser and scheduler states) and PPO's value head are
training state: uploaded only when asked. The training must be finished: metrics.json written, no
checkpoint newer than it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict

from cai import __version__
from cai.hub_lineage import HubError, ModelLineage, model_lineage
from cai.kinds import JobKind
from cai.records import ErrorCode
from cai.store import JobStore

CARD = "README.md"
DATASET_KINDS = ("sft", "prefs")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
                   "chat_template.json")
WEIGHT_FILES = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json")
MODEL_FILES = ("config.json", "generation_config.json", *WEIGHT_FILES, *TOKENIZER_FILES)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", *TOKENIZER_FILES)
METHODS = {
    "sft": ("SFT", "supervised fine-tuning (TRL `SFTTrainer`) on critique-then-revise data (SL-CAI); the loss "
                   "is on the final assistant turn"),
    "rm": ("Reward model", "a reward model (TRL `RewardTrainer`) on AI-judged preference pairs, the preference "
                           "model of RL-CAI"),
    "dpo": ("DPO", "direct preference optimisation (TRL `DPOTrainer`) on AI-judged preference pairs (RLAIF)"),
    "ppo": ("PPO", "PPO (cai's own) against a reward model, with a KL penalty to the reference model (RLAIF)"),
    "grpo": ("GRPO", "GRPO (TRL `GRPOTrainer`), online RLAIF: the constitutional judge ranks each prompt's "
                     "sampled answers under a principle drawn per group"),
}
METHOD_TAGS = {"sft": ["sft"], "rm": ["reward-model"], "dpo": ["dpo", "rlaif"], "ppo": ["ppo", "rlaif"],
               "grpo": ["grpo", "rlaif"]}


class PushTarget(BaseModel):
    """What one push uploads: `files` (relative to `root`) and the card `card_for(repo_id)` renders."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    repo_type: Literal["dataset", "model"]
    root: Path
    files: list[str]
    title: str
    card_for: Callable[[str], str]


# ---------------------------------------------------------------- datasets


def dataset_target(store: JobStore, kind: JobKind, license: str | None = None) -> PushTarget:
    """A finished sft or prefs job's export and its data card; HubError when the job is not ready."""
    check_finished(store, kind)
    with open(store.export_path(kind.dataset), "rb") as f:
        rows = sum(1 for line in f if line.strip())
    if not rows:
        raise HubError(f"{store.root / kind.dataset} holds no rows (every row is an error row or was excluded, "
                       f"see {store.root / CARD}): nothing to share")
    files = store.exports(n for n in kind.export_files if n not in (CARD, "manifest.json"))
    meta, body = split_front_matter(store.export_path(CARD).read_text(encoding="utf-8"))
    title = body.lstrip().splitlines()[0].lstrip("# ").replace("`", "") if body.strip() else f"cai {kind.name} data"
    return PushTarget(repo_type="dataset", root=store.root, files=files, title=f"Upload {title}",
                      card_for=lambda repo_id: dataset_card(store, kind, files, rows, meta, body, title, repo_id,
                                                            license))


def check_finished(store: JobStore, kind: JobKind) -> None:
    """HubError unless the job is a dataset job, finished and exported since its last shard."""
    root = store.root
    if kind.name not in DATASET_KINDS:
        raise HubError(f"{root} is a {kind.title} job ({kind.name}): it holds a report, not a dataset; "
                       f"push an sft or prefs job")
    stats = store.stats(kind.result_stage).check()
    rerun = f"rerun its `cai generate {kind.name}` command (it resumes and exports) or `cai jobs retry-errors {root}`"
    if cancelled := stats.errors.get(ErrorCode.CANCELLED.value, 0):
        raise HubError(f"{root} is unfinished: {cancelled} inputs were cancelled when the job was stopped; "
                       f"{rerun}, then push")
    export, card = store.export_path(kind.dataset), store.export_path(CARD)
    if not stats.rows or not export.is_file() or not card.is_file():
        raise HubError(f"{root} has no export yet ({kind.dataset} and {CARD} are written when the job "
                       f"finishes): {rerun}, then push")
    shards = [p.stat().st_mtime_ns for p in store.shards.glob("*.jsonl")]
    if shards and max(shards) > min(export.stat().st_mtime_ns, card.stat().st_mtime_ns):
        raise HubError(f"{root} is unfinished: its shards are newer than {kind.dataset} (a later run did not "
                       f"finish, so the export is stale); {rerun}, then push")


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """(YAML metadata, body) of a card that may start with a `---` block."""
    if text.startswith("---\n") and (end := text.find("\n---\n", 4)) != -1:
        meta = yaml.safe_load(text[4:end]) or {}
        return (meta if isinstance(meta, dict) else {}), text[end + 5:]
    return {}, text


def size_category(rows: int) -> str:
    """The Hub's size category of a dataset of `rows` rows."""
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if rows < limit:
            return name
    return "10M<n<100M"


def dataset_card(store: JobStore, kind: JobKind, files: list[str], rows: int, meta: dict[str, Any], body: str,
                 title: str, repo_id: str, license: str | None) -> str:
    """The job's data card with Hub metadata, and how to load it from the Hub."""
    from huggingface_hub import DatasetCardData

    data_file = next((f for f in files if f.endswith(".parquet")), kind.dataset)
    tags = list(dict.fromkeys([*meta.get("tags", []), "constitutional-ai", "cai", "synthetic"]))
    constitution = store.manifest.fingerprint_inputs.get("constitution") or {}
    card = DatasetCardData(
        license=license or meta.get("license") or "unknown", task_categories=["text-generation"], tags=tags,
        size_categories=[size_category(rows)], pretty_name=title, annotations_creators=["machine-generated"],
        language_creators=["machine-generated"],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": data_file}]}],
        constitution={k: constitution[k] for k in ("name", "version", "sha256") if k in constitution} or None)
    others = ", ".join(f"`{f}`" for f in files if f != data_file)
    same = f" ({others} holds the same rows)" if others else ""
    return f"""---
{card.to_yaml()}
---
{body.rstrip()}

## On the Hub

`datasets.load_dataset("{repo_id}", split="train")` loads the {rows} rows of `{data_file}`{same}.
Pushed with `cai` {__version__} from job fingerprint `{store.manifest.fingerprint}`; the job's shards (every
trajectory and error row) and its manifest stay with the job directory.
"""


# ---------------------------------------------------------------- models


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(any(path.glob(p)) for p in WEIGHT_FILES)


def is_training_output(path: Path) -> bool:
    """A trained model folder, or one a training run has started to write (config, metrics or checkpoints)."""
    return is_model_dir(path) or any((path / name).is_file() for name in ("config.json", "metrics.json")) or any(
        p.is_dir() for p in path.glob("checkpoint-*"))


def check_trained(model_dir: Path) -> None:
    """HubError unless the folder holds a finished `cai train` output."""
    checkpoints = sorted(p for p in model_dir.glob("checkpoint-*") if p.is_dir())
    if not is_model_dir(model_dir):
        if checkpoints:
            raise HubError(f"{model_dir} holds checkpoints but no saved model: training has not finished; "
                           "resume it (`cai train ... --resume`), then push")
        raise HubError(f"{model_dir} is neither a cai job directory (no manifest.json) nor a trained model "
                       "folder (config.json and weights)")
    metrics = model_dir / "metrics.json"
    if not metrics.is_file():
        raise HubError(f"{model_dir} has no metrics.json: training has not finished (`cai train` writes it "
                       "last), or the folder was not made by `cai train`")
    newer = [p.name for p in checkpoints if p.stat().st_mtime_ns > metrics.stat().st_mtime_ns]
    if newer:
        raise HubError(f"{model_dir} is unfinished: {newer[-1]} is newer than metrics.json (a later run did "
                       "not finish); resume it with --resume, then push")


def model_files(model_dir: Path, include_checkpoints: bool = False) -> list[str]:
    """The files a model push uploads, relative to the folder."""
    names = sorted({p.name for pattern in MODEL_FILES for p in model_dir.glob(pattern) if p.is_file()})
    adapter = model_dir / "adapter"
    names += sorted({f"adapter/{p.name}" for pattern in ADAPTER_FILES for p in adapter.glob(pattern) if p.is_file()})
    if include_checkpoints:
        names += sorted(p.relative_to(model_dir).as_posix() for folder in model_dir.glob("checkpoint-*")
                        for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    return names


def model_target(model_dir: Path, license: str | None = None, include_checkpoints: bool = False,
                 datasets: list[str] | tuple = (), base_model: str | None = None) -> PushTarget:
    """A finished `cai train` output's model files and its model card; HubError when it is not ready."""
    check_trained(model_dir)
    lineage = model_lineage(model_dir, base_model=base_model, datasets=datasets)
    short = METHODS.get(lineage.trainer, (lineage.trainer,))[0]
    return PushTarget(repo_type="model", root=model_dir, files=model_files(model_dir, include_checkpoints),
                      title=f"Upload {short} model", card_for=lambda repo_id: model_card(lineage, repo_id, license))


def model_card(lineage: ModelLineage, repo_id: str, license: str | None) -> str:
    from huggingface_hub import ModelCardData

    short, method = METHODS.get(lineage.trainer, (lineage.trainer, f"`{lineage.trainer}`"))
    used = list(dict.fromkeys(f"`{c.name}` v{c.version}" for c in lineage.constitutions))
    trl = [] if lineage.trainer == "ppo" else ["trl"]  # cai's own PPO
    card = ModelCardData(
        base_model=lineage.base_model, datasets=lineage.datasets or None, license=license or "unknown",
        library_name="transformers",
        pipeline_tag="text-classification" if lineage.trainer == "rm" else "text-generation",
        tags=["constitutional-ai", "cai", *trl, *METHOD_TAGS.get(lineage.trainer, [])],
        constitutions=[{"name": c.name, "version": c.version, "sha256": c.sha256}
                       for c in lineage.constitutions] or None)
    under = f" under {', '.join(used)}" if used else ""
    return f"""---
{card.to_yaml()}
---
# {repo_id}

{short} of {lineage.base_model_name}{under}, trained with `cai` {__version__}: {method}.

## Constitution

{_constitution_table(lineage)}

## Training data

{_data_lines(lineage)}

## Training

- method: {method}
- base model: {lineage.base_model_name}

{_table("setting", lineage.settings, "Settings not listed are the trainer's defaults.")}

## Results (metrics.json)

{_table("metric", lineage.results, "")}

## Use

{_usage(lineage.trainer, repo_id)}
"""


def _constitution_table(lineage: ModelLineage) -> str:
    if not lineage.constitutions:
        return "No constitution could be read from the lineage of the data (or judge) that trained this model."
    rows = "\n".join(f"| `{c.name}` | {c.version} | `{(c.sha256 or 'unknown')[:16]}` | {c.used_for} |"
                     for c in lineage.constitutions)
    return f"| constitution | version | sha256 | how it shaped the model |\n| --- | --- | --- | --- |\n{rows}"


def _data_lines(lineage: ModelLineage) -> str:
    data = lineage.data
    lines = []
    if data is not None:
        details = [f"job fingerprint `{data.fingerprint}`" if data.fingerprint else "",
                   f"{data.rows} rows" if data.rows is not None else ""]
        lines.append(f"- {data.name}" + "".join(f"; {d}" for d in details if d))
    lines += [f"- on the Hub: `{repo}`" for repo in lineage.datasets]
    if lineage.reward_model:
        lines.append(f"- reward: {lineage.reward_model}")
    if lineage.judge_model:
        lines.append(f"- judge (online reward): {lineage.judge_model}")
    return "\n".join(lines) or "- unknown"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value).replace("|", "\\|")


def _table(what: str, values: dict[str, Any], note: str) -> str:
    if not values:
        return f"No {what}s recorded."
    rows = "\n".join(f"| {key} | {_fmt(value)} |" for key, value in values.items())
    return f"| {what} | value |\n| --- | --- |\n{rows}" + (f"\n\n{note}" if note else "")


def _usage(trainer: str, repo_id: str) -> str:
    if trainer == "rm":
        return f"""```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
model = AutoModelForSequenceClassification.from_pretrained("{repo_id}")  # one score per conversation
```"""
    return f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
model = AutoModelForCausalLM.from_pretrained("{repo_id}")
```"""
