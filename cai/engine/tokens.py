"""Prompt rendering and option tokens shared by the local backends (transformers, vLLM).

Both render with the model's own chat template and tokenize with
`add_special_tokens=False` (templates already carry BOS where the model wants
one), so they see identical token ids.

An answer prefix ("The answer is: (") is rendered the way the template renders
an assistant message that is continued (`continue_final_message`), which is
also what a vLLM server does with the OpenAI backend's request: a template
that puts a space after `[/INST]` gets it on every path.

Option tokens (`plan_options`): each option is scored as the tokens the
tokenizer itself produces for prefix + option. When that merges across the
boundary (" (" + "A" -> " (A"), the last prompt tokens become part of every
option's continuation instead of being silently replaced by a different token.
A tokenizer that cannot spell an option (unknown token, two options alike) is
refused with an `OptionTokenError` naming it and the tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cai.engine.base import EngineCapabilityError
from cai.records import Chat, ErrorCode, ErrorInfo


class OptionTokenError(EngineCapabilityError):
    """The tokenizer cannot give the options a token sequence the judge can score."""


def render_prompt(tokenizer, chat: Chat, prefix: str = "") -> str:
    """The chat as the model sees it: ending with the assistant header, or, with a
    `prefix`, inside an assistant message that starts with it."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; cai needs a chat model")
    messages = [m.model_dump() for m in chat]
    if not prefix:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    messages.append({"role": "assistant", "content": prefix})
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False, continue_final_message=True
    )


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class OptionPlan:
    """Every option is scored as `continuations[option]` after the shared `context`."""

    context: list[int]
    continuations: dict[str, list[int]]

    @property
    def single_token(self) -> bool:
        return all(len(ids) == 1 for ids in self.continuations.values())

    def rows(self) -> list[tuple[str, list[int], int]]:
        """(option, context + its tokens, number of its tokens) per option."""
        return [(o, self.context + ids, len(ids)) for o, ids in self.continuations.items()]


def plan_options(tokenizer, chat: Chat, options: Sequence[str], prefix: str = "") -> OptionPlan:
    """The token sequences that spell prefix + option, split after their longest shared start."""
    if any(not o for o in options):
        raise ValueError("options must be non-empty strings")
    prompt_text = render_prompt(tokenizer, chat, prefix)
    prompt_ids = encode(tokenizer, prompt_text)
    fulls = {o: encode(tokenizer, prompt_text + o) for o in options}
    shared = min(common_start(prompt_ids, ids) for ids in fulls.values())
    plan = OptionPlan(prompt_ids[:shared], {o: ids[shared:] for o, ids in fulls.items()})
    _check_plan(tokenizer, plan, prefix)
    return plan


def plan_or_error(tokenizer, chat: Chat, options: Sequence[str], prefix: str) -> OptionPlan | ErrorInfo:
    """The chat's option plan; a chat that cannot be rendered is its own BAD_REQUEST.
    An OptionTokenError (the tokenizer, not the chat) is raised for the whole call."""
    try:
        return plan_options(tokenizer, chat, options, prefix)
    except OptionTokenError:
        raise
    except Exception as exc:
        return ErrorInfo(code=ErrorCode.BAD_REQUEST, message=f"cannot render chat: {exc}")


def common_start(prompt: Sequence[int], full: Sequence[int]) -> int:
    n = 0
    for a, b in zip(prompt, full):
        if a != b:
            break
        n += 1
    return n


def _check_plan(tokenizer, plan: OptionPlan, prefix: str) -> None:
    seen: dict[tuple[int, ...], str] = {}
    for option, ids in plan.continuations.items():
        text = tokenizer.decode(ids, clean_up_tokenization_spaces=False) if ids else ""
        problem = None
        if not plan.context:
            problem = "no prompt tokens are left to score it after"
        elif not ids or not text.endswith(option.strip()):  # e.g. an unknown token
            problem = f"its tokens decode to {text!r}"
        elif tuple(ids) in seen:
            problem = f"it has the same tokens as option {seen[tuple(ids)]!r}"
        if problem:
            raise OptionTokenError(
                f"tokenizer {_tokenizer_name(tokenizer)} cannot score option {option!r} after "
                f"{prefix!r}: {problem} (tokens {_show(tokenizer, ids)}); choose options and an "
                "answer prefix this tokenizer spells, or judge with --mode structured"
            )
        seen[tuple(ids)] = option


def _tokenizer_name(tokenizer) -> str:
    name = getattr(tokenizer, "name_or_path", "") or ""
    return f"{type(tokenizer).__name__}({name!r})" if name else type(tokenizer).__name__


def _show(tokenizer, ids: list[int]) -> str:
    pieces = tokenizer.convert_ids_to_tokens(ids) if ids else []
    return ", ".join(f"{i}={p!r}" for i, p in zip(ids, pieces)) or "none"
