"""`cai serve` (the job API and review page) and `cai keys` (API keys for it).

Register with:  app.command("serve")(serve.serve); app.add_typer(serve.keys_app, name="keys")
The `serve` package (FastAPI) is imported only when these commands run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

err_console = Console(stderr=True)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(
    host: Annotated[str, typer.Option(help="address to bind; the default keeps the server on this machine")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    keys_file: Annotated[Optional[Path], typer.Option(help="API keys file, NAME:KEY or NAME:sha256:HEX per line "
                                                           "(default: $CAI_API_KEYS_FILE or ~/.config/cai/serve-keys.txt); "
                                                           "$CAI_API_KEYS adds NAME:KEY,NAME:KEY")] = None,
    data_root: Annotated[Optional[Path], typer.Option(help="folder of datasets clients may name [default: data]")] = None,
    jobs_root: Annotated[Optional[Path], typer.Option(help="job directories + jobs.sqlite3 [default: jobs/serve]")] = None,
    constitutions: Annotated[Optional[Path], typer.Option(help="folder of constitutions clients may name "
                                                               "[default: cai's constitutions/]")] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, max=16, help="jobs run at the same time [default: 1]")] = None,
    config: Annotated[Optional[Path], typer.Option(help="settings YAML (engines, limits, ...); flags override it")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
    docs: Annotated[Optional[bool], typer.Option("--docs/--no-docs", help="serve the OpenAPI schema and Swagger UI "
                                                 "at /docs (its JS/CSS come from a public CDN) [default: off]")] = None,
) -> None:
    """Serve the job API (/v1; OpenAPI at /docs with --docs) and the review page (/ui) with uvicorn."""
    try:
        import uvicorn

        from serve.app import Settings, create_app
    except ImportError as exc:
        err_console.print(f"[red]error:[/] cai serve needs the serve extra ({exc.name} missing): pip install 'cai[serve]'")
        raise typer.Exit(2) from None
    import os

    from serve.auth import KEYS_ENV, KeyStore

    log = logging.getLogger("serve")
    if not log.handlers:  # skipped keys lines, job life-cycle messages (re-queued jobs, failures) beside uvicorn's
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     serve: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    overrides = dict(keys_file=keys_file, data_root=data_root, jobs_root=jobs_root,
                     constitutions_dir=constitutions, workers=workers, docs=docs)
    try:
        if config is not None:
            settings = Settings.from_yaml(config, **overrides)
        else:
            settings = Settings.model_validate({k: v for k, v in overrides.items() if v is not None})
        store = KeyStore(settings.keys_file, os.environ.get(KEYS_ENV) if settings.keys_from_env else None)
        keys = store.count()
    except (ValueError, OSError) as exc:
        err_console.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    if keys == 0:
        err_console.print(f"[red]error:[/] no API keys in {settings.keys_file} or ${KEYS_ENV}. Create one with\n"
                          f"  cai keys create NAME --file {settings.keys_file}\n"
                          f"(or: python -m serve.keys create NAME --file {settings.keys_file})")
        raise typer.Exit(2)
    if host not in LOOPBACK:
        err_console.print(f"[yellow]warning:[/] binding {host}: the API is reachable from other machines and "
                          "speaks plain HTTP; put it behind a TLS proxy")
    api_docs = "/docs (API)" if settings.docs else "API schema off (--docs)"
    err_console.print(f"cai serve: http://{host}:{port}/ui (review page), {api_docs}; jobs in {settings.jobs_root}, "
                      f"datasets from {settings.data_root}, {keys} key(s), {settings.workers} worker(s)")
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level, proxy_headers=False,
                server_header=False)


keys_app = typer.Typer(help="API keys for cai serve.", no_args_is_help=True)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="who the key is for; it owns the jobs the key submits")],
    file: Annotated[Optional[Path], typer.Option(help="keys file [default: $CAI_API_KEYS_FILE or "
                                                      "~/.config/cai/serve-keys.txt]")] = None,
) -> None:
    """Create a key: printed once on stdout; the file keeps only its sha256."""
    from serve.keys import create_key, default_keys_file

    try:
        key = create_key(name, file)
    except ValueError as exc:  # a bad name, or a keys file with malformed lines (each named)
        err_console.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    print(key)
    err_console.print(f"stored the key's sha256 for {name!r} in {file or default_keys_file()}; "
                      "this is the only time the key is shown")


@keys_app.command("list")
def keys_list(file: Annotated[Optional[Path], typer.Option(help="keys file")] = None) -> None:
    """Key names in a keys file; names every line the server would skip (exit status 1)."""
    from serve.keys import show_keys

    status = show_keys(file)
    if status:
        raise typer.Exit(status)
