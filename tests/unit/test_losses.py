"""Aggregation, PPO policy/value losses, SFT, KL and entropy terms (§5, §8)."""

import dataclasses
import math

import pytest
import torch

from rlhf_ray.algorithms.losses import (
    LossScale,
    aggregate,
    entropy_bonus,
    kl_loss,
    masked_mean,
    policy_loss,
    sequence_mask_weights,
    sft_loss,
    tis_weights,
    token_mask_weights,
    value_loss,
)

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
LN2 = math.log(2.0)


# ---- aggregation (§5.3) ----------------------------------------------------------------------


def test_aggregate_hand_example():
    token_losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # 3 and 5, 6 are padding
    # token-mean: (1 + 2 + 4) / 3
    torch.testing.assert_close(aggregate(token_losses, mask, "token-mean"), torch.tensor(7 / 3))
    # seq-mean-token-mean: ((1 + 2)/2 + 4/1) / 2 = (1.5 + 4) / 2
    torch.testing.assert_close(
        aggregate(token_losses, mask, "seq-mean-token-mean"), torch.tensor(2.75)
    )
    # seq-mean-token-sum-norm, max_len = T = 3: ((1 + 2)/3 + 4/3) / 2 = 7/6
    torch.testing.assert_close(
        aggregate(token_losses, mask, "seq-mean-token-sum-norm"), torch.tensor(7 / 6)
    )
    # an explicit max_len of 7: (3/7 + 4/7) / 2 = 0.5
    scale = LossScale(num_tokens=3, num_seqs=2, max_len=7)
    torch.testing.assert_close(
        aggregate(token_losses, mask, "seq-mean-token-sum-norm", scale), torch.tensor(0.5)
    )


@pytest.mark.parametrize("mode", MODES)
def test_non_finite_padding_does_not_leak(mode):
    token_losses = torch.tensor([[1.0, float("nan")], [2.0, float("inf")]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert torch.isfinite(aggregate(token_losses, mask, mode))


def test_aggregate_unknown_mode():
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(torch.zeros(1, 1), torch.ones(1, 1), "sum")


def test_loss_scale_is_frozen_and_counts_mask():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    scale = LossScale.from_mask(mask)
    assert scale == LossScale(num_tokens=3.0, num_seqs=2.0, max_len=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        scale.max_len = 5  # type: ignore[misc]


def _mini_batch(seed: int = 0):
    """Six sequences of lengths 1–6 (T = 6), float64, with random per-token tensors."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([3, 6, 1, 4, 2, 5])
    mask = (torch.arange(6) < lengths.unsqueeze(1)).double()  # (6, 6)

    def randn():
        return torch.randn(6, 6, generator=generator, dtype=torch.float64)

    return mask, randn


def _micro_batches(mask, sizes, *tensors):
    """Split rows into micro-batches of `sizes`, each trimmed to its own longest response."""
    start = 0
    for size in sizes:
        rows = slice(start, start + size)
        width = int(mask[rows].sum(dim=1).max())
        yield mask[rows, :width], [t[rows, :width] for t in tensors]
        start += size


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sizes", [[1, 2, 3], [4, 2], [1, 1, 1, 1, 1, 1]])
def test_aggregation_is_micro_batch_invariant(mode, sizes):
    mask, randn = _mini_batch()
    whole_losses = randn().requires_grad_()
    scale = LossScale.from_mask(mask)
    whole = aggregate(whole_losses, mask, mode)  # own counts of the whole mini-batch
    (whole_grad,) = torch.autograd.grad(whole, whole_losses)

    split_losses = whole_losses.detach().clone().requires_grad_()
    summed = sum(
        aggregate(losses, micro_mask, mode, scale)
        for micro_mask, (losses,) in _micro_batches(mask, sizes, split_losses)
    )
    (split_grad,) = torch.autograd.grad(summed, split_losses)
    torch.testing.assert_close(summed, whole, atol=1e-12, rtol=0)
    torch.testing.assert_close(split_grad, whole_grad, atol=1e-12, rtol=0)


def test_micro_batch_own_counts_would_differ():
    # The invariance test above bites: averaging micro-batch token-means is not the token-mean.
    mask, randn = _mini_batch()
    losses = randn()
    micro_batches = _micro_batches(mask, [1, 5], losses)
    per_micro = [aggregate(part, m, "token-mean") for m, (part,) in micro_batches]
    assert not torch.isclose(sum(per_micro) / 2, aggregate(losses, mask, "token-mean"))


@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_is_micro_batch_invariant(mode):
    mask, randn = _mini_batch(seed=1)
    old_logprobs, advantages = 0.3 * randn() - 1.0, randn()
    logprobs = (old_logprobs + 0.3 * randn()).requires_grad_()
    scale = LossScale.from_mask(mask)

    whole, _ = policy_loss(logprobs, old_logprobs, advantages, mask, dual_clip=3.0, agg=mode)
    (whole_grad,) = torch.autograd.grad(whole, logprobs)
    summed = sum(
        policy_loss(lp, old, adv, m, dual_clip=3.0, agg=mode, scale=scale)[0]
        for m, (lp, old, adv) in _micro_batches(mask, [2, 1, 3], logprobs, old_logprobs, advantages)
    )
    (split_grad,) = torch.autograd.grad(summed, logprobs)
    torch.testing.assert_close(summed, whole, atol=1e-12, rtol=0)
    torch.testing.assert_close(split_grad, whole_grad, atol=1e-12, rtol=0)


# ---- PPO policy loss (§5.1) ------------------------------------------------------------------


def _policy_loss_at(ratios, advantages, **kwargs):
    """policy_loss on one sequence with the given per-token ratios → loss, grad, metrics."""
    logprobs = torch.tensor([ratios], dtype=torch.float64).log().requires_grad_()
    old_logprobs = torch.zeros_like(logprobs)
    adv = torch.tensor([advantages], dtype=torch.float64)
    loss, metrics = policy_loss(logprobs, old_logprobs, adv, torch.ones_like(adv), **kwargs)
    (grad,) = torch.autograd.grad(loss, logprobs)
    return loss, grad[0], metrics


def test_policy_loss_hand_example_and_clipped_gradient_is_zero():
    # token: (ρ, A) → L = max(−ρA, −clip(ρ, 0.8, 1.2)A)
    #   (1.5, +1) → max(−1.5, −1.2) = −1.2  clipped, dL/dlogp = 0
    #   (0.5, −1) → max( 0.5,  0.8) =  0.8  clipped, dL/dlogp = 0
    #   (1.5, −1) → max( 1.5,  1.2) =  1.5  unclipped, dL/dlogp = −Aρ = 1.5
    #   (0.5, +1) → max(−0.5, −0.8) = −0.5  unclipped, dL/dlogp = −0.5
    loss, grad, metrics = _policy_loss_at([1.5, 0.5, 1.5, 0.5], [1.0, -1.0, -1.0, 1.0])
    torch.testing.assert_close(
        loss, torch.tensor((-1.2 + 0.8 + 1.5 - 0.5) / 4, dtype=torch.float64)
    )
    torch.testing.assert_close(grad, torch.tensor([0.0, 0.0, 1.5, -0.5], dtype=torch.float64) / 4)
    assert metrics["clip_frac"] == 0.5
    torch.testing.assert_close(metrics["ratio_mean"], torch.tensor(1.0, dtype=torch.float64))
    assert metrics["ratio_max"] == 1.5
    # approx_kl = k3(logp_old − logp_θ) = ρ − 1 − ln ρ: mean of (0.5 − ln 1.5, −0.5 + ln 2) twice
    expected_kl = (math.log(2.0) - math.log(1.5)) / 2
    torch.testing.assert_close(metrics["approx_kl"], torch.tensor(expected_kl, dtype=torch.float64))
    assert all(not m.requires_grad and m.dim() == 0 for m in metrics.values())


def test_clip_higher_is_asymmetric():
    # ρ = 1.25, A = +1: symmetric ε = 0.2 clips (−1.2, no gradient); ε_high = 0.28 does not (−1.25)
    loss, grad, _ = _policy_loss_at([1.25], [1.0])
    assert loss.item() == pytest.approx(-1.2) and grad.item() == 0.0
    loss, grad, _ = _policy_loss_at([1.25], [1.0], clip_high=0.28)
    assert loss.item() == pytest.approx(-1.25) and grad.item() == pytest.approx(-1.25)
    # the low side keeps ε_low = 0.2: ρ = 0.75, A = −1 → max(0.75, 0.8) = 0.8, clipped
    loss, grad, _ = _policy_loss_at([0.75], [-1.0], clip_high=0.28)
    assert loss.item() == pytest.approx(0.8) and grad.item() == 0.0


def test_dual_clip_bounds_negative_advantage_loss():
    # ρ = 5, A = −1: plain PPO loss max(5, 1.2) = 5; dual-clip c = 3 caps it at −cA = 3, no gradient
    loss, grad, _ = _policy_loss_at([5.0], [-1.0])
    assert loss.item() == pytest.approx(5.0)
    loss, grad, _ = _policy_loss_at([5.0], [-1.0], dual_clip=3.0)
    assert loss.item() == pytest.approx(3.0) and grad.item() == 0.0
    # below the cap (ρ = 2) and for A > 0 (ρ = 5) dual-clip changes nothing
    assert _policy_loss_at([2.0], [-1.0], dual_clip=3.0)[0].item() == pytest.approx(2.0)
    assert _policy_loss_at([5.0], [1.0], dual_clip=3.0)[0].item() == pytest.approx(-1.2)


def test_dual_clip_bound_holds_on_random_tokens():
    generator = torch.Generator().manual_seed(2)
    log_ratio = 3.0 * torch.randn(1, 200, generator=generator, dtype=torch.float64)
    advantages = -torch.rand(1, 200, generator=generator, dtype=torch.float64)  # all A < 0
    mask = torch.ones_like(advantages)
    for t in range(200):
        token_mask = torch.zeros_like(mask)
        token_mask[0, t] = 1
        loss, _ = policy_loss(
            log_ratio, torch.zeros_like(log_ratio), advantages, token_mask, dual_clip=3.0
        )
        assert loss <= -3.0 * advantages[0, t] + 1e-12


def test_dual_clip_must_exceed_one():
    with pytest.raises(ValueError, match="dual_clip"):
        _policy_loss_at([1.0], [1.0], dual_clip=0.5)


# ---- value loss (§5.2) -----------------------------------------------------------------------


def test_value_loss_hand_example():
    values = torch.tensor([[1.5, 1.1, 9.0]], requires_grad=True)
    old_values = torch.tensor([[1.0, 1.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # token 0: (1.5 − 2)² = 0.25; V_clip = 1 + 0.2 = 1.2, (1.2 − 2)² = 0.64 → ½·0.64 = 0.32
    # token 1: (1.1 − 0)² = 1.21; V − V_old = 0.1 within the clip → ½·1.21 = 0.605
    loss, metrics = value_loss(values, old_values, returns, mask, clip=0.2)
    torch.testing.assert_close(loss, torch.tensor((0.32 + 0.605) / 2))
    assert metrics["clip_frac"] == 0.5
    torch.testing.assert_close(metrics["values_mean"], torch.tensor(1.3))
    (grad,) = torch.autograd.grad(loss, values)
    # clipped token has no gradient; token 1: d/dV ½(V − R)² / 2 = 1.1 / 2
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.55, 0.0]]))

    # unclipped: (½·0.25 + ½·1.21) / 2
    loss, metrics = value_loss(values, old_values, returns, mask, clip=None)
    torch.testing.assert_close(loss, torch.tensor((0.125 + 0.605) / 2))
    assert metrics["clip_frac"] == 0.0


# ---- SFT, KL, entropy (§8, §5.4) -------------------------------------------------------------


def test_sft_loss_hand_example():
    logprobs = torch.tensor([[math.log(0.5), math.log(0.25), -50.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # last token is prompt/padding
    # token-mean NLL: (ln 2 + ln 4) / 2 = 1.5 ln 2
    loss, metrics = sft_loss(logprobs, mask)
    torch.testing.assert_close(loss, torch.tensor(1.5 * LN2))
    torch.testing.assert_close(metrics["nll"], torch.tensor(1.5 * LN2))
    # seq-mean-token-sum-norm with T = 3: (ln 2 + ln 4) / 3
    loss, _ = sft_loss(logprobs, mask, agg="seq-mean-token-sum-norm")
    torch.testing.assert_close(loss, torch.tensor(LN2))


def test_kl_loss_hand_example():
    logprobs = torch.tensor([[LN2, 0.0, 3.0]])
    ref_logprobs = torch.tensor([[0.0, LN2, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # r = (ln 2, −ln 2): k3 = (½ − 1 + ln 2, 2 − 1 − ln 2), mean = ¼
    loss, metrics = kl_loss(logprobs, ref_logprobs, mask)
    torch.testing.assert_close(loss, torch.tensor(0.25))
    torch.testing.assert_close(metrics["kl"], torch.tensor(0.25))
    # k1: mean of (ln 2, −ln 2) = 0
    loss, _ = kl_loss(logprobs, ref_logprobs, mask, kind="k1")
    torch.testing.assert_close(loss, torch.tensor(0.0))


def test_entropy_bonus_hand_example():
    entropy = torch.tensor([[1.0, 2.0, 7.0], [4.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # token-mean (1 + 2 + 4)/3; seq-mean-token-mean (1.5 + 4)/2
    value, metrics = entropy_bonus(entropy, mask)
    torch.testing.assert_close(value, torch.tensor(7 / 3))
    torch.testing.assert_close(metrics["entropy"], torch.tensor(7 / 3))
    value, _ = entropy_bonus(entropy, mask, agg="seq-mean-token-mean")
    torch.testing.assert_close(value, torch.tensor(2.75))


# ---- rollout-vs-trainer corrections (§10) ----------------------------------------------------


def _rho_case():
    """§10's case: two real tokens with ρ = π_old/μ = (0.5, 3.0), then a padding token whose
    log-probs would give ρ = 100 if it leaked."""
    old_logprobs = torch.tensor([[math.log(0.5), math.log(3.0), math.log(100.0)]], dtype=torch.float64)
    return old_logprobs, torch.zeros_like(old_logprobs), torch.tensor([[1, 1, 0]])


def test_tis_weights_truncate_at_cap():
    old, behaviour, mask = _rho_case()
    weights, metrics = tis_weights(old.requires_grad_(), behaviour, mask, cap=2.0)
    torch.testing.assert_close(weights, torch.tensor([[0.5, 2.0, 0.0]], dtype=torch.float64))
    assert not weights.requires_grad
    torch.testing.assert_close(metrics["is_weight_mean"], torch.tensor(1.25, dtype=torch.float64))
    assert metrics["is_truncated_frac"] == 0.5
    # mismatch: |log ρ| = (ln 2, ln 3); k3 of r = log μ − log π_old = −log ρ is ρ − 1 − ln ρ
    torch.testing.assert_close(metrics["logprob_diff_mean"],
                               torch.tensor((LN2 + math.log(3.0)) / 2, dtype=torch.float64))
    expected_kl = ((0.5 - 1 + LN2) + (3.0 - 1 - math.log(3.0))) / 2
    torch.testing.assert_close(metrics["mismatch_kl"], torch.tensor(expected_kl, dtype=torch.float64))


def test_token_mask_keeps_token_one_only():
    old, behaviour, mask = _rho_case()
    weights, metrics = token_mask_weights(old, behaviour, mask, low=0.5, high=2.0)
    # 0.5 is inside [0.5, 2] (bounds inclusive), 3.0 outside, padding 0
    torch.testing.assert_close(weights, torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))
    assert metrics["masked_frac"] == 0.5 and metrics["is_weight_mean"] == 0.5


def test_sequence_mask_uses_geometric_mean_ratio():
    # row 0: ρ = (0.5, 3.0) → geometric mean √1.5 ≈ 1.22 ∈ [0.5, 2]: both tokens kept
    # row 1: ρ = (4, 2, 4) → (32)^(1/3) ≈ 3.17 > 2: all dropped, though ρ = 2 alone is inside
    # row 2: ρ = (0.25) → 0.25 < 0.5: dropped; row 3: no real tokens, counts for nothing
    rho = torch.tensor([[0.5, 3.0, 50.0], [4.0, 2.0, 4.0], [0.25, 1.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [0, 0, 0]])
    weights, metrics = sequence_mask_weights(rho.log(), torch.zeros_like(rho), mask, low=0.5, high=2.0)
    expected = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(weights, expected)
    # 2 of the 3 sequences with real tokens dropped; 2 of 6 real tokens kept
    torch.testing.assert_close(metrics["masked_frac"], torch.tensor(2 / 3, dtype=torch.float64))
    torch.testing.assert_close(metrics["is_weight_mean"], torch.tensor(2 / 6, dtype=torch.float64))


def test_sequence_mask_averages_the_unclamped_log_ratios():
    """Token log ρ = (+25, −20.5): the true geometric mean is e^2.25 ≈ 9.5 > 2, so the sequence is
    dropped; clamping each token to ±20 first would give e^0 = 1 and keep it. (−30, +30): mean 0, kept."""
    log_rho = torch.tensor([[25.0, -20.5], [-30.0, 30.0]], dtype=torch.float64)
    mask = torch.ones(2, 2)
    weights, metrics = sequence_mask_weights(log_rho, torch.zeros_like(log_rho), mask, low=0.5, high=2.0)
    torch.testing.assert_close(weights, torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64))
    assert metrics["masked_frac"] == 0.5


def test_policy_loss_with_unit_weights_equals_without():
    mask, randn = _mini_batch(seed=3)
    old_logprobs, advantages = randn(), randn()
    logprobs = old_logprobs + 0.3 * randn()
    plain, plain_metrics = policy_loss(logprobs, old_logprobs, advantages, mask, dual_clip=3.0)
    ones, _ = policy_loss(logprobs, old_logprobs, advantages, mask, dual_clip=3.0, is_weights=torch.ones_like(mask))
    assert torch.equal(plain, ones)
    assert plain_metrics.keys() == {"clip_frac", "approx_kl", "ratio_mean", "ratio_max"}


def test_policy_loss_is_weights_hand_example():
    # ρ_θ = (1.5, 0.5, 1.5) with A = (+1, −1, −1): token losses (−1.2, 0.8, 1.5) as in §5.1's test;
    # TIS weights (0.5, 2.0) on the real tokens, the third token is padding (weight 7 must not count)
    logprobs = torch.tensor([[1.5, 0.5, 1.5]], dtype=torch.float64).log().requires_grad_()
    adv = torch.tensor([[1.0, -1.0, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    weights = torch.tensor([[0.5, 2.0, 7.0]], dtype=torch.float64).requires_grad_()
    loss, _ = policy_loss(logprobs, torch.zeros_like(adv), adv, mask, is_weights=weights)
    torch.testing.assert_close(loss, torch.tensor((0.5 * -1.2 + 2.0 * 0.8) / 2, dtype=torch.float64))
    seq, _ = policy_loss(logprobs, torch.zeros_like(adv), adv, mask, agg="seq-mean-token-sum-norm", is_weights=weights)
    torch.testing.assert_close(seq, torch.tensor((0.5 * -1.2 + 2.0 * 0.8) / 3, dtype=torch.float64))  # / max_len 3
    loss.backward()
    assert weights.grad is None  # the weights are detached


@pytest.mark.parametrize("make", [
    lambda old, beh, m: tis_weights(old, beh, m, cap=2.0),
    lambda old, beh, m: token_mask_weights(old, beh, m, low=0.5, high=2.0),
    lambda old, beh, m: sequence_mask_weights(old, beh, m, low=0.5, high=2.0),
])
def test_padding_never_contributes_to_weights_or_loss(make):
    mask = torch.tensor([[1, 1, 0, 0]])
    old = torch.tensor([[-1.0, -0.5, float("nan"), 30.0]])
    behaviour = torch.tensor([[-1.2, -0.4, 0.0, float("-inf")]])
    weights, metrics = make(old, behaviour, mask)
    assert weights[0, 2:].eq(0).all() and all(torch.isfinite(v) for v in metrics.values())
    clean, _ = make(old[:, :2], behaviour[:, :2], mask[:, :2])
    torch.testing.assert_close(weights[:, :2], clean)
    adv = torch.tensor([[1.0, -1.0, float("nan"), 5.0]])
    logprobs = torch.tensor([[-0.9, -0.6, 0.0, 0.0]])
    loss, _ = policy_loss(logprobs, old, adv, mask, is_weights=weights)
    short, _ = policy_loss(logprobs[:, :2], old[:, :2], adv[:, :2], mask[:, :2], is_weights=clean,
                           scale=LossScale.from_mask(mask))
    assert torch.isfinite(loss) and torch.equal(loss, short)


# ---- cases the hand examples above leave open (found by mutation testing) --------------------


def test_policy_ratio_uses_the_difference_to_non_zero_old_logprobs():
    # ρ = exp(logp − logp_old): logp_old = (−2, −1), logp = (−2 + ln 1.1, −1 + ln 0.5) → ρ = (1.1, 0.5)
    # A = (+1, +1): L = max(−ρA, −clip(ρ)A) = (max(−1.1, −1.1), max(−0.5, −0.8)) = (−1.1, −0.5)
    old = torch.tensor([[-2.0, -1.0]], dtype=torch.float64)
    logprobs = (old + torch.tensor([[1.1, 0.5]], dtype=torch.float64).log()).requires_grad_()
    adv = torch.ones(1, 2, dtype=torch.float64)
    loss, metrics = policy_loss(logprobs, old, adv, torch.ones_like(adv))
    torch.testing.assert_close(loss, torch.tensor(-0.8, dtype=torch.float64))  # (−1.1 − 0.5) / 2
    torch.testing.assert_close(metrics["ratio_mean"], torch.tensor(0.8, dtype=torch.float64))
    torch.testing.assert_close(metrics["ratio_max"], torch.tensor(1.1, dtype=torch.float64))
    # approx_kl = mean of ρ − 1 − ln ρ = (0.1 − ln 1.1 + (−0.5 + ln 2)) / 2
    expected_kl = (0.1 - math.log(1.1) - 0.5 + LN2) / 2
    torch.testing.assert_close(metrics["approx_kl"], torch.tensor(expected_kl, dtype=torch.float64))
    (grad,) = torch.autograd.grad(loss, logprobs)
    torch.testing.assert_close(grad, torch.tensor([[-1.1, -0.5]], dtype=torch.float64) / 2)


def test_policy_loss_default_clip_is_point_two_on_both_sides():
    # ρ = 1.3, A = +1 → −1.2;  ρ = 0.7, A = −1 → max(0.7, 0.8) = 0.8;  ρ = 1.1, A = +1 → −1.1 (inside)
    loss, grad, metrics = _policy_loss_at([1.3, 0.7, 1.1], [1.0, -1.0, 1.0])
    torch.testing.assert_close(loss, torch.tensor((-1.2 + 0.8 - 1.1) / 3, dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor([0.0, 0.0, -1.1], dtype=torch.float64) / 3)
    torch.testing.assert_close(metrics["clip_frac"], torch.tensor(2 / 3, dtype=torch.float64))


def test_policy_loss_at_ratio_one_is_not_clipped():
    # ρ = 1 exactly: both branches equal −A, so the clip is not "active" and the gradient is −A
    loss, grad, metrics = _policy_loss_at([1.0, 1.0], [2.0, -0.5])
    torch.testing.assert_close(loss, torch.tensor((-2.0 + 0.5) / 2, dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor([-2.0, 0.5], dtype=torch.float64) / 2)
    assert metrics["clip_frac"] == 0.0


def test_dual_clip_leaves_small_positive_advantages_alone():
    # 0 < A < 1: dual-clip applies only where A < 0. ρ = 1, A = 0.5 → −0.5 (not min(−0.5, −1.5))
    loss, grad, _ = _policy_loss_at([1.0], [0.5], dual_clip=3.0)
    assert loss.item() == pytest.approx(-0.5) and grad.item() == pytest.approx(-0.5)
    # A = 0 gives 0 with or without dual-clip
    assert _policy_loss_at([5.0], [0.0], dual_clip=3.0)[0].item() == 0.0
    # −1 < A < 0: ρ = 5, A = −0.5 → max(2.5, 0.6) = 2.5, capped at −cA = 1.5
    loss, grad, _ = _policy_loss_at([5.0], [-0.5], dual_clip=3.0)
    assert loss.item() == pytest.approx(1.5) and grad.item() == 0.0
    # a cap of c = 2 (not a hard-coded 3): ρ = 5, A = −1 → 2
    assert _policy_loss_at([5.0], [-1.0], dual_clip=2.0)[0].item() == pytest.approx(2.0)


def test_dual_clip_just_above_one_is_accepted():
    # c must be > 1: c = 1.5 is valid and caps ρ = 5, A = −1 at 1.5
    loss, _, _ = _policy_loss_at([5.0], [-1.0], dual_clip=1.5)
    assert loss.item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="dual_clip must be > 1, got 1.0"):
        _policy_loss_at([1.0], [1.0], dual_clip=1.0)


def test_policy_metrics_ignore_padding():
    # the padding token has ρ = 10 and a large k3; none of the metrics may see it
    logprobs = torch.tensor([[math.log(1.5), math.log(0.5), math.log(10.0)]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    loss, metrics = policy_loss(logprobs, torch.zeros_like(logprobs), adv, mask)
    torch.testing.assert_close(loss, torch.tensor((-1.2 - 0.5) / 2, dtype=torch.float64))
    assert metrics["clip_frac"] == 0.5  # only ρ = 1.5 is clipped among the real tokens
    torch.testing.assert_close(metrics["ratio_mean"], torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(metrics["ratio_max"], torch.tensor(1.5, dtype=torch.float64))
    expected_kl = (0.5 - math.log(1.5) - 0.5 + LN2) / 2
    torch.testing.assert_close(metrics["approx_kl"], torch.tensor(expected_kl, dtype=torch.float64))
    assert all(m.dtype == torch.float64 for m in metrics.values())


def test_value_loss_clips_below_old_value_and_defaults_to_point_two():
    # V = 0.5, V_old = 1, R = 0: V − V_old = −0.5 → clipped to −0.2, V_clip = 0.8
    # max((0.5 − 0)², (0.8 − 0)²) = 0.64 → ½·0.64 = 0.32 (a clip of 1.2 would leave ½·0.25)
    values = torch.tensor([[0.5]], dtype=torch.float64, requires_grad=True)
    old_values = torch.tensor([[1.0]], dtype=torch.float64)
    returns = torch.zeros(1, 1, dtype=torch.float64)
    mask = torch.ones(1, 1)
    loss, metrics = value_loss(values, old_values, returns, mask)  # default clip
    torch.testing.assert_close(loss, torch.tensor(0.32, dtype=torch.float64))
    assert metrics["clip_frac"] == 1.0 and metrics["clip_frac"].dtype == torch.float64
    (grad,) = torch.autograd.grad(loss, values)
    assert grad.item() == 0.0  # the clipped term does not depend on V
    # an explicit clip of 1.0 leaves it unclipped: ½·0.25, gradient V − R = 0.5
    loss, metrics = value_loss(values, old_values, returns, mask, clip=1.0)
    torch.testing.assert_close(loss, torch.tensor(0.125, dtype=torch.float64))
    assert metrics["clip_frac"] == 0.0


def test_value_loss_takes_the_larger_of_the_two_terms():
    # V = 1.5, V_old = 1, R = 1.6: V_clip = 1.2; (1.5 − 1.6)² = 0.01 < (1.2 − 1.6)² = 0.16 → ½·0.16
    # V = 1.5, V_old = 1, R = 0:   (1.5)² = 2.25 > (1.2)² = 1.44 → ½·2.25 (the clip is not active)
    values = torch.tensor([[1.5, 1.5]], dtype=torch.float64)
    old_values = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    returns = torch.tensor([[1.6, 0.0]], dtype=torch.float64)
    loss, metrics = value_loss(values, old_values, returns, torch.ones(1, 2), clip=0.2)
    torch.testing.assert_close(loss, torch.tensor((0.08 + 1.125) / 2, dtype=torch.float64))
    assert metrics["clip_frac"] == 0.5
    torch.testing.assert_close(metrics["values_mean"], torch.tensor(1.5, dtype=torch.float64))


_SCALE = LossScale(num_tokens=4.0, num_seqs=2.0, max_len=5)  # a mini-batch larger than the micro-batch


def test_value_loss_uses_the_given_mini_batch_scale():
    values, returns = torch.tensor([[1.0, 3.0]]), torch.zeros(1, 2)
    # unclipped token losses ½·(1, 9) = (0.5, 4.5); token-mean over the mini-batch's 4 tokens = 5/4
    loss, _ = value_loss(values, values, returns, torch.ones(1, 2), clip=None, scale=_SCALE)
    torch.testing.assert_close(loss, torch.tensor(1.25))
    loss, _ = value_loss(values, values, returns, torch.ones(1, 2), clip=0.2, scale=_SCALE)
    torch.testing.assert_close(loss, torch.tensor(1.25))
    # seq-mean-token-sum-norm: 5 / (max_len 5 · 2 sequences) = 0.5
    loss, _ = value_loss(values, values, returns, torch.ones(1, 2), agg="seq-mean-token-sum-norm", scale=_SCALE)
    torch.testing.assert_close(loss, torch.tensor(0.5))


def test_sft_kl_entropy_use_the_given_mini_batch_scale():
    mask = torch.ones(1, 2)
    # SFT: NLL (1, 3) → 4 / 4 tokens = 1 (own count would give 2)
    loss, metrics = sft_loss(torch.tensor([[-1.0, -3.0]]), mask, scale=_SCALE)
    torch.testing.assert_close(loss, torch.tensor(1.0))
    torch.testing.assert_close(metrics["nll"], torch.tensor(2.0))  # metrics stay local means
    loss, _ = sft_loss(torch.tensor([[-1.0, -3.0]]), mask, agg="seq-mean-token-mean", scale=_SCALE)
    torch.testing.assert_close(loss, torch.tensor(1.0))  # (4/2 tokens) / 2 sequences
    # KL k1: r = (1, 3) → 4 / 4 = 1
    loss, metrics = kl_loss(torch.tensor([[1.0, 3.0]]), torch.zeros(1, 2), mask, kind="k1", scale=_SCALE)
    torch.testing.assert_close(loss, torch.tensor(1.0))
    torch.testing.assert_close(metrics["kl"], torch.tensor(2.0))
    # entropy (1, 3) → 4 / (5 · 2) with seq-mean-token-sum-norm
    value, metrics = entropy_bonus(torch.tensor([[1.0, 3.0]]), mask, agg="seq-mean-token-sum-norm", scale=_SCALE)
    torch.testing.assert_close(value, torch.tensor(0.4))
    torch.testing.assert_close(metrics["entropy"], torch.tensor(2.0))


def test_kl_loss_k2_and_padding():
    # r = (2, −1) on real tokens, the third is padding: k2 = ½(4, 1) → token-mean 1.25
    logprobs = torch.tensor([[-1.0, -2.0, 5.0]])
    ref_logprobs = torch.tensor([[-3.0, -1.0, -5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, metrics = kl_loss(logprobs, ref_logprobs, mask, kind="k2")
    torch.testing.assert_close(loss, torch.tensor(1.25))
    torch.testing.assert_close(metrics["kl"], torch.tensor(1.25))
    # seq-mean-token-sum-norm, max_len = T = 3: 2.5 / 3
    loss, _ = kl_loss(logprobs, ref_logprobs, mask, kind="k2", agg="seq-mean-token-sum-norm")
    torch.testing.assert_close(loss, torch.tensor(2.5 / 3))


def test_weights_use_the_difference_to_non_zero_behaviour_logprobs():
    # log π_old = (−1 + ln 0.5, −2 + ln 3), log μ = (−1, −2) → ρ = (0.5, 3), as §10's case
    behaviour = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    old = behaviour + torch.tensor([[0.5, 3.0]], dtype=torch.float64).log()
    mask = torch.ones(1, 2)
    weights, metrics = tis_weights(old, behaviour, mask, cap=2.0)
    torch.testing.assert_close(weights, torch.tensor([[0.5, 2.0]], dtype=torch.float64))
    torch.testing.assert_close(metrics["logprob_diff_mean"],
                               torch.tensor((LN2 + math.log(3.0)) / 2, dtype=torch.float64))
    expected_kl = ((0.5 - 1 + LN2) + (3.0 - 1 - math.log(3.0))) / 2
    torch.testing.assert_close(metrics["mismatch_kl"], torch.tensor(expected_kl, dtype=torch.float64))
    assert all(m.dtype == torch.float64 for m in metrics.values())
    # (bounds away from 0.5: −1 + ln 0.5 − (−1) need not round back to ln 0.5 exactly)
    weights, _ = token_mask_weights(old, behaviour, mask, low=0.4, high=2.0)
    torch.testing.assert_close(weights, torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    weights, _ = sequence_mask_weights(old, behaviour, mask, low=0.4, high=2.0)  # √1.5 inside
    torch.testing.assert_close(weights, torch.ones(1, 2, dtype=torch.float64))


def test_tis_ratio_equal_to_the_cap_is_not_truncated():
    # ρ = 1 exactly with cap 1: weight 1, and ρ > cap is false → truncated share 0
    old = torch.tensor([[-0.7, -0.3]], dtype=torch.float64)
    weights, metrics = tis_weights(old, old.clone(), torch.ones(1, 2), cap=1.0)
    torch.testing.assert_close(weights, torch.ones(1, 2, dtype=torch.float64))
    assert metrics["is_truncated_frac"] == 0.0 and metrics["is_truncated_frac"].dtype == torch.float64


def test_tis_clamps_huge_log_ratios_like_the_kl():
    # log ρ = −1000 is clamped to −LOG_RATIO_CLAMP = −20 → w = e⁻²⁰; log ρ = +1000 → capped at 2
    old = torch.tensor([[-1000.0, 0.0]], dtype=torch.float64)
    behaviour = torch.tensor([[0.0, -1000.0]], dtype=torch.float64)
    weights, metrics = tis_weights(old, behaviour, torch.ones(1, 2), cap=2.0)
    # atol 0: e⁻²⁰ ≈ 2e-9 is below the default absolute tolerance, and 0 would pass it
    torch.testing.assert_close(weights, torch.tensor([[math.exp(-20.0), 2.0]], dtype=torch.float64), atol=0, rtol=1e-12)
    assert metrics["is_truncated_frac"] == 0.5


def test_token_mask_bounds_are_inclusive_on_both_sides():
    # ρ = (0.5, 2.0, 2.0·e^0.001): the first two sit exactly on the bounds and stay, the third leaves
    old = torch.tensor([[math.log(0.5), math.log(2.0), math.log(2.0) + 0.001]], dtype=torch.float64)
    weights, metrics = token_mask_weights(old, torch.zeros_like(old), torch.ones(1, 3), low=0.5, high=2.0)
    torch.testing.assert_close(weights, torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(metrics["masked_frac"], torch.tensor(1 / 3, dtype=torch.float64))
    # the sequence level uses the same inclusive bounds: geometric mean exactly 2 is kept
    seq = torch.tensor([[math.log(2.0), math.log(2.0)]], dtype=torch.float64)
    weights, metrics = sequence_mask_weights(seq, torch.zeros_like(seq), torch.ones(1, 2), low=0.5, high=2.0)
    torch.testing.assert_close(weights, torch.ones(1, 2, dtype=torch.float64))
    assert metrics["masked_frac"] == 0.0


def test_sequence_mask_of_a_single_dropped_sequence():
    # one sequence, ρ = (3, 3): dropped → masked_frac 1 of 1, weight mean 0
    old = torch.full((1, 2), math.log(3.0), dtype=torch.float64)
    weights, metrics = sequence_mask_weights(old, torch.zeros_like(old), torch.ones(1, 2), low=0.5, high=2.0)
    assert weights.eq(0).all()
    assert metrics["masked_frac"] == 1.0 and metrics["is_weight_mean"] == 0.0


def test_loss_scale_from_mask_keeps_an_explicit_max_len():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert LossScale.from_mask(mask, max_len=7) == LossScale(num_tokens=3.0, num_seqs=2.0, max_len=7)
    assert LossScale.from_mask(torch.zeros(2, 4)) == LossScale(num_tokens=1.0, num_seqs=1.0, max_len=4)  # ≥ 1


def test_masked_mean_of_one_and_of_no_real_token():
    assert masked_mean(torch.tensor([[3.0, 8.0]]), torch.tensor([[1, 0]])) == 3.0
    assert masked_mean(torch.tensor([[3.0, 8.0]]), torch.tensor([[0, 0]])) == 0.0


def test_policy_loss_huge_log_ratios_stay_finite():
    # log ρ = ±1000 clamps to ±LOG_RATIO_CLAMP = ±20: ρ = (e²⁰, e⁻²⁰), never inf or 0
    # A = (0, +1): token 0 gives max(−0·e²⁰, −0·1.2) = 0 (not 0·inf = NaN); token 1: max(−e⁻²⁰, −0.8)
    logprobs = torch.tensor([[1000.0, -1000.0]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    loss, metrics = policy_loss(logprobs, torch.zeros_like(adv), adv, torch.ones_like(adv))
    torch.testing.assert_close(loss, torch.tensor(-math.exp(-20.0) / 2, dtype=torch.float64))
    torch.testing.assert_close(metrics["ratio_max"], torch.tensor(math.exp(20.0), dtype=torch.float64))
    torch.testing.assert_close(metrics["ratio_mean"], torch.tensor((math.exp(20.0) + math.exp(-20.0)) / 2,
                                                                   dtype=torch.float64))
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert torch.isfinite(grad).all()
    _, metrics = policy_loss(logprobs[:, 1:], torch.zeros(1, 1, dtype=torch.float64), adv[:, 1:], torch.ones(1, 1))
    torch.testing.assert_close(metrics["ratio_mean"], torch.tensor(math.exp(-20.0), dtype=torch.float64),
                               atol=0, rtol=1e-12)  # e⁻²⁰, not exp(−1000) = 0
    # A < 0 with ρ = e²⁰: the loss is large but finite
    loss, _ = policy_loss(logprobs[:, :1], torch.zeros(1, 1, dtype=torch.float64), -torch.ones(1, 1, dtype=torch.float64),
                          torch.ones(1, 1))
    torch.testing.assert_close(loss, torch.tensor(math.exp(20.0), dtype=torch.float64))
