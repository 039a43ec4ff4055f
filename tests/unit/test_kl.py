"""KL estimators and KL coefficient controllers (§2)."""

import json
import math

import pytest
import torch

from rlhf_ray.algorithms.kl import (
    AdaptiveKLController,
    FixedKLController,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalty,
)

LN2 = math.log(2.0)


def test_hand_example_all_kinds():
    # r = logp − ref = (−ln 2, ln 2)
    logprobs = torch.tensor([[0.0, LN2]])
    ref_logprobs = torch.tensor([[LN2, 0.0]])
    # k1 = r; k2 = ½ (ln 2)²; k3(ln 2) = ½ − 1 + ln 2, k3(−ln 2) = 2 − 1 − ln 2
    torch.testing.assert_close(
        kl_penalty(logprobs, ref_logprobs, "k1"), torch.tensor([[-LN2, LN2]])
    )
    torch.testing.assert_close(
        kl_penalty(logprobs, ref_logprobs, "k2"), torch.tensor([[0.5 * LN2**2, 0.5 * LN2**2]])
    )
    torch.testing.assert_close(
        kl_penalty(logprobs, ref_logprobs, "k3"), torch.tensor([[1.0 - LN2, LN2 - 0.5]])
    )


def test_k1_and_k3_unbiased_k1_can_be_negative():
    # Exact expectation under π_θ = p of each estimator, against KL(p ‖ q) = Σ p log(p/q).
    p = torch.tensor([0.5, 0.3, 0.1, 0.1], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    true_kl = (p * (p / q).log()).sum()
    k1 = kl_k1(p.log(), q.log())
    assert (k1 < 0).any()
    torch.testing.assert_close((p * k1).sum(), true_kl)
    torch.testing.assert_close((p * kl_k3(p.log(), q.log())).sum(), true_kl)
    assert not torch.isclose((p * kl_k2(p.log(), q.log())).sum(), true_kl)


def test_k2_k3_nonnegative():
    torch.manual_seed(0)
    logprobs, ref_logprobs = torch.randn(2, 4, 64) * 3
    assert (kl_k2(logprobs, ref_logprobs) >= 0).all()
    assert (kl_k3(logprobs, ref_logprobs) >= 0).all()


def test_huge_log_ratio_stays_finite():
    logprobs = torch.tensor([[-1000.0, 0.0]], requires_grad=True)
    ref_logprobs = torch.tensor([[0.0, -1000.0]])
    k3 = kl_penalty(logprobs, ref_logprobs, "k3")
    k3.sum().backward()
    assert torch.isfinite(k3).all() and torch.isfinite(logprobs.grad).all()
    # r = −1000 clamps to −20: e^20 − 1 − 20
    torch.testing.assert_close(k3[0, 0], torch.tensor(math.exp(20.0) - 21.0))


def test_unknown_kind_names_valid_ones():
    with pytest.raises(ValueError, match="k1.*k2.*k3"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


def test_fixed_controller_is_constant():
    controller = FixedKLController(0.05)
    controller.update(kl=100.0, n_steps=1000)
    assert controller.value == 0.05


@pytest.mark.parametrize(
    "kl, expected",
    [
        (6.6, 0.1 * (1 + 0.1 * 256 / 10000)),  # e = 6.6/6 − 1 = 0.1
        (100.0, 0.1 * (1 + 0.2 * 256 / 10000)),  # e = 15.7 → clipped to 0.2
        (0.0, 0.1 * (1 - 0.2 * 256 / 10000)),  # e = −1 → clipped to −0.2
    ],
)
def test_adaptive_controller_formula_and_clip(kl, expected):
    controller = AdaptiveKLController(init=0.1, target=6.0, horizon=10000)
    controller.update(kl=kl, n_steps=256)
    assert controller.value == pytest.approx(expected, rel=1e-12)


def test_controller_state_roundtrips_through_json():
    controller = AdaptiveKLController(init=0.1, target=6.0, horizon=10000)
    controller.update(kl=9.0, n_steps=64)
    restored = AdaptiveKLController(init=0.1, target=6.0, horizon=10000)
    restored.load_state_dict(json.loads(json.dumps(controller.state_dict())))
    assert restored.value == controller.value != 0.1

    fixed = FixedKLController(0.0)
    fixed.load_state_dict(json.loads(json.dumps(FixedKLController(0.3).state_dict())))
    assert fixed.value == 0.3


def test_k2_uses_the_difference_of_non_zero_log_probs():
    # r = −1 − (−3) = 2: k1 = 2, k2 = ½·2² = 2; k3 = e⁻² − 1 + 2 = 1 + e⁻²
    logprobs, ref_logprobs = torch.tensor([[-1.0]]), torch.tensor([[-3.0]])
    torch.testing.assert_close(kl_k1(logprobs, ref_logprobs), torch.tensor([[2.0]]))
    torch.testing.assert_close(kl_k2(logprobs, ref_logprobs), torch.tensor([[2.0]]))
    torch.testing.assert_close(kl_k3(logprobs, ref_logprobs), torch.tensor([[1.0 + math.exp(-2.0)]]))


def test_k3_clamps_large_positive_log_ratios_too():
    # r = +1000 clamps to +20: e⁻²⁰ − 1 + 20 (unclamped it would be 999)
    k3 = kl_k3(torch.tensor([[0.0]]), torch.tensor([[-1000.0]]))
    torch.testing.assert_close(k3, torch.tensor([[math.exp(-20.0) + 19.0]]))
