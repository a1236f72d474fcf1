"""Phase 2 judge: pairwise comparison under a principle, both orders, soft labels.

Modes (JudgeConfig.mode):
- ``logprob`` (default): the comparison is a multiple-choice question; the judge's
  normalised probabilities of the option tokens "A" / "B" after "The answer is: ("
  give P(first shown preferred). No text is generated.
- ``cot``: the judge writes its reasoning first (one batched generate call), then
  the options are scored after it (one batched scoring call); the probabilities are
  clamped to ``clamp`` as in the CAI paper (which used 0.4-0.6), because reasoning
  makes a judge overconfident.
- ``structured``: for backends without log-probs. The judge answers with a JSON
  object validated by a pydantic model; only malformed replies are asked again
  (batched), up to ``structured_retries`` times; then the order is an UNPARSEABLE
  error carrying the raw text. logprob / cot fall back to it when the backend reports NO_LOGPROBS
  (``fallback_structured``; also a server that does not continue the answer prefix), logged once per
  reason; those records keep ``mode="structured"``. Each retry first checks the job's stop signal
  (``cai.engine.base.check_stop``), so a cancel is not held up by retries.

Option mass: in logprob and cot modes each order records ``option_mass`` = P(A) + P(B)
before normalising. Below ``min_option_mass`` (default 0.5; 0 disables) the judge was
mostly saying something else (its top tokens are in the message), so the order is an
OFF_OPTIONS error rather than a label normalised from noise. Options a server did not
return among its top tokens are bounded by the smallest returned log-prob (``bounded``);
an order where no option was returned at all is OFF_OPTIONS whatever the threshold.

With ``orders=2`` each pair is judged as (A, B) and as (B, A) and the two P(A) are
averaged, so a judge that always picks the first position gets p_a = 0.5 and is
flagged inconsistent. Every step sends all pairs x orders to the engine in one
call. A failure in any order makes the judgement an error row: never a default
winner or a silent tie.

Each mode is one JUDGE_MODE_SPECS entry (JudgeModeSpec). Adding one: its name in cai.records.JUDGE_MODES,
its templates in cai.prompts.JUDGE_MODE_TEMPLATES, its runner and entry here; in cai.recipe.JudgeConfig
a `<mode>_max_tokens` field if it writes text, its name in CLAMPED_MODES if its labels are clamped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from pydantic import (
    BaseModel,
    ValidationError,
    field_validator,
)

from cai.constitution import Principle
from cai.engine.base import ChoiceScores, Engine, NoLogprobs, check_stop
from cai.prompts import (
    JUDGE_ANSWER_PREFIX,
    JUDGE_MODE_TEMPLATES,
    JUDGE_OPTIONS,
    baseline_judge_chat,
    cot_verdict_chat,
    judge_chat,
    judge_template_hash,
    structured_retry_chat,
)
from cai.recipe import JudgeConfig
from cai.records import (
    JUDGE_MODES,
    Chat,
    Completion,
    ErrorCode,
    ErrorInfo,
    Judgement,
    JudgeOrder,
    SamplingParams,
)

log = logging.getLogger(__name__)
_switches_logged: set[str] = set()  # the reasons for structured fallbacks already logged


class JudgeItem(BaseModel):
    """One pair to judge: the conversation so far, two answers, the comparison question."""

    prompt: Chat
    answer_a: str
    answer_b: str
    question: str
    principle_id: str | None = None

    @classmethod
    def for_principle(cls, prompt: Chat, answer_a: str, answer_b: str, principle: Principle) -> JudgeItem:
        return cls(prompt=prompt, answer_a=answer_a, answer_b=answer_b,
                   question=principle.comparison_question, principle_id=principle.id)

    def shown(self, order: int) -> tuple[str, str]:
        return (self.answer_a, self.answer_b) if order == 0 else (self.answer_b, self.answer_a)


class StructuredVerdict(BaseModel):
    """The structured judge's reply. `choice` is the *shown* position."""

    reasoning: str = ""
    choice: Literal["A", "B"]

    @field_validator("choice", mode="before")
    @classmethod
    def _normalise(cls, value: object) -> object:
        return value.strip().strip("()").strip().upper() if isinstance(value, str) else value


def parse_verdict(text: str) -> tuple[StructuredVerdict | None, str]:
    """(verdict, problem): the JSON object in `text`, optionally inside a ```json fence."""
    body = text.strip()
    if body.startswith("```"):
        body = body[3:]
        body = body[4:] if body[:4].lower() == "json" else body
        body = body.rsplit("```", 1)[0] if "```" in body else body
    try:
        return StructuredVerdict.model_validate_json(body.strip()), ""
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return None, f"{where}: {first['msg']}" if where else first["msg"]


# ---- probabilities ---------------------------------------------------------------------


class OptionReading(NamedTuple):
    """P(first option) normalised over the options, their unnormalised mass, or the error."""

    p_first: float | None
    mass: float | None
    error: ErrorInfo | None


def read_options(scores: ChoiceScores, min_mass: float = 0.0) -> OptionReading:
    """Normalise the option log-probs; an order with too little mass on them is an OFF_OPTIONS error."""
    if scores.error is not None:
        return OptionReading(None, None, scores.error)
    logprobs = scores.logprobs or {}
    values = [logprobs.get(o) for o in JUDGE_OPTIONS]
    if any(v is None or math.isnan(v) for v in values) or all(v == -math.inf for v in values):
        msg = f"no usable log-probabilities for options {list(JUDGE_OPTIONS)}: {logprobs}"
        return OptionReading(None, None, ErrorInfo(code=ErrorCode.NO_LOGPROBS, message=msg))
    mass = sum(math.exp(v) for v in values)
    if set(JUDGE_OPTIONS) <= set(scores.bounded) or mass < min_mass:
        return OptionReading(None, mass, _off_options(scores, mass, min_mass))
    top = max(values)
    a, b = (math.exp(v - top) for v in values)
    return OptionReading(a / (a + b), mass, None)


def _off_options(scores: ChoiceScores, mass: float, min_mass: float) -> ErrorInfo:
    wanted = ", ".join(f"{t.token!r} {math.exp(t.logprob):.1%}" for t in scores.top) or "unknown"
    options = "/".join(JUDGE_OPTIONS)
    if set(JUDGE_OPTIONS) <= set(scores.bounded):
        said = f"none of the options {options} is among the tokens the backend returned"
    else:
        bound = f" at most (bounded: {', '.join(scores.bounded)})" if scores.bounded else ""
        said = (f"the judge put{bound} {mass:.1%} of its probability on the options {options}, "
                f"below min_option_mass {min_mass:.0%}")
    return ErrorInfo(code=ErrorCode.OFF_OPTIONS, message=f"{said}; its top tokens: {wanted}")


def _order(index: int, **fields) -> JudgeOrder:
    first = "A" if index == 0 else "B"
    p_first = fields.get("p_first")
    p_a = None if p_first is None else (p_first if first == "A" else 1.0 - p_first)
    return JudgeOrder(first=first, p_a=p_a, **fields)


def combine(item: JudgeItem, orders: list[JudgeOrder], mode: str) -> Judgement:
    """Average P(A) over orders; any failed order makes the whole judgement an error row."""
    failed = next((o for o in orders if o.error is not None), None)
    if failed is not None:
        err = failed.error.model_copy(update={"raw": failed.error.raw or failed.raw})
        return Judgement(principle_id=item.principle_id, mode=mode, orders=orders, error=err)
    p_a = sum(o.p_a for o in orders) / len(orders)
    sides = {(o.p_a > 0.5) - (o.p_a < 0.5) for o in orders}
    consistent = None if len(orders) == 1 else (sides == {1} or sides == {-1})
    return Judgement(principle_id=item.principle_id, mode=mode, p_a=p_a, orders=orders,
                     consistent=consistent, confidence=abs(p_a - 0.5) * 2)


# ---- engine calls (one per step) -------------------------------------------------------


def _score(engine: Engine, chats: list[Chat]) -> list[ChoiceScores]:
    if not chats:
        return []
    try:
        return engine.choice_logprobs(chats, list(JUDGE_OPTIONS), prefix=JUDGE_ANSWER_PREFIX)
    except NoLogprobs as exc:
        err = ErrorInfo(code=ErrorCode.NO_LOGPROBS, message=f"{engine.backend}: {exc}")
        return [ChoiceScores(error=err) for _ in chats]


def _generate(engine: Engine, chats: list[Chat], params: SamplingParams) -> list[Completion]:
    return engine.generate(chats, params) if chats else []


def _controls(engine: Engine) -> tuple[str, ...]:
    """The judge engine's control tokens (HasControlTokens), broken up in quoted text; () without a tokenizer."""
    return tuple(getattr(engine, "control_tokens", None) or ())


def _requests(items: Sequence[JudgeItem], orders: int, layout: str,
              controls: Sequence[str] = ()) -> list[tuple[int, int, Chat]]:
    """(item index, order, chat) for every item x order, in one flat batch."""
    return [(i, o, judge_chat(it.prompt, it.question, *it.shown(o), layout=layout, controls=controls))
            for i, it in enumerate(items) for o in range(orders)]


def _logprob_orders(engine: Engine, items: Sequence[JudgeItem], config: JudgeConfig) -> dict:
    requests = _requests(items, config.orders, "logprob", _controls(engine))
    scores = _score(engine, [chat for _, _, chat in requests])
    out: dict[tuple[int, int], JudgeOrder] = {}
    for (i, o, _), s in zip(requests, scores):
        p, mass, err = read_options(s, config.min_option_mass)
        out[i, o] = _order(o, logprobs=s.logprobs, option_mass=mass, bounded=s.bounded,
                           p_first=p, error=err)
    return out


def _cot_orders(engine: Engine, items: Sequence[JudgeItem], config: JudgeConfig) -> dict:
    requests = _requests(items, config.orders, "cot", _controls(engine))
    texts = _generate(engine, [chat for _, _, chat in requests], config.generation("cot"))
    out: dict[tuple[int, int], JudgeOrder] = {}
    scored = []
    for (i, o, chat), c in zip(requests, texts):
        if c.error is not None:
            out[i, o] = _order(o, raw=c.text, finish_reason=c.finish_reason, error=c.error)
        else:
            scored.append((i, o, c, cot_verdict_chat(chat, c.text)))
    for (i, o, c, _), s in zip(scored, _score(engine, [chat for *_, chat in scored])):
        p, mass, err = read_options(s, config.min_option_mass)
        out[i, o] = _order(o, logprobs=s.logprobs, option_mass=mass, bounded=s.bounded, p_first=p,
                           raw=c.text, finish_reason=c.finish_reason, error=err)
    return out


def _structured_orders(engine: Engine, items: Sequence[JudgeItem], config: JudgeConfig) -> dict:
    requests = {(i, o): chat for i, o, chat in _requests(items, config.orders, "structured", _controls(engine))}
    chats = dict(requests)
    out: dict[tuple[int, int], JudgeOrder] = {}
    params = config.generation("structured")
    for attempt in range(1, config.structured_retries + 2):
        if attempt > 1:  # a stopped job asks no more (StopRequested: the batch becomes cancelled rows)
            check_stop()
        keys = [k for k in chats if k not in out]
        retry: dict[tuple[int, int], Chat] = {}
        for key, c in zip(keys, _generate(engine, [chats[k] for k in keys], params)):
            order = _structured_order(key[1], c, attempt)
            if order.error is None or order.error.code != ErrorCode.UNPARSEABLE:
                out[key] = order
            elif attempt > config.structured_retries:
                out[key] = order
            else:
                retry[key] = structured_retry_chat(requests[key], c.text, order.error.message, _controls(engine))
        chats.update(retry)
        if not retry:
            break
    return out


def _structured_order(order: int, c: Completion, attempt: int) -> JudgeOrder:
    if c.error is not None:  # backend failure: asking again would not help
        return _order(order, raw=c.text, finish_reason=c.finish_reason, attempts=attempt, error=c.error)
    verdict, problem = parse_verdict(c.text)
    if verdict is None:
        err = ErrorInfo(code=ErrorCode.UNPARSEABLE, message=problem, raw=c.text)
        return _order(order, raw=c.text, finish_reason=c.finish_reason, attempts=attempt, error=err)
    p_first = 1.0 if verdict.choice == "A" else 0.0
    return _order(order, verdict=verdict.choice, p_first=p_first, raw=c.text,
                  finish_reason=c.finish_reason, attempts=attempt)


def _clamped(order: JudgeOrder, clamp: tuple[float, float]) -> JudgeOrder:
    if order.p_first is None:
        return order
    low, high = clamp
    p_first = min(max(order.p_first, low), high)
    return order.model_copy(update={"p_first": p_first, "p_a": p_first if order.first == "A" else 1.0 - p_first})


def judge_pairs(engine: Engine, items: Sequence[JudgeItem], config: JudgeConfig | None = None) -> list[Judgement]:
    """Judge every item in both orders (config.orders); one Judgement per item, in order."""
    config = config or JudgeConfig()
    orders = judge_mode_spec(config.mode).run(engine, items, config)
    if config.labels_clamped:
        orders = {key: _clamped(order, config.clamp) for key, order in orders.items()}
    modes = {i: config.mode for i in range(len(items))}
    if config.fallback_structured and config.mode != "structured":
        unscored = {i: o.error.message for (i, _), o in orders.items()
                    if o.error is not None and o.error.code == ErrorCode.NO_LOGPROBS}
        lacking = sorted(unscored)
        if lacking and (reason := unscored[lacking[0]]) not in _switches_logged:  # once, not once per batch
            _switches_logged.add(reason)
            log.warning("judge: mode %s cannot score the options here; those pairs get structured verdicts "
                        "(fallback_structured): %s", config.mode, reason)
        redo = _structured_orders(engine, [items[i] for i in lacking], config)
        for (k, o), order in redo.items():
            orders[lacking[k], o] = order
            modes[lacking[k]] = "structured"
    return [combine(it, [orders[i, o] for o in range(config.orders)], modes[i])
            for i, it in enumerate(items)]


# ---- the modes ---------------------------------------------------------------------------

OrderRunner = Callable[[Engine, Sequence[JudgeItem], JudgeConfig], dict[tuple[int, int], JudgeOrder]]


@dataclass(frozen=True)
class JudgeModeSpec:
    """One judge mode.

    - `run(engine, items, config)`: (item index, order) -> JudgeOrder for every item x config.orders,
      in batched engine calls; an order the backend cannot score is a NO_LOGPROBS error (the judge
      then falls back to structured verdicts when `fallback_structured`).
    - `describe(judge)`: how one order was labelled, for the data card, from the job's `judge`
      settings as stored in its manifest (a dict: keys may be missing, use JudgeConfig's defaults).
    - `option_mass`: its orders record P(A) + P(B) before normalising (the card reports its mean).
    """

    name: str
    run: OrderRunner
    describe: Callable[[dict], str]
    option_mass: bool

    @property
    def templates(self) -> dict[str, str]:
        """The mode's own templates (cai.prompts.JUDGE_MODE_TEMPLATES), hashed into its job lineage."""
        return JUDGE_MODE_TEMPLATES[self.name]

    @property
    def template_hash(self) -> str:
        return judge_template_hash(self.name)

    @property
    def clamped(self) -> bool:
        """Its P(first shown preferred) is clamped to JudgeConfig.clamp (JudgeConfig.CLAMPED_MODES)."""
        return self.name in JudgeConfig.CLAMPED_MODES

    def max_tokens(self, config: JudgeConfig) -> int:
        """The cap on the judge's own text in this mode (1: it scores one token and writes none)."""
        return config.generation(self.name).max_tokens


def _logprob_text(judge: dict) -> str:
    return "the judge's options (A) / (B) were scored from their normalised log-probabilities (no text generated)"


def _cot_text(judge: dict) -> str:
    low, high = judge.get("clamp", (0.05, 0.95))
    return ("the judge wrote its reasoning first, then its options (A) / (B) were scored from their "
            f"normalised log-probabilities, the probability clamped to [{low}, {high}]")


def _structured_text(judge: dict) -> str:
    return (f"the judge answered with a JSON verdict (a malformed reply asked again up to "
            f"{judge.get('structured_retries', 2)} times, then an error row): a hard vote for one answer, "
            "not a probability")


JUDGE_MODE_SPECS: dict[str, JudgeModeSpec] = {spec.name: spec for spec in (
    JudgeModeSpec(name="logprob", run=_logprob_orders, describe=_logprob_text, option_mass=True),
    JudgeModeSpec(name="cot", run=_cot_orders, describe=_cot_text, option_mass=True),
    JudgeModeSpec(name="structured", run=_structured_orders, describe=_structured_text, option_mass=False),
)}


def judge_mode_spec(name: str) -> JudgeModeSpec:
    """The registered mode `name`; ValueError naming the known ones for any other."""
    if name not in JUDGE_MODE_SPECS:
        raise ValueError(f"unknown judge mode {name!r}; known: {', '.join(JUDGE_MODE_SPECS)}")
    return JUDGE_MODE_SPECS[name]


def judge_modes_text(modes: Sequence[str] = JUDGE_MODES) -> str:
    """The modes for help texts: "logprob, cot or structured"."""
    return " or ".join(filter(None, (", ".join(modes[:-1]), modes[-1])))


# ---- baseline ----------------------------------------------------------------------------

BASELINE_PARAMS = SamplingParams(max_tokens=64, temperature=0.0)


def baseline_judge(engine: Engine, items: Sequence[JudgeItem],
                   params: SamplingParams = BASELINE_PARAMS) -> list[Judgement]:
    """The judge most scripts use: one order, text pasted as is, a JSON verdict, greedy, no retry.

    An unparseable reply is an UNPARSEABLE error row (counted separately), not a default winner.
    """
    chats = [baseline_judge_chat(it.prompt, it.question, it.answer_a, it.answer_b) for it in items]
    out = []
    for item, c in zip(items, _generate(engine, chats, params)):
        out.append(combine(item, [_structured_order(0, c, 1)], "baseline"))
    return out
