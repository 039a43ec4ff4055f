"""Critic-free estimators on the toy task (real Ray + DeepSpeed): each raises reward, none starts a critic;
dynamic sampling refills the batch to its configured size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from rlhf_ray.config import load_config
from rlhf_ray.metrics import Timer
from rlhf_ray.trainers.common import prepare_run
from rlhf_ray.trainers.ppo import PPOTrainer
from tests.integration.helpers import policy_weights, toy_overrides

pytestmark = pytest.mark.integration
CONFIGS = Path(__file__).resolve().parents[2] / "configs"

ESTIMATORS = {
    "grpo": ("toy_grpo.yaml", []),
    "dr_grpo": ("toy_grpo.yaml", ["algo.advantage=dr_grpo", "algo.loss_agg=seq-mean-token-sum-norm"]),
    "rloo": ("toy_rloo.yaml", []),
    "reinforce_pp": ("toy_reinforce_pp.yaml", []),
    "reinforce_pp_baseline": ("toy_reinforce_pp.yaml", ["algo.advantage=reinforce_pp_baseline",
                                                        "rollout.samples_per_prompt=4", "trainer.prompts_per_step=4"]),
}


def _trainer(tmp_path, config: str, *overrides: str) -> PPOTrainer:
    cfg = load_config(CONFIGS / config, toy_overrides(tmp_path, *overrides))
    return PPOTrainer(cfg, prepare_run(cfg))


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_estimator_raises_reward_without_a_critic(ray_session, tmp_path, estimator):
    config, extra = ESTIMATORS[estimator]
    trainer = _trainer(tmp_path, config, "trainer.total_steps=30", *extra)
    try:
        assert "critic" not in trainer.roles.pools
        history = [trainer.train_step(step) for step in range(1, 31)]
    finally:
        trainer.close()
    assert trainer.cfg.algo.advantage == estimator
    rewards = [h["reward/score_mean"] for h in history]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.15, rewards
    assert all(np.isfinite(h["policy/loss"]) and np.isfinite(h["kl/ref"]) for h in history)


def test_dynamic_sampling_refills_to_the_batch_size(ray_session, tmp_path):
    """Arithmetic with an exact-answer reward: a random policy is almost never right, so most groups
    score all-equal and are dropped; refills must still deliver exactly prompts_per_step groups."""
    trainer = _trainer(tmp_path, "toy_arith_grpo.yaml", "algo.max_refills=2", "trainer.prompts_per_step=4",
                       "trainer.mini_batch_size=16")
    try:
        samples, scored, metrics = trainer.collect(1, Timer())
    finally:
        trainer.close()
    n = trainer.cfg.rollout.samples_per_prompt
    assert samples.batch_size == scored.scores.shape[0] == 4 * n
    kept = metrics["dynamic/kept_groups"]
    assert 1 <= metrics["dynamic/rounds"] <= 3
    assert kept >= 4 or metrics["dynamic/rounds"] == 3  # stops early only once the batch is full
    groups = scored.scores.view(-1, n)
    informative = (groups.max(1).values > groups.min(1).values)
    assert informative[: min(kept, 4)].all()  # kept groups come first
    assert not informative[min(kept, 4):].any()  # the top-up comes from dropped (all-equal) groups


def _threads(trainer: PPOTrainer) -> dict[str, int]:
    """`role.method` → torch threads of its last call, over the run's workers."""
    out = {"reference": 1} if "reference" in trainer.roles.pools else {}
    for role, group in trainer.roles.pools.items():
        for used in group.get(group.call(lambda w: w.last_threads.remote()), "test", "threads", 60):
            out |= {f"{role}.{method}": n for method, n in used.items()}
    return out


def test_reusing_the_update_forward_for_old_logprobs_equals_recomputing_them(ray_session, tmp_path):
    """On-policy, one epoch, one mini-batch, KL in the loss: π_old from the update's own forward
    (no policy pass in the score phase; reference hosted by the policy rank) trains exactly as a
    separate recomputation beside a reference actor does; the node's thread budget goes to whoever
    is busy in each phase."""
    runs = {}
    for recompute in (False, True):
        trainer = _trainer(tmp_path / str(recompute), "toy_grpo.yaml", "trainer.total_steps=3",
                           f"algo.recompute_old_logprobs={str(recompute).lower()}", "placement.threads_per_node=2",
                           f"placement.reference_in_policy={str(not recompute).lower()}")
        try:
            history = [trainer.train_step(step) for step in range(1, 4)]
            busy = {f"policy.{k}" for k in ray.get(trainer.roles.policy.workers[0].usage.remote(), timeout=60)[0]}
            runs[recompute] = (history, policy_weights(trainer), _threads(trainer), busy)
        finally:
            trainer.close()
    (reused, w_reused, t_reused, busy_reused), (recomputed, w_recomputed, t_recomputed, busy_recomputed) = runs[False], runs[True]
    assert "policy.compute_logprobs" not in busy_reused and "policy.compute_logprobs" in busy_recomputed
    for a, b in zip(reused, recomputed):
        assert a["reward/score_mean"] == b["reward/score_mean"]  # same rollouts every step: same weights synced
        assert a["policy/loss"] == pytest.approx(b["policy/loss"], abs=1e-6)
        assert a["kl/ref"] == pytest.approx(b["kl/ref"], abs=1e-4)
        assert b["rollout/logprob_diff_mean"] < 1e-5  # engine's behaviour log-probs vs the trainer's, same weights
    for name in w_reused:
        np.testing.assert_allclose(w_reused[name], w_recomputed[name], atol=1e-6, rtol=1e-5, err_msg=name)
    # threads: alone in its phase a worker gets the node's 2; two forwards at once get 1 each
    assert "reference" not in t_reused and "reference" in t_recomputed
    assert t_reused["policy.reference_logprobs"] == t_reused["policy.train"] == t_reused["rollout.generate"] == 2
    assert t_recomputed["reference.compute_logprobs"] == t_recomputed["policy.compute_logprobs"] == 1


def test_one_step_off_policy_overlaps_rollout_with_the_update_and_raises_reward(ray_session, tmp_path):
    """Batch t+1 is generated by the weights before update t (version lag 1, π_old = the engine's
    behaviour log-probs), beside the score and update phases, with one thread each on a 2-thread
    node; reward still rises; a checkpoint keeps the batch in flight and a resumed run trains on it."""
    overrides = ("algo.one_step_off_policy=true", "placement.threads_per_node=2", "checkpoint.every=2")
    trainer = _trainer(tmp_path, "toy_grpo.yaml", "trainer.total_steps=30", *overrides)
    try:
        history = [trainer.train_step(step) for step in range(1, 16)]
        threads = _threads(trainer)  # mid-run (the last step's update has no rollout beside it)
        history += [trainer.train_step(step) for step in range(16, 31)]
    finally:
        trainer.close()
    assert [h["rollout/version_lag"] for h in history] == [0] + [1] * 29
    assert all(0.5 < h["policy/ratio_mean"] < 1.5 for h in history[1:])  # stale by one step, not more
    assert threads["rollout.generate"] == threads["policy.train"] == threads["policy.reference_logprobs"] == 1
    rewards = [h["reward/score_mean"] for h in history]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.15, rewards

    first = _trainer(tmp_path / "resume", "toy_grpo.yaml", "trainer.total_steps=4", *overrides)
    try:
        for step in (1, 2):
            first.logger.log(step, first.train_step(step))
        state = first.state_dict(2)
        first.checkpoints.save(2, state, first.queue.tensors())
        saved = first.queue.tensors()
    finally:
        first.close()
    [in_flight] = state["rollout_queue"]["batches"]  # batch 3, generated with the weights before update 2
    resumed = _trainer(tmp_path / "resume", "toy_grpo.yaml", "trainer.total_steps=4", *overrides,
                       "checkpoint.resume=auto")
    try:
        assert resumed.start_step == 3
        samples, _, _ = resumed.collect(3, Timer())
    finally:
        resumed.close()
    n = resumed.cfg.rollout.samples_per_prompt
    expected = [resumed.train_prompts[i].prompt_ids for i in in_flight["indices"]]
    got = [ids[m.bool()].tolist() for ids, m in zip(samples.prompt_ids[::n], samples.prompt_mask[::n])]
    assert got == expected and in_flight["id"] == 3
    assert torch.equal(samples.response_ids, saved["rollout_queue.0.response_ids"])  # the very samples, not new ones
    assert samples.versions.tolist() == [1] * samples.batch_size
