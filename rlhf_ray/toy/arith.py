"""The synthetic "arith" task: single-digit sums with a verifiable exact-answer reward (RLVR).

Prompts are `"a+b="` with a, b in 0..9; each row carries its `answer` (the decimal sum) as a
column, which reaches reward functions as `metadata["answer"]`. `exact_answer` is the shipped
rule reward: 1.0 when the response, stripped of surrounding whitespace, equals the answer;
`digits_format` is a shaping reward for the answer's format (one or two digits).
Seeded and deterministic like the vowel task; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class ArithDataPaths:
    """JSONL files written by `write_arith_datasets` (`{"prompt", "answer"}` rows)."""

    prompts_train: str
    prompts_eval: str


def arith_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    return rows


def exact_answer(prompts: list[str], responses: list[str], metadata: list[dict] | None = None) -> list[float]:
    """1.0 where `response.strip() == metadata[i]["answer"]`, else 0.0 (a verifiable reward)."""
    if metadata is None or len(metadata) != len(responses):
        raise ValueError("exact_answer needs one metadata dict with an 'answer' per response")
    return [float(r.strip() == str(m["answer"])) for r, m in zip(responses, metadata)]


def digits_format(prompts: list[str], responses: list[str], metadata: list[dict] | None = None) -> list[float]:
    """1.0 where the response is one or two digits (the answer's format), else 0.0: a shaping reward."""
    return [float(r.strip().isdigit() and len(r.strip()) <= 2) for r in responses]


def write_arith_datasets(out_dir: str | Path, seed: int = 0, n_train: int = 512, n_eval: int = 64) -> ArithDataPaths:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = arith_rows(n_train + n_eval, seed)
    paths = {}
    for split, part in (("train", rows[:n_train]), ("eval", rows[n_train:])):
        path = out_dir / f"arith_{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
        paths[f"prompts_{split}"] = str(path)
    return ArithDataPaths(**paths)
