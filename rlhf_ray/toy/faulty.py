"""Deliberately misbehaving reward functions, for reward-contract tests and drills.

Each misbehaves only on responses containing a marker character, so a test can count exactly which
samples violate the contract: `raise_on_q` raises for responses with 'q', `nan_on_z` returns NaN
for responses with 'z', `short_list` returns one score too few, `not_numbers` returns strings.
Elsewhere they score like `vowel_reward`.
"""

from __future__ import annotations

import math

from rlhf_ray.toy.task import toy_score


def raise_on_q(prompts: list[str], responses: list[str], metadata: list[dict] | None = None) -> list[float]:
    if any("q" in r for r in responses):
        raise RuntimeError("reward code crashed on a response containing 'q'")
    return [toy_score(p, r) for p, r in zip(prompts, responses)]


def nan_on_z(prompts: list[str], responses: list[str], metadata: list[dict] | None = None) -> list[float]:
    return [math.nan if "z" in r else toy_score(p, r) for p, r in zip(prompts, responses)]


def short_list(prompts: list[str], responses: list[str], metadata: list[dict] | None = None) -> list[float]:
    return [toy_score(p, r) for p, r in zip(prompts, responses)][:-1]


def not_numbers(prompts: list[str], responses: list[str], metadata: list[dict] | None = None) -> list:
    return ["high" for _ in responses]
