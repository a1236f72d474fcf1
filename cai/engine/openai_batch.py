"""Hosted models through the OpenAI Batch API: every request of an engine call goes into one batch
job (upload a JSONL file, create the batch, poll it with backoff, download its output and error
files), at about half the per-token price of synchronous calls and with up to 24 hours of latency.

Each request's `custom_id` is its position in the call plus a digest of its body, so it is unique
in its batch and the same on every run; results are mapped back by it in whatever order the output
file holds them. A request that comes back with an error, or not at all, is an error row naming
the batch and its status (the output line kept as `raw`): a failed batch gives `bad_request` rows,
an expired or cancelled one `cancelled` rows (which a job's rerun redoes), a completed batch
missing a result `internal` ones. Nothing is dropped.

Resuming: the state file (`openai-batches.json` in `state_dir`) maps a digest of each submitted
batch's requests (custom ids and bodies) to its batch id, written before the first poll. A process
killed while it waits, asked for the same requests again, polls that batch instead of submitting
a new one. A job's stop check is consulted between polls (cai.engine.base.stop_scope): a stop
leaves the batch running and its id in the state file. The API key is read from `api_key` or the
environment variable `api_key_env` names and is never written anywhere.

Option scoring (`choice_logprobs`) reuses cai.engine.openai_scoring on the batch's output bodies
when there is no answer prefix. With the judge's prefix it raises NoLogprobs (so the judge falls
back to structured verdicts) unless `continue_prefix=true` says the server continues a final
assistant message (a vLLM-backed batch service): a hosted API cannot be checked for that without
synchronous probe requests.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cai.engine.base import ChoiceScores, NoLogprobs, StopRequested, check_stop
from cai.engine.common import derive_seed, describe
from cai.engine.models import served_model_ref
from cai.errors import CaiError
from cai.files import atomic_write_json
from cai.records import Chat, Completion, ErrorCode, ErrorInfo, SamplingParams

STATE_FILE = "openai-batches.json"
ENDPOINT = "/v1/chat/completions"
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
BATCH_DISCOUNT = 0.5
"""What the Batch API charges relative to synchronous calls (OpenAI: half price)."""


class OpenAIBatchOptions(BaseModel):
    """cai.engine.openai_batch.OpenAIBatchEngine's options. The key: `api_key` (never written to a job's
    manifest or the state file), else the environment variable `api_key_env` names."""

    model_config = ConfigDict(extra="forbid")
    base_url: str | None = Field(None, description="the API's /v1 URL; default: $OPENAI_BASE_URL")
    api_key: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    state_dir: str | None = Field(None, description="where the submitted batches' ids are kept (a job's "
                                                    "directory); default: $XDG_CACHE_HOME/cai/openai-batch")
    completion_window: str = "24h"
    poll_initial: float = Field(10.0, gt=0, description="seconds before the first status poll")
    poll_max: float = Field(300.0, gt=0, description="longest wait between polls")
    poll_factor: float = Field(1.5, ge=1.0, description="each wait is this many times the last one")
    max_wait: float | None = Field(None, gt=0, description="give up polling after this many seconds "
                                                            "(the batch stays submitted); default: never")
    max_requests_per_batch: int = Field(50_000, ge=1, description="the API's limit per batch")
    timeout: float = Field(120.0, gt=0, description="seconds per HTTP call")
    max_retries: int = Field(6, ge=0, description="the client's retries of one HTTP call (429, 5xx)")
    continue_prefix: bool = Field(False, description="the server continues a final assistant message "
                                                     "(continue_final_message): score the judge's options")
    organization: str | None = None
    default_headers: dict[str, str] | None = None


def default_state_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cai" / "openai-batch"


def with_state_dir(spec, job_dir: str | Path):
    """`spec` (a cai.recipe.EngineSpec) with `state_dir` set to `job_dir`/openai-batch when it names this
    backend and sets none: how a job keeps its submitted batches in its own directory (added when the
    engine is built, so the job's fingerprint and manifest do not change)."""
    if spec.backend != "openai_batch" or "state_dir" in spec.options:
        return spec
    return spec.model_copy(update={"options": {**spec.options, "state_dir": str(Path(job_dir) / "openai-batch")}})


class BatchUsage(BaseModel):
    """Tokens the engine's batches used (summed from their outputs), and how it got them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    batches: int = 0
    resumed_batches: int = 0
    polls: int = 0


def estimate_cost(usage: BatchUsage, price_in: float, price_out: float,
                  discount: float = BATCH_DISCOUNT) -> dict[str, float]:
    """Dollars for `usage` given synchronous list prices per million input and output tokens:
    `batch_usd` at the Batch API's `discount`, `synchronous_usd` what the same calls cost one by one."""
    synchronous = (usage.prompt_tokens * price_in + usage.completion_tokens * price_out) / 1e6
    return {"batch_usd": round(synchronous * discount, 6), "synchronous_usd": round(synchronous, 6)}


class BatchState:
    """The state file: request-set digest -> {batch_id, input_file_id, requests, status}. Written
    atomically after every change; a process re-reads it before each lookup."""

    def __init__(self, folder: Path):
        self.path = folder / STATE_FILE
        self._lock = threading.Lock()

    def read(self) -> dict[str, dict]:
        if not self.path.exists():
            return {}
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))["batches"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CaiError(f"{self.path} is not an openai-batch state file ({describe(exc)}): move it away "
                           "(batches it names are then submitted again) or fix it") from None

    def get(self, digest: str) -> dict | None:
        return self.read().get(digest)

    def put(self, digest: str, entry: dict | None) -> None:
        with self._lock:
            batches = self.read()
            if entry is None:
                batches.pop(digest, None)
            else:
                batches[digest] = entry
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, {"version": 1, "batches": batches})


class _Submitted(BaseModel):
    """One batch of this call: its requests and, once it ends, its raw results by custom id."""

    digest: str
    custom_ids: list[str]
    batch_id: str
    status: str = "validating"
    detail: str = ""
    lines: dict[str, dict] = Field(default_factory=dict)


class OpenAIBatchEngine:
    backend = "openai_batch"

    def __init__(self, model: str, options: OpenAIBatchOptions | None = None):
        self.options = options = options or OpenAIBatchOptions()
        self.base_url = options.base_url or os.environ.get("OPENAI_BASE_URL")
        if not self.base_url:
            raise ValueError("the openai_batch backend needs base_url (or env OPENAI_BASE_URL)")
        self._api_key = options.api_key or os.environ.get(options.api_key_env) or "EMPTY"
        self.model = served_model_ref(model, self.backend)
        self.state = BatchState(Path(options.state_dir) if options.state_dir else default_state_dir())
        self.usage = BatchUsage()
        self.sleep: Callable[[float], None] = time.sleep  # tests patch this
        self._delivered: set[str] = set()  # digests answered in this process: asked again = a new batch
        self._client = None
        self._closed = False

    # -- public API --

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Completion]:
        from cai.engine.openai_engine import _to_completion, chat_body

        bodies = [chat_body(self.model.id, chat, params, derive_seed(params.seed, i)) for i, chat in enumerate(chats)]
        return self._run(bodies, _to_completion, lambda e: Completion(finish_reason="error", error=e))

    def choice_logprobs(self, chats: Sequence[Chat], options: Sequence[str], prefix: str = "") -> list[ChoiceScores]:
        from cai.engine.openai_scoring import choice_body, to_scores

        if prefix and not self.options.continue_prefix:
            raise NoLogprobs(
                f"the openai_batch backend cannot check that {self.base_url} continues the judge's answer prefix "
                f"{prefix!r} (hosted chat APIs start a new reply after it), so its option log-probs would not be "
                "the verdict; cai's judge switches to structured verdicts by itself. Pass "
                "--engine-option continue_prefix=true if the server honours continue_final_message")
        bodies = [_flat(choice_body(self.model.id, chat, prefix)) for chat in chats]
        return self._run(bodies, lambda r: to_scores(r, options), lambda e: ChoiceScores(error=e))

    def estimate_cost(self, price_in: float, price_out: float) -> dict[str, float]:
        return estimate_cost(self.usage, price_in, price_out)

    def close(self) -> None:
        """Close the HTTP client; submitted batches keep running on the server. Idempotent."""
        if not self._closed:
            self._closed = True
            if self._client is not None:
                self._client.close()

    # -- machinery --

    def _run(self, bodies: list[dict], convert, on_error) -> list:
        from openai.types.chat import ChatCompletion

        ids = [f"cai-{i:06d}-{_sha(body)[:12]}" for i, body in enumerate(bodies)]
        size = self.options.max_requests_per_batch
        chunks = [(ids[s:s + size], bodies[s:s + size]) for s in range(0, len(bodies), size)]
        submitted = [self._submit(chunk_ids, chunk) for chunk_ids, chunk in chunks]
        self._poll(submitted)
        results = []
        for batch in submitted:
            for cid in batch.custom_ids:
                line = batch.lines.get(cid)
                body = _ok_body(line)
                if body is None:
                    results.append(on_error(_line_error(batch, cid, line)))
                    continue
                self._count(body)
                try:
                    results.append(convert(ChatCompletion.model_validate(body)))
                except Exception as exc:  # a malformed response fails alone
                    raw = json.dumps(line)
                    results.append(on_error(ErrorInfo(code=ErrorCode.INTERNAL, message=describe(exc), raw=raw)))
            self._finish(batch)
        return results

    def _client_(self):
        if self._closed:
            raise RuntimeError(f"this openai_batch engine ({self.model.id}) was closed")
        if self._client is None:
            import openai

            o = self.options
            self._client = openai.OpenAI(base_url=self.base_url, api_key=self._api_key, timeout=o.timeout,
                                         max_retries=o.max_retries, organization=o.organization,
                                         default_headers=o.default_headers)
        return self._client

    def _submit(self, custom_ids: list[str], bodies: list[dict]) -> _Submitted:
        """The batch for these requests: the one the state file names for them, else a new one."""
        digest = _sha([[cid, body] for cid, body in zip(custom_ids, bodies)])
        entry = self.state.get(digest)
        if entry is not None and digest not in self._delivered:
            self.usage.resumed_batches += 1
            return _Submitted(digest=digest, custom_ids=custom_ids, batch_id=entry["batch_id"])
        check_stop()
        client = self._client_()
        lines = "".join(json.dumps({"custom_id": cid, "method": "POST", "url": ENDPOINT, "body": body}) + "\n"
                        for cid, body in zip(custom_ids, bodies))
        upload = client.files.create(file=("cai-batch.jsonl", lines.encode()), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint=ENDPOINT,
                                      completion_window=self.options.completion_window,
                                      metadata={"cai_digest": digest[:64]})
        self.state.put(digest, {"batch_id": batch.id, "input_file_id": upload.id, "requests": len(bodies),
                                "status": batch.status, "submitted_at": time.time()})
        self._delivered.discard(digest)
        return _Submitted(digest=digest, custom_ids=custom_ids, batch_id=batch.id, status=batch.status)

    def _poll(self, submitted: list[_Submitted]) -> None:
        """Retrieve each batch until it ends, waiting poll_initial * poll_factor^n (at most poll_max)
        between rounds, checking the job's stop signal; then download its files."""
        client, o = self._client_(), self.options
        pending, wait, started = list(submitted), o.poll_initial, time.monotonic()
        while pending:
            for batch in list(pending):
                check_stop()
                info = client.batches.retrieve(batch.batch_id)
                self.usage.polls += 1
                batch.status = info.status
                if info.status in TERMINAL:
                    self._download(client, batch, info)
                    pending.remove(batch)
            if not pending:
                return
            if o.max_wait is not None and time.monotonic() - started + wait > o.max_wait:
                raise StopRequested(f"batches {', '.join(b.batch_id for b in pending)} did not end within "
                                    f"max_wait={o.max_wait:g} s; they stay submitted and a rerun polls them")
            self._wait(wait)
            wait = min(wait * o.poll_factor, o.poll_max)

    def _wait(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            check_stop()
            self.sleep(min(left, 0.25))
        check_stop()

    def _download(self, client, batch: _Submitted, info) -> None:
        errors = getattr(getattr(info, "errors", None), "data", None) or []
        batch.detail = "; ".join(f"{e.code}: {e.message}" for e in errors)[:500]
        for file_id in (info.output_file_id, info.error_file_id):
            if not file_id:
                continue
            for raw in client.files.content(file_id).text.splitlines():
                if raw.strip():
                    line = json.loads(raw)
                    batch.lines[str(line.get("custom_id"))] = line
        self.usage.batches += 1

    def _finish(self, batch: _Submitted) -> None:
        """A completed batch stays in the state file (a rerun after a kill reads it again instead of
        paying twice); a failed, expired or cancelled one is forgotten, so its error rows' retry
        submits them anew."""
        self._delivered.add(batch.digest)
        entry = self.state.get(batch.digest)
        if batch.status == "completed":
            if entry is not None and entry.get("status") != "completed":
                self.state.put(batch.digest, {**entry, "status": "completed"})
        else:
            self.state.put(batch.digest, None)

    def _count(self, body: dict) -> None:
        usage = body.get("usage") or {}
        self.usage.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        self.usage.completion_tokens += int(usage.get("completion_tokens") or 0)
        self.usage.requests += 1


# ---- helpers -----------------------------------------------------------------------------------


def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _flat(body: dict) -> dict:
    """A client-call body as a batch line's body: `extra_body` fields merged in."""
    extra = body.pop("extra_body", None) or {}
    return {**body, **extra}


def _ok_body(line: dict | None) -> dict | None:
    response = (line or {}).get("response") or {}
    if line and not line.get("error") and response.get("status_code") == 200 and isinstance(response.get("body"), dict):
        return response["body"]
    return None


def _line_error(batch: _Submitted, cid: str, line: dict | None) -> ErrorInfo:
    where = f"batch {batch.batch_id} ({batch.status})"
    if line is None:
        code = {"completed": ErrorCode.INTERNAL, "failed": ErrorCode.BAD_REQUEST}.get(batch.status, ErrorCode.CANCELLED)
        why = f": {batch.detail}" if batch.detail else ""
        return ErrorInfo(code=code, message=f"{where} returned no result for {cid}{why}")
    response = line.get("response") or {}
    status = response.get("status_code")
    error = line.get("error") or (response.get("body") or {}).get("error") or {}
    message = error.get("message") if isinstance(error, dict) else str(error)
    text = f"{message or ''}".lower()
    if "context length" in text or "context_length" in text or "maximum context" in text:
        code = ErrorCode.CONTEXT_LENGTH
    elif isinstance(status, int) and (status >= 500 or status == 429):
        code = ErrorCode.BACKEND_UNAVAILABLE
    else:
        code = ErrorCode.BAD_REQUEST
    return ErrorInfo(code=code, message=f"{where}: HTTP {status}: {message}", raw=json.dumps(line))
