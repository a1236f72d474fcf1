"""Chat layouts for every model call. Templates are data, so their hash is lineage.

Phase 1 follows the CAI paper's layout as a conversation: the model's answer stays
in the chat, the critique request is the next user turn, then the revision request.
A principle's few-shot examples come first, as earlier turns of the same shape.
"""

from __future__ import annotations

from cai.constitution import FewShotExample, Principle
from cai.records import Chat, Message, sha256_text

CRITIQUE_TURN = "Critique request: {request}"
REVISION_TURN = (
    "Revision request: {request}\n"
    "Reply with the rewritten response only."
)

PHASE1_TEMPLATES = {"critique": CRITIQUE_TURN, "revision": REVISION_TURN}


def template_hash(templates: dict[str, str]) -> str:
    return sha256_text("\n--\n".join(f"{k}={v}" for k, v in sorted(templates.items())))[:16]


PHASE1_TEMPLATE_HASH = template_hash(PHASE1_TEMPLATES)


def answer_chat(prompt: Chat) -> Chat:
    return list(prompt)


def _example_turns(example: FewShotExample, principle: Principle) -> Chat:
    return [
        Message(role="user", content=example.prompt),
        Message(role="assistant", content=example.answer),
        Message(role="user", content=CRITIQUE_TURN.format(request=principle.critique_request)),
        Message(role="assistant", content=example.critique),
        Message(role="user", content=REVISION_TURN.format(request=principle.revision_request)),
        Message(role="assistant", content=example.revision),
    ]


def critique_chat(prompt: Chat, answer: str, principle: Principle) -> Chat:
    shots = [turn for ex in principle.examples for turn in _example_turns(ex, principle)]
    return [
        *shots,
        *prompt,
        Message(role="assistant", content=answer),
        Message(role="user", content=CRITIQUE_TURN.format(request=principle.critique_request)),
    ]


def revision_chat(prompt: Chat, answer: str, principle: Principle, critique: str) -> Chat:
    return [
        *critique_chat(prompt, answer, principle),
        Message(role="assistant", content=critique),
        Message(role="user", content=REVISION_TURN.format(request=principle.revision_request)),
    ]
