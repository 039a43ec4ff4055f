"""The `RewardSource` interface and the checks every source's scores pass (ARCHITECTURE.md §5).

A source maps a batch of (prompt, response) texts to one finite float per sample. A bad value
(NaN, inf, not a number, wrong count) or an exception is a `RewardError` that names the source
and the sample; it is never silently scored 0.
"""

from __future__ import annotations

import math
from typing import Any, Protocol


class RewardSource(Protocol):
    name: str  # metrics key: reward/<name>

    def score(self, prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
        """One finite float per sample; `metadata[i]` carries e.g. `stopped` (the response ended with EOS)."""


VIOLATIONS = ("exception", "timeout", "wrong_count", "wrong_type", "non_finite")


class RewardError(RuntimeError):
    """A reward source failed or returned a bad value; `index` is the sample, None for batch-level failures;
    `kind` is one of VIOLATIONS (the reward contract's counters)."""

    def __init__(self, source: str, message: str, index: int | None = None, kind: str = "exception"):
        where = f" (sample {index})" if index is not None else ""
        super().__init__(f"reward source '{source}'{where}: {message}")
        self.source = source
        self.message = message
        self.index = index
        self.kind = kind

    def __reduce__(self):  # crosses Ray process boundaries intact
        return (RewardError, (self.source, self.message, self.index, self.kind))


def check_scores(source_name: str, scores: Any, n: int) -> list[float]:
    """`scores` as n finite Python floats, or a RewardError naming the source and the first bad sample."""
    try:
        if isinstance(scores, (str, bytes, dict)):
            raise TypeError
        count = len(scores)
    except TypeError:
        raise RewardError(source_name, f"returned {_show(scores)}, expected a list of {n} floats",
                          kind="wrong_type") from None
    if count != n:
        raise RewardError(source_name, f"returned {count} scores for {n} samples", kind="wrong_count")
    out = []
    for i, value in enumerate(scores):
        try:
            if isinstance(value, (str, bytes)):
                raise TypeError
            x = float(value)
        except (TypeError, ValueError):
            raise RewardError(source_name, f"score {_show(value)} is not a number", i, kind="wrong_type") from None
        if not math.isfinite(x):
            raise RewardError(source_name, f"score {x} is not finite", i, kind="non_finite")
        out.append(x)
    return out


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return f"{text[:limit]}… ({type(value).__name__})" if len(text) > limit else f"{text} ({type(value).__name__})"
