"""A constitution (Bai et al. 2022, "Constitutional AI", §3) and the conversations its critique and
revision steps send to the model (seed notes 003 §6.3).

The file is YAML or JSON:

    principles:                      # at least one; each round samples one per example
      - name: harmless               # optional; default principle_<i>
        critique: "Identify ways in which the response is harmful."       # the critique request
        revision: "Rewrite the response to remove anything harmful."     # the revision request
    feedback:                        # optional: how a given critique (a human's) is framed
      critique: "Critique the response."
      revision: "Rewrite the response to address the critique."

For a prompt, a current response and a principle, the critique step continues the conversation
[user: prompt, assistant: response, user: principle.critique] and the revision step continues
[… the same, assistant: critique, user: principle.revision]; each round starts again from the
prompt and the latest response, so contexts do not grow with the number of rounds. A critique
record (`rlhf_ray.data.feedback`) supplies the critique of round 1 itself, under the `feedback`
principle. A prompt that is a list of chat messages is the conversation's opening as it is.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from rlhf_ray.data.errors import DataError

FEEDBACK_CRITIQUE = "Critique the response."
FEEDBACK_REVISION = "Rewrite the response to address the critique."


@dataclasses.dataclass(frozen=True)
class Principle:
    name: str
    critique: str  # the critique request: a user turn after the response
    revision: str  # the revision request: a user turn after the critique


@dataclasses.dataclass(frozen=True)
class Constitution:
    source: str
    principles: tuple[Principle, ...]  # at least one
    feedback: Principle  # frames a critique given with the data (name "feedback")


def load_constitution(path: str | Path) -> Constitution:
    """Read and check a constitution file; a problem is a DataError naming the file and the principle."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "missing_file", "no such constitution file (YAML or JSON)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise DataError(str(path), "unreadable", f"not YAML/JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("principles"), list) or not data["principles"]:
        raise DataError(str(path), "missing_key", "needs a non-empty list 'principles' of {name, critique, revision}",
                        key="principles")
    principles = tuple(_principle(str(path), i, p) for i, p in enumerate(data["principles"]))
    names = [p.name for p in principles]
    if len(set(names)) < len(names):
        raise DataError(str(path), "bad_value", f"principle names repeat: {names}", key="principles")
    extra = data.get("feedback") or {}
    feedback = Principle("feedback", _text(str(path), extra, "critique", "feedback", FEEDBACK_CRITIQUE),
                         _text(str(path), extra, "revision", "feedback", FEEDBACK_REVISION))
    return Constitution(str(path), principles, feedback)


def _principle(source: str, index: int, value: Any) -> Principle:
    where = f"principles[{index}]"
    if not isinstance(value, dict):
        raise DataError(source, "wrong_type", f"expected a mapping with critique and revision, got {value!r:.60}",
                        key=where)
    name = value.get("name", f"principle_{index}")
    if not isinstance(name, str) or not name.strip():
        raise DataError(source, "wrong_type", f"name must be a non-empty string, got {name!r:.40}", key=f"{where}.name")
    return Principle(name, _text(source, value, "critique", where), _text(source, value, "revision", where))


def _text(source: str, value: dict, key: str, where: str, default: str | None = None) -> str:
    text = value.get(key, default)
    if not isinstance(text, str) or not text.strip():
        raise DataError(source, "missing_key" if text is None else "wrong_type",
                        f"needs a non-empty string, got {text!r:.40}", key=f"{where}.{key}")
    return text


def sample_principles(constitution: Constitution, count: int, seed: int, round_: int) -> list[Principle]:
    """One principle per example for round `round_`, drawn uniformly, seeded by (seed, round)."""
    picks = np.random.default_rng([seed, round_]).integers(len(constitution.principles), size=count)
    return [constitution.principles[i] for i in picks]


def as_messages(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
    """A prompt as the conversation's opening: a string becomes one user message."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def critique_messages(prompt, response: str, principle: Principle) -> list[dict[str, str]]:
    """[prompt …, assistant: response, user: the critique request]; the model replies with a critique."""
    return as_messages(prompt) + [{"role": "assistant", "content": response},
                                  {"role": "user", "content": principle.critique}]


def revision_messages(prompt, response: str, principle: Principle, critique: str) -> list[dict[str, str]]:
    """The critique conversation, its critique, then the revision request; the model replies with a revision."""
    return critique_messages(prompt, response, principle) + [{"role": "assistant", "content": critique},
                                                              {"role": "user", "content": principle.revision}]
