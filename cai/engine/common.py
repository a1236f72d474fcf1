"""Helpers every backend shares, free of torch, vllm and openai (the HTTP backend needs none of them)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from cai.records import Completion, ErrorCode, ErrorInfo

__all__ = ["context_error", "derive_seed", "describe", "error_completion", "tokenizer_controls", "truncate_at_stop"]


def derive_seed(seed: int | None, index: int) -> int | None:
    """Per-request seed: request i of a call seeded `seed` gets seed + i, so
    duplicate chats in one batch (k samples per prompt) differ."""
    return None if seed is None else (seed + index) % (2**32)


def truncate_at_stop(text: str, stop: Sequence[str] | None) -> tuple[str, bool]:
    """Cut `text` before the earliest stop string (which is not included)."""
    cuts = [text.find(s) for s in stop or () if s and s in text]
    if not cuts:
        return text, False
    return text[: min(cuts)], True


def error_completion(code: ErrorCode, message: str, prompt_tokens: int = 0) -> Completion:
    return Completion(
        finish_reason="error",
        prompt_tokens=prompt_tokens,
        error=ErrorInfo(code=code, message=message),
    )


def context_error(n_tokens: int, limit: int) -> ErrorInfo:
    return ErrorInfo(
        code=ErrorCode.CONTEXT_LENGTH,
        message=f"prompt is {n_tokens} tokens; the model's context is {limit}",
    )


def describe(exc: BaseException) -> str:
    """An exception as one line for an error row: its type and message."""
    return f"{type(exc).__name__}: {exc}"


_TEMPLATE_MARKER = re.compile(r"<[^\s<>]{1,98}>|\[/?[A-Z][A-Z_]{0,97}\]")


def tokenizer_controls(tokenizer) -> tuple[str, ...]:
    """Strings the model reads as control tokens, sorted: the tokenizer's special and added tokens
    (it turns them into their token wherever they appear in text) and the markers its chat
    template writes (`<｜Assistant｜>`, `[INST]`, `<start_of_turn>`). The judge breaks them up
    in quoted text (cai.prompts.neutralise keeps only the markup-like ones)."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or ())
    added = getattr(tokenizer, "get_added_vocab", None)
    if callable(added):
        found.update(added())
    template = getattr(tokenizer, "chat_template", None)
    templates = template.values() if isinstance(template, dict) else [template]
    for text in templates:
        if isinstance(text, str):
            found.update(m for piece in _template_texts(text) for m in _TEMPLATE_MARKER.findall(piece))
    return tuple(sorted(t for t in found if isinstance(t, str)))


def _template_texts(template: str) -> list[str]:
    """The literal text of a Jinja chat template: its raw text and string constants (the whole
    source when it does not lex)."""
    try:
        import jinja2

        return [value for _, kind, value in jinja2.Environment().lex(template) if kind in ("data", "string")]
    except Exception:  # no jinja2, or a template that does not lex: scan its source
        return [template]
