"""Evaluation math (ALGORITHMS.md §9, §11): LC win-rate, reward-model report, refusals, lengths, watch, gate."""

import math

import numpy as np
import pytest

from rlhf_ray.eval_metrics import (
    LENGTH_L2,
    OverOptimisationWatch,
    check_gate,
    expected_calibration_error,
    fit_length_controlled,
    fit_logistic_soft,
    length_stats,
    refusal_share,
    reward_model_report,
    win_rate_report,
)


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# --- logistic fit and length-controlled win-rate (§11) -------------------------------------------


def test_soft_logistic_intercept_only_is_logit_of_mean():
    features = np.ones((4, 1))
    targets = np.array([1.0, 0.0, 0.0, 0.0])
    weights = fit_logistic_soft(features, targets, l2=np.array([1e-12]))
    # ∂/∂w Σ [p log σ(w) + (1−p) log(1−σ(w))] = Σ (p − σ(w)) = 0 → σ(w) = mean p = ¼ → w = log(¼/¾) = −log 3
    assert weights[0] == pytest.approx(-math.log(3.0), abs=1e-9)


def test_lc_equals_raw_when_lengths_are_equal():
    fit = fit_length_controlled([1.0, 0.0, 0.5, 1.0], [5, 7, 9, 3], [5, 7, 9, 3])
    # raw = (1 + 0 + ½ + 1)/4 = 0.625; all Δlen = 0 → σ_len = 0, no length term,
    # intercept-only fit: σ(quality) = mean p = 0.625, quality = log(0.625/0.375) = log(5/3)
    assert fit.win_rate == 0.625
    assert fit.sigma_len == 0.0
    assert fit.length_coef == 0.0
    assert fit.lc_win_rate == pytest.approx(0.625, abs=1e-6)
    assert fit.quality == pytest.approx(math.log(5 / 3), abs=1e-6)


def test_lc_symmetric_length_explained_case_is_half():
    # the model wins exactly when it is 10 longer, loses when 10 shorter: Δ = (+10, +10, −10, −10)
    fit = fit_length_controlled([1.0, 1.0, 0.0, 0.0], [20, 30, 5, 10], [10, 20, 15, 20])
    # σ_len = population std of (10, 10, −10, −10) = 10 → t_i = tanh(±1)
    assert fit.sigma_len == pytest.approx(10.0)
    # the data is unchanged by (p, t) → (1 − p, −t), so the optimum has quality = 0 and LC = σ(0) = ½
    assert fit.win_rate == 0.5
    assert fit.quality == pytest.approx(0.0, abs=1e-9)
    assert fit.lc_win_rate == pytest.approx(0.5, abs=1e-9)
    # ∂/∂β: Σ t_i (p_i − σ(β t_i)) − λβ = 4 tanh(1) σ(−β tanh(1)) − λβ = 0 at the fitted β
    beta, t = fit.length_coef, math.tanh(1.0)
    assert 4 * t * _sigmoid(-beta * t) == pytest.approx(LENGTH_L2 * beta, rel=1e-6)
    assert beta > 3.0  # the judge is (fitted as) strongly length-driven


def test_lc_moves_toward_half_when_length_explains_wins():
    # wins exactly when longer: Δ = (+10, +20, +30, −10), p = (1, 1, 1, 0), raw = ¾
    model, baseline = [20, 30, 40, 10], [10, 10, 10, 20]
    fit = fit_length_controlled([1.0, 1.0, 1.0, 0.0], model, baseline)
    assert fit.win_rate == 0.75
    assert 0.5 < fit.lc_win_rate < 0.6  # most of the ¾ is length; numerically 0.538
    assert fit.length_coef > 0
    # first-order condition of the (unpenalised) intercept: Σ (p_i − σ(q + β t_i)) = 0,
    # i.e. the mean predicted preference WITH the length term reproduces raw = ¾
    t = np.tanh((np.array(model) - np.array(baseline)) / fit.sigma_len)
    predicted = 1.0 / (1.0 + np.exp(-(fit.quality + fit.length_coef * t)))
    assert predicted.mean() == pytest.approx(0.75, abs=1e-6)
    # LC with the length term at 0 is σ(quality) for every comparison
    assert fit.lc_win_rate == pytest.approx(_sigmoid(fit.quality))


def test_lc_swapping_model_and_baseline_mirrors():
    model, baseline = [20, 30, 40, 10], [10, 10, 10, 20]
    fit = fit_length_controlled([1.0, 1.0, 0.5, 0.0], model, baseline)
    swapped = fit_length_controlled([0.0, 0.0, 0.5, 1.0], baseline, model)
    # p → 1 − p and Δ → −Δ maps the likelihood onto itself with (q, β) → (−q, β): LC' = 1 − LC
    assert swapped.lc_win_rate == pytest.approx(1.0 - fit.lc_win_rate, abs=1e-9)
    assert swapped.length_coef == pytest.approx(fit.length_coef, abs=1e-9)


def test_lc_all_wins_stays_one():
    fit = fit_length_controlled([1.0, 1.0, 1.0], [1, 50, 9], [20, 3, 9])
    # every preference is 1: no length pattern to explain, LC = raw = 1 (within the 1e-8 intercept prior)
    assert fit.lc_win_rate == pytest.approx(1.0, abs=1e-6)
    assert fit.length_coef == pytest.approx(0.0, abs=1e-4)  # only its N(0, 10²) prior pins it, at ~0


def test_lc_instruction_terms_keep_lc_equal_raw_without_length_effect():
    fit = fit_length_controlled([1.0, 1.0, 0.0, 0.5], [4, 4, 4, 4], [4, 4, 4, 4], instruction_ids=["a", "a", "b", "b"])
    # no length term; the intercept's score equation: mean_i σ(q + d_{k(i)}) = mean p = 2.5/4 = 0.625
    assert fit.lc_win_rate == pytest.approx(0.625, abs=1e-6)
    assert fit.win_rate == 0.625


def test_lc_rejects_bad_inputs():
    with pytest.raises(ValueError, match="one entry per comparison"):
        fit_length_controlled([1.0, 0.0], [1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fit_length_controlled([1.5], [1], [1])
    with pytest.raises(ValueError, match="no comparisons"):
        fit_length_controlled([], [], [])


def test_win_rate_report_bootstrap_two_comparisons():
    report = win_rate_report([0.0, 1.0], [3, 3], [3, 3], n_bootstrap=400, seed=0)
    # resamples of {0, 1}: {0,0} (¼) → 0, mixed (½) → ½, {1,1} (¼) → 1; ~100 of 400 are 0 and ~100 are 1,
    # far more than the 10 in each 2.5 % tail → percentile interval (0, 1); equal lengths → LC ≈ raw
    assert (report.win_rate, report.n) == (0.5, 2)
    assert report.win_rate_interval == (0.0, 1.0)
    assert report.lc_win_rate_interval == pytest.approx((0.0, 1.0), abs=1e-6)


def test_win_rate_report_all_ties_has_point_interval():
    report = win_rate_report([0.5] * 5, [1, 9, 4, 30, 2], [5, 5, 5, 5, 5], n_bootstrap=50, seed=3)
    # every resample is all ½: q = β = 0 zeroes the gradient Σ t_i^k (½ − σ(0)) = 0 → LC = raw = ½
    assert report.win_rate_interval == (0.5, 0.5)
    assert report.lc_win_rate_interval == pytest.approx((0.5, 0.5), abs=1e-9)
    assert report.lc_win_rate == pytest.approx(0.5, abs=1e-9)


def test_win_rate_report_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(1)
    delta = rng.normal(0.0, 100.0, size=60)
    prefs = (rng.random(60) < 1.0 / (1.0 + np.exp(-np.tanh(delta / 100.0) * 2.0))).astype(float)
    args = (prefs.tolist(), (300 + delta).tolist(), [300.0] * 60)
    first = win_rate_report(*args, n_bootstrap=100, seed=7)
    again = win_rate_report(*args, n_bootstrap=100, seed=7)
    assert first == again  # same seed → same resamples → same intervals
    low, high = first.win_rate_interval
    assert low < first.win_rate < high
    low, high = first.lc_win_rate_interval
    assert low < first.lc_win_rate < high


# --- reward model on preference pairs (§9) -------------------------------------------------------

CHOSEN = [2.0, 1.0, 0.0, 3.0, 1.0]
REJECTED = [1.0, 1.0, 1.0, 0.0, 2.0]  # margins (1, 0, −1, 3, −1) → correct (1, ½, 0, 1, 0)
SUBSETS = ["chat", "chat", "safety", "safety", "reasoning"]
CHOSEN_LEN = [5, 10, 10, 3, 8]
REJECTED_LEN = [10, 10, 5, 3, 2]  # chosen shorter, equal, longer, equal, longer


def test_reward_model_report_accuracy_subsets_sections():
    report = reward_model_report(
        CHOSEN, REJECTED, SUBSETS, CHOSEN_LEN, REJECTED_LEN,
        sections={"chat": "Chat", "safety": "Safety", "reasoning": "Safety"},
    )
    assert (report.accuracy, report.n) == (0.5, 5)  # (1 + ½ + 0 + 1 + 0)/5 = 2.5/5, the tie counts ½
    assert report.subsets["chat"].accuracy == 0.75 and report.subsets["chat"].n == 2  # (1 + ½)/2
    assert report.subsets["safety"].accuracy == 0.5 and report.subsets["safety"].n == 2  # (0 + 1)/2
    assert report.subsets["reasoning"].accuracy == 0.0 and report.subsets["reasoning"].n == 1
    assert list(report.subsets) == ["chat", "safety", "reasoning"]  # order of first appearance
    # Chat = 0.75; Safety pools safety + reasoning: (0 + 1 + 0)/3 = ⅓; average (0.75 + ⅓)/2 = 13/24
    assert report.sections == pytest.approx({"Chat": 0.75, "Safety": 1 / 3})
    assert report.section_average == pytest.approx(13 / 24)


def test_reward_model_report_calibration_and_log_loss():
    report = reward_model_report(CHOSEN, REJECTED, SUBSETS, CHOSEN_LEN, REJECTED_LEN, n_bins=5)
    # log-loss = mean softplus(−m) = [log(1+e⁻¹) + log 2 + log(1+e) + log(1+e⁻³) + log(1+e)]/5 ≈ 0.7363
    expected = (math.log1p(math.exp(-1)) + math.log(2) + 2 * math.log1p(math.e) + math.log1p(math.exp(-3))) / 5
    assert report.log_loss == pytest.approx(expected)
    # confidences σ(|m|) = (σ1, ½, σ1, σ3, σ1) = (.731, .5, .731, .953, .731); 5 bins of width .1 on [.5, 1]:
    #   [.5, .6): the tie, conf ½, acc ½ → gap 0
    #   [.7, .8): pairs 0, 2, 4, conf σ1, acc (1 + 0 + 0)/3 = ⅓ → gap σ1 − ⅓ ≈ 0.3977
    #   [.9, 1]: pair 3, conf σ3, acc 1 → gap 1 − σ3 ≈ 0.0474
    # ECE = (3·(σ1 − ⅓) + 1·(1 − σ3))/5 ≈ 0.2481
    expected_ece = (3 * (_sigmoid(1) - 1 / 3) + (1 - _sigmoid(3))) / 5
    assert report.ece == pytest.approx(expected_ece)
    assert report.sections == {} and math.isnan(report.section_average)


def test_reward_model_report_length_bias():
    report = reward_model_report(CHOSEN, REJECTED, SUBSETS, CHOSEN_LEN, REJECTED_LEN)
    # shorter: pair 0 → 1/1; equal: pairs 1, 3 → (½ + 1)/2 = 0.75; longer: pairs 2, 4 → (0 + 0)/2 = 0
    assert (report.chosen_shorter.accuracy, report.chosen_shorter.n) == (1.0, 1)
    assert (report.equal_length.accuracy, report.equal_length.n) == (0.75, 2)
    assert (report.chosen_longer.accuracy, report.chosen_longer.n) == (0.0, 2)


def test_reward_model_report_empty_length_bucket_is_nan_and_unmapped_subset_raises():
    report = reward_model_report([1.0], [0.0], ["x"], [3], [3])
    assert report.chosen_shorter.n == 0 and math.isnan(report.chosen_shorter.accuracy)
    with pytest.raises(ValueError, match="without a section"):
        reward_model_report(CHOSEN, REJECTED, SUBSETS, CHOSEN_LEN, REJECTED_LEN, sections={"chat": "Chat"})


def test_ece_perfectly_calibrated_bin_is_zero():
    margin = math.log(3.0)  # σ(log 3) = ¾
    # four pairs at confidence ¾, three right and one wrong → acc ¾ = conf → ECE 0
    assert expected_calibration_error(np.array([margin, margin, margin, -margin])) == pytest.approx(0.0, abs=1e-12)


# --- refusals and lengths -------------------------------------------------------------------------


def test_refusal_share_default_patterns():
    responses = [
        "I'm sorry, but I can't do that.",  # "I'm sorry, but"
        "Sure! Here is the code.",
        "As an AI language model, I have no opinions.",  # "As an AI"
        "i cannot assist with that",  # case-insensitive "I cannot assist"
        "I can’t help with that request.",  # typographic apostrophe
        "The sorry state of affairs is explained below.",
    ]
    result = refusal_share(responses)
    assert result.flags == (True, False, True, True, True, False)
    assert result.share == pytest.approx(4 / 6)


def test_refusal_share_custom_patterns():
    result = refusal_share(["no way", "No WAY!", "yes"], patterns=[r"no way"])
    assert result.flags == (True, True, False)  # 2 of 3
    assert result.share == pytest.approx(2 / 3)


def test_length_stats_hand_example():
    stats = length_stats(list(range(1, 11)), [False] * 8 + [True] * 2)
    # 1..10: mean = median = 5.5; p90 at position 0.9·(10 − 1) = 8.1 → 9 + 0.1·(10 − 9) = 9.1; max 10
    assert (stats.n, stats.mean, stats.median, stats.max) == (10, 5.5, 5.5, 10.0)
    assert stats.p90 == pytest.approx(9.1)
    assert stats.truncated_share == 0.2  # 2 of 10


# --- over-optimisation watch ---------------------------------------------------------------------


def test_watch_fires_when_gold_falls_while_proxy_rises():
    watch = OverOptimisationWatch(patience=2, min_delta=0.05)
    # best gold 0.70 at step 200 → the threshold is 0.70 − 0.05 = 0.65
    assert not watch.update(100, proxy_reward=1.0, gold_reward=0.50)
    assert not watch.update(200, proxy_reward=1.5, gold_reward=0.70)  # new best
    assert not watch.update(300, proxy_reward=2.0, gold_reward=0.68)  # 0.68 ≥ 0.65: not below
    assert not watch.update(400, proxy_reward=2.5, gold_reward=0.60)  # below, 1 in a row
    assert watch.update(500, proxy_reward=3.0, gold_reward=0.55)  # below, 2 in a row; proxy 2.0 (300) → 3.0
    assert watch.triggered and watch.best_step == 200
    for fragment in ("0.55 at step 500", "best 0.7 at step 200", "from 2 at step 300 to 3", "2 evaluations"):
        assert fragment in watch.reason
    assert watch.update(600, proxy_reward=0.0, gold_reward=0.9)  # latched
    assert watch.best_step == 200


def test_watch_gold_noise_within_min_delta_never_fires():
    watch = OverOptimisationWatch(patience=2, min_delta=0.05)
    golds = [0.70, 0.67, 0.69, 0.66, 0.68, 0.655]  # all ≥ 0.70 − 0.05 = 0.65
    for i, gold in enumerate(golds):
        assert not watch.update(100 * i, proxy_reward=float(i), gold_reward=gold)
    assert watch.best_step == 0 and watch.reason == ""


def test_watch_proxy_falling_too_does_not_fire():
    watch = OverOptimisationWatch(patience=2, min_delta=0.05)
    for step, proxy, gold in [(100, 1.0, 0.5), (200, 1.5, 0.7), (300, 2.0, 0.68), (400, 1.8, 0.6), (500, 1.6, 0.55)]:
        assert not watch.update(step, proxy, gold)  # at 500: proxy 1.6 < 2.0 at step 300
    assert not watch.update(600, 1.7, 0.50)  # span 500–600 starts after 400: 1.7 < 1.8
    assert watch.update(700, 1.9, 0.50)  # span starts after 500: 1.9 > 1.6, gold below for 3 in a row


def test_watch_recovery_breaks_the_run():
    watch = OverOptimisationWatch(patience=2, min_delta=0.05)
    for step, gold in [(1, 0.7), (2, 0.6), (3, 0.66), (4, 0.6)]:  # below, within, below: never 2 in a row
        assert not watch.update(step, proxy_reward=float(step), gold_reward=gold)


# --- gate ----------------------------------------------------------------------------------------


def test_check_gate_reports_each_failure():
    metrics = {"eval/win_rate": 0.6, "eval/refusal_share": 0.3, "eval/rm_accuracy": 1.0, "unused": 0.0}
    gate = {
        "eval/win_rate": (">=", 0.5),  # 0.6 ≥ 0.5 passes
        "eval/refusal_share": ("<=", 0.2),  # 0.3 ≤ 0.2 fails
        "eval/rm_accuracy": (">", 1.0),  # 1.0 > 1.0 fails (strict)
        "eval/length_mean": ("<", 3.0),  # missing fails
    }
    assert check_gate(metrics, gate) == [
        "eval/refusal_share: 0.3 fails <= 0.2",
        "eval/rm_accuracy: 1 fails > 1",
        "eval/length_mean: missing, gate requires < 3",
    ]
    assert check_gate({"a": 0.5}, {"a": (">=", 0.5)}) == []  # the boundary passes a non-strict op
    assert check_gate({"a": math.nan}, {"a": ("<", 1.0)}) == ["a: nan fails < 1"]


def test_check_gate_unknown_op_raises():
    with pytest.raises(ValueError, match="unknown op"):
        check_gate({"a": 1.0}, {"a": ("==", 1.0)})
