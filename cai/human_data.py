"""Human-labelled data for the human-grounded policy measures (cai.human_eval).

Pairs (`read_human_pairs`): a conversation and two final assistant turns, one chosen by
people. Read from
- HH-RLHF transcripts (`{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}`,
  sharing every turn but the last assistant turn): the judge evaluation's reader
  (`cai.evaluate.read_hh_items`), with its skip rules (unparseable, different prompts,
  identical answers), counted in `skipped`;
- preference files with `prompt` / `chosen` / `rejected` (cai's prefs export, TRL's
  conversational or standard format): `prompt` a string or a list of messages, each answer a
  string or a list of messages ending with the assistant turn; earlier turns of a list answer
  must be the same in both and join the prompt;
- `chosen` / `rejected` message lists without a prompt (TRL's implicit prompt): the turns both
  share are the prompt.

Two-option questions (`read_choice_items`): the `harmful_vs_ethical` format, read by the judge
evaluation's reader (`cai.evaluate.read_mc_items`: labels, option texts, skip rules). The policy
sees the question as the user turn, up to "The answer is"; the answer is scored as that phrase
(as the start of its reply, the `prefix`) followed by the option label of the data (" (A)").
The second order exchanges the two option texts in the prompt, so the correct text is under the
other label.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from cai.errors import CaiError
from cai.evaluate import read_hh_items, read_mc_items
from cai.files import read_jsonl_numbered
from cai.records import Chat, Message

ANSWER_PHRASE = "The answer is"


class HumanPair(BaseModel):
    source: str = Field(description="file:line")
    prompt: Chat
    chosen: str
    rejected: str


class ChoiceOrder(BaseModel):
    """One order of a two-option question: the user turn, the reply's start and the two labels."""

    chat: Chat
    prefix: str
    correct: str
    incorrect: str


class ChoiceItem(BaseModel):
    source: str
    orders: list[ChoiceOrder] = Field(description="as written, then with the option texts exchanged")


class HumanData(BaseModel):
    """Which file, in which format, how many rows were used and why others were not."""

    path: str
    format: Literal["hh", "prefs", "mc"]
    n: int
    skipped: dict[str, int] = Field(default_factory=dict)


def _first_row(path: str | Path) -> dict | None:
    if not Path(path).is_file():
        raise CaiError(f"{path}: no such file; give a JSONL file of human-labelled data")
    return next((row for _, row in read_jsonl_numbered(path)), None)


def _looks_hh(value: Any) -> bool:
    return isinstance(value, str) and value.lstrip().startswith("Human:")


# ---- pairs -------------------------------------------------------------------------------


def read_human_pairs(path: str | Path, limit: int | None = None) -> tuple[HumanData, list[HumanPair]]:
    """The pairs of an HH-RLHF or chosen/rejected preference file (format sniffed from the first row)."""
    first = _first_row(path)
    if isinstance(first, dict) and _looks_hh(first.get("chosen")):
        evalset = read_hh_items(path, limit)
        pairs = [HumanPair(source=e.source, prompt=e.item.prompt,
                           chosen=e.item.answer_a if e.human == "A" else e.item.answer_b,
                           rejected=e.item.answer_b if e.human == "A" else e.item.answer_a)
                 for e in evalset.items]
        return HumanData(path=str(path), format="hh", n=len(pairs), skipped=evalset.skipped), pairs
    if isinstance(first, dict) and "chosen" in first and "rejected" in first:
        return _read_preference_rows(path, limit)
    raise CaiError(f"{path}: expected human-labelled pairs: HH-RLHF transcripts in chosen/rejected, or "
                   "prompt/chosen/rejected rows (e.g. cai's prefs export); a two-option file goes to the "
                   "multiple-choice input instead")


def _messages(value: Any) -> Chat:
    if isinstance(value, str):
        return [Message(role="user", content=value)]
    if isinstance(value, list):
        return [Message.model_validate(m) for m in value]
    raise ValueError(f"expected a string or a list of messages, got {type(value).__name__}")


def _answer(value: Any) -> tuple[Chat, str]:
    """(turns before the answer, the final assistant turn's text) of a string or message list."""
    if isinstance(value, str):
        return [], value
    turns = _messages(value)
    if not turns or turns[-1].role != "assistant":
        raise ValueError("the answer's last message is not an assistant turn")
    return turns[:-1], turns[-1].content


def _pair_of(row: dict) -> tuple[Chat, str, str] | str:
    """(prompt, chosen, rejected) of a preference row, or why it cannot be used."""
    try:
        before_c, chosen = _answer(row["chosen"])
        before_r, rejected = _answer(row["rejected"])
        # no prompt: TRL's implicit prompt, the turns both answers share
        prompt = _messages(row["prompt"]) if "prompt" in row else []
    except (KeyError, ValueError, ValidationError):
        return "unparseable"
    if before_c != before_r:
        return "different_prompts"
    prompt = [*prompt, *before_c]
    if not prompt or prompt[-1].role != "user":
        return "no_user_turn"
    if chosen.strip() == rejected.strip():
        return "identical_answers"
    return prompt, chosen, rejected


def _read_preference_rows(path: str | Path, limit: int | None) -> tuple[HumanData, list[HumanPair]]:
    pairs: list[HumanPair] = []
    skipped: Counter[str] = Counter()
    for n, row in read_jsonl_numbered(path):
        if limit is not None and len(pairs) >= limit:
            break
        got = _pair_of(row)
        if isinstance(got, str):
            skipped[got] += 1
            continue
        pairs.append(HumanPair(source=f"{path}:{n}", prompt=got[0], chosen=got[1], rejected=got[2]))
    return HumanData(path=str(path), format="prefs", n=len(pairs), skipped=dict(skipped)), pairs


# ---- two-option questions ------------------------------------------------------------------


def swap_options(text: str, a: str, b: str) -> str:
    """The prompt with option texts `a` (after "(A)") and `b` (after "(B)") exchanged, layout kept.
    The options are found as cai.evaluate.parse_mc_prompt finds them (the last "(A)" / "(B)")."""
    end = text.rfind(ANSWER_PHRASE)
    end = len(text) if end < 0 else end
    ib = text.rfind("(B)", 0, end)
    ia = text.rfind("(A)", 0, max(ib, 0))
    seg_a, seg_b = text[ia + 3:ib], text[ib + 3:end]
    if ia < 0 or a not in seg_a or b not in seg_b:
        raise ValueError("the options' texts are not where the parser found them")
    return text[:ia + 3] + seg_a.replace(a, b, 1) + text[ib:ib + 3] + seg_b.replace(b, a, 1) + text[end:]


def choice_order(prompt: str, correct: str, incorrect: str) -> ChoiceOrder:
    """The user turn (the prompt up to "The answer is"), the reply's start ("The answer is:") and labels."""
    cut = prompt.rfind(ANSWER_PHRASE)
    question, prefix = (prompt[:cut], prompt[cut:].rstrip()) if cut >= 0 else (prompt, "")
    label = (lambda s: s) if prefix else str.strip  # no prefix: the label starts the reply
    return ChoiceOrder(chat=[Message(role="user", content=question.rstrip())], prefix=prefix,
                       correct=label(correct), incorrect=label(incorrect))


def read_choice_items(path: str | Path, limit: int | None = None) -> tuple[HumanData, list[ChoiceItem]]:
    """Two-option questions in both orders (the second with the option texts exchanged)."""
    first = _first_row(path)
    if not (isinstance(first, dict) and "corrects" in first and "incorrects" in first):
        raise CaiError(f"{path}: expected two-option rows {{\"prompt\": \"... (A) ... (B) ... The answer is:\", "
                       "\"corrects\": [\" (B)\"], \"incorrects\": [\" (A)\"]}; chosen/rejected pairs go to the "
                       "pairs input instead")
    evalset = read_mc_items(path, limit)
    raw = {f"{path}:{n}": row for n, row in read_jsonl_numbered(path)}
    items, skipped = [], Counter(evalset.skipped)
    for e in evalset.items:
        row = raw[e.source]
        prompt, correct, incorrect = row["prompt"], row["corrects"][0], row["incorrects"][0]
        try:
            swapped = swap_options(prompt, e.item.answer_a, e.item.answer_b)
        except ValueError:
            skipped["no_options"] += 1
            continue
        items.append(ChoiceItem(source=e.source, orders=[choice_order(prompt, correct, incorrect),
                                                         choice_order(swapped, incorrect, correct)]))
    return HumanData(path=str(path), format="mc", n=len(items), skipped=dict(skipped)), items
