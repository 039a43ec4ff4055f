"""Reward-model losses and offline preference optimisation (ALGORITHMS.md §6, §7).

- `bradley_terry_loss`, `listwise_loss`: reward-model training on pairs / rankings (§6).
- `dpo_loss` (with cDPO label smoothing), `ipo_loss`: reference-based pairwise losses (§7).
- `simpo_loss`, `orpo_loss`: reference-free pairwise losses on length-averaged log-probs (§7).
- `kto_loss`: unpaired desirable/undesirable examples (§7).
- `rrhf_loss`: ranking hinge over K candidates plus SFT on the best one (§7).

Inputs are per-sequence (B,) tensors (or (B, K) for K candidates): summed response log-probs
ℓ(y) = Σ_t logp[t], or their length averages ℓ(y)/|y| where a name says `avg`. Each function
returns (scalar loss, metrics); metrics are detached 0-d tensors. log σ is always `logsigmoid`.

References: Bradley & Terry (1952); Ouyang et al., "InstructGPT" (2022); Rafailov et al., "Direct
Preference Optimization" (2023); Mitchell, "A note on DPO with noisy preferences" (2023, cDPO);
Azar et al., "A General Theoretical Paradigm to Understand Learning from Human Preferences"
(2023, IPO); Meng et al., "SimPO" (2024); Hong et al., "ORPO" (2024); Ethayarajh et al., "KTO"
(2024); Yuan et al., "RRHF" (2023).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

Metrics = dict[str, Tensor]

LOG_2 = math.log(2.0)
ORPO_MAX_AVG_LOGPROB = -1e-6  # p = 1 exactly would make log odds infinite and its gradient NaN


def bradley_terry_loss(
    chosen: Tensor, rejected: Tensor, margin: float | Tensor = 0.0
) -> tuple[Tensor, Metrics]:
    """Pairwise reward-model loss −log σ(r_chosen − r_rejected − m) (§6; Bradley & Terry 1952).

    `chosen`, `rejected` (B,) rewards; `margin` a float or (B,) tensor, ≥ 0.
    Metrics: accuracy (share with r_chosen > r_rejected), margin (mean r_chosen − r_rejected),
    reward_mean, reward_std (over chosen and rejected together).
    """
    diff = chosen - rejected  # (B,)
    loss = -F.logsigmoid(diff - margin).mean()
    rewards = torch.cat([chosen, rejected]).detach()  # (2B,)
    metrics = _pair_metrics(chosen.detach(), rejected.detach()) | {
        "reward_mean": rewards.mean(),
        "reward_std": rewards.std(),
    }
    return loss, metrics


def listwise_loss(scores: Tensor) -> tuple[Tensor, Metrics]:
    """InfoNCE over K ranked candidates, best first: −log(exp(r_1) / Σ_i exp(r_i)) (§6).

    `scores` (B, K) rewards, column 0 the best. With K = 2 this is Bradley–Terry.
    Metrics: accuracy (share where the best outscores every other), margin (mean r_1 − max others).
    """
    loss = (torch.logsumexp(scores, dim=-1) - scores[:, 0]).mean()
    best_other = scores[:, 1:].max(dim=-1).values.detach()  # (B,)
    return loss, _pair_metrics(scores[:, 0].detach(), best_other)


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Metrics]:
    """DPO −log σ(β·h), or cDPO with label smoothing ε (§7; Rafailov et al. 2023; Mitchell 2023).

    h = (ℓ_θ(y_c) − ℓ_ref(y_c)) − (ℓ_θ(y_r) − ℓ_ref(y_r)), all inputs (B,) summed log-probs.
    cDPO: −(1 − ε)·log σ(β·h) − ε·log σ(−β·h). At θ = ref the loss is log 2.
    Metrics: rewards/chosen, rewards/rejected (implicit rewards β(ℓ_θ − ℓ_ref)),
    rewards/accuracy, rewards/margin.
    """
    chosen_logratios = policy_chosen - ref_chosen  # (B,)
    rejected_logratios = policy_rejected - ref_rejected  # (B,)
    logits = beta * (chosen_logratios - rejected_logratios)
    eps = label_smoothing
    losses = -(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    metrics = _implicit_reward_metrics(beta * chosen_logratios, beta * rejected_logratios)
    return losses.mean(), metrics


def ipo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
) -> tuple[Tensor, Metrics]:
    """IPO (h − 1/(2β))² (§7; Azar et al. 2023).

    Inputs (B,) are length-averaged log-probs ℓ(y)/|y|; h as in `dpo_loss`.
    Metrics as `dpo_loss` (implicit rewards β(ℓ_θ − ℓ_ref)).
    """
    chosen_logratios = policy_chosen - ref_chosen  # (B,)
    rejected_logratios = policy_rejected - ref_rejected  # (B,)
    h = chosen_logratios - rejected_logratios
    loss = (h - 1.0 / (2.0 * beta)).square().mean()
    return loss, _implicit_reward_metrics(beta * chosen_logratios, beta * rejected_logratios)


def simpo_loss(
    chosen_avg: Tensor, rejected_avg: Tensor, beta: float, gamma: float
) -> tuple[Tensor, Metrics]:
    """SimPO −log σ(β·ℓ_θ(y_c)/|y_c| − β·ℓ_θ(y_r)/|y_r| − γ), no reference (§7; Meng et al. 2024).

    `chosen_avg`, `rejected_avg` (B,) length-averaged log-probs; `gamma` the target margin.
    Metrics: rewards/* with the implicit reward β·ℓ/|y|.
    """
    chosen_rewards, rejected_rewards = beta * chosen_avg, beta * rejected_avg  # (B,)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma).mean()
    return loss, _implicit_reward_metrics(chosen_rewards, rejected_rewards)


def orpo_loss(
    chosen_avg: Tensor, rejected_avg: Tensor, chosen_nll: Tensor, lam: float
) -> tuple[Tensor, Metrics]:
    """ORPO L_SFT(y_c) − λ·log σ(log odds(y_c) − log odds(y_r)) (§7; Hong et al. 2024).

    p = exp(ℓ/|y|), log odds = log p − log(1 − p), with log(1 − p) computed stably (log1mexp).
    `chosen_avg`, `rejected_avg` (B,) length-averaged log-probs; `chosen_nll` (B,) or 0-d, the
    chosen response's SFT loss. Metrics: nll, log_odds_ratio (mean), rewards/accuracy (share with
    log odds(y_c) > log odds(y_r)).
    """
    log_odds_ratio = _log_odds(chosen_avg) - _log_odds(rejected_avg)  # (B,)
    odds_ratio_loss = -F.logsigmoid(log_odds_ratio).mean()
    loss = chosen_nll.mean() + lam * odds_ratio_loss
    metrics = {
        "nll": chosen_nll.detach().mean(),
        "odds_ratio_loss": odds_ratio_loss.detach(),
        "log_odds_ratio": log_odds_ratio.detach().mean(),
        "rewards/accuracy": (log_odds_ratio.detach() > 0).float().mean(),
    }
    return loss, metrics


def kto_loss(
    logratios: Tensor,
    desirable: Tensor,
    kl_ref: float | Tensor,
    beta: float,
    w_d: float,
    w_u: float,
) -> tuple[Tensor, Metrics]:
    """KTO on unpaired examples (§7; Ethayarajh et al. 2024).

    r = ℓ_θ(y) − ℓ_ref(y) (`logratios`, (B,)); z_0 = max(0, `kl_ref`), detached;
    desirable: λ_D·(1 − σ(β(r − z_0))), undesirable: λ_U·(1 − σ(β(z_0 − r))); mean over B.
    `desirable` (B,) bool. Metrics: rewards/chosen, rewards/rejected (mean β·r over desirable /
    undesirable examples, 0 when there are none), kl (z_0).
    """
    z0 = torch.as_tensor(kl_ref, dtype=logratios.dtype).detach().clamp(min=0.0)
    desirable = desirable.bool()
    desirable_losses = w_d * torch.sigmoid(-beta * (logratios - z0))  # 1 − σ(x) = σ(−x)
    undesirable_losses = w_u * torch.sigmoid(-beta * (z0 - logratios))
    loss = torch.where(desirable, desirable_losses, undesirable_losses).mean()
    rewards = beta * logratios.detach()  # (B,)
    metrics = {
        "rewards/chosen": _subset_mean(rewards, desirable),
        "rewards/rejected": _subset_mean(rewards, ~desirable),
        "kl": z0,
    }
    return loss, metrics


def rrhf_loss(avg_logprobs: Tensor, scores: Tensor, best_nll: Tensor) -> tuple[Tensor, Metrics]:
    """RRHF Σ_{s_i < s_j} max(0, p_i − p_j) + L_SFT(best candidate) (§7; Yuan et al. 2023).

    `avg_logprobs` (B, K) p_i = ℓ_θ(y_i)/|y_i|; `scores` (B, K) candidate scores; `best_nll` (B,)
    or 0-d, the SFT loss of each row's best-scored candidate. The rank term is summed over pairs
    within a row, then both terms are averaged over B. Metrics: rank_loss, nll.
    """
    worse_than = scores.unsqueeze(-1) < scores.unsqueeze(-2)  # (B, K, K): s_i < s_j
    violations = (avg_logprobs.unsqueeze(-1) - avg_logprobs.unsqueeze(-2)).relu()  # p_i − p_j
    rank_loss = torch.where(worse_than, violations, 0.0).sum(dim=(-2, -1)).mean()
    loss = rank_loss + best_nll.mean()
    return loss, {"rank_loss": rank_loss.detach(), "nll": best_nll.detach().mean()}


def _log_odds(avg_logprob: Tensor) -> Tensor:
    """log(p / (1 − p)) for p = exp(ℓ): ℓ − log1mexp(ℓ), stable as p → 0 and p → 1."""
    avg_logprob = avg_logprob.clamp(max=ORPO_MAX_AVG_LOGPROB)
    return avg_logprob - _log1mexp(avg_logprob)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0 (Mächler 2012: expm1 near 0, log1p far from 0)."""
    near_zero = x > -LOG_2
    return torch.where(  # each branch clamped so the one not taken has a finite gradient
        near_zero,
        torch.log(-torch.expm1(x.clamp(min=-LOG_2))),
        torch.log1p(-torch.exp(x.clamp(max=-LOG_2))),
    )


def _implicit_reward_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Metrics:
    """rewards/{chosen, rejected, accuracy, margin} of (B,) implicit rewards."""
    chosen, rejected = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracy": (chosen > rejected).float().mean(),
        "rewards/margin": (chosen - rejected).mean(),
    }


def _pair_metrics(better: Tensor, worse: Tensor) -> Metrics:
    """accuracy (share with better > worse) and margin (mean better − worse) of (B,) rewards."""
    return {"accuracy": (better > worse).float().mean(), "margin": (better - worse).mean()}


def _subset_mean(x: Tensor, keep: Tensor) -> Tensor:
    """Mean of `x` where `keep` is true; 0 when nothing is kept."""
    return torch.where(keep, x, 0.0).sum() / keep.sum().clamp(min=1)
