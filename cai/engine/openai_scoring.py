"""Option scoring over an OpenAI-compatible chat server: request bodies, reading `top_logprobs`, and
the check that the server continues the judge's answer prefix (cai.engine.openai_engine uses them);
also emptying llama-server's prompt cache for benchmarks (`erase_slots`).

A server scores an option only as the first token of the assistant's reply; the judge's answer prefix
("The answer is: (") must therefore be *continued*, not closed as a turn of its own and followed by a
new reply. vLLM's server does so on `continue_final_message`; llama.cpp's `llama-server` does so on it
and also on any final assistant message (its "prefill"); llama-cpp-python's server ignores both and
renders the prefix as a closed turn. `verify_continuation` tells these apart from prompt-token counts
alone (`usage.prompt_tokens`), with at most four one-token requests per engine. A server that refuses
log-probs (llama-cpp-python's started with `--logits_all false`: HTTP 500 "logprobs is not supported")
cannot score either. Both raise a NoLogprobs, so the judge switches to structured verdicts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from cai.engine.base import TOP_ALTERNATIVES, ChoiceScores, NoLogprobs, TokenLogprob
from cai.records import Chat, ErrorCode, ErrorInfo

TOP_LOGPROBS = 20

PREFIX_TOKEN_SLACK = 1
"""Tokens a prefix may cost more in context than alone (a merge at its edge) and still count as continued."""

CountPrompts = Callable[[list[dict]], list[int | ErrorInfo | None]]
"""Sends request bodies; each one's `usage.prompt_tokens`, its error if it failed, None without usage."""


class ContinuationIgnored(NoLogprobs):
    """The server renders the judge's answer prefix as a closed turn followed by a new reply (it
    ignores `continue_final_message`), so no option it scores would be the judge's verdict. A
    NoLogprobs: the judge falls back to structured verdicts (JudgeConfig.fallback_structured)."""


def choice_body(model: str, chat: Chat, prefix: str) -> dict:
    """One scoring request: one token, greedy, the top log-probs; the prefix as a final assistant
    message to continue."""
    body = dict(
        model=model,
        messages=[{"role": m.role, "content": m.content} for m in chat],
        max_tokens=1,
        temperature=0.0,
        logprobs=True,
        top_logprobs=TOP_LOGPROBS,
    )
    if prefix:
        body["messages"].append({"role": "assistant", "content": prefix})
        body["extra_body"] = {"add_generation_prompt": False, "continue_final_message": True}
    return body


def prompt_tokens(response) -> int | None:
    usage = getattr(response, "usage", None)
    return getattr(usage, "prompt_tokens", None) or None


def verify_continuation(count: CountPrompts, body: dict, prefix: str,
                        server: str) -> tuple[bool | None, NoLogprobs | None]:
    """(honoured, problem) for the scoring request `body`: (True, None) when the server continues the
    prefix, (False, the error to raise) when it does not or refuses log-probs, (None, None) when unknown
    (a failed request, no usage counts: ask again on the next call).

    First the request is sent as is and with the prefix as a closed turn: a server that continues it
    counts fewer prompt tokens for the first (no end of turn). A server that ignores
    `continue_final_message` renders both alike, and so does one that continues every final
    assistant message (llama-server): `_continued_alone` tells those two apart."""
    closed = {**body, "extra_body": {"add_generation_prompt": False, "continue_final_message": False}}
    continued, fresh = counts = count([body, closed])
    if (refused := _refused(counts, server)) is not None:
        return False, refused
    if not isinstance(continued, int) or not isinstance(fresh, int):
        return None, None
    if fresh > continued:
        return True, None
    if fresh < continued:
        return False, _ignored(server, prefix, f"costs {continued} prompt tokens continued and {fresh} as a closed turn")
    return _continued_alone(count, body, prefix, continued, server)


def _continued_alone(count: CountPrompts, body: dict, prefix: str, continued: int,
                     server: str) -> tuple[bool | None, NoLogprobs | None]:
    """Measure what the prefix costs by itself (sent twice: `doubled` - `continued`) and what it adds
    to the request without it (`continued` - `bare`). Continued, the two are equal; closed, the
    second also holds an end of turn and a new reply's header."""
    bare = {key: value for key, value in body.items() if key != "extra_body"}
    bare["messages"] = body["messages"][:-1]
    twice = {**body, "messages": [*bare["messages"], {"role": "assistant", "content": prefix * 2}]}
    without, doubled = counts = count([bare, twice])
    if (refused := _refused(counts, server)) is not None:
        return False, refused
    if not isinstance(without, int) or not isinstance(doubled, int):
        return None, None
    own, added = doubled - continued, continued - without
    if own >= 1 and added - own <= PREFIX_TOKEN_SLACK:
        return True, None
    return False, _ignored(server, prefix, f"adds {added} prompt tokens to the request but costs {own} by "
                                           "itself (an end of turn and a new reply follow it)")


SWITCH = ("cai's judge switches to structured verdicts by itself (fallback_structured; --mode structured "
          "asks for them directly)")


def _ignored(server: str, prefix: str, measured: str) -> ContinuationIgnored:
    return ContinuationIgnored(
        f"the server at {server} ignores continue_final_message: the answer prefix {prefix!r} {measured}, "
        f"so the judge's option log-probs would score a new reply, not its verdict. {SWITCH}; to score "
        "options, serve the judge with `vllm serve` or llama.cpp's `llama-server` (or pass "
        "verify_continuation=false if this template really renders no end-of-turn tokens)"
    )


def _refused(counts: list[int | ErrorInfo | None], server: str) -> NoLogprobs | None:
    """A probe the server refused because it was asked for log-probs: no request of this kind will score."""
    for error in counts:
        said = f"{error.message} {error.raw or ''}" if isinstance(error, ErrorInfo) else ""
        if "logprob" in said.lower():
            return NoLogprobs(
                f"the server at {server} refuses log-probabilities ({' '.join(said.split())[:300]}), so it "
                f"cannot score the judge's options. {SWITCH}; llama-cpp-python's server scores only when "
                "started with --logits_all true (its default)")
    return None


def to_scores(response, options: Sequence[str]) -> ChoiceScores:
    """The options' log-probs from the first generated token's `top_logprobs`."""
    content = None
    if response.choices and response.choices[0].logprobs is not None:
        content = response.choices[0].logprobs.content
    if not content or not content[0].top_logprobs:
        error = ErrorInfo(code=ErrorCode.NO_LOGPROBS, message="the server returned no logprobs")
        return ChoiceScores(error=error)
    top = content[0].top_logprobs
    by_text: dict[str, float] = {}
    for entry in top:  # distinct token ids can decode to the same text: add them up
        prev = by_text.get(entry.token)
        by_text[entry.token] = entry.logprob if prev is None else _logaddexp(prev, entry.logprob)
    floor = min(e.logprob for e in top)  # anything not returned is at most this likely
    bounded = [o for o in options if o not in by_text]
    ranked = sorted(top, key=lambda e: e.logprob, reverse=True)
    return ChoiceScores(
        logprobs={o: by_text.get(o, floor) for o in options},
        top=[TokenLogprob(token=e.token, logprob=e.logprob) for e in ranked[:TOP_ALTERNATIVES]],
        bounded=bounded,
    )


def _logaddexp(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    return hi + math.log1p(math.exp(lo - hi))


def erase_slots(base_url: str, api_key: str, timeout: float) -> bool:
    """Erase every slot of a llama.cpp `llama-server` (its prompt cache; `POST /slots/N?action=erase`,
    offered when it runs with `--slot-save-path`). False when the server offers no such thing."""
    import httpx

    root = base_url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"}
    try:
        with httpx.Client(base_url=root, headers=headers, timeout=timeout) as client:
            slots = client.get("/slots")
            if slots.status_code != 200 or not isinstance(slots.json(), list):
                return False
            return all(client.post(f"/slots/{slot['id']}", params={"action": "erase"}).status_code == 200
                       for slot in slots.json())
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return False
