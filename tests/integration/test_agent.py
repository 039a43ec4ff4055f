"""Multi-turn agents on the toy guessing game (rlhf_ray.envs.toy:GuessingGame), through the real
stack: vLLM engines running episodes, the environment's per-turn and outcome rewards, GRPO and PPO
(critic, GAE over policy tokens only), and an exact resume in the middle of a multi-turn run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rlhf_ray.config import load_config
from rlhf_ray.trainers.common import prepare_run
from rlhf_ray.trainers.ppo import PPOTrainer
from tests.integration.helpers import policy_weights, toy_overrides

pytestmark = pytest.mark.integration
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _cfg(tmp_path, *extra: str):
    return load_config(CONFIGS / "toy_agent_guess.yaml", toy_overrides(tmp_path, "trainer.eval_prompts=32", *extra))


def _fit(cfg) -> tuple[dict, list[dict], dict]:
    trainer = PPOTrainer(cfg, prepare_run(cfg))
    try:
        result = trainer.fit()
        return result, list(trainer.logger.history), policy_weights(trainer)
    finally:
        trainer.close()


def test_grpo_agent_learns_the_guessing_game(ray_session, tmp_path):
    """Episodes of up to 3 turns with higher/lower replies between them: the held-out reward (the
    environment's return, greedy) rises, and every step trains on multi-turn episodes."""
    result, history, _ = _fit(_cfg(tmp_path, "trainer.total_steps=40", "checkpoint.export_hf=false"))
    assert result["eval_after"] > result["eval_before"] + 0.1, (result["eval_before"], result["eval_after"])
    rewards = [h["reward/score_mean"] for h in history]
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.05, rewards
    assert all(1 <= h["rollout/turns_mean"] <= 3 for h in history)
    assert max(h["rollout/turns_mean"] for h in history) > 1.5  # episodes do go past the first turn
    assert all(0 < h["rollout/env_token_share"] < 1 for h in history)


def test_ppo_on_episodes_resumes_exactly_mid_run(ray_session, tmp_path):
    """PPO with a critic: GAE walks the policy tokens (the environment's replies are holes), per-turn
    rewards stay at their turns; a run resumed from step 2's checkpoint ends with the uninterrupted
    run's metrics and weights."""
    common = ("algo.advantage=gae", "algo.kl.placement=reward", "algo.kl.estimator=k1", "trainer.total_steps=4",
              "checkpoint.every=2", "checkpoint.keep_last=5", "checkpoint.export_hf=false")
    cfg = _cfg(tmp_path / "a", *common)
    _, rows, weights = _fit(cfg)
    assert all(np.isfinite(r["critic/loss"]) and np.isfinite(r["policy/loss"]) for r in rows)
    resumed = _cfg(tmp_path / "b", *common, f"checkpoint.resume={cfg.run_dir / 'checkpoints' / 'step_00000002'}")
    _, resumed_rows, resumed_weights = _fit(resumed)
    by_step = {r["step"]: r for r in rows}
    assert [r["step"] for r in resumed_rows] == [3, 4]
    for row in resumed_rows:
        for key, value in row.items():
            if isinstance(value, float) and not key.startswith(("time/", "perf/")):
                assert value == pytest.approx(by_step[row["step"]][key], rel=1e-6, abs=1e-7), (row["step"], key)
    for name in weights:
        np.testing.assert_array_equal(weights[name], resumed_weights[name], err_msg=name)
