"""Reward-model and offline preference losses (§6, §7)."""

import math

import pytest
import torch

from rlhf_ray.algorithms.preference import (
    bradley_terry_loss,
    dpo_loss,
    ipo_loss,
    kto_loss,
    listwise_loss,
    orpo_loss,
    rrhf_loss,
    simpo_loss,
)


def softplus(x: float) -> float:
    """−log σ(−x) = log(1 + eˣ), for hand-computed expectations."""
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---- reward model (§6) -----------------------------------------------------------------------


def test_bradley_terry_hand_example():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    # diffs (2, −1): −log σ(2) = log(1 + e⁻²), −log σ(−1) = log(1 + e)
    loss, metrics = bradley_terry_loss(chosen, rejected)
    torch.testing.assert_close(loss, torch.tensor((softplus(-2.0) + softplus(1.0)) / 2))
    assert metrics["accuracy"] == 0.5
    assert metrics["margin"] == 0.5  # (2 − 1) / 2
    torch.testing.assert_close(metrics["reward_mean"], torch.tensor(0.75))  # (2 + 0 + 0 + 1)/4


def test_bradley_terry_with_margin():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    # m = 1: −log σ(2 − 1) = log(1 + e⁻¹), −log σ(−1 − 1) = log(1 + e²)
    loss, _ = bradley_terry_loss(chosen, rejected, margin=1.0)
    torch.testing.assert_close(loss, torch.tensor((softplus(-1.0) + softplus(2.0)) / 2))
    per_pair, _ = bradley_terry_loss(chosen, rejected, margin=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(per_pair, torch.tensor((softplus(-1.0) + softplus(1.0)) / 2))


def test_bradley_terry_extreme_scores_finite():
    loss, _ = bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([200.0]))
    torch.testing.assert_close(loss, torch.tensor(400.0))  # log(1 + e⁴⁰⁰) ≈ 400, not inf


def test_listwise_hand_example():
    # exp(ln 3) / (3 + 1 + 1) = 0.6
    scores = torch.tensor([[math.log(3.0), 0.0, 0.0]])
    loss, metrics = listwise_loss(scores)
    torch.testing.assert_close(loss, torch.tensor(-math.log(0.6)))
    assert metrics["accuracy"] == 1.0


def test_listwise_with_two_candidates_is_bradley_terry():
    scores = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    listwise, list_metrics = listwise_loss(scores)
    pairwise, pair_metrics = bradley_terry_loss(scores[:, 0], scores[:, 1])
    torch.testing.assert_close(listwise, pairwise)
    torch.testing.assert_close(list_metrics["accuracy"], pair_metrics["accuracy"])
    torch.testing.assert_close(list_metrics["margin"], pair_metrics["margin"])


# ---- DPO family (§7) -------------------------------------------------------------------------


def test_dpo_at_reference_is_log2_and_pushes_chosen_up():
    policy_chosen = torch.tensor([-3.0, -7.5], dtype=torch.float64, requires_grad=True)
    policy_rejected = torch.tensor([-4.0, -2.0], dtype=torch.float64, requires_grad=True)
    loss, metrics = dpo_loss(
        policy_chosen, policy_rejected, policy_chosen.detach(), policy_rejected.detach(), beta=0.1
    )
    assert loss.item() == math.log(2.0)
    loss.backward()
    # dL/dℓ_c = −β σ(0) / B = −0.025 < 0: gradient descent raises the chosen log-prob
    torch.testing.assert_close(policy_chosen.grad, torch.full((2,), -0.025, dtype=torch.float64))
    torch.testing.assert_close(policy_rejected.grad, torch.full((2,), 0.025, dtype=torch.float64))
    assert metrics["rewards/chosen"] == 0.0 and metrics["rewards/accuracy"] == 0.0


def test_dpo_hand_example():
    # h = (−1 − (−2)) − (−3 − (−2)) = 1 − (−1) = 2; β h = 1 → −log σ(1) = log(1 + e⁻¹)
    args = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])
    loss, metrics = dpo_loss(*args, beta=0.5)
    torch.testing.assert_close(loss, torch.tensor(softplus(-1.0)))
    assert metrics["rewards/chosen"] == 0.5 and metrics["rewards/rejected"] == -0.5
    assert metrics["rewards/accuracy"] == 1.0 and metrics["rewards/margin"] == 1.0
    # cDPO ε = 0.1: 0.9·log(1 + e⁻¹) + 0.1·log(1 + e)
    smoothed, _ = dpo_loss(*args, beta=0.5, label_smoothing=0.1)
    torch.testing.assert_close(smoothed, torch.tensor(0.9 * softplus(-1.0) + 0.1 * softplus(1.0)))


def test_cdpo_with_zero_smoothing_is_dpo():
    generator = torch.Generator().manual_seed(1)
    args = [torch.randn(5, generator=generator) * 3 for _ in range(4)]
    torch.testing.assert_close(
        dpo_loss(*args, beta=0.2, label_smoothing=0.0)[0], dpo_loss(*args, beta=0.2)[0]
    )


def test_ipo_hand_example():
    beta = 0.25  # target h = 1/(2β) = 2
    zero = torch.tensor([0.0])
    at_target, _ = ipo_loss(torch.tensor([1.0]), torch.tensor([-1.0]), zero, zero, beta)
    assert at_target.item() == 0.0  # h = 1 − (−1) = 2
    # h = 0.5 − 0 = 0.5 → (0.5 − 2)² = 2.25
    off_target, metrics = ipo_loss(torch.tensor([0.5]), zero, zero, zero, beta)
    torch.testing.assert_close(off_target, torch.tensor(2.25))
    assert metrics["rewards/chosen"] == 0.125  # β · 0.5


def test_simpo_hand_example():
    # β = 2, γ = 1: 2·(−0.5) − 2·(−1.5) − 1 = 1 → −log σ(1) = log(1 + e⁻¹)
    loss, metrics = simpo_loss(torch.tensor([-0.5]), torch.tensor([-1.5]), beta=2.0, gamma=1.0)
    torch.testing.assert_close(loss, torch.tensor(softplus(-1.0)))
    assert metrics["rewards/chosen"] == -1.0 and metrics["rewards/margin"] == 2.0


def test_orpo_hand_example():
    # p_c = 0.5 → odds 1, log odds 0; p_r = 0.2 → odds 0.25, log odds −ln 4
    # −log σ(ln 4) = −log(4/5) = ln 1.25;  L = 0.7 + 0.1 · ln 1.25
    chosen_avg, rejected_avg = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)])
    loss, metrics = orpo_loss(chosen_avg, rejected_avg, chosen_nll=torch.tensor([0.7]), lam=0.1)
    torch.testing.assert_close(loss, torch.tensor(0.7 + 0.1 * math.log(1.25)))
    torch.testing.assert_close(metrics["log_odds_ratio"], torch.tensor(math.log(4.0)))
    assert metrics["rewards/accuracy"] == 1.0


@pytest.mark.parametrize("chosen_avg", [-1e-5, -1e-12, 0.0, -30.0])
def test_orpo_stable_as_p_approaches_one_or_zero(chosen_avg):
    chosen = torch.tensor([chosen_avg], requires_grad=True)
    rejected = torch.tensor([-2.0], requires_grad=True)
    loss, metrics = orpo_loss(chosen, rejected, chosen_nll=torch.tensor(0.0), lam=1.0)
    loss.backward()
    assert (
        torch.isfinite(loss)
        and torch.isfinite(chosen.grad).all()
        and torch.isfinite(rejected.grad).all()
    )
    if chosen_avg == -1e-5:
        # float64 reference: log odds = ℓ − log(−expm1(ℓ)) ≈ 11.513
        reference = chosen_avg - math.log(-math.expm1(chosen_avg))
        reference -= -2.0 - math.log(-math.expm1(-2.0))
        assert metrics["log_odds_ratio"].item() == pytest.approx(reference, rel=1e-5)


def test_kto_hand_example():
    logratios = torch.tensor([1.0, -1.0])
    desirable = torch.tensor([True, False])
    # z₀ = 0.5, β = 1: desirable 1·(1 − σ(1 − 0.5)) = σ(−0.5)
    #                  undesirable 2·(1 − σ(0.5 − (−1))) = 2σ(−1.5)
    loss, metrics = kto_loss(logratios, desirable, torch.tensor(0.5), beta=1.0, w_d=1.0, w_u=2.0)
    torch.testing.assert_close(loss, torch.tensor((sigmoid(-0.5) + 2 * sigmoid(-1.5)) / 2))
    assert metrics["rewards/chosen"] == 1.0 and metrics["rewards/rejected"] == -1.0
    assert metrics["kl"] == 0.5


def test_kto_reference_kl_clamped_and_detached():
    logratios = torch.tensor([0.3, -0.2], requires_grad=True)
    kl_ref = torch.tensor(-4.0, requires_grad=True)
    desirable = torch.tensor([True, False])
    loss, metrics = kto_loss(logratios, desirable, kl_ref, beta=0.1, w_d=1.0, w_u=1.0)
    at_zero, _ = kto_loss(logratios, desirable, 0.0, beta=0.1, w_d=1.0, w_u=1.0)
    torch.testing.assert_close(loss, at_zero)
    assert metrics["kl"] == 0.0
    loss.backward()
    assert kl_ref.grad is None and logratios.grad is not None


def test_rrhf_hand_example():
    avg_logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -3.0, -0.2]])
    scores = torch.tensor([[3.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    best_nll = torch.tensor([0.3, 0.5])
    # row 0, pairs with s_i < s_j: (1, 0): max(0, −2 + 1) = 0; (1, 2): max(0, −2 + 0.5) = 0;
    #        (2, 0): max(0, −0.5 + 1) = 0.5  → 0.5
    # row 1, all scores tied → no pairs → 0
    # L = mean(0.5, 0) + mean(0.3, 0.5) = 0.25 + 0.4
    loss, metrics = rrhf_loss(avg_logprobs, scores, best_nll)
    torch.testing.assert_close(loss, torch.tensor(0.65))
    torch.testing.assert_close(metrics["rank_loss"], torch.tensor(0.25))
    torch.testing.assert_close(metrics["nll"], torch.tensor(0.4))
