"""Imitations of llama.cpp's two OpenAI-compatible servers on 127.0.0.1, for tests without llama.cpp.

- `llama-server` (llama.cpp's C++ server): honours `continue_final_message` and also continues any
  final assistant message (its "prefill", on by default), so even `continue_final_message: false`
  continues it; `add_generation_prompt` is honoured; both true is a 400.
- llama-cpp-python's server (`python -m llama_cpp.server`): ignores both fields, closes every message
  and opens a new assistant reply.

Both render SmolLM2's ChatML template, count prompt tokens with a crude tokenizer, and answer in the
shapes the real servers sent for SmolLM2-135M-Instruct (recorded in docs/llamacpp.md): top log-probs
in OpenAI's chat format (llama-server adds `id` and byte lists; llama-cpp-python sends `bytes: null`
and a `refusal` field), usage counts, finish reasons.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
TOKEN = re.compile(r"<\|im_(?:start|end)\|>|\w+|[^\w\s]|\n| ")

Scorer = Callable[[str], list[tuple[str, float]]]
"""The rendered prompt -> the next token's top log-probs, most likely first."""
Responder = Callable[[list[dict]], str]
"""The request's messages -> the reply's text."""


def count_tokens(text: str) -> int:
    return len(TOKEN.findall(text))


def render(messages: list[dict], continue_final: bool, generation_prompt: bool) -> str:
    """SmolLM2-Instruct's chat template (its default system turn included)."""
    out = "" if messages and messages[0]["role"] == "system" else f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
    for n, m in enumerate(messages):
        out += f"<|im_start|>{m['role']}\n{m['content']}"
        if not (continue_final and n == len(messages) - 1):
            out += "<|im_end|>\n"
    return out + ("<|im_start|>assistant\n" if generation_prompt else "")


def llama_server_prompt(body: dict) -> str:
    """As llama-server's oaicompat_chat_params_parse renders the request (prefill on)."""
    messages = body["messages"]
    continued = body.get("continue_final_message") is True
    generation = body.get("add_generation_prompt", True)
    if not continued and messages and messages[-1]["role"] == "assistant":
        continued, generation = True, False
    if continued and generation:
        raise ValueError("Cannot set both add_generation_prompt and continue_final_message to true.")
    return render(messages, continued, generation)


def llama_cpp_python_prompt(body: dict) -> str:
    """As llama-cpp-python's Jinja2ChatFormatter renders it: every turn closed, a new reply opened."""
    return render(body["messages"], False, True)


def verdict_scorer(a: float = 0.7, b: float = 0.2) -> Scorer:
    """After the judge's answer prefix: P(A) = a, P(B) = b; elsewhere a fresh reply's first tokens."""
    def score(prompt: str) -> list[tuple[str, float]]:
        if prompt.endswith("The answer is: ("):
            rest = max(1e-6, 1.0 - a - b)
            return sorted([("A", math.log(a)), ("B", math.log(b)), ("C", math.log(rest))], key=lambda t: -t[1])
        return [("I", math.log(0.5)), ("The", math.log(0.3)), ("Answer", math.log(0.1)), ("A", math.log(0.01))]
    return score


def echo_responder(messages: list[dict]) -> str:
    return f"reply to: {messages[-1]['content'][:40]}"


class LlamaCppFake:
    """`kind`: "llama-server" or "llama-cpp-python". `calls` holds every request body. `logits_all=False`:
    llama-cpp-python's server started with `--logits_all false`, which answers log-prob requests with a 500.
    llama-server lists `slots` at GET /slots and erases one (POST /slots/N?action=erase, counted in
    `erased`) only when started with --slot-save-path (`slot_actions`)."""

    def __init__(self, kind: str, scorer: Scorer | None = None, responder: Responder = echo_responder,
                 logits_all: bool = True, slots: int = 4, slot_actions: bool = False):
        if kind not in ("llama-server", "llama-cpp-python"):
            raise ValueError(kind)
        self.kind, self.scorer, self.responder = kind, scorer or verdict_scorer(), responder
        self.logits_all, self.slots, self.slot_actions = logits_all, slots, slot_actions
        self.erased: list[int] = []
        self.calls: list[dict] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def do_GET(self):
                self._send(*fake.slot_list(self.path))

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                if self.path.startswith("/slots/"):
                    self._send(*fake.erase(self.path))
                    return
                with fake.lock:
                    fake.calls.append(body)
                self._send(*fake.answer(body))

            def _send(self, status: int, payload) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
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

    def __enter__(self) -> LlamaCppFake:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def scoring_calls(self) -> list[dict]:
        return [c for c in self.calls if c.get("logprobs")]

    # -- answers --

    def slot_list(self, path: str) -> tuple[int, object]:
        if self.kind != "llama-server" or path != "/slots":
            return 404, {"detail": "Not Found"}
        return 200, [{"id": i, "n_ctx": 2048, "is_processing": False} for i in range(self.slots)]

    def erase(self, path: str) -> tuple[int, dict]:
        if self.kind != "llama-server":
            return 404, {"detail": "Not Found"}
        if not self.slot_actions:
            message = "This server does not support slots action. Start it with `--slot-save-path`"
            return 501, {"error": {"code": 501, "message": message, "type": "not_supported_error"}}
        slot = int(path.split("/")[2].split("?")[0])
        self.erased.append(slot)
        return 200, {"id_slot": slot, "n_erased": 0}

    def answer(self, body: dict) -> tuple[int, dict]:
        try:
            prompt = (llama_server_prompt if self.kind == "llama-server" else llama_cpp_python_prompt)(body)
        except ValueError as exc:  # llama-server's answer to an impossible request
            return 400, {"error": {"code": 400, "message": str(exc), "type": "invalid_request_error"}}
        if body.get("logprobs") and not self.logits_all:
            message = "logprobs is not supported for models created with logits_all=False"
            return 500, {"error": {"message": message, "type": "internal_server_error", "param": None, "code": None}}
        if body.get("logprobs"):
            top = self.scorer(prompt)[: body.get("top_logprobs") or 1]
            text, logprobs = top[0][0], self._logprobs(top)
        else:
            text, logprobs = self.responder(body["messages"]), None
        budget = body.get("max_tokens") or 10**6
        finish = "length" if count_tokens(text) >= budget else "stop"
        return 200, self._completion(text, finish, logprobs, count_tokens(prompt), min(budget, count_tokens(text)))

    def _logprobs(self, top: list[tuple[str, float]]) -> dict:
        if self.kind == "llama-server":
            entries = [{"id": 100 + k, "token": t, "bytes": list(t.encode()), "logprob": lp}
                       for k, (t, lp) in enumerate(top)]
            first = {**entries[0], "top_logprobs": entries}
            return {"content": [first]}
        entries = [{"token": t, "logprob": lp, "bytes": None} for t, lp in top]
        return {"content": [{"token": top[0][0], "bytes": None, "logprob": top[0][1], "top_logprobs": entries}],
                "refusal": None}

    def _completion(self, text: str, finish: str, logprobs, prompt: int, completion: int) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                  "finish_reason": finish}
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        if self.kind == "llama-server":
            usage["prompt_tokens_details"] = {"cached_tokens": 0}
            return {"choices": [choice], "created": 0, "model": "smollm2", "system_fingerprint": "b0-fake",
                    "object": "chat.completion", "usage": usage, "id": "chatcmpl-fake"}
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": "smollm2",
                "choices": [choice], "usage": usage}
