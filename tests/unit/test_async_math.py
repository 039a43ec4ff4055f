"""Asynchronous RL, the pure parts: which rows are fresh enough (algo.max_staleness) and the two
off-policy objectives on the hand-computed case of ALGORITHMS.md §10."""

from __future__ import annotations

import math

import pytest
import torch
from rlhf_ray.algorithms.losses import policy_loss, tis_weights
from rlhf_ray.trainers.rollout_queue import fresh_rows


def test_fresh_rows_keep_groups_within_the_bound_and_drop_a_group_with_one_stale_row():
    versions = torch.tensor([5, 5, 3, 5, 2, 2, 4, 4])  # groups of 2: {5,5} {3,5} {2,2} {4,4}
    keep = fresh_rows(versions, current=5, max_staleness=2, group=2)
    assert keep.tolist() == [True, True, True, True, False, False, True, True]  # 5-3 = 2 is inside, 5-2 = 3 is not
    assert fresh_rows(versions, current=5, max_staleness=0, group=2).tolist() == [True, True] + [False] * 6
    assert fresh_rows(versions, current=5, max_staleness=3, group=4).tolist() == [True] * 8
    assert fresh_rows(torch.tensor([0, 1]), current=1, max_staleness=1, group=1).tolist() == [True, True]


# Two tokens, advantage 1 each: π_θ = (0.6, 0.3), π_prox = (0.5, 0.25), μ = (1.0, 1/12)
# → ρ = π_prox/μ = (0.5, 3.0), w = min(ρ, 2) = (0.5, 2.0) (the §10 case).
THETA, PROX, MU = (0.6, 0.3), (0.5, 0.25), (1.0, 1 / 12)


def _log(values) -> torch.Tensor:
    return torch.tensor([[math.log(v) for v in values]], dtype=torch.float64)


def test_decoupled_objective_clips_against_the_proximal_policy_and_weighs_by_prox_over_mu():
    """r = π_θ/π_prox = (1.2, 1.2), inside [0.8, 1.2]: L = −w·r·A = (−0.6, −2.4), token mean −1.5."""
    mask, adv = torch.ones(1, 2), torch.ones(1, 2, dtype=torch.float64)
    weights, metrics = tis_weights(_log(PROX), _log(MU), mask, cap=2.0)
    assert weights[0].tolist() == pytest.approx([0.5, 2.0])
    assert metrics["is_truncated_frac"] == pytest.approx(0.5)
    loss, _ = policy_loss(_log(THETA), _log(PROX), adv, mask, is_weights=weights)
    assert loss.item() == pytest.approx(-1.5)


def test_behaviour_objective_clips_the_ratio_against_the_engine_log_probs():
    """π_old = μ: r = (0.6, 3.6), the second clipped at 1.2: L = (−0.6, −1.2), token mean −0.9."""
    mask, adv = torch.ones(1, 2), torch.ones(1, 2, dtype=torch.float64)
    loss, metrics = policy_loss(_log(THETA), _log(MU), adv, mask)
    assert loss.item() == pytest.approx(-0.9)
    assert metrics["clip_frac"] == pytest.approx(0.5)
