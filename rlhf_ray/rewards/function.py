"""`FunctionReward`: a Python function named `module:function` as a reward source (rule-based,
verifiable rewards such as `rlhf_ray.toy.task:vowel_reward`).

Contract: `fn(prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]`,
one finite float per sample, pure (same inputs, same scores). The module must be importable
where the reward worker runs (installed, or on PYTHONPATH).

When the batch call raises, the function is called again one sample at a time to find the first
sample that reproduces the error, so the RewardError can name it; the function being pure makes
this safe, and it costs time only on the way to stopping the run.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from rlhf_ray.rewards.base import RewardError, check_scores


class FunctionReward:
    def __init__(self, spec: str, name: str | None = None):
        self.spec = spec
        self.fn = import_function(spec, name or spec)
        self.name = name or spec.rpartition(":")[2]

    def score(self, prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
        try:
            scores = self.fn(prompts, responses, metadata)
        except Exception as error:
            index = self._first_failing_sample(prompts, responses, metadata)
            raise RewardError(self.name, f"{self.spec} raised {type(error).__name__}: {error}", index) from error
        return check_scores(self.name, scores, len(prompts))

    def _first_failing_sample(self, prompts: list[str], responses: list[str], metadata: list[dict]) -> int | None:
        for i in range(len(prompts)):
            try:
                self.fn(prompts[i : i + 1], responses[i : i + 1], metadata[i : i + 1])
            except Exception:
                return i
        return None  # fails only on the whole batch


def import_function(spec: str, source_name: str) -> Callable:
    """The callable named by `module.path:function`, or a RewardError that says what is missing."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RewardError(source_name, f"'{spec}' is not of the form module.path:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise RewardError(source_name, f"cannot import module '{module_name}' of '{spec}': {error}") from error
    fn = getattr(module, attr, None)
    if fn is None:
        raise RewardError(source_name, f"module '{module_name}' has no attribute '{attr}' (from '{spec}')")
    if not callable(fn):
        raise RewardError(source_name, f"'{spec}' is a {type(fn).__name__}, not a function")
    return fn
