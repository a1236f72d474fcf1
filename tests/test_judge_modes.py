"""The judge-mode registry: one entry per mode, in agreement with the names, templates and settings the
layers below the judge keep (they cannot import it), and the one place the judge and its data card read."""

from __future__ import annotations

import json
from typing import get_args

import pytest
from typer.testing import CliRunner

from cai import judge, prompts
from cai.card_judging import judging_text
from cai.engine.fake import FakeEngine
from cai.judge import (
    JUDGE_MODE_SPECS,
    JudgeItem,
    JudgeModeSpec,
    judge_mode_spec,
    judge_modes_text,
    judge_pairs,
)
from cai.preferences import PreferenceStats
from cai.recipe import JudgeConfig
from cai.records import JUDGE_MODES, JudgeMode, Message

# The job fingerprints of existing jobs hash these: a change here makes every such job start over.
PINNED_TEMPLATE_HASHES = {
    "logprob": "ded70dad3e3903b0",
    "cot": "06c93898a3324fb2",
    "structured": "0e9ff2ee0cc5aac1",
    "baseline": "96e466c5b31e5d15",
}


def item() -> JudgeItem:
    return JudgeItem(prompt=[Message(role="user", content="hi")], answer_a="good", answer_b="bad", question="Q?")


def test_the_registry_has_exactly_the_modes_the_lower_layers_validate():
    assert tuple(JUDGE_MODE_SPECS) == JUDGE_MODES
    assert all(name == spec.name for name, spec in JUDGE_MODE_SPECS.items())
    assert get_args(JudgeConfig.model_fields["mode"].annotation) == JUDGE_MODES
    assert get_args(JudgeMode) == (*JUDGE_MODES, "baseline")
    assert set(prompts.JUDGE_MODE_TEMPLATES) == {*JUDGE_MODES, "baseline"}
    assert JudgeConfig.CLAMPED_MODES <= set(JUDGE_MODES)


def test_each_mode_has_templates_and_its_hash_is_pinned():
    for name, spec in JUDGE_MODE_SPECS.items():
        assert spec.templates is prompts.JUDGE_MODE_TEMPLATES[name]
        assert prompts.judge_tail(name) == spec.templates[f"judge_tail_{name}"]
        assert spec.template_hash == prompts.judge_template_hash(name) == PINNED_TEMPLATE_HASHES[name]
    assert prompts.BASELINE_TEMPLATE_HASH == PINNED_TEMPLATE_HASHES["baseline"]
    assert prompts.judge_config_template_hashes("cot", True) == {
        "cot": PINNED_TEMPLATE_HASHES["cot"], "structured": PINNED_TEMPLATE_HASHES["structured"]}


def test_judge_chat_ends_with_the_modes_own_tail(monkeypatch):
    monkeypatch.setitem(prompts.JUDGE_MODE_TEMPLATES["cot"], "judge_tail_cot", "Think harder.")
    chat = prompts.judge_chat([Message(role="user", content="hi")], "Q?", "a", "b", layout="cot")
    assert chat[0].content.endswith("Think harder.")  # what the hash covers is what the judge is shown


def test_max_tokens_and_clamping_per_mode():
    config = JudgeConfig(cot_max_tokens=7, structured_max_tokens=9)
    assert {n: s.max_tokens(config) for n, s in JUDGE_MODE_SPECS.items()} == {"logprob": 1, "cot": 7, "structured": 9}
    assert config.max_token_settings() == {"cot_max_tokens": 7, "structured_max_tokens": 9}
    # every `<mode>_max_tokens` field belongs to a registered mode (a misspelt one would cap nothing)
    assert {f.removesuffix(JudgeConfig.MAX_TOKENS_SUFFIX) for f in config.max_token_settings()} <= set(JUDGE_MODES)
    assert [n for n, s in JUDGE_MODE_SPECS.items() if s.clamped] == ["cot"]
    with pytest.raises(KeyError):
        config.generation("baseline")


def test_confidence_ceiling_of_a_clamped_judge():
    assert JudgeConfig(mode="cot", clamp=(0.4, 0.6)).confidence_ceiling() == pytest.approx(0.2)
    assert JudgeConfig(mode="cot", clamp=(0.1, 0.7), orders=1).confidence_ceiling() == pytest.approx(0.8)
    assert JudgeConfig(mode="logprob", clamp=(0.4, 0.6)).confidence_ceiling() is None
    assert JudgeConfig(mode="cot").labels_clamped and not JudgeConfig(mode="structured").labels_clamped


def test_judge_pairs_runs_the_registered_runner(monkeypatch):
    calls = []
    scripted = judge._logprob_orders

    def runner(engine, items, config):
        calls.append(len(items))
        return scripted(engine, items, config)

    spec = JudgeModeSpec(name="logprob", run=runner, describe=lambda j: "scripted", option_mass=True)
    monkeypatch.setitem(JUDGE_MODE_SPECS, "logprob", spec)
    [j] = judge_pairs(FakeEngine(chooser=lambda c, o, p: {"A": 0.0, "B": -1.0}), [item()])
    assert calls == [1] and j.ok and j.mode == "logprob"


def test_a_clamped_mode_is_clamped_by_judge_pairs(monkeypatch):
    verdict = json.dumps({"reasoning": "x", "choice": "A"})
    engine = FakeEngine(responder=lambda chat, params: verdict)
    [hard] = judge_pairs(engine, [item()], JudgeConfig(mode="structured", orders=1))
    assert hard.p_a == 1.0
    monkeypatch.setattr(JudgeConfig, "CLAMPED_MODES", frozenset({"cot", "structured"}))
    [clamped] = judge_pairs(engine, [item()], JudgeConfig(mode="structured", clamp=(0.2, 0.8)))
    assert [o.p_first for o in clamped.orders] == [pytest.approx(0.8), pytest.approx(0.8)]
    assert [o.p_a for o in clamped.orders] == [pytest.approx(0.8), pytest.approx(0.2)]


def test_the_data_card_reads_the_modes_description(monkeypatch):
    spec = JUDGE_MODE_SPECS["structured"]
    monkeypatch.setitem(JUDGE_MODE_SPECS, "structured", JudgeModeSpec(
        name="structured", run=spec.run, describe=lambda j: f"a scripted verdict ({j['orders']})", option_mass=False))
    text = judging_text({"samples": 2, "judge": {"mode": "structured", "orders": 1}}, PreferenceStats())
    assert "Per order, a scripted verdict (1)." in text
    assert "normalised log-probabilities" in judging_text({"samples": 2}, PreferenceStats())  # default: logprob


def test_unknown_mode_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown judge mode 'rubric'; known: logprob, cot, structured"):
        judge_mode_spec("rubric")


def test_help_texts_list_the_modes():
    from cai.cli import app

    assert judge_modes_text() == "logprob, cot or structured"
    assert judge_modes_text(("logprob",)) == "logprob"
    runner = CliRunner()
    for command in (["generate", "prefs"], ["eval", "judge"], ["eval", "policy"]):
        result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "300"})
        assert result.exit_code == 0 and judge_modes_text() in result.output, command
