"""Constitutions (rlhf_ray.data.constitution): files load or fail naming file and principle; the
critique and revision conversations are exactly the documented turns, rendered by the chat
template; principles are sampled reproducibly per round."""

import json
from pathlib import Path

import pytest

from rlhf_ray.data import DataError, render_messages
from rlhf_ray.data.constitution import (
    FEEDBACK_REVISION, Principle, critique_messages, load_constitution, revision_messages, sample_principles)
from rlhf_ray.toy import build_char_tokenizer
from rlhf_ray.toy.feedback import TOY_CONSTITUTION, write_toy_constitution

ROOT = Path(__file__).resolve().parents[2]
P = Principle("vowels", "Which letters are not vowels?", "Rewrite it with more vowels.")


def test_shipped_constitutions_load(tmp_path):
    real = load_constitution(ROOT / "configs" / "constitutions" / "example.yaml")
    assert [p.name for p in real.principles] == ["harmful", "helpful", "honest", "respectful"]
    assert real.feedback.critique == "Critique your last response."
    toy = load_constitution(write_toy_constitution(tmp_path / "c.yaml"))
    assert [p.name for p in toy.principles] == [p["name"] for p in TOY_CONSTITUTION["principles"]]
    assert toy.principles[0] == P


def test_json_and_defaults(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"principles": [{"critique": "c0", "revision": "r0"}, {"critique": "c1", "revision": "r1"}]}))
    c = load_constitution(path)
    assert [p.name for p in c.principles] == ["principle_0", "principle_1"]
    assert c.feedback.name == "feedback" and c.feedback.revision == FEEDBACK_REVISION


@pytest.mark.parametrize("data, key, reason", [
    ({"principles": []}, "principles", "missing_key"),
    ({"rules": [{"critique": "c", "revision": "r"}]}, "principles", "missing_key"),
    ({"principles": [{"critique": "c", "revision": "r"}, {"critique": "c"}]}, "principles[1].revision", "missing_key"),
    ({"principles": [{"critique": " ", "revision": "r"}]}, "principles[0].critique", "wrong_type"),
    ({"principles": ["be nice"]}, "principles[0]", "wrong_type"),
    ({"principles": [{"name": "a", "critique": "c", "revision": "r"}] * 2}, "principles", "bad_value"),
    ({"principles": [{"critique": "c", "revision": "r"}], "feedback": {"revision": 3}}, "feedback.revision", "wrong_type"),
])
def test_bad_constitutions_name_file_and_key(tmp_path, data, key, reason):
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError) as err:
        load_constitution(path)
    assert (err.value.source, err.value.key, err.value.reason) == (str(path), key, reason)
    with pytest.raises(DataError, match="no such constitution file"):
        load_constitution(tmp_path / "missing.yaml")


def test_conversations_are_the_documented_turns():
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert critique_messages("say: ab\n", "xy", P) == [
        {"role": "user", "content": "say: ab\n"}, {"role": "assistant", "content": "xy"},
        {"role": "user", "content": P.critique}]
    assert revision_messages(chat, "xy", P, "too few") == chat + [
        {"role": "assistant", "content": "xy"}, {"role": "user", "content": P.critique},
        {"role": "assistant", "content": "too few"}, {"role": "user", "content": P.revision}]
    tok = build_char_tokenizer()
    assert render_messages(tok, revision_messages("say: ab\n", "xy", P, "too few")) == (
        "<|user|>say: ab\n<|assistant|>xy<|user|>Which letters are not vowels?<|assistant|>too few"
        "<|user|>Rewrite it with more vowels.<|assistant|>")
    tok.chat_template = None  # without a template: role lines, then the assistant's turn opened
    assert render_messages(tok, critique_messages("hi", "yo", P)) == (
        "user: hi\nassistant: yo\nuser: Which letters are not vowels?\nassistant: ")


def test_principles_are_sampled_per_round_reproducibly(tmp_path):
    c = load_constitution(write_toy_constitution(tmp_path / "c.yaml"))
    first = sample_principles(c, 60, seed=0, round_=1)
    assert first == sample_principles(c, 60, seed=0, round_=1)
    assert first != sample_principles(c, 60, seed=0, round_=2) != sample_principles(c, 60, seed=1, round_=2)
    assert {p.name for p in first} == {"vowels", "short", "lowercase"}
