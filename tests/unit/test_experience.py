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
