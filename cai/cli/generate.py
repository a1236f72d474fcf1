"""`cai generate ...`: batch generation commands."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from cai.cli.common import (
    ConstitutionOpt,
    EngineOpt,
    ModelOpt,
    absolute_if_path,
    engine_spec,
    fail_on_user_error,
    parse_pairs,
    stoppable_job,
)
from cai.cli.push import (
    TOKEN_ENV,
    HubPrivateOpt,
    PushToHubOpt,
    TokenEnvOpt,
    hub_push_settings,
    push_result,
)
from cai.cli.summaries import (
    print_error_explanation,
    print_phase1_summary,
    print_phase2_summary,
    print_summary,
    print_trajectories,
)
from cai.constitution_plan import UNREVISED
from cai.engine.models import EMBEDDED_ALIASES
from cai.events import BatchCommitted, Planned, ProgressEvent, StepStarted
from cai.jobdir import JobSummary
from cai.judge import judge_modes_text
from cai.kinds import kind_of_job
from cai.recipe import (
    DEFAULT_BATCH_SIZE,
    ExecutorConfig,
    JudgeConfig,
    Phase1Config,
    Phase2Config,
    PrefsJob,
    SFTJob,
)
from cai.records import SamplingParams

app = typer.Typer(help="Generate synthetic datasets from a constitution.", no_args_is_help=True)
console = Console()


ConstitutionForOpt = Annotated[Optional[list[str]], typer.Option(
    "--constitution-for", help="GROUP=CONSTITUTION, repeatable: the constitution of one prompt group (a bundled "
    "set's name, a file's name without suffix, or a JSONL row's `source` field), e.g. benign=helpful; other groups "
    "use --constitution; phase 1 also takes GROUP=none (that group's answers kept unrevised)")]


UpdateFromOpt = Annotated[Optional[Path], typer.Option(
    "--update-from", help="an earlier job directory (same prompts, model and settings) made under an older version "
    "of the constitution: rows whose principles are unchanged are carried over with their lineage, the others "
    "generated again; the data card lists both by principle, with the constitution diff")]
PriceOpt = Annotated[Optional[str], typer.Option(
    "--price-per-mtok", help="IN,OUT: list prices in dollars per million input and output tokens (e.g. 2.5,10); "
    "the data card adds an estimated cost (at the Batch API's discount for --engine openai_batch). Not part of "
    "the job's fingerprint: a rerun may change it")]
SystemOpt = Annotated[Optional[str], typer.Option(
    help="system turn before every request (not exported); default with the embedded model: a brevity turn "
    "(\"Keep every reply short\"), so its answers end within the token budget; --system '' for none")]

# The brevity turn of cai/recipes/cpu-smollm2.yaml: a 135M model rambles past any token budget without it.
EMBEDDED_SYSTEM = "You are a helpful assistant. Keep every reply short: at most three sentences."
EMBEDDED_CRITIQUE_MAX_TOKENS = 128  # a critique is one or two sentences (the CPU recipe's budget)
LOCAL_BACKENDS = ("auto", "vllm", "transformers")


def embedded(engine: str, model: str | None) -> bool:
    """Whether the job runs the embedded SmolLM2-135M (no --model, a local backend)."""
    return engine in LOCAL_BACKENDS and (model is None or model in EMBEDDED_ALIASES)


def price_per_mtok(value: str | None) -> tuple[float, float] | None:
    """--price-per-mtok IN,OUT as two non-negative finite numbers."""
    if value is None:
        return None
    parts = value.split(",")
    try:
        prices = tuple(float(part) for part in parts)
    except ValueError:
        prices = ()
    if len(prices) != 2 or not all(0 <= p < math.inf for p in prices):
        raise typer.BadParameter(f"{value!r}: expected IN,OUT, two non-negative numbers of dollars per million "
                                 "input and output tokens, e.g. 2.5,10", param_hint="--price-per-mtok")
    return prices


def cost_settings(update_from: Path | None, price: str | None) -> dict:
    """The job fields --update-from and --price-per-mtok set (none when not given)."""
    fields = {"update_from": absolute_if_path(str(update_from)) if update_from else None,
              "price_per_mtok": price_per_mtok(price)}
    return {key: value for key, value in fields.items() if value is not None}


ExecutorOpt = Annotated[str, typer.Option(
    "--executor", help="local: batches run in this process; ray: on a pool of Ray actors, each holding one engine "
    "(pip install 'cai[ray]'); the records are the same")]
RayAddressOpt = Annotated[Optional[str], typer.Option(
    "--ray-address", help="ray: the cluster to join (auto: the one `ray start --head` runs here; HOST:6379; "
    "ray://HOST:10001); default: start Ray in this process")]
ReplicasOpt = Annotated[int, typer.Option("--replicas", min=1, help="ray: engine replicas (one engine each)")]
GpusOpt = Annotated[float, typer.Option("--gpus-per-replica", min=0.0, help="ray: GPUs per replica (1 for vLLM)")]
CpusOpt = Annotated[float, typer.Option("--cpus-per-replica", min=0.0, help="ray: CPUs per replica")]


def executor_config(executor: str, ray_address: str | None, replicas: int, gpus: float, cpus: float) -> ExecutorConfig:
    """--executor and the Ray flags as a job's `executor` settings; a Ray flag without --executor ray is an error."""
    if executor not in ("local", "ray"):
        raise typer.BadParameter(f"--executor {executor!r}: expected local or ray")
    if executor == "local" and (ray_address is not None or replicas != 1 or gpus or cpus != 1.0):
        raise typer.BadParameter("--ray-address, --replicas, --gpus-per-replica and --cpus-per-replica need "
                                 "--executor ray")
    return ExecutorConfig(name=executor, address=ray_address, replicas=replicas, gpus_per_replica=gpus,
                          cpus_per_replica=cpus)


@app.command("sft")
def sft(
    constitution: ConstitutionOpt = "harmless",
    constitution_for: ConstitutionForOpt = None,
    prompts: Annotated[str, typer.Option(help="JSONL / HH-RLHF file, dataset folder, or bundled set: redteam, benign")] = "redteam",
    out: Annotated[Path, typer.Option(help="job directory (resumed if it exists)")] = Path("jobs/sft"),
    engine: EngineOpt = "auto",
    model: ModelOpt = None,
    engine_option: Annotated[Optional[list[str]], typer.Option("--engine-option", help="backend option KEY=VALUE (JSON value), repeatable")] = None,
    rounds: Annotated[int, typer.Option(min=1, help="critique -> revision rounds")] = 2,
    system: SystemOpt = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="use the first N prompts")] = None,
    seed: int = 0,
    max_tokens: Annotated[int, typer.Option(min=1, help="max new tokens per answer and revision")] = 256,
    critique_max_tokens: Annotated[Optional[int], typer.Option(
        min=1, help=f"max new tokens per critique; default 192 ({EMBEDDED_CRITIQUE_MAX_TOKENS} with the embedded "
        "model)")] = None,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
    batch_size: Annotated[int, typer.Option(min=1, help="prompts per engine call and per shard")] = DEFAULT_BATCH_SIZE,
    new_job: Annotated[bool, typer.Option(help="if OUT holds a job with other settings, start a new directory beside it")] = False,
    parquet: Annotated[bool, typer.Option(help="also export sft.parquet beside sft.jsonl")] = True,
    drop_near_duplicates: Annotated[bool, typer.Option(help="also merge prompts differing only in case, punctuation or spacing")] = False,
    show: Annotated[int, typer.Option(help="example trajectories to print")] = 2,
    schedule: Annotated[str, typer.Option(help="steps: all requests of a step, then the next; continuous: each "
                                          "prompt's next step starts as soon as its last one ends (same records; "
                                          "faster with long token budgets and on GPUs)")] = "steps",
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    replicas: ReplicasOpt = 1,
    gpus_per_replica: GpusOpt = 0.0,
    cpus_per_replica: CpusOpt = 1.0,
    update_from: UpdateFromOpt = None,
    price: PriceOpt = None,
    push_to_hub: PushToHubOpt = None,
    hub_private: HubPrivateOpt = False,
    token_env: TokenEnvOpt = TOKEN_ENV,
) -> None:
    """Phase 1 (SL-CAI): answer, then critique and revise against sampled principles."""
    hub = hub_push_settings(push_to_hub, hub_private, token_env)  # the token is checked before any generation
    params = dict(temperature=temperature, seed=seed)
    small = embedded(engine, model)
    if critique_max_tokens is None:
        critique_max_tokens = EMBEDDED_CRITIQUE_MAX_TOKENS if small else 192
    job = SFTJob(
        constitution=absolute_if_path(constitution),
        constitution_by_group=_by_group(constitution_for),
        prompts=absolute_if_path(prompts),
        out=str(out),
        engine=engine_spec(engine, model, engine_option),
        phase1=Phase1Config(
            rounds=rounds,
            system_prompt=EMBEDDED_SYSTEM if system is None and small else system or None,
            seed=seed,
            schedule=schedule,
            answer=SamplingParams(max_tokens=max_tokens, **params),
            critique=SamplingParams(max_tokens=critique_max_tokens, **params),
            revision=SamplingParams(max_tokens=max_tokens, **params),
        ),
        limit=limit,
        batch_size=batch_size,
        parquet=parquet,
        drop_near_duplicates=drop_near_duplicates,
        new_job=new_job,
        executor=executor_config(executor, ray_address, replicas, gpus_per_replica, cpus_per_replica),
        **cost_settings(update_from, price),
    )
    with fail_on_user_error(), stoppable_job() as stop:
        summary = _run_with_progress(job, stop)
    print_phase1_summary(summary)
    print_trajectories(Path(summary.out), show)
    stats, tokens = summary.export, {job.phase1.answer.max_tokens, job.phase1.revision.max_tokens}
    budget = f"{'/'.join(map(str, sorted(tokens)))}-token budget of an answer or revision"
    print_error_explanation(stats.errors, stats.rows + stats.error_total, "trajectories", budget, summary.out)
    if hub is not None:
        push_result(summary.out, hub)


@app.command("prefs")
def prefs(
    constitution: ConstitutionOpt = "harmless",
    constitution_for: ConstitutionForOpt = None,
    prompts: Annotated[str, typer.Option(help="JSONL / HH-RLHF file, dataset folder, or bundled set")] = "redteam",
    policy: ModelOpt = None,
    out: Annotated[Path, typer.Option(help="job directory (resumed if it exists)")] = Path("jobs/prefs"),
    engine: EngineOpt = "auto",
    engine_option: Annotated[Optional[list[str]], typer.Option("--engine-option", help="policy backend option KEY=VALUE")] = None,
    judge: Annotated[Optional[str], typer.Option(help="judge model; default: the policy model judges")] = None,
    judge_engine: Annotated[Optional[str], typer.Option(help="judge backend; default: --engine")] = None,
    judge_engine_option: Annotated[Optional[list[str]], typer.Option("--judge-engine-option", help="judge backend option KEY=VALUE, repeatable (the policy's --engine-option does not apply to a separate judge)")] = None,
    samples: Annotated[int, typer.Option(min=2, help="K answers sampled per prompt")] = 2,
    system: SystemOpt = None,
    pairing: Annotated[str, typer.Option(help="best_worst (one pair per prompt) or all")] = "best_worst",
    labeller: Annotated[str, typer.Option(help="judge: the judge labels pairs of K samples; contrastive: one pair per prompt steered toward/away from a sampled principle's directions, labelled by construction (RLCD); both: contrastive, also scored by the judge (the data card reports its agreement)")] = "judge",
    mode: Annotated[str, typer.Option(help=f"judge scoring: {judge_modes_text()}")] = "logprob",
    orders: Annotated[int, typer.Option(min=1, max=2, help="judge both orders (2) or one")] = 2,
    min_option_mass: Annotated[float, typer.Option(min=0.0, max=1.0, help="an order whose P(A)+P(B) is below this is an `off_options` error row, not a label (0 disables)")] = 0.5,
    limit: Annotated[Optional[int], typer.Option(min=1)] = None,
    seed: int = 0,
    temperature: Annotated[float, typer.Option(min=0.01)] = 0.8,
    max_tokens: Annotated[int, typer.Option(min=1)] = 192,
    min_confidence: Annotated[float, typer.Option(min=0.0, max=1.0, help="export only pairs this confident")] = 0.0,
    keep_inconsistent: Annotated[bool, typer.Option(help="export pairs whose two orders disagree")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="prompts per engine call and per shard")] = DEFAULT_BATCH_SIZE,
    new_job: bool = False,
    parquet: bool = True,
    drop_near_duplicates: Annotated[bool, typer.Option(help="also merge prompts differing only in case, punctuation or spacing")] = False,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    replicas: ReplicasOpt = 1,
    gpus_per_replica: GpusOpt = 0.0,
    cpus_per_replica: CpusOpt = 1.0,
    update_from: UpdateFromOpt = None,
    price: PriceOpt = None,
    push_to_hub: PushToHubOpt = None,
    hub_private: HubPrivateOpt = False,
    token_env: TokenEnvOpt = TOKEN_ENV,
) -> None:
    """Phase 2 (RL-CAI): K sampled answers per prompt, judged pairwise; a TRL preference dataset."""
    hub = hub_push_settings(push_to_hub, hub_private, token_env)  # the token is checked before any generation
    with fail_on_user_error():
        policy_spec = engine_spec(engine, policy, engine_option)
        judge_spec = None
        if judge is not None or judge_engine is not None or judge_engine_option:
            judge_spec = engine_spec(judge_engine or engine, judge or policy, judge_engine_option)
        job = PrefsJob(
            constitution=absolute_if_path(constitution), constitution_by_group=_by_group(constitution_for),
            prompts=absolute_if_path(prompts), out=str(out),
            policy=policy_spec, judge=judge_spec,
            phase2=Phase2Config(
                samples=samples, pairing=pairing, labeller=labeller, seed=seed,
                system_prompt=EMBEDDED_SYSTEM if system is None and embedded(engine, policy) else system or None,
                policy=SamplingParams(temperature=temperature, max_tokens=max_tokens),
                judge=JudgeConfig(mode=mode, orders=orders, seed=seed, min_option_mass=min_option_mass),
            ),
            limit=limit, batch_size=batch_size, min_confidence=min_confidence,
            require_consistent=not keep_inconsistent, parquet=parquet, new_job=new_job,
            drop_near_duplicates=drop_near_duplicates,
            executor=executor_config(executor, ray_address, replicas, gpus_per_replica, cpus_per_replica),
            **cost_settings(update_from, price),
        )
        with stoppable_job() as stop:
            summary = _run_with_progress(job, stop)
    print_phase2_summary(summary)
    budget = f"{job.phase2.policy.max_tokens}-token budget of an answer"
    print_error_explanation(summary.stats.errors, summary.stats.records, "rows", budget, summary.out)
    if hub is not None:
        push_result(summary.out, hub)


def _by_group(items: list[str] | None) -> dict[str, str]:
    pairs = parse_pairs(items, "--constitution-for", "benign=helpful", json_values=False)
    return {group: spec if spec == UNREVISED else absolute_if_path(spec) for group, spec in pairs.items()}


def _run_with_progress(job: BaseModel, stop: Callable[[], bool]) -> JobSummary:
    """Run (or resume) any kind of job with a progress bar per stage and the step in flight."""
    kind = kind_of_job(job)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(kind.title, total=None)

        def on_progress(event: ProgressEvent) -> None:
            if isinstance(event, Planned):
                bar.reset(task, total=event.total, description=f"{kind.title}: {event.stage}")
            elif isinstance(event, BatchCommitted):
                bar.advance(task, event.rows)
            elif isinstance(event, StepStarted):
                bar.update(task, description=f"{kind.title}: {event.name} ({event.requests} requests)")

        return kind.run(job, progress=on_progress, stop=stop)


def run_job(job: BaseModel) -> None:
    """Run (or resume) a job of any kind as its own command does: progress bar, Ctrl-C, summary."""
    with fail_on_user_error(), stoppable_job() as stop:
        summary = _run_with_progress(job, stop)
    print_summary(summary)
