"""The driver's pure math between scoring and the update (ALGORITHMS.md §2–§5.3).

Score shaping (missing-EOS penalty, normalisation, clip), KL-shaped token rewards, advantages by
the configured estimator, whitening, and the plan that splits a batch into mini-batches sharded
over data-parallel ranks with whole-mini-batch loss normalisers. No Ray, no models.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from collections import Counter

import torch

from rlhf_ray.algorithms.advantages import (
    broadcast_to_tokens, compute_gae, group_advantages, reinforce_pp_returns, whiten)
from rlhf_ray.algorithms.kl import kl_penalty
from rlhf_ray.algorithms.losses import LossScale
from rlhf_ray.batch import Experience, Samples, TensorRecord, pad_to
from rlhf_ray.config import RunConfig


@dataclass
class Scored(TensorRecord):
    """Everything the score phase returns for a batch of samples."""

    old_logprobs: torch.Tensor | None  # (B, T) log π_old; None when the update's forward provides it
    ref_logprobs: torch.Tensor | None  # (B, T) log π_ref; None when no reference is loaded (β = 0)
    values: torch.Tensor | None  # (B, T) critic values, or None without a critic
    scores: torch.Tensor  # (B,) weighted sum of reward sources (NaN where a source violated the contract)
    per_source: dict[str, torch.Tensor]  # source name → (B,)
    valid: torch.Tensor | None = None  # (B,) bool, False for samples masked by the reward contract
    violations: dict[str, int] = field(default_factory=dict)  # reward-contract violations by kind

    def select(self, rows: torch.Tensor) -> "Scored":
        picked = super().select(rows)
        picked.per_source = {k: v[rows] for k, v in self.per_source.items()}
        return picked


@dataclass
class Rewards:
    """The reward phase's answer for a batch."""

    scores: torch.Tensor  # (B,) weighted sum of the sources, NaN where the reward contract was violated
    per_source: dict[str, torch.Tensor]  # source name → (B,)
    valid: torch.Tensor  # (B,) bool
    violations: dict[str, int]  # violation kind → count in this batch


def fill_invalid(scores: torch.Tensor, valid: torch.Tensor, n: int) -> torch.Tensor:
    """Masked samples take the mean valid score of their prompt group (the batch's if the group has
    none), so they shift no baseline; they are then left out of the loss. (B,)"""
    groups, ok = scores.view(-1, n), valid.view(-1, n)
    batch_mean = scores[valid].mean() if valid.any() else torch.tensor(0.0)
    count = ok.sum(1, keepdim=True)
    group_mean = torch.where(ok, groups, 0.0).sum(1, keepdim=True) / count.clamp(min=1)
    group_mean = torch.where(count > 0, group_mean, batch_mean)
    return torch.where(ok, groups, group_mean).reshape(-1)


def concat_scored(parts: list[Scored]) -> Scored:
    """Stack score-phase outputs of several rounds; (B, T) tensors right-padded to a common T."""
    t = max((x.shape[1] for p in parts for x in (p.old_logprobs, p.ref_logprobs, p.values) if x is not None), default=0)
    tokens = lambda name: torch.cat([pad_to(getattr(p, name), t, 0.0, left=False) for p in parts])  # noqa: E731
    return Scored(old_logprobs=tokens("old_logprobs") if parts[0].old_logprobs is not None else None,
                  ref_logprobs=tokens("ref_logprobs") if parts[0].ref_logprobs is not None else None,
                  values=tokens("values") if parts[0].values is not None else None,
                  scores=torch.cat([p.scores for p in parts]),
                  per_source={k: torch.cat([p.per_source[k] for p in parts]) for k in parts[0].per_source},
                  valid=torch.cat([p.valid for p in parts]) if parts[0].valid is not None else None,
                  violations=dict(sum((Counter(p.violations) for p in parts), Counter())))


# --- prompt groups (n samples of one prompt are contiguous rows) ---------------------------------


def group_stats(scores: torch.Tensor, n: int) -> dict[str, float]:
    """Mean within-group score std and the share of groups whose scores are all equal (zero advantage)."""
    groups = scores.view(-1, n)
    return {"reward/group_std_mean": groups.std(dim=1, unbiased=False).mean().item(),
            "reward/zero_adv_group_frac": (~informative_groups(scores, n)).float().mean().item()}


def informative_groups(scores: torch.Tensor, n: int) -> torch.Tensor:
    """(G,) True for groups whose scores differ (DAPO dynamic sampling keeps only these)."""
    groups = scores.view(-1, n)
    return (groups.max(dim=1).values - groups.min(dim=1).values) > 0


def group_rows(groups: torch.Tensor, n: int) -> torch.Tensor:
    """Row indices of the given group indices, groups kept contiguous. (len(groups)·n,)"""
    return (groups[:, None] * n + torch.arange(n)[None, :]).reshape(-1)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO soft overlong punishment (ALGORITHMS.md §3): 0 up to max_len − buffer, then falling
    linearly to −penalty at max_len. (B,)"""
    excess = (lengths.float() - (max_len - buffer)).clamp(min=0)
    return -penalty * (excess / buffer).clamp(max=1.0)


WHITEN_BY_DEFAULT = {"gae": True, "reinforce_pp": True, "reinforce_pp_baseline": True,
                     "grpo": False, "dr_grpo": False, "rloo": False}


def shape_scores(scores: torch.Tensor, stopped: torch.Tensor, lengths: torch.Tensor, cfg: RunConfig,
                 normaliser: "RunningMoments") -> torch.Tensor:
    """Missing-EOS and overlong penalties, normalisation and clip of sequence scores (ALGORITHMS.md §3). (B,)"""
    r = cfg.reward
    scores = scores.clone().float()
    if r.missing_eos_penalty is not None:
        scores = torch.where(stopped, scores, scores + r.missing_eos_penalty)
    if r.overlong_buffer is not None:
        scores = scores + overlong_penalty(lengths, cfg.rollout.max_new_tokens, r.overlong_buffer, r.overlong_penalty)
    if r.normalize == "batch":
        scores = (scores - scores.mean()) / (scores.std(unbiased=False) + 1e-8)
    elif r.normalize == "running":
        normaliser.update(scores)
        scores = (scores - normaliser.mean) / (normaliser.std + 1e-8)
    if r.clip is not None:
        scores = scores.clamp(-r.clip, r.clip)
    return scores


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor,
                  turn_rewards: torch.Tensor | None = None) -> torch.Tensor:
    """rew_t = −β·kl_t, plus the sequence score at the last real response token (§2). (B, T)

    Multi-turn (`turn_rewards`, (B, T): each turn's environment reward at its last policy token; the
    mask then has holes where the environment's tokens are): those rewards stay at their turns and the
    rest of the score, score − Σ turn rewards, goes to the last policy token, so the sum is the score."""
    rewards = -kl_coef * kl * mask
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    last = (mask.bool() * positions).argmax(-1)  # the last real token, wherever the holes are (0 if none)
    if turn_rewards is not None:
        rewards = rewards + turn_rewards.to(rewards.dtype) * mask
        scores = scores - (turn_rewards * mask).sum(-1)
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def make_experience(samples: Samples, scored: Scored, scores: torch.Tensor, cfg: RunConfig,
                    kl_coef: float) -> tuple[Experience, dict[str, float]]:
    """Advantages (and returns for the critic) for one batch (ALGORITHMS.md §4)."""
    algo = cfg.algo
    mask = samples.response_mask.float()
    beta = kl_coef if algo.kl.placement == "reward" else 0.0
    kl = torch.zeros_like(mask)  # (B, T); π_old is None only when the KL is in the loss (§2), π_ref when β = 0
    if scored.old_logprobs is not None and scored.ref_logprobs is not None:
        kl = kl_penalty(scored.old_logprobs, scored.ref_logprobs, algo.kl.estimator) * mask
    returns = None
    if algo.advantage == "gae":
        rewards = token_rewards(scores, kl, beta, mask, samples.env_rewards)
        advantages, returns = compute_gae(rewards, scored.values, mask, algo.gamma, algo.lam)
    elif algo.advantage == "reinforce_pp":
        advantages = reinforce_pp_returns(token_rewards(scores, kl, beta, mask, samples.env_rewards), mask, algo.gamma)
    else:
        shaped = scores - beta * kl.sum(-1)
        kind = "reinforce_baseline" if algo.advantage == "reinforce_pp_baseline" else algo.advantage
        advantages = broadcast_to_tokens(group_advantages(shaped, cfg.rollout.samples_per_prompt, kind), mask)
    whiten_on = algo.whiten_advantages if algo.whiten_advantages is not None else WHITEN_BY_DEFAULT[algo.advantage]
    if whiten_on:
        advantages = whiten(advantages, mask) * mask
    exp = Experience(**vars(samples), old_logprobs=scored.old_logprobs, ref_logprobs=scored.ref_logprobs,
                     advantages=advantages, returns=returns, values=scored.values)
    _check_behaviour_logprobs(samples, algo.rollout_correction)
    metrics = _experience_metrics(exp, scored, scores, mask)
    if algo.mask_truncated:  # DAPO: truncated responses teach nothing about where to stop
        exp.response_mask = exp.response_mask * samples.stopped[:, None].to(samples.response_mask.dtype)
    if scored.valid is not None:  # the reward contract's masked samples never reach the loss
        exp.response_mask = exp.response_mask * scored.valid[:, None].to(samples.response_mask.dtype)
    return exp, metrics


def _check_behaviour_logprobs(samples: Samples, correction: str) -> None:
    """A rollout correction weighs the update by the engine's log μ (`Samples.logprobs`, ALGORITHMS.md §10)."""
    if correction != "none" and samples.logprobs is None:
        raise ValueError(f"algo.rollout_correction={correction} needs the rollout engine's behaviour log-probs, "
                         f"and the engine returned none; set algo.rollout_correction=none or use an engine that returns them.")


def _experience_metrics(exp: Experience, scored: Scored, scores: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """kl/ref is here when π_old is known before the update, else the policy's update reports it (neither
    without a reference)."""
    adv = exp.advantages[mask.bool()]
    out = {
        "reward/score_mean": scored.scores.mean().item(),
        "reward/score_std": scored.scores.std(unbiased=False).item(),
        "reward/shaped_mean": scores.mean().item(),
        "response/length_mean": mask.sum(-1).mean().item(),
        "response/truncated_frac": (~exp.stopped).float().mean().item(),
        "adv/mean": adv.mean().item(),
        "adv/std": adv.std(unbiased=False).item(),
    }
    out |= {f"reward/{k}_mean": v.mean().item() for k, v in scored.per_source.items()}
    if scored.old_logprobs is not None and scored.ref_logprobs is not None:
        out["kl/ref"] = ((scored.old_logprobs - scored.ref_logprobs) * mask).sum(-1).mean().item()
    if exp.returns is not None:
        ret, val = exp.returns[mask.bool()], exp.values[mask.bool()]
        out["critic/explained_var"] = (1 - (ret - val).var() / (ret.var() + 1e-8)).item()
    return out


class RunningMoments:
    """Running mean/std of scores over the run (Chan et al. parallel update)."""

    def __init__(self) -> None:
        self.count, self.mean, self.var = 0, 0.0, 1.0

    @property
    def std(self) -> float:
        return float(self.var) ** 0.5

    def update(self, x: torch.Tensor) -> None:
        n, m, v = x.numel(), x.mean().item(), x.var(unbiased=False).item()
        total = self.count + n
        delta = m - self.mean
        self.var = (self.var * self.count + v * n + delta**2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total


def plan_update(exp: Experience, mini_batch_size: int, ranks: int) -> tuple[list[dict], list[LossScale]]:
    """Rank r's shard = its 1/ranks slice of each mini-batch, in order; scales are per whole mini-batch."""
    n_mb = exp.batch_size // mini_batch_size
    per_rank = mini_batch_size // ranks
    scales, rows = [], [[] for _ in range(ranks)]
    for j in range(n_mb):
        mb = slice(j * mini_batch_size, (j + 1) * mini_batch_size)
        scales.append(LossScale.from_mask(exp.response_mask[mb]))
        for r in range(ranks):
            start = j * mini_batch_size + r * per_rank
            rows[r].extend(range(start, start + per_rank))
    return [exp.select(torch.tensor(r)).to_numpy() for r in rows], scales


def nonfinite_counts(named: dict[str, torch.Tensor | None], mask: torch.Tensor) -> dict[str, int]:
    """Non-finite values on real response tokens (or per sequence), in the order given: the first
    name is where they first appeared. {} when all are finite."""
    out = {}
    for name, t in named.items():
        if t is None:
            continue
        values = t[mask.bool()] if t.shape == mask.shape else t
        bad = int((~torch.isfinite(values)).sum())
        if bad:
            out[name] = bad
    return out
