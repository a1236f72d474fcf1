"""The processes of the service bench (serve.bench): the stub model server and `cai serve`, each in a
process of its own (no interpreter shared with the job or the pollers), stopped when the block ends."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

KEY_ENV = "CAI_BENCH_STUB_KEY"  # never set: the stub needs no key, and no real key is sent to it


_STUB_CHILD = """import sys
from cai.engine.stub_server import StubChatServer
with StubChatServer(latency={latency!r}) as server:
    print(server.url, flush=True)
    sys.stdin.read()
"""


@contextmanager
def stub_process(latency: float) -> Iterator[str]:
    """A StubChatServer in a process of its own (no GIL shared with the job or pollers) until stdin closes; its URL."""
    proc = subprocess.Popen([sys.executable, "-c", _STUB_CHILD.format(latency=latency)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        if not url.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"the stub server did not start (exit status {proc.poll()})")
        yield url
    finally:
        proc.stdin.close()
        _end(proc, 10)


def _end(proc: subprocess.Popen, grace: float) -> None:
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def service_process(root: Path) -> Iterator[str]:
    """`cai serve --config ROOT/serve.yaml` on 127.0.0.1 (a free port) until the block ends; its URL."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    log = (root / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cai", "serve", "--config", str(root / "serve.yaml"), "--keys-file",
         str(root / "keys.txt"), "--port", str(port), "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT, env={k: v for k, v in os.environ.items() if k != KEY_ENV})
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
    try:
        while True:
            with contextlib.suppress(httpx.TransportError):  # not listening yet
                if httpx.get(f"{url}/healthz", timeout=2, trust_env=False).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"cai serve did not start (exit status {proc.poll()}); its log:\n{_tail(root)}")
            time.sleep(0.1)
        yield url
    finally:
        if (died := proc.poll()) is None:
            proc.send_signal(signal.SIGINT)  # uvicorn's graceful stop: the workers end with the app
        _end(proc, 30)
        log.close()
        if died is not None:
            print(f"cai serve exited early (status {died}); its log ends:\n{_tail(root)}", file=sys.stderr)


def _tail(root: Path) -> str:
    return (root / "serve.log").read_text(encoding="utf-8", errors="replace")[-3000:]
