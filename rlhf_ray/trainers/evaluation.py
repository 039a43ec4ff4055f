"""Evaluation signals on held-out prompts (ALGORITHMS.md §9): pass@k and win-rate; pure functions."""

from __future__ import annotations

import math

import torch


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 − C(n−c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_pass_at_k(scores: torch.Tensor, n: int, k: int, threshold: float) -> float:
    """Mean pass@k over prompts; `scores` (P·n,) with each prompt's n samples contiguous."""
    correct = (scores.view(-1, n) >= threshold).sum(dim=1).tolist()
    return sum(pass_at_k(n, c, k) for c in correct) / len(correct)


def win_rate(policy_scores: torch.Tensor, reference_scores: torch.Tensor) -> float:
    """Share of prompts where the policy's response scores higher than the reference's; ties count ½."""
    wins = (policy_scores > reference_scores).float() + 0.5 * (policy_scores == reference_scores).float()
    return wins.mean().item()
