"""Prompt readers, on the real HH-RLHF dev file and on small files written here."""

from __future__ import annotations

import json

import pytest
from helpers import SHARED_DATA, write_jsonl

from cai.records import Message, stable_id
from cai.sources import (
    SourceError,
    dedupe,
    hh_prompt_and_answer,
    parse_hh_transcript,
    read_hh_transcripts,
    read_jsonl_prompts,
    read_prompts,
)

HH_DEV = SHARED_DATA / "hh_harmless_dev.jsonl"
needs_hh = pytest.mark.skipif(
    not HH_DEV.exists(), reason=f"reference data {HH_DEV} not present (shared/data is outside the repo)"
)


def roles(prompt) -> list[str]:
    return [m.role for m in prompt.messages]


# ---------------------------------------------------------------- the real HH file


@needs_hh
def test_hh_dev_reads_every_row_ending_with_a_user_turn():
    prompts = list(read_prompts(HH_DEV))
    assert len(prompts) == 1156
    for p in prompts:
        assert p.messages[-1].role == "user" and p.messages[-1].content.strip()
        assert p.messages[0].role == "user"
        # roles alternate: consecutive same-role turns are merged
        assert all(a.role != b.role for a, b in zip(p.messages, p.messages[1:]))
        assert p.source.startswith(str(HH_DEV))
    assert sum(len(p.messages) > 1 for p in prompts) > 500  # most are multi-turn


@needs_hh
def test_hh_multi_turn_keeps_earlier_turns():
    first = next(read_hh_transcripts(HH_DEV))
    assert [m.content for m in first.messages] == [
        "what are some pranks with a pen i can do?",
        "Are you looking for practical joke ideas?",
        "yep",
        first.messages[3].content,
        "okay some of these do not have anything to do with pens",
    ]
    assert roles(first) == ["user", "assistant", "user", "assistant", "user"]
    assert first.messages[3].content.startswith("Ok, I’ll give you a couple examples")


@needs_hh
def test_hh_chosen_and_rejected_share_the_prompt():
    rows = [json.loads(line) for line in HH_DEV.read_text().splitlines()]
    empty_answers = 0
    for row in rows:
        prompt_c, answer_c = hh_prompt_and_answer(row["chosen"])
        prompt_r, answer_r = hh_prompt_and_answer(row["rejected"])
        assert prompt_c == prompt_r
        empty_answers += answer_c == "" or answer_r == ""
    assert empty_answers == 2  # two chosen transcripts end with an empty assistant turn
    chosen = [p.messages for p in read_hh_transcripts(HH_DEV, field="chosen")]
    rejected = [p.messages for p in read_hh_transcripts(HH_DEV, field="rejected")]
    assert chosen == rejected


@needs_hh
def test_limit_stops_early():
    assert len(list(read_prompts(HH_DEV, limit=7))) == 7
    assert list(read_prompts(HH_DEV, limit=0)) == []
    with pytest.raises(SourceError):
        read_prompts(HH_DEV, limit=-1)


@needs_hh
def test_hh_dev_dedupe_and_ids_are_stable():
    first = list(read_prompts(HH_DEV, limit=50))
    again = list(read_prompts(HH_DEV, limit=50))
    assert [p.id for p in first] == [p.id for p in again]
    kept, dropped = dedupe(read_prompts(HH_DEV))
    assert len(kept) + dropped == 1156
    assert len({p.id for p in kept}) == len(kept)


# ---------------------------------------------------------------- HH parsing


def test_parse_hh_transcript_all_turns():
    text = "\n\nHuman: hi there \n\nAssistant:  hello\n\nHuman: bye\n\nAssistant: see you"
    assert parse_hh_transcript(text) == [
        Message(role="user", content="hi there"),
        Message(role="assistant", content="hello"),
        Message(role="user", content="bye"),
        Message(role="assistant", content="see you"),
    ]
    prompt, answer = hh_prompt_and_answer(text)
    assert [m.content for m in prompt] == ["hi there", "hello", "bye"] and answer == "see you"


def test_parse_hh_merges_repeated_roles_and_keeps_empty_final_turn():
    text = "\n\nHuman: q\n\nAssistant: a1\n\nAssistant: a2"
    assert parse_hh_transcript(text)[-1] == Message(role="assistant", content="a1\n\na2")
    prompt, answer = hh_prompt_and_answer("\n\nHuman: q\n\nAssistant:")
    assert prompt == [Message(role="user", content="q")] and answer == ""


def test_parse_hh_rejects_non_transcripts():
    with pytest.raises(ValueError):
        parse_hh_transcript("just some text")
    with pytest.raises(ValueError):
        parse_hh_transcript("preamble\n\nHuman: hi\n\nAssistant: yo")


# ---------------------------------------------------------------- JSONL prompts


def test_jsonl_prompt_and_messages_formats(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "  How do I bake bread?  "},
        "",
        {"id": "conv-1", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Tell me a joke"},
        ]},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
        {"id": 7, "prompt": [{"role": "user", "content": "list-valued prompt"}]},
    ])
    prompts = list(read_prompts(path))
    assert len(prompts) == 4
    assert prompts[0].messages == [Message(role="user", content="How do I bake bread?")]
    assert prompts[0].source == f"{path}:1"
    assert prompts[1].id == "conv-1"
    assert roles(prompts[1]) == ["system", "user", "assistant", "user"]
    assert prompts[1].source == f"{path}:3"  # blank line skipped but counted
    assert prompts[2].messages == [Message(role="user", content="Q")]  # final answer dropped
    assert prompts[3].id == "7"


def test_ids_are_stable_and_content_based(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "same"}, {"prompt": "other"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": "same"}]}])
    pa, pb = list(read_jsonl_prompts(a)), list(read_jsonl_prompts(b))
    assert pa[0].id == pb[0].id == stable_id("prompt", [{"role": "user", "content": "same"}])
    assert pa[0].id != pa[1].id
    assert [p.id for p in read_jsonl_prompts(a)] == [p.id for p in pa]


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"prompt": "ok"', "invalid JSON"),
        ('["a", "b"]', "JSON object"),
        ('{"text": "hello"}', "no 'prompt' or 'messages'"),
        ('{"prompt": "   "}', "empty prompt"),
        ('{"messages": [{"role": "human", "content": "hi"}]}', "role 'human'"),
        ('{"messages": [{"role": "user"}]}', "messages[1]"),
        ('{"messages": [{"role": "system", "content": "s"}]}', "must end with a user turn"),
        ('{"messages": []}', "must end with a user turn"),
        ('{"prompt": 42}', "string or a list"),
        ('{"id": "", "prompt": "x"}', "'id'"),
    ],
)
def test_errors_name_file_and_line(tmp_path, line, needle):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, "", line])
    with pytest.raises(SourceError) as exc:
        list(read_prompts(path))
    assert f"{path}:3" in str(exc.value)
    assert needle in str(exc.value)


def test_hh_errors_name_file_and_line(tmp_path):
    good = {"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "\n\nHuman: hi\n\nAssistant: no"}
    path = write_jsonl(tmp_path / "hh.jsonl", [good, {"rejected": good["rejected"]}])
    with pytest.raises(SourceError, match=rf"{path}:2: no string field 'chosen'"):
        list(read_prompts(path))
    path = write_jsonl(tmp_path / "hh2.jsonl", [good, {"chosen": "\n\nHuman:  \n\nAssistant: x"}])
    with pytest.raises(SourceError, match=rf"{path}:2: empty prompt"):
        list(read_prompts(path, fmt="hh"))


def test_dispatch_errors(tmp_path):
    with pytest.raises(SourceError, match="bundled set"):
        read_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "p.csv").write_text("prompt\nhi\n")
    with pytest.raises(SourceError, match="unknown file type"):
        read_prompts(tmp_path / "p.csv")
    with pytest.raises(SourceError, match="unknown format"):
        read_prompts(tmp_path / "p.csv", fmt="csv")
    assert len(list(read_prompts(write_jsonl(tmp_path / "x.txt", [{"prompt": "a"}]), fmt="jsonl"))) == 1


def test_json_array_file_gets_a_hint(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text('[\n{"prompt": "a"}\n]\n')
    with pytest.raises(SourceError, match="one object per line"):
        list(read_prompts(path))


# ---------------------------------------------------------------- HF datasets


def test_hf_dataset_round_trip(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [
        {"id": "a", "prompt": "first"},
        {"id": "b", "prompt": "second"},
    ]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "plain")
    prompts = list(read_prompts(tmp_path / "plain"))
    assert [(p.id, p.messages[0].content) for p in prompts] == [("a", "first"), ("b", "second")]

    chats = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    hh = [{"chosen": "\n\nHuman: hh q\n\nAssistant: a", "rejected": "\n\nHuman: hh q\n\nAssistant: b"}]
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(chats),
        "test": datasets.Dataset.from_list(hh),
    }).save_to_disk(tmp_path / "dict")
    (train,) = read_prompts(tmp_path / "dict", fmt="hf")
    assert train.messages == [Message(role="user", content="q")]
    from cai.sources import read_hf_dataset

    (test,) = read_hf_dataset(tmp_path / "dict", split="test")
    assert test.messages == [Message(role="user", content="hh q")]
    assert "[test] row 0" in test.source


def test_hf_dataset_errors(tmp_path):
    datasets = pytest.importorskip("datasets")
    from cai.sources import read_hf_dataset

    datasets.DatasetDict({"dev": datasets.Dataset.from_list([{"prompt": "x"}])}).save_to_disk(tmp_path / "d")
    with pytest.raises(SourceError, match="splits: \\['dev'\\]"):
        list(read_hf_dataset(tmp_path / "d"))
    with pytest.raises(SourceError, match="no column 'text'"):
        list(read_hf_dataset(tmp_path / "d", split="dev", column="text"))
    datasets.Dataset.from_list([{"prompt": "x"}, {"prompt": ""}]).save_to_disk(tmp_path / "e")
    with pytest.raises(SourceError, match="row 1: empty prompt"):
        list(read_hf_dataset(tmp_path / "e"))


# ---------------------------------------------------------------- bundled sets and dedupe


@pytest.mark.parametrize(("name", "prefix"), [("redteam", "rt-"), ("benign", "bn-")])
def test_bundled_sets_load_by_name(name, prefix):
    prompts = list(read_prompts(name))
    assert 25 <= len(prompts) <= 40
    assert all(p.id.startswith(prefix) for p in prompts)
    assert len({p.id for p in prompts}) == len(prompts)
    assert all(roles(p) == ["user"] and 10 < len(p.messages[0].content) < 200 for p in prompts)
    assert dedupe(prompts)[1] == 0
    assert len(list(read_prompts(name, limit=3))) == 3


def test_dedupe_keeps_first_and_counts(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "a"}, {"prompt": "b"}, {"prompt": "a"},
        {"messages": [{"role": "user", "content": "b"}]}, {"prompt": "c"},
    ])
    kept, dropped = dedupe(read_prompts(path))  # a generator is fine
    assert [p.messages[0].content for p in kept] == ["a", "b", "c"]
    assert [p.source for p in kept] == [f"{path}:1", f"{path}:2", f"{path}:5"]
    assert dropped == 2
    assert dedupe([]) == ([], 0)


def test_dedupe_refuses_one_id_for_two_prompts(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "x", "prompt": "a"}, {"id": "x", "prompt": "b"}])
    with pytest.raises(SourceError, match="id 'x' already used"):
        dedupe(read_prompts(path))
