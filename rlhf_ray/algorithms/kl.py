"""KL between policy and reference, and the KL coefficient β (ALGORITHMS.md §2).

- `kl_k1`, `kl_k2`, `kl_k3`: per-token estimators of KL(π_θ ‖ π_ref) from samples of π_θ.
- `kl_penalty`: pick one of them by name.
- `FixedKLController`, `AdaptiveKLController`: β, constant or adapted towards a target KL.

References: J. Schulman, "Approximating KL divergence" (2020), http://joschu.net/blog/kl-approx.html;
D. Ziegler et al., "Fine-Tuning Language Models from Human Preferences" (2019), §2.2 (adaptive β).
"""

from typing import Callable

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0  # exp(20) ≈ 5e8: keeps exp() finite in float32 for any log-ratio
ADAPTIVE_KL_ERROR_CLIP = 0.2


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = r, r = logp_θ − logp_ref: unbiased, high variance, can be negative (§2)."""
    return logprobs - ref_logprobs  # (B, T)


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = ½ r²: biased, low variance, ≥ 0 (§2, Schulman 2020)."""
    return 0.5 * (logprobs - ref_logprobs).square()  # (B, T)


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = exp(−r) − 1 + r: unbiased, low variance, always ≥ 0 (§2, Schulman 2020).

    r is clamped to ±LOG_RATIO_CLAMP before exp, so a huge log-ratio gives a large finite value.
    """
    log_ratio = (logprobs - ref_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (B, T)
    return torch.expm1(-log_ratio) + log_ratio


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str) -> Tensor:
    """Per-token KL estimate of the named kind, "k1" | "k2" | "k3" (ALGORITHMS.md §2).

    `logprobs`, `ref_logprobs` (B, T) → (B, T); padding is left to the caller's mask.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; valid kinds: {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[kind](logprobs, ref_logprobs)


class FixedKLController:
    """A constant KL coefficient β (ALGORITHMS.md §2); `update` does nothing."""

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def update(self, kl: float, n_steps: int) -> None:
        """No-op: β stays fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """β adapted towards a target KL (ALGORITHMS.md §2; Ziegler et al. 2019, §2.2).

    After a step with measured KL: e = clip(KL / target − 1, −0.2, 0.2),
    β ← β · (1 + e · n_steps / horizon).
    """

    def __init__(self, init: float, target: float, horizon: float) -> None:
        self.value = float(init)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, kl: float, n_steps: int) -> None:
        """Move β up when the measured `kl` is above target, down when below."""
        error = kl / self.target - 1.0
        error = min(max(error, -ADAPTIVE_KL_ERROR_CLIP), ADAPTIVE_KL_ERROR_CLIP)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """Only β: target and horizon come from the run's config."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
