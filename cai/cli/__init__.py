"""The `cai` command line."""

from __future__ import annotations

import typer

from cai.cli import bench, constitution, eval, generate, jobs, push, run, serve, train

app = typer.Typer(
    help="Constitutional AI: constitutions -> critique/revision SFT data, AI-judged preferences, trained models.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.add_typer(constitution.app, name="constitution")
app.add_typer(generate.app, name="generate")
app.add_typer(jobs.app, name="jobs")
app.add_typer(train.app, name="train")
app.add_typer(eval.app, name="eval")
app.command("bench")(bench.bench)
app.command("push")(push.push)
app.command("run")(run.run)
app.command("serve")(serve.serve)
app.add_typer(serve.keys_app, name="keys")


def main() -> None:
    app()
