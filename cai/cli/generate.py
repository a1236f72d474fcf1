"""`cai generate ...`: batch generation commands."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
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
from cai.constitution_plan import UNREVISED
from cai.evaluate import render_markdown
from cai.events import BatchCommitted, Planned, ProgressEvent, StepStarted
from cai.jobdir import JobSummary
from cai.judge import judge_modes_text
from cai.kinds import kind_of_job, open_store
from cai.pipeline import SFT, Phase1Summary, Phase2Summary, PreferenceStats
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
    system: Annotated[Optional[str], typer.Option(help="system turn before every request (not exported)")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="use the first N prompts")] = None,
    seed: int = 0,
    max_tokens: Annotated[int, typer.Option(min=1, help="max new tokens per answer and revision")] = 256,
    critique_max_tokens: Annotated[int, typer.Option(min=1)] = 192,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
    batch_size: Annotated[int, typer.Option(min=1, help="prompts per engine call and per shard")] = DEFAULT_BATCH_SIZE,
    new_job: Annotated[bool, typer.Option(help="if OUT holds a job with other settings, start a new directory beside it")] = False,
    parquet: Annotated[bool, typer.Option(help="also export sft.parquet beside sft.jsonl")] = True,
    drop_near_duplicates: Annotated[bool, typer.Option(help="also merge prompts differing only in case, punctuation or spacing")] = False,
    show: Annotated[int, typer.Option(help="example trajectories to print")] = 2,
    schedule: Annotated[str, typer.Option(help="steps: all requests of a step, then the next; continuous: each "
                                          "prompt's next step starts as soon as its last one ends (same records)")] = "steps",
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    replicas: ReplicasOpt = 1,
    gpus_per_replica: GpusOpt = 0.0,
    cpus_per_replica: CpusOpt = 1.0,
) -> None:
    """Phase 1 (SL-CAI): answer, then critique and revise against sampled principles."""
    params = dict(temperature=temperature, seed=seed)
    job = SFTJob(
        constitution=absolute_if_path(constitution),
        constitution_by_group=_by_group(constitution_for),
        prompts=absolute_if_path(prompts),
        out=str(out),
        engine=engine_spec(engine, model, engine_option),
        phase1=Phase1Config(
            rounds=rounds,
            system_prompt=system,
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
    )
    with fail_on_user_error(), stoppable_job() as stop:
        summary = _run_with_progress(job, stop)
    print_phase1_summary(summary)
    print_trajectories(Path(summary.out), show)


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
    system: Annotated[Optional[str], typer.Option(help="system turn before every policy request (not exported)")] = None,
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
) -> None:
    """Phase 2 (RL-CAI): K sampled answers per prompt, judged pairwise; a TRL preference dataset."""
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
                samples=samples, pairing=pairing, labeller=labeller, seed=seed, system_prompt=system,
                policy=SamplingParams(temperature=temperature, max_tokens=max_tokens),
                judge=JudgeConfig(mode=mode, orders=orders, seed=seed, min_option_mass=min_option_mass),
            ),
            limit=limit, batch_size=batch_size, min_confidence=min_confidence,
            require_consistent=not keep_inconsistent, parquet=parquet, new_job=new_job,
            drop_near_duplicates=drop_near_duplicates,
            executor=executor_config(executor, ray_address, replicas, gpus_per_replica, cpus_per_replica),
        )
        with stoppable_job() as stop:
            summary = _run_with_progress(job, stop)
    print_phase2_summary(summary)


def _by_group(items: list[str] | None) -> dict[str, str]:
    pairs = parse_pairs(items, "--constitution-for", "benign=helpful", json_values=False)
    return {group: spec if spec == UNREVISED else absolute_if_path(spec) for group, spec in pairs.items()}


def print_phase2_summary(summary: Phase2Summary) -> None:
    st = summary.stats
    console.print(
        f"[bold]done[/]: {summary.done_now} prompts now, {summary.done_before} resumed"
        f" ({summary.duplicates_merged} duplicates merged)\n"
        f"[bold]pairs[/]: {st.judged} judged, {st.exported} exported; errors {st.errors or 'none'};"
        f" excluded {st.excluded or 'none'}\n"
        f"[bold]labels[/]: {_labels_line(st)}\n"
        f"[bold]tokens[/]: {summary.generated_tokens_now} sampled, {summary.generation_seconds:.1f}s of generation"
        f" and judging (wall {summary.wall_seconds:.1f}s)\n"
        f"[bold]dataset[/]: {', '.join(summary.files)}\n[bold]data card[/]: {summary.out}/README.md"
    )


def _labels_line(st: PreferenceStats) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    judge = (f"mean confidence {fmt(st.mean_confidence)}, consistency {fmt(st.consistency_rate)},"
             f" first-position wins {fmt(st.first_position_wins)}")
    c = st.contrast
    if c is None:
        return judge
    if not c.judge_scored:
        return f"{c.pairs} contrastive pairs, labelled by construction (no judge scores)"
    return (f"{c.pairs} contrastive pairs, labelled by construction; the judge agrees with the construction on "
            f"{c.agreement:.2f} (95% CI {c.agreement_low:.2f}-{c.agreement_high:.2f}, n={c.judge_scored}); judge's "
            + judge)


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


def print_phase1_summary(summary: Phase1Summary) -> None:
    stats = summary.export
    errors = ", ".join(f"{k}={v}" for k, v in sorted(stats.errors.items())) or "none"
    console.print(
        f"[bold]done[/]: {summary.done_now} prompts now, {summary.done_before} resumed from earlier runs"
        f" ({summary.duplicates_merged} duplicate prompts merged)\n"
        f"[bold]exported[/]: {stats.rows} rows; excluded error rows: {stats.error_total} ({errors})\n"
        f"[bold]tokens[/]: {summary.generated_tokens_now} generated in {summary.generation_seconds:.1f}s"
        f" = {summary.tokens_per_second:.1f} tok/s (wall {summary.wall_seconds:.1f}s)\n"
        f"[bold]dataset[/]: {', '.join(stats.files)}\n"
        f"[bold]data card[/]: {summary.out}/README.md   [bold]trajectories[/]: {summary.out}/shards/"
    )


def print_judge_eval_summary(summary: JobSummary) -> None:
    console.print(render_markdown(summary.report))
    console.print(f"judged now: {summary.done_now}, resumed: {summary.done_before}")
    console.print(f"report: {', '.join(summary.files)}")


SUMMARY_PRINTERS: dict[str, Callable[[JobSummary], None]] = {
    "sft": print_phase1_summary, "prefs": print_phase2_summary, "judge-eval": print_judge_eval_summary,
}


def print_summary(summary: JobSummary) -> None:
    """A job summary as its command prints it (a kind without its own printer: the summary's fields)."""
    printer = SUMMARY_PRINTERS.get(summary.kind)
    if printer is None:
        console.print_json(summary.model_dump_json(exclude={"details"}))
        console.print_json(summary.details.model_dump_json())
    else:
        printer(summary)


def print_trajectories(job_dir: Path, count: int) -> None:
    """Print the first `count` trajectories of the job, error rows included (marked)."""
    _, store = open_store(job_dir)
    for row in store.head(SFT, count):
        body = [f"[bold cyan]prompt[/]: {escape(row['prompt'][-1]['content'])}"]
        for step in row["trajectory"]:
            label = step["kind"] + (f" [{step['principle_id']}]" if step["principle_id"] else "")
            body.append(f"[bold]{escape(label)}[/]: {escape(step['text'])}")
        if row["error"]:
            body.append(f"[red]error {row['error']['code']}[/]: {escape(row['error']['message'])} (excluded from export)")
        const = row["lineage"]["constitution"]
        title = f"{row['id']}  ({const['name']} v{const['version']})" if const else f"{row['id']}  (unrevised)"
        console.print(Panel("\n\n".join(body), title=title, expand=True))


def run_job(job: BaseModel) -> None:
    """Run (or resume) a job of any kind as its own command does: progress bar, Ctrl-C, summary."""
    with fail_on_user_error(), stoppable_job() as stop:
        summary = _run_with_progress(job, stop)
    print_summary(summary)
