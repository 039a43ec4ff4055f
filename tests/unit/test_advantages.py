"""GAE, group estimators, REINFORCE++ returns, whitening (§4)."""

import pytest
import torch

from rlhf_ray.algorithms.advantages import (
    broadcast_to_tokens,
    compute_gae,
    dr_grpo_advantages,
    group_advantages,
    grpo_advantages,
    reinforce_baseline_advantages,
    reinforce_pp_returns,
    rloo_advantages,
    whiten,
)

KINDS = ["grpo", "dr_grpo", "rloo", "reinforce_baseline"]


def _random_padded(batch: int = 4, length: int = 6, seed: int = 0):
    """Random rewards, values (B, T) with garbage on padding, and a right-padded mask."""
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.randn(batch, length, generator=generator, dtype=torch.float64)
    values = torch.randn(batch, length, generator=generator, dtype=torch.float64)
    lengths = torch.tensor([length, 1, 3, length - 1])[:batch]
    mask = (torch.arange(length) < lengths.unsqueeze(1)).float()  # (B, T)
    return rewards, values, mask


def test_gae_hand_example_ignores_padding():
    rewards = torch.tensor([[0.0, 1.0, 99.0]])  # last token is padding
    values = torch.tensor([[0.5, 0.25, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # γ = 1, λ = 0.5: δ_1 = 1 + 0 − 0.25 = 0.75, A_1 = 0.75
    #                 δ_0 = 0 + 0.25 − 0.5 = −0.25, A_0 = −0.25 + 0.5·0.75 = 0.125
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[0.125, 0.75, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.625, 1.0, 0.0]]))  # A + V


def test_gae_hand_example_discounted():
    rewards = torch.tensor([[0.0, 1.0]])
    values = torch.tensor([[0.5, 0.25]])
    # γ = 0.5, λ = 1: δ_1 = 1 − 0.25 = 0.75; δ_0 = 0 + 0.5·0.25 − 0.5 = −0.375
    #                 A_0 = −0.375 + 0.5·0.75 = 0
    advantages, returns = compute_gae(rewards, values, torch.ones(1, 2), gamma=0.5, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.0, 0.75]]))
    torch.testing.assert_close(returns, torch.tensor([[0.5, 1.0]]))


def test_gae_lambda_one_is_reward_to_go_minus_value():
    rewards, values, mask = _random_padded()
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    real_rewards = rewards * mask
    reward_to_go = real_rewards.flip(1).cumsum(1).flip(1)  # Σ_{k≥t} rew_k
    torch.testing.assert_close(advantages, (reward_to_go - values) * mask)
    torch.testing.assert_close(returns, reward_to_go * mask)


def test_gae_lambda_zero_is_td_error():
    rewards, values, mask = _random_padded(seed=1)
    gamma = 0.9
    advantages, _ = compute_gae(rewards, values, mask, gamma=gamma, lam=0.0)
    real_values = values * mask
    next_values = torch.cat([real_values[:, 1:], torch.zeros(4, 1, dtype=values.dtype)], dim=1)
    delta = rewards + gamma * next_values - values
    torch.testing.assert_close(advantages, delta * mask)


def test_gae_padding_gets_zero():
    rewards, values, mask = _random_padded(seed=2)
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.99, lam=0.95)
    assert (advantages[mask == 0] == 0).all() and (returns[mask == 0] == 0).all()


def test_gae_skips_a_hole_in_the_mask():
    rewards, values, _ = _random_padded(batch=1, length=3, seed=3)
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    advantages, _ = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    compact, _ = compute_gae(rewards[:, [0, 2]], values[:, [0, 2]], torch.ones(1, 2), 0.9, 0.8)
    torch.testing.assert_close(advantages[:, [0, 2]], compact)
    assert advantages[0, 1] == 0


def test_reinforce_pp_returns_hand_example():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # γ = 0.5: G_2 = 3, G_1 = 2 + 0.5·3 = 3.5, G_0 = 1 + 0.5·3.5 = 2.75
    returns = reinforce_pp_returns(rewards, mask, gamma=0.5)
    torch.testing.assert_close(returns, torch.tensor([[2.75, 3.5, 3.0, 0.0]]))


def test_group_estimators_hand_example():
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])  # two groups of 3
    # group 1: mean 2, sample std sqrt((1 + 0 + 1)/2) = 1 → ±1/(1 + ε); group 2: all equal → 0/ε = 0
    torch.testing.assert_close(
        grpo_advantages(scores, 3, eps=1e-6),
        torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / (1 + 1e-6),
    )
    torch.testing.assert_close(
        dr_grpo_advantages(scores, 3), torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    )
    torch.testing.assert_close(
        reinforce_baseline_advantages(scores, 3), torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    )
    # RLOO: 1 − (2+3)/2 = −1.5, 2 − (1+3)/2 = 0, 3 − (1+2)/2 = 1.5
    torch.testing.assert_close(
        rloo_advantages(scores, 3), torch.tensor([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0])
    )


def test_grpo_eps_in_denominator():
    # scores (0, 2): mean 1, sample std sqrt(2); (0 − 1)/(sqrt 2 + 0.5)
    out = group_advantages(torch.tensor([0.0, 2.0]), 2, "grpo", eps=0.5)
    expected = 1.0 / (2.0**0.5 + 0.5)
    torch.testing.assert_close(out, torch.tensor([-expected, expected]))


@pytest.mark.parametrize("kind", KINDS)
def test_group_advantages_zero_mean_per_group(kind):
    scores = torch.randn(12, generator=torch.Generator().manual_seed(4))
    advantages = group_advantages(scores, 4, kind)
    assert advantages.shape == (12,) and advantages.dtype == torch.float32
    torch.testing.assert_close(advantages.view(3, 4).mean(dim=1), torch.zeros(3), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_all_equal_group_gets_zero(kind):
    advantages = group_advantages(torch.full((8,), 0.7), 4, kind)
    assert (advantages == 0).all()


def test_rloo_matches_leave_one_out_loop():
    scores = torch.randn(10, generator=torch.Generator().manual_seed(5))
    expected = []
    for group in scores.view(2, 5):
        for i in range(5):
            others = torch.cat([group[:i], group[i + 1 :]])
            expected.append(group[i] - others.mean())
    torch.testing.assert_close(group_advantages(scores, 5, "rloo"), torch.stack(expected))


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4, "grpo")
    with pytest.raises(ValueError, match="rloo"):
        group_advantages(torch.zeros(4), 1, "rloo")
    with pytest.raises(ValueError, match="grpo"):
        group_advantages(torch.zeros(4), 1, "grpo")
    with pytest.raises(ValueError, match="dr_grpo"):
        group_advantages(torch.zeros(4), 2, "ppo")


def test_whiten_hand_example():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # masked mean 2, population variance 1 → (−1, 1); padding → 0
    torch.testing.assert_close(whiten(x, mask, eps=0.0), torch.tensor([[-1.0, 1.0, 0.0]]))
    # scale only: (−1, 1) + 2
    torch.testing.assert_close(
        whiten(x, mask, shift_mean=False, eps=0.0), torch.tensor([[1.0, 3.0, 0.0]])
    )


def test_whiten_masked_moments():
    _, values, mask = _random_padded(seed=6)
    x = 3.0 * values + 5.0
    real = mask.bool()
    whitened = whiten(x, mask)
    torch.testing.assert_close(whitened[real].mean(), torch.tensor(0.0, dtype=x.dtype))
    torch.testing.assert_close(whitened[real].var(unbiased=False), torch.tensor(1.0, dtype=x.dtype))
    assert (whitened[~real] == 0).all()

    scaled = whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(scaled[real].mean(), x[real].mean())
    torch.testing.assert_close(scaled[real].var(unbiased=False), torch.tensor(1.0, dtype=x.dtype))


def test_broadcast_to_tokens():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask)
    torch.testing.assert_close(out, torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))


def test_rloo_at_minimal_group_size_two():
    # n = 2: the leave-one-out baseline is the other sample: (1 − 4, 4 − 1) = (−3, 3)
    torch.testing.assert_close(rloo_advantages(torch.tensor([1.0, 4.0]), 2), torch.tensor([-3.0, 3.0]))
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, 4.0]), 2, "rloo"), torch.tensor([-3.0, 3.0]))


def test_whiten_constant_tensor_is_zero_not_nan():
    # all real entries equal: mean 5, var 0 → (x − 5)/sqrt(0 + ε) = 0, and finite
    x = torch.tensor([[5.0, 5.0, -3.0], [5.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(whiten(x, mask), torch.zeros(2, 3), atol=0, rtol=0)
    # scale only: 0 + mean 5 on the real tokens
    torch.testing.assert_close(whiten(x, mask, shift_mean=False), 5.0 * mask, atol=0, rtol=0)


def test_whiten_single_real_token():
    # one real entry: mean = 4, var = 0 → 0 (a count clamped to 2 would give mean 2, var 4 → 1)
    x = torch.tensor([[4.0, 9.0]])
    mask = torch.tensor([[1.0, 0.0]])
    torch.testing.assert_close(whiten(x, mask), torch.zeros(1, 2), atol=0, rtol=0)
    torch.testing.assert_close(whiten(x, mask, shift_mean=False), torch.tensor([[4.0, 0.0]]), atol=0, rtol=0)


def test_grpo_default_eps_is_tiny():
    # scores (0, 2): ±1/(sqrt 2 + 1e-6) with the default ε
    expected = 1.0 / (2.0**0.5 + 1e-6)
    torch.testing.assert_close(grpo_advantages(torch.tensor([0.0, 2.0]), 2), torch.tensor([-expected, expected]))
    torch.testing.assert_close(group_advantages(torch.tensor([0.0, 2.0]), 2, "grpo"), torch.tensor([-expected, expected]))


@pytest.mark.parametrize("kind", ["dr_grpo", "reinforce_baseline"])
def test_mean_baselines_accept_groups_of_one(kind):
    # n = 1: each sample is its own group mean → advantage 0 (no std or leave-one-out needed)
    assert group_advantages(torch.tensor([1.0, -2.0, 3.0]), 1, kind).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="groups of 0"):
        group_advantages(torch.tensor([1.0, 2.0]), 0, kind)


def test_broadcast_keeps_the_values_dtype():
    # a float64 (or bool) mask must not change the dtype of float32 advantages
    values = torch.tensor([2.0, -1.0])
    out = broadcast_to_tokens(values, torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[2.0, 0.0], [-1.0, -1.0]]))
