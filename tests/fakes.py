"""Scripted policy and judge callables shared by the phase-2 and service tests."""

from __future__ import annotations

import math

from cai.engine.fake import FakeEngine


def alternating_sampler():
    """A policy whose samples alternate "a good careful answer #n" / "a bad answer #n"."""
    counter = {"n": 0}

    def respond(chat, params):
        counter["n"] += 1
        return ("a good careful answer" if counter["n"] % 2 else "a bad answer") + f" #{counter['n']}"

    return respond


def judge_preferring(word: str = "good", p: float = 0.9):
    """A chooser giving P = p to whichever shown option contains `word`, in either order."""

    def choose(chat, options, prefix):
        text = chat[-1].content
        first, second = text.index("(A)\n"), text.index("(B)\n")
        word_first = word in text[first:second]
        return {"A": math.log(p if word_first else 1 - p), "B": math.log(1 - p if word_first else p)}

    return choose


class LoggedEngine(FakeEngine):
    """A fake engine that logs its start, calls and close into a shared list (engine lifetimes)."""

    def __init__(self, name: str, log: list[str], **kw):
        super().__init__(model_id=name, **kw)
        self.name, self.log = name, log
        log.append(f"start {name}")

    def generate(self, chats, params):
        self.log.append(f"generate {self.name}")
        return super().generate(chats, params)

    def choice_logprobs(self, chats, options, prefix=""):
        self.log.append(f"score {self.name}")
        return super().choice_logprobs(chats, options, prefix)

    def close(self):
        self.log.append(f"close {self.name}")
