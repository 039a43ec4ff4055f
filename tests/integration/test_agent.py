"""Multi-turn agents through the real stack: vLLM engines running episodes continuously (environment
steps beside generation), the toy guessing game (rlhf_ray.envs.toy:GuessingGame) with per-turn and
outcome rewards under GRPO and PPO (critic, GAE over policy tokens only) and an exact resume in the
middle of a multi-turn run, and a tool-using agent (CalculatorArithmetic) trained SFT → GRPO."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from rlhf_ray.batch import Samples
from rlhf_ray.config import load_config
from rlhf_ray.trainers.common import prepare_run
from rlhf_ray.trainers.pipeline import run_pipeline
from rlhf_ray.trainers.ppo import PPOTrainer
from rlhf_ray.workers import RolloutWorker
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


def _episodes_with_a_slow_environment(worker, delay_s: float):
    """In the rollout actor: four episodes of three turns on its vLLM engine, where episode 0's first
    environment step takes `delay_s`; → (each step's start and end times, the samples)."""
    import threading
    import time

    from rlhf_ray.envs.base import StepResult
    from rlhf_ray.models import load_tokenizer
    from rlhf_ray.rollout.base import SamplingParams
    from rlhf_ray.rollout.multiturn import run_episodes

    log, lock = [], threading.Lock()

    class SlowFirst:
        def reset(self, prompt, metadata):
            self.index, self.turn = metadata["i"], 0
            return ""

        def step(self, action):
            self.turn += 1
            start = time.monotonic()
            if (self.index, self.turn) == (0, 1):
                time.sleep(delay_s)
            with lock:
                log.append((self.index, self.turn, start, time.monotonic()))
            return StepResult("ok\n", 0.0, self.turn == 3, {})

    tokenizer = load_tokenizer(worker.paths.tokenizer)
    prompts = [tokenizer.encode(f"say: {w}\n", add_special_tokens=False) for w in ("ab", "cd", "ef", "gh")]
    params = SamplingParams(max_new_tokens=6, n=1, logprobs=True, suppress_special_tokens=True)
    samples, _ = run_episodes(worker.engine, tokenizer, prompts, [{"i": i} for i in range(4)], SlowFirst, params,
                              seed=7, first_index=0, max_turns=3, max_tokens=64)
    return log, samples.to_numpy()


def test_episodes_run_continuously_while_an_environment_step_is_slow(ray_session, tmp_path):
    """Episode 0's first environment step sleeps 1.5 s; the other episodes play all three turns on the
    engine meanwhile (no lock-step across the batch), and every episode samples the same tokens as
    without the delay (each request seeded on its own, whatever else shares the engine's steps)."""
    cfg = _cfg(tmp_path)
    worker = ray.remote(RolloutWorker).options(num_cpus=1).remote(cfg, prepare_run(cfg).models, 0)
    try:
        log, slow = ray.get(worker.__ray_call__.remote(_episodes_with_a_slow_environment, 1.5), timeout=300)
        _, fast = ray.get(worker.__ray_call__.remote(_episodes_with_a_slow_environment, 0.0), timeout=300)
    finally:
        ray.kill(worker)
    ends = {(i, turn): end for i, turn, _, end in log}
    assert len(ends) == 12
    assert all(ends[(i, 3)] < ends[(0, 1)] for i in (1, 2, 3))  # done before episode 0's first reply came
    assert ends[(0, 2)] > ends[(0, 1)]
    slow, fast = Samples.from_numpy(slow), Samples.from_numpy(fast)
    assert torch.equal(slow.response_ids, fast.response_ids) and torch.equal(slow.response_mask, fast.response_mask)
    assert torch.allclose(slow.logprobs, fast.logprobs, atol=1e-5)


def test_a_tool_using_agent_learns_to_call_the_calculator(ray_session, tmp_path):
    """configs/toy_agent_calc.yaml: SFT on demonstrations (half call the tool), then GRPO on episodes
    whose tool results come back as chat-template tool turns: the held-out reward rises, and so does
    the share of episodes that use the tool (the only reliable way to be right)."""
    cfg = load_config(CONFIGS / "toy_agent_calc.yaml", toy_overrides(tmp_path, "data.toy_eval_size=32"))
    result = run_pipeline(cfg)
    before, after = result["ppo"]["eval_before"], result["ppo"]["eval_after"]  # 32 prompts × 8 episodes
    assert after > before + 0.2, (before, after)
    rows = [json.loads(line) for line in (cfg.run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "rollout/tool_use_share" in r]
    share = [r["rollout/tool_use_share"] for r in steps]
    assert len(share) == 30  # every step's episodes called tools
    assert np.mean(share[-5:]) > np.mean(share[:3]) + 0.2, share
    rewards = [r["reward/score_mean"] for r in steps]  # 32 episodes a step: ±0.1 each, so no margin here
    assert np.mean(rewards[-10:]) > np.mean(rewards[:3]), rewards
    assert all(r["rollout/turns_mean"] <= 2 and "rollout/tool_failures/bad_json" in r for r in steps)
