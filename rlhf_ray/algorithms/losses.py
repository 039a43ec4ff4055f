"""Token-loss aggregation and the per-token losses of PPO, SFT and the KL/entropy terms
(ALGORITHMS.md §5, §8).

- `LossScale`, `aggregate` (+ `token_mean`, `seq_mean_token_mean`, `seq_mean_token_sum_norm`):
  masked reduction of (B, T) token losses, micro-batch invariant (§5.3).
- `policy_loss`: PPO clipped surrogate with clip-higher and dual-clip (§5.1).
- `value_loss`: clipped value loss (§5.2).
- `sft_loss`: token negative log-likelihood of the response (§8).
- `kl_loss`, `entropy_bonus`: the β·KL and c_H·entropy terms of the total loss (§5.4).
- `masked_mean`: mean over real tokens, used for metrics.

Every loss returns (scalar loss, metrics); metrics are detached 0-d tensors, means over the
local batch's real tokens.

References: Schulman et al., "Proximal Policy Optimization Algorithms" (2017); Huang et al.,
"The 37 implementation details of PPO" (2022) and "The N implementation details of RLHF with
PPO" (2024); Yu et al., "DAPO" (2025, clip-higher, token-mean); Ye et al., "Mastering Complex
Control in MOBA Games with Deep RL" (2020, dual-clip); Shao et al., "DeepSeekMath" (2024,
seq-mean-token-mean, KL in the loss); Liu et al., "Understanding R1-Zero-Like Training" (2025,
seq-mean-token-sum-norm).
"""

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from rlhf_ray.algorithms.kl import LOG_RATIO_CLAMP, kl_k3, kl_penalty

Metrics = dict[str, Tensor]


@dataclass(frozen=True)
class LossScale:
    """Normalisers of a WHOLE mini-batch, shared by its micro-batches (ALGORITHMS.md §5.3).

    With gradient accumulation each micro-batch divides by these instead of its own counts, so
    the micro-batch losses (and gradients) sum to exactly the mini-batch's. Under data
    parallelism, count over all ranks' micro-batches of the mini-batch.
    """

    num_tokens: float  # real response tokens in the mini-batch
    num_seqs: float  # sequences with at least one real response token
    max_len: int  # the constant of seq-mean-token-sum-norm: the max response length

    @classmethod
    def from_mask(cls, response_mask: Tensor, max_len: int | None = None) -> "LossScale":
        """Counts of `response_mask` (B, T); `max_len` defaults to T."""
        tokens_per_seq = response_mask.sum(dim=-1)  # (B,)
        return cls(
            num_tokens=max(float(tokens_per_seq.sum()), 1.0),
            num_seqs=max(float((tokens_per_seq > 0).sum()), 1.0),
            max_len=response_mask.shape[-1] if max_len is None else max_len,
        )


def token_mean(token_losses: Tensor, mask: Tensor, scale: LossScale) -> Tensor:
    """Σ over real tokens / number of real tokens in the mini-batch (§5.3; DAPO default)."""
    return _masked(token_losses, mask).sum() / scale.num_tokens


def seq_mean_token_mean(token_losses: Tensor, mask: Tensor, scale: LossScale) -> Tensor:
    """Mean over each sequence's tokens, then mean over the mini-batch's sequences (§5.3; GRPO)."""
    seq_sums = _masked(token_losses, mask).sum(dim=-1)  # (B,)
    seq_lens = mask.sum(dim=-1).clamp(min=1)  # (B,)
    return (seq_sums / seq_lens).sum() / scale.num_seqs


def seq_mean_token_sum_norm(token_losses: Tensor, mask: Tensor, scale: LossScale) -> Tensor:
    """Σ over each sequence's tokens / max_len, then mean over sequences (§5.3; Dr. GRPO)."""
    return _masked(token_losses, mask).sum() / (scale.max_len * scale.num_seqs)


AGGREGATIONS: dict[str, Callable[[Tensor, Tensor, LossScale], Tensor]] = {
    "token-mean": token_mean,
    "seq-mean-token-mean": seq_mean_token_mean,
    "seq-mean-token-sum-norm": seq_mean_token_sum_norm,
}


def aggregate(
    token_losses: Tensor, mask: Tensor, mode: str, scale: LossScale | None = None
) -> Tensor:
    """Reduce (B, T) token losses over real tokens to a scalar (ALGORITHMS.md §5.3).

    `mode`: "token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum-norm". Without `scale`
    the batch's own counts are used (max_len = T); with the mini-batch's `scale` the result is
    this micro-batch's share, and the shares of all micro-batches sum to the mini-batch value.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {mode!r}; valid modes: {sorted(AGGREGATIONS)}")
    scale = LossScale.from_mask(mask) if scale is None else scale
    return AGGREGATIONS[mode](token_losses, mask, scale)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of `x` over entries where `mask` is 1; 0 when there are none. (B, T) → 0-d."""
    return _masked(x, mask).sum() / mask.sum().clamp(min=1)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    scale: LossScale | None = None,
) -> tuple[Tensor, Metrics]:
    """PPO clipped surrogate (ALGORITHMS.md §5.1; Schulman et al. 2017).

    ρ = exp(logp_θ − logp_old),  L_t = −min(ρ·A, clip(ρ, 1 − clip_low, 1 + clip_high)·A).
    clip_high > clip_low is DAPO's clip-higher. `dual_clip` = c > 1 (Ye et al. 2020) bounds
    L_t ≤ −c·A where A < 0. All inputs (B, T).
    Metrics: clip_frac (share of real tokens where the clipped branch is taken), approx_kl
    (k3 of logp_old − logp_θ), ratio_mean, ratio_max.
    """
    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (B, T)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    token_losses = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        bounded = torch.minimum(token_losses, -dual_clip * advantages)
        token_losses = torch.where(advantages < 0, bounded, token_losses)
    loss = aggregate(token_losses, response_mask, agg, scale)
    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean((clipped > unclipped).to(ratio.dtype), response_mask),
            "approx_kl": masked_mean(kl_k3(old_logprobs, logprobs), response_mask),
            "ratio_mean": masked_mean(ratio, response_mask),
            "ratio_max": ratio.masked_fill(~response_mask.bool(), float("-inf")).max(),
        }
    return loss, metrics


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    response_mask: Tensor,
    clip: float | None = 0.2,
    agg: str = "token-mean",
    scale: LossScale | None = None,
) -> tuple[Tensor, Metrics]:
    """Clipped value loss (ALGORITHMS.md §5.2; "37 implementation details of PPO", #9).

    V_clip = V_old + clip(V − V_old, −clip, clip),  L_t = ½·max((V − R)², (V_clip − R)²);
    `clip=None` gives the unclipped ½(V − R)². All inputs (B, T).
    Metrics: clip_frac (share of real tokens where the clipped term is larger), values_mean.
    """
    unclipped = (values - returns).square()  # (B, T)
    if clip is None:
        token_losses, clipped_active = 0.5 * unclipped, torch.zeros_like(unclipped)
    else:
        values_clipped = old_values + (values - old_values).clamp(-clip, clip)
        clipped = (values_clipped - returns).square()
        token_losses = 0.5 * torch.maximum(unclipped, clipped)
        clipped_active = (clipped > unclipped).to(values.dtype)
    loss = aggregate(token_losses, response_mask, agg, scale)
    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean(clipped_active, response_mask),
            "values_mean": masked_mean(values, response_mask),
        }
    return loss, metrics


def sft_loss(
    logprobs: Tensor,
    response_mask: Tensor,
    agg: str = "token-mean",
    scale: LossScale | None = None,
) -> tuple[Tensor, Metrics]:
    """Negative log-likelihood of the response tokens (ALGORITHMS.md §8).

    `logprobs` (B, T) of the target tokens; prompt tokens are 0 in the caller's `response_mask`.
    Metrics: nll (mean over real tokens).
    """
    loss = aggregate(-logprobs, response_mask, agg, scale)
    return loss, {"nll": masked_mean(-logprobs.detach(), response_mask)}


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    response_mask: Tensor,
    kind: str = "k3",
    agg: str = "token-mean",
    scale: LossScale | None = None,
) -> tuple[Tensor, Metrics]:
    """Aggregated KL(π_θ ‖ π_ref) estimate for "KL in the loss" (ALGORITHMS.md §2, §5.4; GRPO).

    The caller adds β · loss. Inputs (B, T). Metrics: kl (mean over real tokens).
    """
    token_kl = kl_penalty(logprobs, ref_logprobs, kind)  # (B, T)
    loss = aggregate(token_kl, response_mask, agg, scale)
    return loss, {"kl": masked_mean(token_kl.detach(), response_mask)}


def entropy_bonus(
    entropy: Tensor,
    response_mask: Tensor,
    agg: str = "token-mean",
    scale: LossScale | None = None,
) -> tuple[Tensor, Metrics]:
    """Aggregated per-token entropy (ALGORITHMS.md §5.4); the caller subtracts c_H · value.

    `entropy` (B, T) from `entropy_from_logits`. Metrics: entropy (mean over real tokens).
    """
    value = aggregate(entropy, response_mask, agg, scale)
    return value, {"entropy": masked_mean(entropy.detach(), response_mask)}


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """`x` with padding set to 0 (by selection, so non-finite padding values cannot leak)."""
    return torch.where(mask.bool(), x, 0.0)
