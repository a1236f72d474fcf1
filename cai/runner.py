"""`cai run RECIPE.yaml`: the two-phase Constitutional AI run, stage by stage.

A recipe embeds each stage's typed job settings (the same models the CLI commands build from
their flags), validated when it loads, so a misspelt field fails at once, naming the file and the
field. The runner fills in what wires the stages together (prompts, models, folders), writes each
stage's whole job to RUN/<stage>/job.json and runs `cai run RUN/<stage>/job.json` in its own
process: every stage can be re-run by hand, engines and trainers never share a process (vLLM's CPU
thread binding and model memory go away between stages), and the peak memory of each stage is
measured on its own. A stage is finished when its folder holds `.done`; a rerun starts at the
first unfinished stage, and the data stages resume inside themselves from their job directories.

    01-sft-data  phase 1 (sft job): critique -> revise with the base model
    02-sft       SFT of the base model on the revisions (train-sft)
    03-prefs     phase 2 (prefs job): K samples per prompt from the SFT model, AI-judged pairs
                 (not for method grpo: it samples and judges online, inside 05-policy)
    04-rm        reward model (train-rm; method: ppo)
    05-policy    PPO against the reward model (train-ppo), DPO on the pairs (train-dpo), or GRPO on
                 the phase-2 prompts with the judge (judge_model, phase 2's judge settings) as the
                 reward (train-grpo)
    06-judge-check-N  the evaluation judge against human labels (judge-eval), per judge_check file
    07-eval      final vs SFT vs base, graded by the evaluation judge (eval-policy): win rates next
                 to that judge's human agreement, refusal rate, plots

With `launcher:` the training stages run under `accelerate launch` (cai.train.launch); the others
always run in one process.

Phase 1 and phase 2 take disjoint, seeded slices of each prompt source (run.json records the
split); evaluation excludes both. Each prompt group can have its own constitution (red-team
prompts: harmless; ordinary requests: helpful, or unrevised).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cai.constitution_plan import UNREVISED
from cai.engine.models import EMBEDDED_MODEL
from cai.errors import CaiError
from cai.files import atomic_write_lines, atomic_write_text
from cai.judge_eval import EvalJob
from cai.policy_records import PolicyEvalJob
from cai.recipe import EngineSpec, PrefsJob, SFTJob
from cai.sources import read_prompts
from cai.stage_jobs import (
    StageResult,
    describe_errors,
    job_settings,
    run_stage,
    write_job_file,
)
from cai.train.jobs import (
    DPOTrainJob,
    DPOTrainSettings,
    GRPOTrainJob,
    GRPOTrainSettings,
    PPOTrainJob,
    PPOTrainSettings,
    RewardTrainJob,
    RewardTrainSettings,
    SFTTrainJob,
    SFTTrainSettings,
)
from cai.train.launch import Launcher

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


class RecipeError(CaiError, ValueError):
    """A recipe that cannot run as written; the message names the recipe (file) and what to change."""


def _options(what: str) -> tuple[Any, Any]:
    return dict[str, Any], Field(default_factory=dict, description=f"backend options of the {what} engine")


Phase1Settings = job_settings(
    SFTJob, {"constitution", "constitution_by_group", "prompts", "out", "engine", "limit"}, "Phase1Settings",
    "Phase-1 job settings (cai.recipe.SFTJob); the runner sets constitution, prompts, out and engine.",
    engine_options=_options("phase-1"))
Phase2Settings = job_settings(
    PrefsJob, {"constitution", "constitution_by_group", "prompts", "out", "policy", "judge", "limit"},
    "Phase2Settings", "Phase-2 job settings (cai.recipe.PrefsJob); the runner sets constitution, prompts, out, "
    "the policy (the SFT model) and the judge (judge_model).",
    engine_options=_options("policy"), judge_engine_options=_options("judge"))
JudgeCheckSettings = job_settings(
    EvalJob, {"data", "out", "engine", "baseline"}, "JudgeCheckSettings",
    "Judge-evaluation settings (cai.judge_eval.EvalJob); the runner sets data, out and the engine (the "
    "evaluation judge), without the baseline judge.", engine_options=_options("evaluation judge"))
EvalSettings = job_settings(
    PolicyEvalJob, {"policy", "out", "sft", "base", "judge", "training_judge", "judge_reports", "engine",
                    "train_logs"}, "EvalSettings",
    "Policy-evaluation settings (cai.policy_records.PolicyEvalJob); the runner sets the models, judges, "
    "judge reports and training logs, and adds the training prompts to config.exclude.")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataStage(_Strict):
    prompts: list[str] = Field(default_factory=lambda: ["redteam"], description="sources, mixed in order")
    limit: int | None = Field(None, ge=1, description="prompts taken from each source")
    constitutions: dict[str, str] = Field(
        default_factory=dict, description="prompt group (a source's bundled name or file name without suffix) -> "
        "constitution for its prompts; phase 1 also takes `none` (answers kept unrevised)")


class Phase1Stage(DataStage):
    job: Phase1Settings = Field(default_factory=Phase1Settings)  # type: ignore[valid-type]


class Phase2Stage(DataStage):
    job: Phase2Settings = Field(default_factory=Phase2Settings)  # type: ignore[valid-type]


class JudgeCheck(_Strict):
    data: list[str] = Field(default_factory=list, description="human-labelled files (multiple-choice or HH "
                            "pairs); a missing file is skipped and the report says so")
    job: JudgeCheckSettings = Field(default_factory=lambda: JudgeCheckSettings(limit=100))  # type: ignore[valid-type]


class RunRecipe(_Strict):
    """One YAML file describes the whole run; each stage embeds its job's settings."""

    name: str
    description: str = ""
    constitution: str = "harmless"
    base_model: str = EMBEDDED_MODEL
    judge_model: str | None = Field(None, description="labels the phase-2 pairs; default: the base model")
    eval_judge_model: str | None = Field(
        None, description="grades the final policy; best a model other than judge_model. Default: judge_model, "
        "and then the report's first line says the policy is graded by the judge that trained it")
    split_seed: int = Field(0, description="seed of the disjoint phase-1 / phase-2 split of each prompt source")
    engine: str = "auto"
    method: Literal["dpo", "ppo", "grpo"] = Field(
        "dpo", description="dpo: DPO on the phase-2 pairs; ppo: reward model + PPO; grpo: GRPO with the judge as "
        "the reward, online on the phase-2 prompts (no 03-prefs stage)")
    phase1: Phase1Stage = Field(default_factory=Phase1Stage)
    sft: SFTTrainSettings = Field(default_factory=SFTTrainSettings)
    phase2: Phase2Stage = Field(default_factory=Phase2Stage)
    rm: RewardTrainSettings = Field(default_factory=RewardTrainSettings, description="method ppo: the reward model")
    dpo: DPOTrainSettings = Field(default_factory=DPOTrainSettings, description="method dpo: the policy")
    ppo: PPOTrainSettings = Field(default_factory=PPOTrainSettings, description="method ppo: the policy")
    grpo: GRPOTrainSettings = Field(
        default_factory=GRPOTrainSettings, description="method grpo: the policy; the judge is judge_model on the "
        "recipe's engine with phase 2's judge settings unless judge_backend / judge_options / judge_config say "
        "otherwise")
    eval: EvalSettings = Field(default_factory=EvalSettings)  # type: ignore[valid-type]
    judge_check: JudgeCheck = Field(default_factory=JudgeCheck)
    launcher: Launcher | None = Field(None, description="run the training stages under `accelerate launch` "
                                      "(one process per GPU); unset: every stage in one process")

    @model_validator(mode="after")
    def _every_stage_job_builds(self) -> RunRecipe:
        """Build each stage's whole job now, so the job models' own checks fail at load too."""
        plan_stages(self, Path("RUN"))
        if self.launcher:
            self.launcher.check(self.method)
        return self


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.2 numbers: `5e-5` is a float (PyYAML's YAML 1.1 rules would read a string)."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+.0123456789"))


def load_recipe(spec: str | Path) -> RunRecipe:
    """A recipe file, or the name of a shipped recipe (`cpu-smollm2`, `gpu-7b`). Every stage's job is
    validated here: an error names the file and the field."""
    path = Path(spec)
    if not path.exists() and (RECIPES_DIR / f"{spec}.yaml").exists():
        path = RECIPES_DIR / f"{spec}.yaml"
    if not path.is_file():
        shipped = ", ".join(p.stem for p in sorted(RECIPES_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"{spec}: no such recipe file (shipped recipes: {shipped})")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: not a readable YAML recipe: {exc}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping (name:, phase1:, sft:, ...)")
    try:
        return RunRecipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(f"{path}: {describe_errors(exc)}") from None


def split_prompts(recipe: RunRecipe, run_dir: Path) -> dict[str, Any]:
    """Write prompts-phase1.jsonl and prompts-phase2.jsonl once: each source's prompts are shuffled
    with `split_seed` and dealt out without overlap (phase 1 first), so phase 2 never reuses a
    phase-1 prompt; evaluation excludes both files. Rows keep their group in `source`.
    Returns the split (recorded in run.json)."""
    phases = {"phase1": recipe.phase1, "phase2": recipe.phase2}
    taken: dict[str, dict[str, set[int]]] = {name: {} for name in phases}
    for spec in dict.fromkeys(recipe.phase1.prompts + recipe.phase2.prompts):
        size = sum(1 for _ in read_prompts(spec))
        counts = _split_counts(recipe, spec, size)
        picked = random.Random(f"{recipe.split_seed}:{spec}").sample(range(size), sum(counts.values()))
        start = 0
        for name, count in counts.items():
            taken[name][spec] = set(picked[start:start + count])
            start += count
    for name in phases:
        path = run_dir / f"prompts-{name}.jsonl"
        if not path.exists():
            atomic_write_lines(path, (
                json.dumps({"id": p.id, "source": p.group, "messages": [m.model_dump() for m in p.messages]},
                           ensure_ascii=False) + "\n"
                for spec, picked in taken[name].items()
                for index, p in enumerate(read_prompts(spec)) if index in picked))
    return {"seed": recipe.split_seed, **{name: {spec: len(ids) for spec, ids in taken[name].items()}
                                          for name in phases},
            "eval": "the eval sets minus every phase-1 and phase-2 prompt (eval-policy config.exclude)"}


def _split_counts(recipe: RunRecipe, spec: str, size: int) -> dict[str, int]:
    """How many prompts of `spec` each phase takes; refuses overlap, an empty phase or too few prompts."""
    users = {name: stage for name, stage in (("phase1", recipe.phase1), ("phase2", recipe.phase2))
             if spec in stage.prompts}
    if len(users) == 2 and recipe.phase1.limit is None:
        raise RecipeError(f"recipe {recipe.name}: phase 1 and phase 2 both read {spec} and phase1.limit is unset, "
                         "so phase 1 would take every prompt and leave phase 2 none; set phase1.limit")
    counts = {name: stage.limit or size for name, stage in users.items()}
    if len(users) == 2 and recipe.phase2.limit is None:
        counts["phase2"] = size - counts["phase1"]
    if sum(counts.values()) > size or 0 in counts.values():
        raise RecipeError(f"recipe {recipe.name}: {spec} has {size} prompts, but the phases ask for "
                         f"{counts}; lower the limits (phase 1 and phase 2 never share a prompt)")
    return counts


def _absolute_if_path(spec: str) -> str:
    """A file argument as an absolute path (names stay as given), as the CLI commands record it."""
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


def _by_group(stage: DataStage) -> dict[str, str]:
    return {group: spec if spec == UNREVISED else _absolute_if_path(spec) for group, spec in stage.constitutions.items()}


def _build(stage: str, recipe_key: str, job: type[BaseModel], **fields: Any) -> BaseModel:
    """A stage's whole job; a ValidationError becomes a RecipeError naming the stage and its recipe key."""
    try:
        return job(**fields)
    except ValidationError as exc:
        raise RecipeError(f"stage {stage} ({recipe_key}): {describe_errors(exc)}") from None


def _data_jobs(recipe: RunRecipe, run_dir: Path) -> list[tuple[str, BaseModel]]:
    engine = recipe.engine
    constitution = _absolute_if_path(recipe.constitution)
    phase1 = recipe.phase1.job.model_dump(exclude={"engine_options"})
    phase2 = recipe.phase2.job.model_dump(exclude={"engine_options", "judge_engine_options"})
    judge = recipe.judge_model or recipe.base_model
    stages = [
        ("01-sft-data", _build(
            "01-sft-data", "phase1.job", SFTJob, **phase1, constitution=constitution,
            constitution_by_group=_by_group(recipe.phase1), prompts=str(run_dir / "prompts-phase1.jsonl"),
            out=str(run_dir / "01-sft-data"),
            engine=EngineSpec(backend=engine, model=recipe.base_model, options=recipe.phase1.job.engine_options))),
        ("02-sft", _build(
            "02-sft", "sft", SFTTrainJob, **recipe.sft.model_dump(), model=recipe.base_model,
            data=str(run_dir / "01-sft-data" / "sft.jsonl"), out=str(run_dir / "02-sft"))),
        ("03-prefs", _build(
            "03-prefs", "phase2.job", PrefsJob, **phase2, constitution=constitution,
            constitution_by_group=_by_group(recipe.phase2), prompts=str(run_dir / "prompts-phase2.jsonl"),
            out=str(run_dir / "03-prefs"),
            policy=EngineSpec(backend=engine, model=str(run_dir / "02-sft"), options=recipe.phase2.job.engine_options),
            judge=EngineSpec(backend=engine, model=judge, options=recipe.phase2.job.judge_engine_options))),
    ]
    # GRPO samples and judges online, inside its training stage: no offline pairs to make
    return [stage for stage in stages if not (recipe.method == "grpo" and stage[0] == "03-prefs")]


def _policy_jobs(recipe: RunRecipe, run_dir: Path) -> list[tuple[str, BaseModel]]:
    sft, prefs = str(run_dir / "02-sft"), str(run_dir / "03-prefs" / "prefs.jsonl")
    policy = str(run_dir / "05-policy")
    if recipe.method == "dpo":
        return [("05-policy", _build("05-policy", "dpo", DPOTrainJob, **recipe.dpo.model_dump(), model=sft,
                                     data=prefs, out=policy))]
    if recipe.method == "grpo":
        return [("05-policy", _grpo_job(recipe, run_dir, sft, policy))]
    rm = str(run_dir / "04-rm")
    return [("04-rm", _build("04-rm", "rm", RewardTrainJob, **recipe.rm.model_dump(), model=sft, data=prefs, out=rm)),
            ("05-policy", _build("05-policy", "ppo", PPOTrainJob, **recipe.ppo.model_dump(), model=sft, data=prefs,
                                 reward_model=rm, out=policy))]


def _grpo_job(recipe: RunRecipe, run_dir: Path, sft: str, policy: str) -> BaseModel:
    """GRPO from the SFT model on the phase-2 prompts; the judge as phase 2 would judge (its model, the
    recipe's engine, phase 2's judge engine options and judge settings), unless `grpo:` sets them."""
    settings = recipe.grpo.model_dump()
    settings["judge_backend"] = recipe.grpo.judge_backend or recipe.engine
    settings["judge_options"] = recipe.grpo.judge_options or recipe.phase2.job.judge_engine_options
    settings["judge_config"] = recipe.grpo.judge_config or recipe.phase2.job.phase2.judge
    return _build("05-policy", "grpo", GRPOTrainJob, **settings, model=sft, data=str(run_dir / "prompts-phase2.jsonl"),
                  constitution=_absolute_if_path(recipe.constitution), constitution_by_group=_by_group(recipe.phase2),
                  judge_model=recipe.judge_model or recipe.base_model, out=policy)


def _eval_jobs(recipe: RunRecipe, run_dir: Path) -> list[tuple[str, BaseModel]]:
    judge = recipe.judge_model or recipe.base_model
    eval_judge = recipe.eval_judge_model or judge
    checks = recipe.judge_check.job.model_dump(exclude={"engine_options"})
    stages: list[tuple[str, BaseModel]] = []
    for n, data in enumerate(recipe.judge_check.data):
        if Path(data).is_file():  # missing: the eval report says the judge's human agreement was not measured
            name = f"06-judge-check-{n}"
            stages.append((name, _build(
                name, "judge_check.job", EvalJob, **checks, data=str(Path(data).resolve()), out=str(run_dir / name),
                engine=EngineSpec(backend=recipe.engine, model=eval_judge,
                                  options=recipe.judge_check.job.engine_options), baseline=False)))
    settings = recipe.eval.model_dump()
    # held-out means held out: no prompt the run trained on is evaluated
    settings["config"]["exclude"] += [str(run_dir / "prompts-phase1.jsonl"), str(run_dir / "prompts-phase2.jsonl")]
    for field in ("human_pairs", "human_choices"):  # missing: the report says the measure was not taken
        path = settings["config"].get(field)
        settings["config"][field] = str(Path(path).resolve()) if path and Path(path).is_file() else None
    stages.append(("07-eval", _build(
        "07-eval", "eval", PolicyEvalJob, **settings, policy=str(run_dir / "05-policy"), sft=str(run_dir / "02-sft"),
        base=recipe.base_model, judge=eval_judge, training_judge=judge, engine=recipe.engine,
        judge_reports=[str(run_dir / name / "report.json") for name, _ in stages], out=str(run_dir / "07-eval"),
        train_logs={"sft": str(run_dir / "02-sft" / "log.jsonl"),
                    recipe.method: str(run_dir / "05-policy" / "log.jsonl")})))
    return stages


def plan_stages(recipe: RunRecipe, run_dir: Path) -> list[tuple[str, BaseModel]]:
    """(stage folder, its whole typed job) in order; paths point inside run_dir (made absolute, so a
    job file runs from any folder)."""
    run_dir = Path(run_dir).resolve()
    return _data_jobs(recipe, run_dir) + _policy_jobs(recipe, run_dir) + _eval_jobs(recipe, run_dir)


def _launcher(recipe: RunRecipe, job: BaseModel) -> Launcher | None:
    """The recipe's launcher, for a training stage it covers."""
    kind = getattr(job, "kind", "")
    launched = recipe.launcher and kind.startswith("train-") and kind.removeprefix("train-") in recipe.launcher.stages
    return recipe.launcher if launched else None


def run_recipe(recipe: RunRecipe, run_dir: str | Path, log=print) -> list[StageResult]:
    """Run every unfinished stage in order; finished stages (a `.done` file) are skipped."""
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = run_dir / "run.json"
    state: dict[str, Any] = {"recipe": recipe.model_dump(mode="json"), "stages": {}}
    if manifest_path.exists():
        state = json.loads(manifest_path.read_text())
        # validated again, so a field added to RunRecipe since (with its default) is not a change
        if RunRecipe.model_validate(state["recipe"]).model_dump(mode="json") != recipe.model_dump(mode="json"):
            raise RecipeError(f"{run_dir} was started with another recipe; use a new run folder")
    state["split"] = split_prompts(recipe, run_dir)
    results = []
    for name, job in plan_stages(recipe, run_dir):
        done = run_dir / name / ".done"
        if done.exists():
            log(f"[{name}] done earlier, skipped")
            results.append(StageResult.model_validate_json(done.read_text()))
            continue
        launcher = _launcher(recipe, job)
        extra = {"launcher": launcher} if launcher else {}
        result = run_stage(name, write_job_file(run_dir / name / "job.json", job), run_dir, log, **extra)
        atomic_write_text(done, result.model_dump_json(indent=2))
        state["stages"][name] = result.model_dump()
        atomic_write_text(manifest_path, json.dumps(state, indent=2))
        log(f"[{name}] {result.seconds:.0f}s, peak {result.peak_rss_mb:.0f} MB")
        results.append(result)
    return results
