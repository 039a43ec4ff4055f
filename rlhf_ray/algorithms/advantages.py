"""Advantage estimators (ALGORITHMS.md §4).

- `compute_gae`: GAE advantages and returns from per-token rewards and critic values (§4.1).
- `grpo_advantages`, `dr_grpo_advantages`, `rloo_advantages`, `reinforce_baseline_advantages`:
  critic-free, per-sequence advantages from each prompt's group of scores (§4.2);
  `group_advantages` picks one by name.
- `reinforce_pp_returns`: REINFORCE++ returns-to-go over per-token rewards (§4.2).
- `whiten`: masked normalisation over the batch's real tokens (§4.1).
- `broadcast_to_tokens`: a per-sequence value copied onto every real token (§4.2).

Tensors are right-padded (B, T) with `response_mask` (1 = real response token); group scores
are (B,) with each prompt's `group_size` samples contiguous.

References: Schulman et al., "High-Dimensional Continuous Control Using GAE" (2016);
Shao et al., "DeepSeekMath" (2024, GRPO); Liu et al., "Understanding R1-Zero-Like Training"
(2025, Dr. GRPO); Ahmadian et al., "Back to Basics: Revisiting REINFORCE" (2024, RLOO);
Hu, "REINFORCE++" (2025); TRL's `whiten` (shift_mean).
"""

from typing import Callable

import torch
from torch import Tensor


def compute_gae(
    rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """GAE (ALGORITHMS.md §4.1; Schulman et al. 2016): returns (advantages, returns), both (B, T).

    δ_t = rew_t + γ·V_{t+1} − V_t,  A_t = δ_t + γλ·A_{t+1},  returns_t = A_t + V_t.
    The recursion walks real tokens only (padding is skipped, carrying the next real token's
    V and A through it); V after the last real token is 0; padding gets A = 0 and return 0.
    """
    with torch.no_grad():  # a block, not the decorator: mutation testing skips decorated functions
        real = response_mask.bool()  # (B, T)
        next_value = values.new_zeros(values.shape[0])  # (B,) V_{t+1}
        next_advantage = values.new_zeros(values.shape[0])  # (B,) A_{t+1}
        advantages = torch.zeros_like(values)  # (B, T)
        for t in reversed(range(values.shape[1])):
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            advantage = delta + gamma * lam * next_advantage
            advantages[:, t] = torch.where(real[:, t], advantage, 0.0)
            next_advantage = torch.where(real[:, t], advantage, next_advantage)
            next_value = torch.where(real[:, t], values[:, t], next_value)
        returns = torch.where(real, advantages + values, 0.0)
        return advantages, returns


def reinforce_pp_returns(rewards: Tensor, response_mask: Tensor, gamma: float) -> Tensor:
    """REINFORCE++ returns-to-go G_t = rew_t + γ·G_{t+1} over real tokens (§4.2; Hu 2025).

    `rewards` (B, T) per-token (KL in the reward, score on the last real token) → (B, T),
    0 on padding. The caller whitens the result over the whole batch with `whiten`.
    """
    with torch.no_grad():  # a block, not the decorator: mutation testing skips decorated functions
        real = response_mask.bool()  # (B, T)
        next_return = rewards.new_zeros(rewards.shape[0])  # (B,) G_{t+1}
        returns = torch.zeros_like(rewards)  # (B, T)
        for t in reversed(range(rewards.shape[1])):
            next_return = torch.where(real[:, t], rewards[:, t] + gamma * next_return, next_return)
            returns[:, t] = torch.where(real[:, t], next_return, 0.0)
        return returns


def grpo_advantages(scores: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """GRPO: A_i = (s_i − mean(s)) / (std(s) + ε) within each group (§4.2; Shao et al. 2024).

    std is the sample standard deviation (Bessel-corrected, as TRL, OpenRLHF and veRL compute
    it), so a group needs at least 2 samples. `scores` (B,) → (B,).
    """
    if group_size < 2:
        raise ValueError(f"grpo needs group_size >= 2 for a group std, got {group_size}")
    groups = _grouped(scores, group_size)  # (G, n)
    centred = groups - groups.mean(dim=1, keepdim=True)
    return (centred / (groups.std(dim=1, keepdim=True) + eps)).reshape(-1)


def dr_grpo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """Dr. GRPO: A_i = s_i − mean(s) within each group (§4.2; Liu et al. 2025). (B,) → (B,).

    Pair it with the `seq-mean-token-sum-norm` aggregation (§5.3).
    """
    groups = _grouped(scores, group_size)  # (G, n)
    return (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)


def rloo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """RLOO: A_i = s_i − (Σ_{j≠i} s_j)/(n − 1) (§4.2; Ahmadian et al. 2024). (B,) → (B,)."""
    if group_size < 2:
        raise ValueError(
            f"rloo needs group_size >= 2 for a leave-one-out baseline, got {group_size}"
        )
    groups = _grouped(scores, group_size)  # (G, n)
    leave_one_out_mean = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - leave_one_out_mean).reshape(-1)


def reinforce_baseline_advantages(scores: Tensor, group_size: int) -> Tensor:
    """REINFORCE++-baseline: A_i = s_i − mean(s) within each group (§4.2; Hu 2025). (B,) → (B,).

    The estimator then whitens over the whole batch: the caller does that on the token level
    with `whiten(broadcast_to_tokens(advantages, response_mask), response_mask)`.
    """
    return dr_grpo_advantages(scores, group_size)


GROUP_ESTIMATORS: dict[str, Callable[..., Tensor]] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_baseline": reinforce_baseline_advantages,
}


def group_advantages(scores: Tensor, group_size: int, kind: str, eps: float = 1e-6) -> Tensor:
    """Per-sequence advantages of the named critic-free estimator (ALGORITHMS.md §4.2).

    `kind`: "grpo" | "dr_grpo" | "rloo" | "reinforce_baseline"; `eps` is used by grpo only.
    `scores` (B,) float, each prompt's `group_size` samples contiguous → (B,) float32.
    A group whose scores are all equal gets zero advantage.
    """
    if kind not in GROUP_ESTIMATORS:
        raise ValueError(
            f"unknown group estimator {kind!r}; valid kinds: {sorted(GROUP_ESTIMATORS)}"
        )
    if kind == "grpo":
        return grpo_advantages(scores, group_size, eps)
    return GROUP_ESTIMATORS[kind](scores, group_size)


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x − mean) / sqrt(var + eps) over the entries where `mask` is 1 (ALGORITHMS.md §4.1).

    Mean and (population) variance are masked; with `shift_mean=False` the mean is added back
    (scale only, as TRL's `whiten`). `x`, `mask` (B, T) → (B, T), 0 where `mask` is 0.
    """
    real = mask.bool()
    count = real.sum().clamp(min=1)
    mean = torch.where(real, x, 0.0).sum() / count
    var = torch.where(real, (x - mean).square(), 0.0).sum() / count
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(real, whitened, 0.0)


def broadcast_to_tokens(seq_values: Tensor, response_mask: Tensor) -> Tensor:
    """Copy a per-sequence value onto each real token, 0 on padding (§4.2).

    `seq_values` (B,), `response_mask` (B, T) → (B, T).
    """
    return seq_values.unsqueeze(-1) * response_mask.to(seq_values.dtype)


def _grouped(scores: Tensor, group_size: int) -> Tensor:
    """(B,) → (B / group_size, group_size) float32; B must be a multiple of group_size."""
    if group_size < 1 or scores.shape[0] % group_size != 0:
        raise ValueError(
            f"batch of {scores.shape[0]} scores is not a whole number of groups of {group_size}"
        )
    return scores.float().reshape(-1, group_size)
