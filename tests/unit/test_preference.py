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

LOG2 = math.log(2.0)


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


def test_cdpo_is_the_label_noise_mixture_of_the_two_orientations():
    """cDPO ε: (1 − ε)·(−log σ(βh)) + ε·(−log σ(−βh)), written out by hand (not by calling dpo_loss twice):
    ε = 0 is DPO; ε = ½ is symmetric in chosen and rejected."""
    generator = torch.Generator().manual_seed(1)
    chosen, rejected, ref_chosen, ref_rejected = [torch.randn(5, generator=generator) * 3 for _ in range(4)]
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    for eps in (0.0, 0.25):
        by_hand = ((1 - eps) * torch.nn.functional.softplus(-0.2 * h) + eps * torch.nn.functional.softplus(0.2 * h)).mean()
        loss, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.2, label_smoothing=eps)
        torch.testing.assert_close(loss, by_hand)
    half, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.2, label_smoothing=0.5)
    swapped, _ = dpo_loss(rejected, chosen, ref_rejected, ref_chosen, beta=0.2, label_smoothing=0.5)
    torch.testing.assert_close(half, swapped)


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


# ---- cases the hand examples above leave open (found by mutation testing) --------------------


def test_ipo_with_a_non_zero_reference():
    # β = 0.5, target 1/(2β) = 1; chosen: −1 − (−3) = 2, rejected: −2 − (−1.5) = −0.5 → h = 2.5
    # (h − 1)² = 2.25; implicit rewards β·(2, −0.5) = (1, −0.25)
    loss, metrics = ipo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-3.0]),
                             torch.tensor([-1.5]), beta=0.5)
    torch.testing.assert_close(loss, torch.tensor(2.25))
    assert metrics["rewards/chosen"] == 1.0 and metrics["rewards/rejected"] == -0.25
    assert metrics["rewards/accuracy"] == 1.0 and metrics["rewards/margin"] == 1.25


def test_dpo_with_non_zero_reference_and_two_pairs():
    # pair 0: h = (−1 − (−2)) − (−3 − (−2)) = 2, β h = 1 → log(1 + e⁻¹)
    # pair 1: h = (−4 − (−2)) − (−1 − (−2)) = −3, β h = −1.5 → log(1 + e^1.5)
    loss, metrics = dpo_loss(torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -2.0]),
                             torch.tensor([-2.0, -2.0]), beta=0.5)
    torch.testing.assert_close(loss, torch.tensor((softplus(-1.0) + softplus(1.5)) / 2))
    # rewards: chosen β·(1, −2) mean −0.25; rejected β·(−1, 1) mean 0; accuracy ½; margin (1 + (−1.5))/2
    torch.testing.assert_close(metrics["rewards/chosen"], torch.tensor(-0.25))
    torch.testing.assert_close(metrics["rewards/rejected"], torch.tensor(0.0))
    assert metrics["rewards/accuracy"] == 0.5
    torch.testing.assert_close(metrics["rewards/margin"], torch.tensor(-0.25))


def test_kto_reward_metrics_average_each_subset_and_keep_the_dtype():
    # β = 0.5, r = (1, 3, −2): desirable rewards β·(1, 3) mean 1.0, undesirable β·(−2) = −1
    logratios = torch.tensor([1.0, 3.0, -2.0], dtype=torch.float64)
    desirable = torch.tensor([True, True, False])
    loss, metrics = kto_loss(logratios, desirable, 0.1, beta=0.5, w_d=1.0, w_u=1.0)
    assert metrics["rewards/chosen"] == 1.0 and metrics["rewards/rejected"] == -1.0
    # z₀ = 0.1 in the inputs' dtype (float64 0.1, not float32's 0.10000000149)
    assert metrics["kl"].dtype == torch.float64 and metrics["kl"].item() == 0.1
    # losses σ(−0.5·0.9), σ(−0.5·2.9), σ(−0.5·(0.1 + 2))
    expected = (sigmoid(-0.45) + sigmoid(-1.45) + sigmoid(-1.05)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_kto_without_undesirable_examples_reports_zero():
    _, metrics = kto_loss(torch.tensor([1.0, 2.0]), torch.tensor([True, True]), 0.0, beta=1.0, w_d=1.0, w_u=1.0)
    assert metrics["rewards/chosen"] == 1.5 and metrics["rewards/rejected"] == 0.0


def test_bradley_terry_tie_is_not_accurate_and_reward_spread():
    # diffs (0, 2): a tie does not count as accurate → ½; margin (0 + 2)/2 = 1
    chosen, rejected = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0])
    loss, metrics = bradley_terry_loss(chosen, rejected)
    torch.testing.assert_close(loss, torch.tensor((LOG2 + softplus(-2.0)) / 2))
    assert metrics["accuracy"] == 0.5 and metrics["margin"] == 1.0
    # rewards (1, 2, 1, 0): mean 1, sample std sqrt((0 + 1 + 0 + 1)/3)
    torch.testing.assert_close(metrics["reward_mean"], torch.tensor(1.0))
    torch.testing.assert_close(metrics["reward_std"], torch.tensor(math.sqrt(2 / 3)))


def test_listwise_metrics_against_the_best_other_candidate():
    # row 0: best 2 vs others (3, 0): max other 3 → not accurate, margin −1
    # row 1: best 1 vs others (1, −5): a tie is not accurate, margin 0
    # row 2: best 4 vs others (0, 1): accurate, margin 3
    scores = torch.tensor([[2.0, 3.0, 0.0], [1.0, 1.0, -5.0], [4.0, 0.0, 1.0]])
    loss, metrics = listwise_loss(scores)
    assert metrics["accuracy"] == pytest.approx(1 / 3)
    torch.testing.assert_close(metrics["margin"], torch.tensor(2 / 3))  # (−1 + 0 + 3)/3
    expected = sum(torch.logsumexp(row, 0).item() - row[0].item() for row in scores) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # row 1 by hand: log(e + e + e⁻⁵) − 1
    single, _ = listwise_loss(scores[1:2])
    assert single.item() == pytest.approx(math.log(2 * math.e + math.exp(-5.0)) - 1.0, rel=1e-6)


def test_orpo_metrics_and_equal_odds():
    # p_c = p_r = 0.5: log odds ratio 0 → not accurate; −log σ(0) = ln 2
    half = torch.tensor([math.log(0.5)])
    loss, metrics = orpo_loss(half, half, chosen_nll=torch.tensor([0.3, 0.5]), lam=2.0)
    torch.testing.assert_close(loss, torch.tensor(0.4 + 2.0 * LOG2))
    assert metrics["rewards/accuracy"] == 0.0
    torch.testing.assert_close(metrics["nll"], torch.tensor(0.4))
    torch.testing.assert_close(metrics["odds_ratio_loss"], torch.tensor(LOG2))
    # a log odds ratio in (0, 1) counts as accurate: p_c = 0.5, p_r = 0.4 → ln(1/(2/3)) = ln 1.5
    _, metrics = orpo_loss(half, torch.tensor([math.log(0.4)]), chosen_nll=torch.tensor(0.0), lam=1.0)
    assert metrics["rewards/accuracy"] == 1.0
    torch.testing.assert_close(metrics["log_odds_ratio"], torch.tensor(math.log(1.5)))


@pytest.mark.parametrize("p", [0.5, 0.9, 0.3, 1e-3])
def test_orpo_log_odds_on_both_branches(p):
    # log odds(p) − log odds(½) = ln(p/(1 − p)); p = ½ sits exactly on the branch point ℓ = −ln 2
    chosen = torch.tensor([math.log(p)], dtype=torch.float64)
    rejected = torch.tensor([math.log(0.5)], dtype=torch.float64)
    _, metrics = orpo_loss(chosen, rejected, chosen_nll=torch.tensor(0.0, dtype=torch.float64), lam=1.0)
    assert metrics["log_odds_ratio"].item() == pytest.approx(math.log(p / (1 - p)), abs=1e-12)
