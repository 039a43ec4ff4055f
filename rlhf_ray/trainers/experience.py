"""The driver's pure math between scoring and the update (ALGORITHMS.md §2–§5.3).

Score shaping (missing-EOS penalty, normalisation, clip), KL-shaped token rewards, advantages by
the configured estimator, whitening, and the plan that splits a batch into mini-batches sharded
over data-parallel ranks with whole-mini-batch loss normalisers. No Ray, no models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_ray.algorithms.advantages import (
    broadcast_to_tokens, compute_gae, group_advantages, reinforce_pp_returns, whiten)
from rlhf_ray.algorithms.kl import kl_penalty
from rlhf_ray.algorithms.losses import LossScale
from rlhf_ray.batch import Experience, Samples
from rlhf_ray.config import RunConfig


@dataclass
class Scored:
    """Everything the score phase returns for a batch of samples."""

    old_logprobs: torch.Tensor  # (B, T) log π_old
    ref_logprobs: torch.Tensor  # (B, T) log π_ref
    values: torch.Tensor | None  # (B, T) critic values, or None without a critic
    scores: torch.Tensor  # (B,) weighted sum of reward sources
    per_source: dict[str, torch.Tensor]  # source name → (B,)


WHITEN_BY_DEFAULT = {"gae": True, "reinforce_pp": True, "reinforce_pp_baseline": True,
                     "grpo": False, "dr_grpo": False, "rloo": False}


def shape_scores(scores: torch.Tensor, stopped: torch.Tensor, cfg: RunConfig, normaliser: "RunningMoments") -> torch.Tensor:
    """Missing-EOS penalty, clip and normalisation of sequence scores (ALGORITHMS.md §3). (B,)"""
    r = cfg.reward
    scores = scores.clone().float()
    if r.missing_eos_penalty is not None:
        scores = torch.where(stopped, scores, scores + r.missing_eos_penalty)
    if r.normalize == "batch":
        scores = (scores - scores.mean()) / (scores.std(unbiased=False) + 1e-8)
    elif r.normalize == "running":
        normaliser.update(scores)
        scores = (scores - normaliser.mean) / (normaliser.std + 1e-8)
    if r.clip is not None:
        scores = scores.clamp(-r.clip, r.clip)
    return scores


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> torch.Tensor:
    """rew_t = −β·kl_t, plus the sequence score at the last real response token (§2). (B, T)"""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def make_experience(samples: Samples, scored: Scored, scores: torch.Tensor, cfg: RunConfig,
                    kl_coef: float) -> tuple[Experience, dict[str, float]]:
    """Advantages (and returns for the critic) for one batch (ALGORITHMS.md §4)."""
    algo = cfg.algo
    mask = samples.response_mask.float()
    kl = kl_penalty(scored.old_logprobs, scored.ref_logprobs, algo.kl.estimator) * mask  # (B, T)
    beta = kl_coef if algo.kl.placement == "reward" else 0.0
    returns = None
    if algo.advantage == "gae":
        advantages, returns = compute_gae(token_rewards(scores, kl, beta, mask), scored.values, mask, algo.gamma, algo.lam)
    elif algo.advantage == "reinforce_pp":
        advantages = reinforce_pp_returns(token_rewards(scores, kl, beta, mask), mask, algo.gamma)
    else:
        shaped = scores - beta * kl.sum(-1)
        kind = "reinforce_baseline" if algo.advantage == "reinforce_pp_baseline" else algo.advantage
        advantages = broadcast_to_tokens(group_advantages(shaped, cfg.rollout.samples_per_prompt, kind), mask)
    whiten_on = algo.whiten_advantages if algo.whiten_advantages is not None else WHITEN_BY_DEFAULT[algo.advantage]
    if whiten_on:
        advantages = whiten(advantages, mask) * mask
    exp = Experience(**vars(samples), old_logprobs=scored.old_logprobs, ref_logprobs=scored.ref_logprobs,
                     advantages=advantages, returns=returns, values=scored.values)
    return exp, _experience_metrics(exp, scored, scores, mask)


def _experience_metrics(exp: Experience, scored: Scored, scores: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    k1 = ((scored.old_logprobs - scored.ref_logprobs) * mask).sum(-1)
    adv = exp.advantages[mask.bool()]
    out = {
        "reward/score_mean": scored.scores.mean().item(),
        "reward/score_std": scored.scores.std(unbiased=False).item(),
        "reward/shaped_mean": scores.mean().item(),
        "kl/ref": k1.mean().item(),
        "response/length_mean": mask.sum(-1).mean().item(),
        "response/truncated_frac": (~exp.stopped).float().mean().item(),
        "adv/mean": adv.mean().item(),
        "adv/std": adv.std(unbiased=False).item(),
    }
    out |= {f"reward/{k}_mean": v.mean().item() for k, v in scored.per_source.items()}
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
