"""Toy feedback for the vowel task: a feedback file of every kind and a short constitution.

`write_toy_feedback` writes records in the schema of `rlhf_ray.data.feedback`, judged by the task's
hidden rule (more vowels is better): comparisons (every 8th a tie), 1–5 ratings of three responses
per prompt, thumbs (up when at least half the letters are vowels), edits (consonants turned into
vowels) and critiques. `TOY_CONSTITUTION` has principles short enough for the toy models' 256
positions; `configs/constitutions/example.yaml` is an example for real models.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from rlhf_ray.toy.task import VOWELS, ToyTask, toy_score

TOY_CONSTITUTION = {
    "principles": [
        {"name": "vowels", "critique": "Which letters are not vowels?", "revision": "Rewrite it with more vowels."},
        {"name": "short", "critique": "Is it too long?", "revision": "Rewrite it shorter."},
        {"name": "lowercase", "critique": "Is it only lowercase letters?", "revision": "Rewrite it in lowercase."},
    ],
    "feedback": {"critique": "Critique it.", "revision": "Rewrite it to fix that."},
}


def write_toy_constitution(path: str | Path) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(TOY_CONSTITUTION, sort_keys=False))
    return str(path)


def toy_feedback_records(seed: int = 0, n: int = 16) -> list[dict]:
    """n prompts' worth of each kind of record (3n ratings), in a fixed order for a seed."""
    task = ToyTask(seed)
    records = []
    for i, ranked in enumerate(task.ranked_lists(n, k=3)):
        prompt, (best, middle, worst) = ranked.prompt, ranked.responses
        a, b = (best, worst) if i % 2 else (worst, best)
        choice = "tie" if i % 8 == 7 else ("a" if a == best else "b")
        records.append({"kind": "comparison", "prompt": prompt, "response_a": a, "response_b": b, "choice": choice})
        records += [{"kind": "rating", "prompt": prompt, "response": r, "rating": 1 + round(4 * toy_score("", r))}
                    for r in (best, middle, worst)]
        records.append({"kind": "binary", "prompt": prompt, "response": middle,
                        "thumbs": "up" if toy_score("", middle) >= 0.5 else "down"})
        records.append({"kind": "edit", "prompt": prompt, "original": worst, "corrected": more_vowels(worst)})
        records.append({"kind": "critique", "prompt": prompt, "response": worst, "critique": "Too few vowels."})
    return records


def more_vowels(text: str) -> str:
    """Every other consonant turned into the vowel 'a' (an annotator's correction)."""
    out, flip = [], False
    for c in text:
        if c not in VOWELS:
            flip = not flip
            c = "a" if flip else c
        out.append(c)
    return "".join(out)


def write_toy_feedback(path: str | Path, seed: int = 0, n: int = 16) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in toy_feedback_records(seed, n)))
    return str(path)
