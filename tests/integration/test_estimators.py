"""Critic-free estimators on the toy task (real Ray + DeepSpeed): each raises reward, none starts a critic;
dynamic sampling refills the batch to its configured size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rlhf_ray.config import load_config
from rlhf_ray.metrics import Timer
from rlhf_ray.trainers.common import prepare_run
from rlhf_ray.trainers.ppo import PPOTrainer
from tests.integration.helpers import toy_overrides

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
        assert "critic" not in trainer.roles.groups
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
