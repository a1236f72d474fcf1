"""One JSONL line parser (cai.files.parse_json_line) behind every reader: prompts, evaluation data,
job shards and read_jsonl name the file and line of a bad row the same way."""

from __future__ import annotations

import pytest
from helpers import write_jsonl

from cai.errors import CaiError
from cai.evaluate import read_eval_items
from cai.files import JsonlError, read_jsonl
from cai.store import scan_shard


def test_a_bad_evaluation_data_line_is_a_user_error_naming_the_line(tmp_path):
    good = {"chosen": "\n\nHuman: q\n\nAssistant: yes", "rejected": "\n\nHuman: q\n\nAssistant: no"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, '{"chosen": "'])
    with pytest.raises(CaiError, match=r"pairs.jsonl:2: not a JSON line \(not JSON: "):
        read_eval_items(path)


def test_shards_and_jsonl_files_give_one_reason_for_one_bad_line(tmp_path):
    path = tmp_path / "x-000000.jsonl"
    path.write_bytes(b'{"id": "a", "error": null}\n{"id": "b", "err')
    [ok, bad] = scan_shard(path)
    assert ok.problem is None and bad.problem.startswith("not JSON: ")
    assert bad.problem.endswith("truncated (no newline at the end)")
    with pytest.raises(JsonlError) as exc:
        list(read_jsonl(path))
    assert str(exc.value) == f"{path}:2: not a JSON line ({bad.problem})"
