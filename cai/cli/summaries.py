"""What `cai generate` and `cai jobs` print when a job ends: counts, labels, the error rows left
and why, what an update carried over, and the first trajectories."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel

from cai.evaluate import render_markdown
from cai.jobdir import JobSummary
from cai.kinds import open_store
from cai.pipeline import SFT, Phase1Summary, Phase2Summary, PreferenceStats
from cai.update_report import read_update_report

console = Console()


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
    print_update(summary.out)


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
    print_update(summary.out)


def error_hints(budget: str, out: str) -> dict[str, str]:
    """Why rows end with each error code and what to do, as the end of a sentence."""
    retry = f"`cai jobs retry-errors {out}` tries them again"
    return {
        "truncated": f"hit the {budget} (`truncated` error rows, kept in shards/ and counted in the data card, "
                     "not exported); raise --max-tokens to keep such replies",
        "cancelled": "were cancelled before they ran (`cancelled` error rows); rerun the same command to generate them",
        "empty": f"got an empty reply from the model (`empty` error rows, kept in shards/); {retry}",
        "context_length_exceeded": "did not fit the model's context (`context_length_exceeded` error rows); use "
                                   "shorter prompts, fewer --rounds or a model with a longer context",
        "backend_unavailable": f"failed because the backend did not answer (`backend_unavailable` error rows); {retry}",
    }


def print_error_explanation(errors: dict[str, int], total: int, unit: str, budget: str, out: str) -> None:
    """One line per kind of error row the job has left, hiding none: how many, why, what to do."""
    hints = error_hints(budget, out)
    for code, n in sorted(errors.items()):
        why = hints.get(code, f"ended as `{code}` error rows (kept in shards/, counted in the data card)")
        console.print(f"[yellow]note[/]: {n} of {total} {unit} {why}")


def print_update(out: str) -> None:
    """What an update carried over and regenerated (nothing for a job made in full)."""
    report = read_update_report(Path(out))
    if report is not None:
        console.print(f"[bold]updated from[/] {report.old_job}: {report.reused} {report.unit} reused, "
                      f"{report.regenerated_total} regenerated (by principle in the data card)")


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
