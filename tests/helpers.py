"""Plain helpers shared by the test files: repository paths and JSONL writers.

Fixtures live in conftest.py; these are ordinary functions and constants, imported by name.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"  # reference data sets, kept outside the repository
CONSTITUTIONS = ROOT / "constitutions"
HARMLESS = str(CONSTITUTIONS / "harmless.yaml")
HELPFUL = str(CONSTITUTIONS / "helpful.yaml")


def write_jsonl(path: Path, rows: Iterable[dict | str]) -> Path:
    """One JSON value a line; a str row is written as it is (a broken or blank line)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_prompts(path: Path, texts: Iterable[str]) -> Path:
    """A prompt file: one {"prompt": text} row per text."""
    return write_jsonl(path, [{"prompt": t} for t in texts])
