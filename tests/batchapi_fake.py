"""A local OpenAI Batch API on 127.0.0.1 for the openai_batch backend's tests: files (upload, content)
and batches (create, retrieve), with each batch's status progression, lost results and failed
requests scripted per batch.

    with FakeBatchAPI(plan=lambda n, ids: BatchPlan(final="expired", drop={ids[0]})) as api:
        ... OpenAIBatchEngine("m", OpenAIBatchOptions(base_url=api.url, ...))

Each retrieve of a batch moves it one step along `plan.statuses + [plan.final]`. It speaks the same
HTTP as tests/fakeserver.FakeServer (a ThreadingHTTPServer with a handler class) but routes GETs and
multipart uploads, which that scripted chat server does not.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import random
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class BatchPlan:
    """How one batch goes: the statuses its polls see, then `final` (completed, failed, expired,
    cancelled); `drop`: custom ids left out of the output; `fail`: custom ids answered in the error
    file with HTTP 400; `shuffle`: output lines in random order."""

    statuses: list[str] = field(default_factory=lambda: ["validating", "in_progress"])
    final: str = "completed"
    drop: set[str] = field(default_factory=set)
    fail: set[str] = field(default_factory=set)
    shuffle: bool = True


def reply_to(body: dict) -> str:
    return f"reply to: {body['messages'][-1]['content']}"


def words(text: str) -> int:
    return len(str(text).split())


class FakeBatchAPI:
    """`plan(batch_no, custom_ids) -> BatchPlan`; `answer(body) -> text`. Records `created` (batch
    create requests), `uploads`, `polls`, `auth` (Authorization headers) and `batches` by id."""

    def __init__(self, plan: Callable[[int, list[str]], BatchPlan] | None = None,
                 answer: Callable[[dict], str] = reply_to):
        self.plan = plan or (lambda n, ids: BatchPlan())
        self.answer = answer
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.created: list[dict] = []
        self.uploads = 0
        self.polls = 0
        self.auth: set[str] = set()
        self.lock = threading.RLock()
        self.on_poll: Callable[[str], None] | None = None
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeBatchAPI:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- the API --

    def upload(self, data: bytes) -> dict:
        with self.lock:
            file_id = f"file-{len(self.files) + 1}"
            self.files[file_id] = data
            self.uploads += 1
        return {"id": file_id, "object": "file", "bytes": len(data), "created_at": 0, "filename": "in.jsonl",
                "purpose": "batch", "status": "processed"}

    def create(self, request: dict) -> dict:
        lines = [json.loads(x) for x in self.files[request["input_file_id"]].decode().splitlines() if x.strip()]
        with self.lock:
            number = len(self.created)
            self.created.append(request)
            batch_id = f"batch_{number + 1}"
            plan = self.plan(number, [line["custom_id"] for line in lines])
            self.batches[batch_id] = {"plan": plan, "lines": lines, "step": 0, "object": self._object(
                batch_id, request, plan.statuses[0] if plan.statuses else plan.final)}
        return self.batches[batch_id]["object"]

    def retrieve(self, batch_id: str) -> dict:
        with self.lock:
            self.polls += 1
            batch = self.batches[batch_id]
            plan, steps = batch["plan"], [*batch["plan"].statuses, batch["plan"].final]
            batch["step"] = min(batch["step"] + 1, len(steps) - 1)
            status = steps[batch["step"]]
            obj = batch["object"]
            if status != obj["status"]:
                obj["status"] = status
                if status == plan.final:
                    self._finish(batch, obj)
        if self.on_poll is not None:
            self.on_poll(batch_id)
        return obj

    def _finish(self, batch: dict, obj: dict) -> None:
        plan = batch["plan"]
        if plan.final == "failed":
            obj["errors"] = {"object": "list", "data": [{"code": "invalid_request", "message": "scripted failure",
                                                         "line": None, "param": None}]}
            return
        out, err = [], []
        for line in batch["lines"]:
            cid = line["custom_id"]
            if cid in plan.drop:
                continue
            if cid in plan.fail:
                err.append({"id": f"r-{cid}", "custom_id": cid, "error": None, "response": {
                    "status_code": 400, "request_id": "x",
                    "body": {"error": {"message": "scripted bad request", "type": "invalid_request_error"}}}})
            else:
                out.append({"id": f"r-{cid}", "custom_id": cid, "error": None, "response": {
                    "status_code": 200, "request_id": "x", "body": self._completion(line["body"])}})
        if plan.shuffle:
            random.Random(len(out)).shuffle(out)
        for key, rows in (("output_file_id", out), ("error_file_id", err)):
            if rows:
                obj[key] = self.upload("".join(json.dumps(r) + "\n" for r in rows).encode())["id"]
        obj["request_counts"] = {"total": len(batch["lines"]), "completed": len(out), "failed": len(err)}

    def _completion(self, body: dict) -> dict:
        text = self.answer(body)
        prompt = sum(words(m["content"]) for m in body["messages"])
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                  "logprobs": None}
        if body.get("logprobs"):
            top = [{"token": t, "logprob": lp, "bytes": None} for t, lp in (("A", -0.1), ("B", -2.5))]
            choice["logprobs"] = {"content": [{"token": "A", "logprob": -0.1, "bytes": None, "top_logprobs": top}]}
        return {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"], "choices": [choice],
                "usage": {"prompt_tokens": prompt, "completion_tokens": words(text),
                          "total_tokens": prompt + words(text)}}

    @staticmethod
    def _object(batch_id: str, request: dict, status: str) -> dict:
        return {"id": batch_id, "object": "batch", "endpoint": request["endpoint"], "errors": None,
                "input_file_id": request["input_file_id"], "completion_window": request["completion_window"],
                "status": status, "output_file_id": None, "error_file_id": None, "created_at": 0,
                "metadata": request.get("metadata"), "request_counts": {"total": 0, "completed": 0, "failed": 0}}


def _multipart_file(content_type: str, data: bytes) -> bytes:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + data)
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "file":
            return part.get_payload(decode=True)
    raise ValueError("no file part")


def _handler(api: FakeBatchAPI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, payload, raw: bytes | None = None, status: int = 200) -> None:
            data = raw if raw is not None else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            api.auth.add(self.headers.get("Authorization", ""))
            data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path.endswith("/files"):
                return self._reply(api.upload(_multipart_file(self.headers["Content-Type"], data)))
            if self.path.endswith("/batches"):
                return self._reply(api.create(json.loads(data)))
            self._reply({"error": {"message": f"no route {self.path}"}}, status=404)

        def do_GET(self) -> None:
            api.auth.add(self.headers.get("Authorization", ""))
            if m := re.search(r"/files/([^/]+)/content$", self.path):
                return self._reply(None, raw=api.files[m.group(1)])
            if m := re.search(r"/batches/([^/?]+)$", self.path):
                return self._reply(api.retrieve(m.group(1)))
            self._reply({"error": {"message": f"no route {self.path}"}}, status=404)

        def log_message(self, *args) -> None:
            pass

    return Handler
