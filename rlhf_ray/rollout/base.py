"""The `RolloutEngine` interface: what every generation backend (HF generate, vLLM) provides.

Engines are token-in/token-out: prompt token ids in, a `Samples` batch out, so no text is
re-tokenised between generation and training. Engines never produce the log-probs used for the
PPO ratio on-policy: old log-probs come from a policy forward pass (ARCHITECTURE.md §3). With
`SamplingParams.logprobs` an engine also returns its behaviour log-probs (log-softmax of its own
logits at temperature T, before any suppression or top-k/top-p): π_old of the one-step
off-policy mode, and the engine-vs-trainer mismatch metric.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from rlhf_ray.batch import Samples


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings for one `generate` call (mapped from `RolloutConfig`)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    n: int = 1  # samples per prompt, contiguous in the output
    greedy: bool = False  # evaluation decoding; ignores temperature/top-p/top-k
    suppress_special_tokens: bool = False  # never sample special tokens (EOS included)
    logprobs: bool = False  # also return the behaviour log-probs of the sampled tokens (Samples.logprobs)


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> Samples:
        """Sample `params.n` responses per prompt; rows [i·n, (i+1)·n) belong to prompt i."""

    def load_weights(self, named_arrays: dict[str, np.ndarray]) -> None:
        """Copy (a bucket of) new policy weights in, by parameter name."""

    def weights_checksum(self) -> float:
        """Sum of all weights in float64: compared with the sender's after a sync."""

    def sleep(self) -> None:
        """Free memory while training runs (GPU engines); a no-op where there is nothing to free."""

    def wake(self) -> None:
        """Undo `sleep` before the next generation."""
