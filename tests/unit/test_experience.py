"""The driver's math between scoring and the update: hand-computed examples and invariants."""

import numpy as np
import pytest
import torch

from rlhf_ray.batch import Experience, Samples
from rlhf_ray.config import load_config
from rlhf_ray.trainers.evaluation import mean_pass_at_k, pass_at_k, win_rate
from rlhf_ray.trainers.experience import (
    RunningMoments, Scored, group_rows, group_stats, informative_groups, make_experience, plan_update, shape_scores,
    token_rewards)


def _samples(lengths: list[int], t: int = 4) -> Samples:
    b = len(lengths)
    mask = torch.tensor([[1] * n + [0] * (t - n) for n in lengths])
    return Samples(prompt_ids=torch.ones(b, 2, dtype=torch.long), prompt_mask=torch.ones(b, 2, dtype=torch.long),
                   response_ids=torch.full((b, t), 5) * mask, response_mask=mask,
                   stopped=torch.tensor([n < t for n in lengths]))


def test_token_rewards_put_score_on_last_real_token():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]).float()
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.5, 9.0, 9.0, 9.0]])
    rewards = token_rewards(torch.tensor([1.0, -2.0]), kl, kl_coef=0.5, mask=mask)
    # row 0: −0.5·kl on real tokens, +1 at t=2; row 1: −0.25 + (−2) at t=0; padding 0
    expected = torch.tensor([[-0.05, -0.1, -0.15 + 1.0, 0.0], [-0.25 - 2.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)


def test_shape_scores_penalty_clip_and_batch_norm():
    cfg = load_config(None, ["reward.missing_eos_penalty=-1", "reward.clip=1.5"])
    out = shape_scores(torch.tensor([1.0, 2.0, -3.0]), torch.tensor([True, False, True]), torch.tensor([3, 16, 2]), cfg,
                       RunningMoments())
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0, -1.5]))  # 2 − 1 = 1; −3 clipped
    cfg = load_config(None, ["reward.normalize=batch"])
    out = shape_scores(torch.tensor([1.0, 3.0]), torch.tensor([True, True]), torch.tensor([2, 2]), cfg, RunningMoments())
    torch.testing.assert_close(out, torch.tensor([-1.0, 1.0]), atol=1e-6, rtol=0)


def test_overlong_penalty_is_linear_in_the_buffer():
    # max 16, buffer 4: no penalty up to 12 tokens, then −¼ per token, −1 at 16
    cfg = load_config(None, ["rollout.max_new_tokens=16", "reward.overlong_buffer=4", "reward.overlong_penalty=1"])
    lengths = torch.tensor([10, 12, 13, 14, 16])
    out = shape_scores(torch.zeros(5), torch.ones(5, dtype=torch.bool), lengths, cfg, RunningMoments())
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0]))


def test_group_stats_and_informative_groups():
    scores = torch.tensor([1.0, 1.0, 0.0, 2.0, 3.0, 3.0])
    assert informative_groups(scores, 2).tolist() == [False, True, False]
    stats = group_stats(scores, 2)
    assert stats["reward/zero_adv_group_frac"] == pytest.approx(2 / 3)
    assert stats["reward/group_std_mean"] == pytest.approx(1 / 3)  # stds 0, 1, 0
    assert group_rows(torch.tensor([2, 0]), 2).tolist() == [4, 5, 0, 1]


def test_mask_truncated_removes_truncated_rows_from_the_loss_only():
    cfg = load_config(None, ["algo.advantage=grpo", "rollout.samples_per_prompt=2", "algo.mask_truncated=true"])
    samples = _samples([2, 4], t=4)  # the second hit the limit without EOS
    exp, metrics = make_experience(samples, _scored(samples, [1.0, 0.0]), torch.tensor([1.0, 0.0]), cfg, 0.0)
    assert exp.response_mask.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0]]
    assert metrics["response/truncated_frac"] == 0.5 and metrics["response/length_mean"] == 3.0


def test_running_moments_match_numpy():
    rng = np.random.default_rng(0)
    chunks = [rng.normal(3, 2, size=n) for n in (5, 17, 8)]
    m = RunningMoments()
    for c in chunks:
        m.update(torch.tensor(c))
    allx = np.concatenate(chunks)
    assert m.mean == pytest.approx(allx.mean()) and m.std == pytest.approx(allx.std())


def _scored(samples: Samples, scores: list[float], values=None) -> Scored:
    b, t = samples.response_mask.shape
    lp = torch.zeros(b, t)
    return Scored(old_logprobs=lp, ref_logprobs=lp.clone(), values=values, scores=torch.tensor(scores),
                  per_source={"s": torch.tensor(scores)})


def test_grpo_experience_zero_mean_per_group_and_zero_on_padding():
    cfg = load_config(None, ["algo.advantage=grpo", "rollout.samples_per_prompt=2"])
    samples = _samples([2, 4, 3, 1])
    exp, metrics = make_experience(samples, _scored(samples, [1.0, 0.0, 5.0, 5.0]), torch.tensor([1.0, 0.0, 5.0, 5.0]), cfg, 0.1)
    # group 1: (1 − ½)/std([1,0]) = ±0.7071 broadcast; group 2 all equal → 0
    torch.testing.assert_close(exp.advantages[0], torch.tensor([0.7071, 0.7071, 0, 0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(exp.advantages[1], torch.full((4,), -0.7071), atol=1e-4, rtol=0)
    assert exp.advantages[2:].abs().sum() == 0
    assert metrics["response/length_mean"] == 2.5 and metrics["response/truncated_frac"] == 0.25


def test_gae_experience_matches_hand_computation():
    cfg = load_config(None, ["algo.gamma=1", "algo.lam=1", "algo.whiten_advantages=false"])
    samples = _samples([3], t=3)
    values = torch.tensor([[0.5, 0.25, 0.0]])
    exp, _ = make_experience(samples, _scored(samples, [2.0], values), torch.tensor([2.0]), cfg, 0.1)
    # λ=γ=1: A_t = Σ_{k≥t} rew_k − V_t, rewards (KL 0) = [0, 0, 2]
    torch.testing.assert_close(exp.advantages, torch.tensor([[1.5, 1.75, 2.0]]))
    torch.testing.assert_close(exp.returns, torch.tensor([[2.0, 2.0, 2.0]]))


def test_plan_shards_each_minibatch_over_ranks_in_order():
    samples = _samples([1, 2, 3, 4, 1, 2, 3, 4])
    b, t = samples.response_mask.shape
    exp = Experience(**vars(samples), old_logprobs=torch.zeros(b, t), ref_logprobs=torch.zeros(b, t),
                     advantages=torch.arange(b, dtype=torch.float)[:, None].expand(b, t).clone())
    shards, scales = plan_update(exp, mini_batch_size=4, ranks=2)
    rows = [Experience.from_numpy(s).advantages[:, 0].tolist() for s in shards]
    assert rows == [[0, 1, 4, 5], [2, 3, 6, 7]]  # rank r holds its half of mini-batch 0 then of mini-batch 1
    assert [s.num_tokens for s in scales] == [10, 10] and [s.num_seqs for s in scales] == [4, 4]


def test_pass_at_k_and_win_rate_by_hand():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)  # 1 − C(3,1)/C(4,1)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 − C(3,2)/C(4,2) = 1 − 3/6
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # prompt 0: 1 of 4 correct; prompt 1: none
    assert mean_pass_at_k(scores, 4, 1, threshold=1.0) == pytest.approx(0.125)
    assert win_rate(torch.tensor([1.0, 0.5, 0.2]), torch.tensor([0.0, 0.5, 0.9])) == pytest.approx(0.5)


def test_fill_invalid_uses_group_then_batch_mean():
    from rlhf_ray.trainers.experience import fill_invalid

    scores = torch.tensor([1.0, float("nan"), 3.0, 5.0, float("nan"), float("nan")])
    valid = torch.tensor([True, False, True, True, False, False])
    out = fill_invalid(scores, valid, 2)
    # group 0 → its valid mean 1; group 1 fully valid; group 2 has none → batch mean (1+3+5)/3 = 3
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0, 3.0, 5.0, 3.0, 3.0]))


def test_a_rollout_correction_needs_the_engines_behaviour_logprobs():
    samples = _samples([2, 1])
    samples.logprobs = torch.tensor([[-0.5, -1.0, 0.0, 0.0], [-2.0, 0.0, 0.0, 0.0]])
    scored, scores = _scored(samples, [1.0, 0.0]), torch.tensor([1.0, 0.0])
    grpo = ["algo.advantage=grpo", "rollout.samples_per_prompt=2"]
    cfg = load_config(None, grpo + ["algo.rollout_correction=tis"])
    exp, _ = make_experience(samples, scored, scores, cfg, 0.0)
    shipped = Experience.from_numpy(exp.select(torch.tensor([1])).to_numpy())  # as plan_update sends it: μ travels
    torch.testing.assert_close(shipped.logprobs, samples.logprobs[1:])
    samples.logprobs = None
    make_experience(samples, scored, scores, load_config(None, grpo), 0.0)  # no correction: none needed
    with pytest.raises(ValueError, match="algo.rollout_correction=tis needs the rollout engine's behaviour log-probs"):
        make_experience(samples, scored, scores, cfg, 0.0)


# ---- estimator paths of make_experience, score shaping and the helpers (found by mutation testing) ----


def _kl_scored(samples: Samples, scores: list[float], values=None) -> Scored:
    """π_old − π_ref = k1 of (1, 0, 0) on row 0 and (0, −0.5, 0) on row 1 (T = 3)."""
    old = torch.tensor([[-1.0, -1.0, 0.0], [-1.0, -2.0, 0.0]])
    ref = torch.tensor([[-2.0, -1.0, 0.0], [-1.0, -1.5, 0.0]])
    return Scored(old_logprobs=old, ref_logprobs=ref, values=values, scores=torch.tensor(scores),
                  per_source={"s": torch.tensor(scores), "t": torch.tensor([3.0, 5.0])})


def test_reinforce_pp_experience_by_hand():
    cfg = load_config(None, ["algo.advantage=reinforce_pp", "algo.whiten_advantages=false", "algo.gamma=1"])
    samples = _samples([2, 3], t=3)
    scores = torch.tensor([1.0, 2.0])
    exp, metrics = make_experience(samples, _kl_scored(samples, [1.0, 2.0]), scores, cfg, 0.5)
    # rewards −0.5·k1 plus the score on the last real token: row 0 (−0.5, 0 + 1, ·), row 1 (0, 0.25, 2)
    # returns-to-go: row 0 (0.5, 1, 0), row 1 (2.25, 2.25, 2)
    torch.testing.assert_close(exp.advantages, torch.tensor([[0.5, 1.0, 0.0], [2.25, 2.25, 2.0]]))
    assert exp.returns is None
    # adv over the 5 real tokens (0.5, 1, 2.25, 2.25, 2): mean 1.6, population variance 2.575 / 5
    assert metrics["adv/mean"] == pytest.approx(1.6) and metrics["adv/std"] == pytest.approx(0.515 ** 0.5)
    assert metrics["kl/ref"] == pytest.approx(0.25)  # summed per sequence (1, −0.5), then mean
    assert metrics["reward/score_mean"] == 1.5 and metrics["reward/score_std"] == 0.5
    assert metrics["reward/s_mean"] == 1.5 and metrics["reward/t_mean"] == 4.0
    assert metrics["response/length_mean"] == 2.5 and metrics["response/truncated_frac"] == 0.5
    # whitened by default: (x − 1.6)/sqrt(0.515 + 1e-8) on real tokens, 0 on padding
    cfg = load_config(None, ["algo.advantage=reinforce_pp", "algo.gamma=1"])
    exp, metrics = make_experience(samples, _kl_scored(samples, [1.0, 2.0]), scores, cfg, 0.5)
    expected = (torch.tensor([[0.5, 1.0, 1.6], [2.25, 2.25, 2.0]]) - 1.6) / 0.515 ** 0.5
    torch.testing.assert_close(exp.advantages, expected, atol=1e-5, rtol=0)
    assert metrics["adv/mean"] == pytest.approx(0.0, abs=1e-6) and metrics["adv/std"] == pytest.approx(1.0, abs=1e-5)


def test_kl_estimator_and_coefficient_shape_the_token_rewards():
    # k2: ½ r² = (0.5, 0, 0) and (0, 0.125, 0); β = 1 → rewards row 0 (−0.5, 1), row 1 (0, −0.125, 2)
    cfg = load_config(None, ["algo.advantage=reinforce_pp", "algo.whiten_advantages=false", "algo.kl.estimator=k2"])
    samples = _samples([2, 3], t=3)
    exp, _ = make_experience(samples, _kl_scored(samples, [1.0, 2.0]), torch.tensor([1.0, 2.0]), cfg, 1.0)
    torch.testing.assert_close(exp.advantages, torch.tensor([[0.5, 1.0, 0.0], [1.875, 1.875, 2.0]]))


def test_kl_in_the_loss_leaves_the_rewards_alone():
    cfg = load_config(None, ["algo.advantage=reinforce_pp", "algo.whiten_advantages=false",
                             "algo.kl.placement=loss", "algo.kl.estimator=k3"])
    samples = _samples([2, 3], t=3)
    exp, metrics = make_experience(samples, _kl_scored(samples, [1.0, 2.0]), torch.tensor([1.0, 2.0]), cfg, 0.5)
    torch.testing.assert_close(exp.advantages, torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 2.0]]))
    assert metrics["kl/ref"] == pytest.approx(0.25)  # still reported
    # without π_old (the update's forward provides it) there is no KL term and no kl/ref metric
    scored = _kl_scored(samples, [1.0, 2.0])
    scored.old_logprobs = None
    exp, metrics = make_experience(samples, scored, torch.tensor([1.0, 2.0]), cfg, 0.5)
    torch.testing.assert_close(exp.advantages, torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 2.0]]))
    assert "kl/ref" not in metrics and exp.old_logprobs is None


@pytest.mark.parametrize("placement", ["reward", "loss"])
def test_without_a_reference_there_is_no_kl_term_and_no_kl_metric(placement):
    """β = 0 loads no reference (ref_logprobs None): the advantages are those of a zero KL penalty."""
    cfg = load_config(None, ["algo.advantage=reinforce_pp", "algo.whiten_advantages=false",
                             f"algo.kl.placement={placement}", "algo.kl.estimator=k3", "algo.kl.coef=0"])
    assert not cfg.uses_reference
    samples = _samples([2, 3], t=3)
    scored = _kl_scored(samples, [1.0, 2.0])
    scored.ref_logprobs = None
    exp, metrics = make_experience(samples, scored, torch.tensor([1.0, 2.0]), cfg, 0.0)
    torch.testing.assert_close(exp.advantages, torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 2.0]]))
    assert "kl/ref" not in metrics and exp.ref_logprobs is None


@pytest.mark.parametrize("overrides, uses", [
    ([], True),  # β = 0.05 by default
    (["algo.kl.coef=0"], False),
    (["algo.kl.coef=0", "algo.kl.placement=loss", "algo.kl.estimator=k3"], False),
    (["algo.kl.coef=0", "trainer.eval_win_rate=true"], True),  # the win-rate baseline is the reference's answers
    (["algo.kl.coef=0.01", "algo.kl.adaptive=true"], True),
])
def test_the_reference_is_loaded_only_when_something_reads_it(overrides, uses):
    assert load_config(None, overrides).uses_reference is uses


def test_an_adaptive_kl_from_zero_is_refused():
    from rlhf_ray.config import ConfigError

    with pytest.raises(ConfigError, match=r"algo.kl.adaptive=true with algo.kl.coef=0: .* set algo.kl.coef"):
        load_config(None, ["algo.kl.coef=0", "algo.kl.adaptive=true"])


@pytest.mark.parametrize("advantage, extra, expected", [
    # shaped scores s − β·Σk1 = (1 − 0.5, 2 + 0.25) = (0.5, 2.25)
    ("rloo", [], 1.75),  # 0.5 − 2.25, not whitened by default
    ("dr_grpo", [], 0.875),  # 0.5 − mean 1.375
    ("grpo", [], 0.875 / (1.75 / 2 ** 0.5 + 1e-6)),  # / (sample std + ε)
    ("grpo", ["algo.whiten_advantages=true"], 1.0),  # ±0.7071 whitened over the 4 real tokens
    ("reinforce_pp_baseline", [], 1.0),  # ±0.875, whitened by default
    ("reinforce_pp_baseline", ["algo.whiten_advantages=false"], 0.875),
])
def test_group_estimators_in_make_experience(advantage, extra, expected):
    cfg = load_config(None, [f"algo.advantage={advantage}", "rollout.samples_per_prompt=2"] + extra)
    samples = _samples([2, 2], t=3)
    exp, metrics = make_experience(samples, _kl_scored(samples, [1.0, 2.0]), torch.tensor([1.0, 2.0]), cfg, 0.5)
    torch.testing.assert_close(exp.advantages, expected * torch.tensor([[-1.0, -1.0, 0.0], [1.0, 1.0, 0.0]]),
                               atol=1e-5, rtol=0)
    assert metrics["reward/shaped_mean"] == 1.5 and "critic/explained_var" not in metrics


def test_gae_experience_with_kl_reward_and_explained_variance():
    cfg = load_config(None, ["algo.gamma=1", "algo.lam=1", "algo.whiten_advantages=false"])
    samples = _samples([2], t=2)
    scored = Scored(old_logprobs=torch.tensor([[-1.0, -1.0]]), ref_logprobs=torch.tensor([[-2.0, -1.0]]),
                    values=torch.tensor([[0.5, 0.0]]), scores=torch.tensor([2.0]), per_source={})
    exp, metrics = make_experience(samples, scored, torch.tensor([2.0]), cfg, 0.5)
    # rewards (−0.5·1, 2): A_1 = 2 − 0 = 2, A_0 = −0.5 + 0 − 0.5 + 2 = 1; returns A + V = (1.5, 2)
    torch.testing.assert_close(exp.advantages, torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(exp.returns, torch.tensor([[1.5, 2.0]]))
    assert exp.values is scored.values
    assert exp.old_logprobs is scored.old_logprobs and exp.ref_logprobs is scored.ref_logprobs
    # 1 − var(R − V)/var(R) = 1 − var(1, 2)/var(1.5, 2) = 1 − 0.5/0.125 = −3 (sample variances)
    assert metrics["critic/explained_var"] == pytest.approx(-3.0, rel=1e-6)


def test_invalid_samples_leave_the_loss():
    cfg = load_config(None, ["algo.advantage=grpo", "rollout.samples_per_prompt=2"])
    samples = _samples([2, 3], t=3)
    scored = _kl_scored(samples, [1.0, 2.0])
    scored.valid = torch.tensor([True, False])
    exp, _ = make_experience(samples, scored, torch.tensor([1.0, 2.0]), cfg, 0.0)
    assert exp.response_mask.tolist() == [[1, 1, 0], [0, 0, 0]]
    assert samples.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]  # the caller's samples untouched


def test_shape_scores_order_penalty_then_normalise_then_clip():
    # missing EOS −1 on the second: (1, 1, 3); batch-normalised: mean 5/3, population std sqrt(8/9)
    # → (−0.7071, −0.7071, 1.4142); clip 0.5 → (−0.5, −0.5, 0.5)
    cfg = load_config(None, ["reward.missing_eos_penalty=-1", "reward.normalize=batch", "reward.clip=0.5"])
    out = shape_scores(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([True, False, True]), torch.tensor([2, 4, 2]),
                       cfg, RunningMoments())
    torch.testing.assert_close(out, torch.tensor([-0.5, -0.5, 0.5]))
    cfg = load_config(None, ["reward.missing_eos_penalty=-1", "reward.normalize=batch"])
    out = shape_scores(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([True, False, True]), torch.tensor([2, 4, 2]),
                       cfg, RunningMoments())
    torch.testing.assert_close(out, torch.tensor([-0.5, -0.5, 1.0]) * 2 ** 0.5, atol=1e-5, rtol=0)


def test_shape_scores_running_normalisation_by_hand():
    cfg = load_config(None, ["reward.normalize=running"])
    moments = RunningMoments()
    assert (moments.count, moments.mean, moments.var, moments.std) == (0, 0.0, 1.0, 1.0)
    ones = torch.ones(2, dtype=torch.bool)
    # batch (1, 3): running mean 2, variance 1 → (−1, 1)
    out = shape_scores(torch.tensor([1.0, 3.0]), ones, torch.tensor([2, 2]), cfg, moments)
    torch.testing.assert_close(out, torch.tensor([-1.0, 1.0]))
    # then (4, 4): all of (1, 3, 4, 4) → mean 3, population variance 1.5 → (4 − 3)/sqrt(1.5)
    out = shape_scores(torch.tensor([4.0, 4.0]), ones, torch.tensor([2, 2]), cfg, moments)
    torch.testing.assert_close(out, torch.full((2,), 1 / 1.5 ** 0.5))
    assert moments.count == 4 and moments.mean == 3.0 and moments.var == pytest.approx(1.5)


def test_overlong_penalty_by_hand():
    from rlhf_ray.trainers.experience import overlong_penalty

    # max 16, buffer 4, penalty 2: excess over 12 is (0, 2, 8) → (0, −1, −2 capped)
    out = overlong_penalty(torch.tensor([11, 14, 20]), max_len=16, buffer=4, penalty=2.0)
    torch.testing.assert_close(out, torch.tensor([0.0, -1.0, -2.0]))


def test_token_rewards_of_an_empty_response_do_not_index_out_of_range():
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    rewards = token_rewards(torch.tensor([1.0, 3.0]), torch.zeros(2, 2), kl_coef=0.1, mask=mask)
    torch.testing.assert_close(rewards, torch.tensor([[0.0, 1.0], [3.0, 0.0]]))  # clamped to index 0


def test_fill_invalid_with_no_valid_sample_at_all_is_zero():
    from rlhf_ray.trainers.experience import fill_invalid

    out = fill_invalid(torch.tensor([float("nan"), float("nan")]), torch.tensor([False, False]), 2)
    torch.testing.assert_close(out, torch.zeros(2))
    # two valid of three: their mean (1 + 3)/2 = 2 fills the third
    out = fill_invalid(torch.tensor([1.0, 3.0, float("nan")]), torch.tensor([True, True, False]), 3)
    torch.testing.assert_close(out, torch.tensor([1.0, 3.0, 2.0]))
    # one valid of four in a group: the group's mean is that one score (count 1, not clamped higher)
    out = fill_invalid(torch.tensor([4.0, float("nan"), float("nan"), float("nan")]),
                       torch.tensor([True, False, False, False]), 4)
    torch.testing.assert_close(out, torch.full((4,), 4.0))


def test_concat_scored_pads_and_sums():
    from rlhf_ray.trainers.experience import concat_scored

    a = Scored(old_logprobs=torch.tensor([[-1.0, -2.0]]), ref_logprobs=torch.tensor([[-0.5, -0.5]]),
               values=torch.tensor([[1.0, 2.0]]), scores=torch.tensor([1.0]), per_source={"s": torch.tensor([1.0])},
               valid=torch.tensor([True]), violations={"nan": 1})
    b = Scored(old_logprobs=torch.tensor([[-3.0, -4.0, -5.0]]), ref_logprobs=torch.tensor([[-1.0, -1.0, -1.0]]),
               values=torch.tensor([[3.0, 4.0, 5.0]]), scores=torch.tensor([2.0]), per_source={"s": torch.tensor([7.0])},
               valid=torch.tensor([False]), violations={"nan": 2, "range": 1})
    out = concat_scored([a, b])
    torch.testing.assert_close(out.old_logprobs, torch.tensor([[-1.0, -2.0, 0.0], [-3.0, -4.0, -5.0]]))
    torch.testing.assert_close(out.ref_logprobs, torch.tensor([[-0.5, -0.5, 0.0], [-1.0, -1.0, -1.0]]))
    torch.testing.assert_close(out.values, torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 5.0]]))
    assert out.scores.tolist() == [1.0, 2.0] and out.per_source["s"].tolist() == [1.0, 7.0]
    assert out.valid.tolist() == [True, False] and out.violations == {"nan": 3, "range": 1}
    # optional fields stay None
    a.old_logprobs = b.old_logprobs = a.values = b.values = a.valid = b.valid = None
    out = concat_scored([a, b])
    assert out.old_logprobs is None and out.values is None and out.valid is None
    single = concat_scored([a])  # one round: passed through as it is
    assert single.old_logprobs is None and single.per_source["s"].tolist() == [1.0]
    a.ref_logprobs = b.ref_logprobs = None  # no reference (β = 0): no token tensor is left at all
    out = concat_scored([a, b])
    assert out.ref_logprobs is None and out.scores.tolist() == [1.0, 2.0]
    picked = concat_scored([a, b]).select(torch.tensor([1]))
    assert picked.per_source["s"].tolist() == [7.0] and picked.scores.tolist() == [2.0]


def test_nonfinite_counts_per_token_and_per_sequence():
    from rlhf_ray.trainers.experience import nonfinite_counts

    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    nan, inf = float("nan"), float("inf")
    named = {"logprobs": torch.tensor([[0.0, nan, nan], [inf, nan, 0.0]]),  # padding NaNs do not count
             "values": None,
             "scores": torch.tensor([nan, 1.0]),  # (B,): every entry counts
             "clean": torch.zeros(2, 3)}
    assert list(nonfinite_counts(named, mask).items()) == [("logprobs", 2), ("scores", 1)]
    assert nonfinite_counts({"clean": torch.zeros(2, 3)}, mask) == {}


def test_concat_scored_of_one_full_round():
    from rlhf_ray.trainers.experience import concat_scored

    part = Scored(old_logprobs=torch.tensor([[-1.0]]), ref_logprobs=torch.tensor([[-2.0]]), values=torch.tensor([[0.5]]),
                  scores=torch.tensor([1.0]), per_source={"s": torch.tensor([1.0])}, valid=torch.tensor([True]))
    out = concat_scored([part])
    assert out.old_logprobs.tolist() == [[-1.0]] and out.values.tolist() == [[0.5]] and out.valid.tolist() == [True]
    assert out.ref_logprobs.tolist() == [[-2.0]] and out.violations == {}


def test_informative_groups_see_small_differences():
    assert informative_groups(torch.tensor([0.0, 0.5, 0.25, 0.25]), 2).tolist() == [True, False]


def test_score_normalisation_is_bounded_for_near_equal_scores():
    # spread 2e-8: (s − mean)/(std + 1e-8) = ±1e-8/2e-8 = ±0.5, not ±1e-8/(std − ε) ≈ ±inf
    scores, ones = torch.tensor([0.0, 2e-8]), torch.ones(2, dtype=torch.bool)
    for normalize in ("batch", "running"):
        cfg = load_config(None, [f"reward.normalize={normalize}"])
        out = shape_scores(scores, ones, torch.tensor([2, 2]), cfg, RunningMoments())
        torch.testing.assert_close(out, torch.tensor([-0.5, 0.5]), atol=1e-3, rtol=0)


def test_token_rewards_accept_float64_scores():
    # the score is cast to the rewards' dtype before it is added at the last real token
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    rewards = token_rewards(torch.tensor([0.5], dtype=torch.float64), torch.zeros(1, 3), kl_coef=0.1, mask=mask)
    assert rewards.dtype == torch.float32
    torch.testing.assert_close(rewards, torch.tensor([[0.0, 0.5, 0.0]]))


def test_reinforce_pp_experience_uses_the_configured_gamma():
    # no KL: rewards (0, 1) and (0, 0, 2); γ = 0.5 → returns (0.5, 1) and (0.5, 1, 2)
    cfg = load_config(None, ["algo.advantage=reinforce_pp", "algo.whiten_advantages=false", "algo.gamma=0.5"])
    samples = _samples([2, 3], t=3)
    exp, _ = make_experience(samples, _scored(samples, [1.0, 2.0]), torch.tensor([1.0, 2.0]), cfg, 0.5)
    torch.testing.assert_close(exp.advantages, torch.tensor([[0.5, 1.0, 0.0], [0.5, 1.0, 2.0]]))


def test_explained_variance_with_constant_returns_is_large_and_negative():
    # returns (2, 2, 2) have no variance: 1 − var(R − V)/(0 + 1e-8) = 1 − 0.0625/1e-8
    cfg = load_config(None, ["algo.gamma=1", "algo.lam=1", "algo.whiten_advantages=false"])
    samples = _samples([3], t=3)
    values = torch.tensor([[0.5, 0.25, 0.0]])
    _, metrics = make_experience(samples, _scored(samples, [2.0], values), torch.tensor([2.0]), cfg, 0.1)
    assert metrics["critic/explained_var"] == pytest.approx(1 - 0.0625 / 1e-8, rel=1e-4)


def test_token_rewards_with_environment_turns_keep_turn_rewards_in_place_and_the_rest_at_the_last_policy_token():
    """Multi-turn: policy, policy, observation, observation, policy, padding. The score goes to the last
    policy token (index 4, not mask.sum − 1 = 2); a turn's reward stays on its last token, and the sum
    of the rewards is the score."""
    from rlhf_ray.trainers.experience import token_rewards

    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0]])
    zero_kl = torch.zeros(1, 6)
    assert token_rewards(torch.tensor([2.0]), zero_kl, 0.1, mask).tolist() == [[0, 0, 0, 0, 2.0, 0]]
    turns = torch.tensor([[0.0, 0.25, 0.0, 0.0, 1.0, 0.0]])
    rewards = token_rewards(torch.tensor([2.0]), zero_kl, 0.1, mask, turns)
    assert rewards.tolist() == [[0, 0.25, 0, 0, 1.75, 0]] and rewards.sum().item() == 2.0
    kl = torch.tensor([[0.5, 0.5, 9.0, 9.0, 0.5, 9.0]])  # observation / padding KL never counts
    with_kl = token_rewards(torch.tensor([2.0]), kl, 0.1, mask, turns)[0].tolist()
    assert with_kl == pytest.approx([-0.05, 0.2, 0.0, 0.0, 1.7, 0.0], abs=1e-6)
