"""A local OpenAI-compatible chat server that answers every request with the same text after a
fixed latency: what the openai backend itself costs, without a model (`cai bench --stub-latency-ms`).

HTTP/1.1 with keep-alive, as `vllm serve` and hosted APIs speak; one thread per connection.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STUB_REPLY = "I would rather help with something safe; here is a careful, honest answer."


class StubChatServer:
    """`with StubChatServer(latency=0.01) as server:` serves POST {server.url}/chat/completions on
    127.0.0.1 (a free port) until the block ends; `requests` counts the answers sent."""

    def __init__(self, latency: float, reply: str = STUB_REPLY, host: str = "127.0.0.1", port: int = 0):
        self.latency = latency
        self.requests = 0
        self._lock = threading.Lock()
        self._httpd = _Server((host, port), _handler(self, reply))
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="cai-stub-server", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> StubChatServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _count(self) -> None:
        with self._lock:
            self.requests += 1


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # the default 5 drops simultaneous connects: 1 s SYN retries
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):  # a client that hung up
            super().handle_error(request, client_address)


def _handler(server: StubChatServer, reply: str) -> type[BaseHTTPRequestHandler]:
    completion_tokens = len(reply.split())

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            time.sleep(server.latency)
            prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
            data = json.dumps({
                "id": "stub", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", "stub"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                             "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
            }).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            server._count()

        def log_message(self, *args) -> None:
            pass

    return Handler
