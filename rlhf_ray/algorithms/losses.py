"""Token-loss aggregation, the per-token losses of PPO, SFT and the KL/entropy terms, and the
rollout-vs-trainer importance weights (ALGORITHMS.md §5, §8, §10).

- `LossScale`, `aggregate` (+ `token_mean`, `seq_mean_token_mean`, `seq_mean_token_sum_norm`):
  masked reduction of (B, T) token losses, micro-batch invariant (§5.3).
- `policy_loss`: PPO clipped surrogate with clip-higher and dual-clip (§5.1), optionally
  weighted per token by `is_weights` (§10).
- `tis_weights`, `token_mask_weights`, `sequence_mask_weights`: off-policy corrections for the
  rollout engine's μ ≠ the trainer's π_old (§10): truncated IS, token mask, sequence mask.
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
seq-mean-token-sum-norm); Yao et al., "Your efficient RL framework secretly brings you off-policy
RL training" (2025, TIS); Ling team, "IcePop" (2025, token-level masked IS).
"""

import math
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
    is_weights: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """PPO clipped surrogate (ALGORITHMS.md §5.1; Schulman et al. 2017).

    ρ = exp(logp_θ − logp_old),  L_t = −min(ρ·A, clip(ρ, 1 − clip_low, 1 + clip_high)·A).
    clip_high > clip_low is DAPO's clip-higher. `dual_clip` = c > 1 (Ye et al. 2020) bounds
    L_t ≤ −c·A where A < 0. `is_weights` (§10): each token's L_t is multiplied by w_t (detached;
    ρ stays π_θ/π_old, normalisers unchanged); None leaves the loss as it was. All inputs (B, T).
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
    if is_weights is not None:
        token_losses = token_losses * is_weights.detach()
    loss = aggregate(token_losses, response_mask, agg, scale)
    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean((clipped > unclipped).to(ratio.dtype), response_mask),
            "approx_kl": masked_mean(kl_k3(old_logprobs, logprobs), response_mask),
            "ratio_mean": masked_mean(ratio, response_mask),
            "ratio_max": ratio.masked_fill(~response_mask.bool(), float("-inf")).max(),
        }
    return loss, metrics


def tis_weights(
    old_logprobs: Tensor, behaviour_logprobs: Tensor, response_mask: Tensor, cap: float
) -> tuple[Tensor, Metrics]:
    """Truncated importance sampling (ALGORITHMS.md §10; Yao et al. 2025): w_t = min(ρ_t, cap).

    ρ_t = π_old/μ from the trainer's and the rollout engine's log-probs. Inputs (B, T) → w (B, T),
    detached, 0 on padding. Metrics: is_weight_mean, is_truncated_frac (share of real tokens with
    ρ_t > cap), and the mismatch of `mismatch_metrics`.
    """
    with torch.no_grad():
        rho = torch.exp(_log_rho(old_logprobs, behaviour_logprobs, response_mask))  # (B, T)
        weights = _masked(rho.clamp(max=cap), response_mask)
        metrics = {
            "is_weight_mean": masked_mean(weights, response_mask),
            "is_truncated_frac": masked_mean((rho > cap).to(rho.dtype), response_mask),
        }
    return weights, metrics | mismatch_metrics(old_logprobs, behaviour_logprobs, response_mask)


def token_mask_weights(
    old_logprobs: Tensor, behaviour_logprobs: Tensor, response_mask: Tensor, low: float, high: float
) -> tuple[Tensor, Metrics]:
    """Token-level masked importance sampling (ALGORITHMS.md §10; "IcePop", Ling team 2025).

    w_t = 1 where low ≤ ρ_t ≤ high, else 0 (the token leaves the loss); ρ_t = π_old/μ. Inputs
    (B, T) → w (B, T), detached, 0 on padding. Metrics: is_weight_mean, masked_frac (share of real
    tokens dropped), and the mismatch of `mismatch_metrics`.
    """
    with torch.no_grad():
        log_rho = _log_rho(old_logprobs, behaviour_logprobs, response_mask)  # (B, T)
        weights = _masked(_inside(log_rho, low, high).to(log_rho.dtype), response_mask)
        metrics = {
            "is_weight_mean": masked_mean(weights, response_mask),
            "masked_frac": masked_mean(1.0 - weights, response_mask),
        }
    return weights, metrics | mismatch_metrics(old_logprobs, behaviour_logprobs, response_mask)


def sequence_mask_weights(
    old_logprobs: Tensor, behaviour_logprobs: Tensor, response_mask: Tensor, low: float, high: float
) -> tuple[Tensor, Metrics]:
    """Sequence-level masked importance sampling (ALGORITHMS.md §10; veRL's rollout correction).

    The sequence's geometric-mean ratio exp(mean_t log ρ_t) over its response tokens decides for
    all of them: w = 1 on every real token inside [low, high], 0 outside. Inputs (B, T) → w (B, T),
    detached, 0 on padding. Metrics: is_weight_mean, masked_frac (share of sequences with response
    tokens that are dropped), and the mismatch of `mismatch_metrics`.
    """
    with torch.no_grad():
        # not clamped per token (as _log_rho does for exp): the true geometric mean, compared in log space
        log_rho = _masked((old_logprobs - behaviour_logprobs).detach(), response_mask)  # (B, T)
        lengths = response_mask.sum(dim=-1)  # (B,)
        keep = _inside(log_rho.sum(dim=-1) / lengths.clamp(min=1), low, high)  # (B,)
        weights = _masked(keep[:, None].to(log_rho.dtype).expand_as(log_rho), response_mask)
        has_tokens = lengths > 0  # (B,)
        metrics = {
            "is_weight_mean": masked_mean(weights, response_mask),
            "masked_frac": (has_tokens & ~keep).sum().to(log_rho.dtype) / has_tokens.sum().clamp(min=1),
        }
    return weights, metrics | mismatch_metrics(old_logprobs, behaviour_logprobs, response_mask)


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


def _log_rho(old_logprobs: Tensor, behaviour_logprobs: Tensor, response_mask: Tensor) -> Tensor:
    """log ρ_t = log π_old − log μ (§10), detached, clamped to keep exp() finite, 0 on padding. (B, T)"""
    log_rho = (old_logprobs - behaviour_logprobs).detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return _masked(log_rho, response_mask)


def _inside(log_rho: Tensor, low: float, high: float) -> Tensor:
    """low ≤ ρ ≤ high, compared in log space (bool, shape of `log_rho`)."""
    return (log_rho >= math.log(low)) & (log_rho <= math.log(high))


def mismatch_metrics(old_logprobs: Tensor, behaviour_logprobs: Tensor, response_mask: Tensor) -> Metrics:
    """Rollout-vs-trainer mismatch over real tokens (§10): mean |log π_old − log μ| and the k3
    estimate of KL(μ ‖ π_old) from μ's samples (§2)."""
    old, behaviour = old_logprobs.detach(), behaviour_logprobs.detach()
    return {
        "logprob_diff_mean": masked_mean((old - behaviour).abs(), response_mask),
        "mismatch_kl": masked_mean(kl_k3(behaviour, old), response_mask),
    }


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """`x` with padding set to 0 (by selection, so non-finite padding values cannot leak)."""
    return torch.where(mask.bool(), x, 0.0)
