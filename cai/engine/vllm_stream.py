"""vLLM's own request queue as a cai request stream (cai.engine.stream): a request is added to the
offline engine (`LLMEngine.add_request`) when it is submitted, and `wait` steps the engine until
one finishes, so new requests join the running batch instead of waiting for the slowest one."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable

from cai.engine.base import check_stop
from cai.engine.common import describe, error_completion
from cai.records import Chat, Completion, ErrorCode, SamplingParams

Prepare = Callable[[Chat, SamplingParams, "int | None"], "tuple[list[int], object] | Completion"]


class VLLMStream:
    def __init__(self, llm_engine, prepare: Prepare, convert: Callable[[object], Completion]):
        self.llm_engine, self.prepare, self.convert = llm_engine, prepare, convert
        self.keys: dict[str, Hashable] = {}  # vLLM request id -> the submitter's key
        self.finished: list[tuple[Hashable, Completion]] = []
        self._ids = itertools.count()

    def submit(self, key: Hashable, chat: Chat, params: SamplingParams) -> None:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        prepared = self.prepare(chat, params, params.seed)
        if isinstance(prepared, Completion):
            self.finished.append((key, prepared))
            return
        ids, vllm_params = prepared
        vllm_params.output_kind = RequestOutputKind.FINAL_ONLY  # one output per request, when it ends
        request_id = f"cai-stream-{id(self)}-{next(self._ids)}"
        try:
            self.llm_engine.add_request(request_id, TokensPrompt(prompt_token_ids=ids), vllm_params)
        except Exception as exc:  # vLLM refused this request alone
            self.finished.append((key, error_completion(ErrorCode.INTERNAL, describe(exc), len(ids))))
            return
        self.keys[request_id] = key

    def wait(self) -> list[tuple[Hashable, Completion]]:
        while not self.finished and self.keys:
            check_stop()
            for out in self.llm_engine.step():
                if out.finished and out.request_id in self.keys:
                    self.finished.append((self.keys.pop(out.request_id), self.convert(out)))
        finished, self.finished = self.finished, []
        return finished

    def close(self) -> None:
        if self.keys:
            self.llm_engine.abort_request(list(self.keys))
            self.keys.clear()
        self.finished.clear()
