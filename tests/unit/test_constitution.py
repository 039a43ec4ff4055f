"""Constitutions (rlhf_ray.data.constitution): files load or fail naming file and principle; the
critique and revision conversations are exactly the documented turns, rendered by the chat
template; principles are sampled reproducibly per round."""

import json
from pathlib import Path

import numpy as np
import pytest

from rlhf_ray.data import DataError, render_messages
from rlhf_ray.data.constitution import (
    FEEDBACK_CRITIQUE,
    FEEDBACK_REVISION,
    Constitution,
    Principle,
    as_messages,
    critique_messages,
    load_constitution,
    revision_messages,
    sample_principles,
)
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
        "<|user|>say: ab\n</s><|assistant|>xy</s><|user|>Which letters are not vowels?</s>"
        "<|assistant|>too few</s><|user|>Rewrite it with more vowels.</s><|assistant|>")
    tok.chat_template = None  # without a template: role lines, then the assistant's turn opened
    assert render_messages(tok, critique_messages("hi", "yo", P)) == (
        "user: hi\nassistant: yo\nuser: Which letters are not vowels?\nassistant: ")


def test_principles_are_sampled_per_round_reproducibly(tmp_path):
    c = load_constitution(write_toy_constitution(tmp_path / "c.yaml"))
    first = sample_principles(c, 60, seed=0, round_=1)
    assert first == sample_principles(c, 60, seed=0, round_=1)
    assert first != sample_principles(c, 60, seed=0, round_=2) != sample_principles(c, 60, seed=1, round_=2)
    assert {p.name for p in first} == {"vowels", "short", "lowercase"}


def write_constitution(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def constitution_error(tmp_path, data):
    path = write_constitution(tmp_path, data)
    with pytest.raises(DataError) as err:
        load_constitution(path)
    return str(err.value).removeprefix(f"{path}").removeprefix(", ")


@pytest.mark.parametrize("data, message", [
    ("principles: [a, b", None),  # not YAML
    ("- a list\n", "key 'principles': needs a non-empty list 'principles' of {name, critique, revision} [missing_key]"),
    ({"principles": {"name": "a"}}, ("key 'principles': needs a non-empty list 'principles' of {name, critique, "
                                    "revision} [missing_key]")),
    ({"principles": ["be nice"]}, ("key 'principles[0]': expected a mapping with critique and revision, got 'be nice' "
                                  "[wrong_type]")),
    ({"principles": [{"critique": "c", "revision": "r"}, "x" * 100]},
     f"key 'principles[1]': expected a mapping with critique and revision, got '{'x' * 59} [wrong_type]"),
    ({"principles": [{"name": "", "critique": "c", "revision": "r"}]},
     "key 'principles[0].name': name must be a non-empty string, got '' [wrong_type]"),
    ({"principles": [{"name": "  ", "critique": "c", "revision": "r"}]},
     "key 'principles[0].name': name must be a non-empty string, got '  ' [wrong_type]"),
    ({"principles": [{"name": 7, "critique": "c", "revision": "r"}]},
     "key 'principles[0].name': name must be a non-empty string, got 7 [wrong_type]"),
    ({"principles": [{"critique": "c"}]},
     "key 'principles[0].revision': needs a non-empty string, got None [missing_key]"),
    ({"principles": [{"critique": ["c"], "revision": "r"}]},
     "key 'principles[0].critique': needs a non-empty string, got ['c'] [wrong_type]"),
    ({"principles": [{"name": "a", "critique": "c", "revision": "r"}, {"name": "b", "critique": "c", "revision": "r"},
                     {"name": "a", "critique": "c", "revision": "r"}]},
     "key 'principles': principle names repeat: ['a', 'b', 'a'] [bad_value]"),
    ({"principles": [{"critique": "c", "revision": "r"}], "feedback": {"critique": ""}},
     "key 'feedback.critique': needs a non-empty string, got '' [wrong_type]"),
])
def test_bad_constitutions_say_what_is_wrong(tmp_path, data, message):
    got = constitution_error(tmp_path, data)
    if message is None:
        assert got.startswith(": not YAML/JSON: ") and got.endswith(" [unreadable]")
    else:
        assert got == message


def test_the_missing_file_message(tmp_path):
    with pytest.raises(DataError) as err:
        load_constitution(tmp_path / "none.yaml")
    assert str(err.value) == f"{tmp_path / 'none.yaml'}: no such constitution file (YAML or JSON) [missing_file]"
    (tmp_path / "dir.yaml").mkdir()  # a directory is not a constitution file
    with pytest.raises(DataError, match=r"no such constitution file \(YAML or JSON\) \[missing_file\]$"):
        load_constitution(tmp_path / "dir.yaml")


def test_a_full_constitution_loads_field_by_field(tmp_path):
    path = write_constitution(tmp_path, "principles:\n"
                                        "  - name: kind\n    critique: Is it kind?\n    revision: Make it kind.\n"
                                        "  - critique: Is it short?\n    revision: Make it short.\n"
                                        "feedback:\n  critique: What is wrong?\n  revision: Fix it.\n")
    c = load_constitution(str(path))  # a string path works too
    assert c == Constitution(str(path), (Principle("kind", "Is it kind?", "Make it kind."),
                                         Principle("principle_1", "Is it short?", "Make it short.")),
                             Principle("feedback", "What is wrong?", "Fix it."))
    partial = write_constitution(tmp_path, {"principles": [{"critique": "c", "revision": "r"}],
                                            "feedback": {"revision": "Do better."}})
    assert load_constitution(partial).feedback == Principle("feedback", FEEDBACK_CRITIQUE, "Do better.")
    empty = write_constitution(tmp_path, {"principles": [{"critique": "c", "revision": "r"}], "feedback": None})
    assert load_constitution(empty).feedback == Principle("feedback", "Critique the response.",
                                                         "Rewrite the response to address the critique.")


def test_sampling_is_uniform_over_principles_by_seed_and_round():
    principles = tuple(Principle(f"p{i}", "c", "r") for i in range(3))
    c = Constitution("c.yaml", principles, Principle("feedback", "c", "r"))
    picks = np.random.default_rng([7, 2]).integers(3, size=9)
    assert sample_principles(c, 9, seed=7, round_=2) == [principles[i] for i in picks]
    assert sample_principles(c, 0, seed=7, round_=2) == []


def test_a_message_prompt_keeps_only_role_and_content():
    prompt = [{"role": "system", "content": "s", "name": "x"}, {"role": "user", "content": "u", "weight": 0}]
    assert as_messages(prompt) == [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert as_messages("hi") == [{"role": "user", "content": "hi"}]
    assert critique_messages(prompt, "r", P)[:2] == as_messages(prompt)
