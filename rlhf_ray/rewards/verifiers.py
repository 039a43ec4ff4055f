"""Verifiable (rule) rewards for RLVR, usable as `reward.sources[i].path: rlhf_ray.rewards.verifiers:<name>`.

Each takes (prompts, responses, metadata) and returns one float per sample; the reference answer
comes from the dataset's `answer` column (every extra column reaches rewards as metadata).
"""

from __future__ import annotations

import re

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_answer(text: str) -> str | None:
    """The last `\\boxed{...}` content, else the last number in the text, else None."""
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def _same(answer: str | None, reference: str) -> bool:
    if answer is None:
        return False
    try:
        return abs(float(answer.replace(",", "")) - float(str(reference).replace(",", ""))) < 1e-6
    except ValueError:
        return answer.strip() == str(reference).strip()


def math_answer(prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
    """1.0 when the response's final answer (last \\boxed{} or last number) equals metadata['answer']
    numerically (or textually for non-numbers), else 0.0 — the GSM8K/MATH-style RLVR check."""
    return [float(_same(final_answer(r), m["answer"])) for r, m in zip(responses, metadata)]
