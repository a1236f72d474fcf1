"""A scripted OpenAI-compatible HTTP server on 127.0.0.1 for backend tests."""

from __future__ import annotations

import json
import select
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def ok_body(text: str, finish: str = "stop", logprobs=None, prompt_tokens: int = 5) -> dict:
    return {
        "id": "cmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": logprobs,
            }
        ],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 3, "total_tokens": prompt_tokens + 3},
    }


def chat_prompt_tokens(body: dict, honours_continuation: bool = True) -> int:
    """Prompt tokens as a vLLM server would count them: one per message, plus an end-of-turn
    after the last one unless it is continued (`continue_final_message`, honoured only when
    `honours_continuation`), plus a new assistant header unless `add_generation_prompt` is false."""
    if honours_continuation and body.get("continue_final_message") is True:
        return len(body["messages"])
    return len(body["messages"]) + (1 if body.get("add_generation_prompt") is False else 2)


def error_body(message: str) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "code": None}}


class FakeServer:
    """Scripted per call: `script(body, call_no)` -> (status, headers, json body, delay).

    `keep_alive`: speak HTTP/1.1 and keep connections open between requests, as real servers do;
    `connections` counts the TCP connections accepted."""

    def __init__(self, script, keep_alive: bool = False):
        self.script = script
        self.calls: list[dict] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.connections = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"
            disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall

            def setup(self):
                super().setup()
                with server.lock:
                    server.connections += 1

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    call_no = len(server.calls)
                    server.calls.append(body)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    status, headers, payload, delay = server.script(body, call_no)
                    # A client that gave up (timeout) closes the socket: stop counting it then.
                    if select.select([self.connection], [], [], delay)[0]:
                        return
                finally:
                    with server.lock:
                        server.in_flight -= 1
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
