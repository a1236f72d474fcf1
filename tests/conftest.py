"""Fixtures shared by several test files. Plain helpers are in helpers.py, serve_helpers.py and
tiny_tokenizers.py, imported by name; nothing here imports torch or fastapi until a fixture runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import write_jsonl, write_prompts


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    """A word-level tokenizer with a ChatML template and a 2-layer, 64-wide Llama, built once a session.

    Read-only: tests train it into folders of their own."""
    from tiny_tokenizers import tiny_llama, word_level

    return tiny_llama(tmp_path_factory.mktemp("tiny-chat"), word_level(), max_positions=256, tie_embeddings=True)


@pytest.fixture
def roots(tmp_path: Path) -> Path:
    """A service root (serve_helpers.settings): keys for alice and bob, and data/ with questions.jsonl
    (4 prompts), big.jsonl (30), hh.jsonl (3 HH pairs) and leak.jsonl, a symlink out of data/."""
    from serve_helpers import ALICE, BOB

    (tmp_path / "keys.txt").write_text(f"# test keys\nalice:{ALICE}\nbob:{BOB}\n")
    data = tmp_path / "data"
    data.mkdir()
    write_prompts(data / "questions.jsonl", [f"question {i}" for i in range(4)])
    write_prompts(data / "big.jsonl", [f"q{i}" for i in range(30)])
    write_jsonl(data / "hh.jsonl", [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: a good careful answer {i}",
                                     "rejected": f"\n\nHuman: q{i}\n\nAssistant: a bad answer {i}"} for i in range(3)])
    outside = tmp_path / "outside"
    outside.mkdir()
    write_prompts(outside / "secret.jsonl", ["secret"])
    (data / "leak.jsonl").symlink_to(outside / "secret.jsonl")
    return tmp_path
