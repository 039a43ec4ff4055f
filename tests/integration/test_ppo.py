"""Distributed PPO on CPU with real Ray actors, real DeepSpeed and the toy models.

One Ray session for the module. Each trainer starts five or six actors (≈20 s), so each test
builds as few as it can and asserts several facts on one run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import ray
from transformers import AutoModelForCausalLM

from rlhf_ray.config import load_config
from rlhf_ray.trainers.common import prepare_run
from rlhf_ray.trainers.ppo import PPOTrainer
from tests.integration.helpers import engine_states, policy_probe, policy_weights, toy_overrides

pytestmark = pytest.mark.integration
TOY_PPO = Path(__file__).resolve().parents[2] / "configs" / "toy_ppo.yaml"
PHASES = ("prompts", "rollout", "score", "advantages", "update", "sync")


def _trainer(tmp_path, *overrides: str) -> PPOTrainer:
    cfg = load_config(TOY_PPO, toy_overrides(tmp_path, *overrides))
    return PPOTrainer(cfg, prepare_run(cfg))


def _engine_weights(trainer: PPOTrainer, index: int = 0) -> dict[str, np.ndarray]:
    """An HF engine's weights by name (a vLLM engine's fused, repacked layers have no such view)."""
    return ray.get(trainer.roles.pools["rollout"].workers[index].named_weights.remote(), timeout=120)


def _assert_engines_hold_the_policy(trainer: PPOTrainer, version: int, tolerance: float = 1e-4) -> np.ndarray:
    """Every engine holds `version` and its probe log-probs equal the policy's; → the policy's probe."""
    expected = policy_probe(trainer)
    for held, probe in engine_states(trainer):
        assert held == version
        np.testing.assert_allclose(probe, expected, atol=tolerance, rtol=0)
    return expected


@pytest.fixture(scope="module")
def toy_run(ray_session, tmp_path_factory):
    """One fixed-seed toy PPO run (GAE + critic, vLLM rollouts: the default backend where vLLM is installed);
    step 1 inspected in detail, then trained on."""
    tmp = tmp_path_factory.mktemp("toy_run")
    trainer = _trainer(tmp, "trainer.total_steps=30")
    try:  # collect every fact, then release the actors before the tests look at them
        before, probe_before = policy_weights(trainer), _assert_engines_hold_the_policy(trainer, 0)
        first = trainer.train_step(1)
        trainer.logger.log(1, first)
        facts = {"before": before, "after": policy_weights(trainer), "probe_before": probe_before,
                 "probe_after": _assert_engines_hold_the_policy(trainer, 1), "backend": trainer.cfg.rollout_backend,
                 "first": first, "groups": sorted(trainer.roles.pools)}
        facts["summary"] = _fit_from_step_2(trainer)
        facts["final"] = policy_weights(trainer)
        facts["history"] = trainer.logger.history
        facts["run_dir"] = trainer.cfg.run_dir
    finally:
        trainer.close()
    return facts


def _fit_from_step_2(trainer: PPOTrainer) -> dict:
    """The rest of the run through PPOTrainer.fit itself (steps 2.., final evaluation, export, summary),
    started as fit starts after a resume at step 1."""
    trainer.start_step = 2
    return trainer.fit()


def test_one_step_touches_every_role_and_phase(toy_run):
    m = toy_run["first"]
    assert toy_run["groups"] == ["critic", "policy", "reward", "rollout"]  # reference: in the policy; reward: in the driver
    for phase in PHASES:
        assert m[f"time/{phase}"] > 0, phase
    # policy, critic (values + update), reference (KL), reward (per source), rollout (lengths)
    for key in ("policy/loss", "policy/grad_norm", "policy/clip_frac", "critic/loss", "critic/grad_norm",
                "critic/explained_var", "kl/ref", "reward/vowel_mean", "response/length_mean", "perf/tokens_per_s"):
        assert np.isfinite(m[key]), key
    assert m["kl/ref"] == pytest.approx(0.0, abs=1e-5)  # before any update, policy == reference
    assert m["sync/version"] == 1


def test_update_moves_policy_and_the_vllm_engine_follows(toy_run):
    assert toy_run["backend"] == "vllm"
    before, after = toy_run["before"], toy_run["after"]
    changed = [k for k in after if not np.array_equal(before[k], after[k])]
    assert len(changed) == len(after), "every trained tensor should move after one PPO step"
    # the probe sees the update (so equal probes mean equal weights), and the engine matches the policy
    assert np.abs(toy_run["probe_after"] - toy_run["probe_before"]).max() > 1e-3
    assert toy_run["first"]["sync/probe_gap"] < 1e-4


def test_short_run_raises_reward_with_bounded_kl(toy_run):
    history = toy_run["history"]
    assert len(history) == 30
    first = np.mean([h["reward/score_mean"] for h in history[:3]])
    last = np.mean([h["reward/score_mean"] for h in history[-3:]])
    assert last > first + 0.15, (first, last)
    kl = [h["kl/ref"] for h in history]
    assert max(kl) < 20.0, kl  # bounded: the KL penalty holds the policy near the reference
    assert toy_run["summary"]["eval_after"] > first + 0.1


def test_metrics_file_and_export(toy_run):
    lines = (toy_run["run_dir"] / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 31))
    policy = AutoModelForCausalLM.from_pretrained(toy_run["summary"]["export_policy"])
    exported = {k: v.detach().numpy() for k, v in policy.state_dict().items()}
    trained = toy_run["final"]  # what the policy ranks held after the last step
    assert set(trained) <= set(exported), set(trained) - set(exported)
    for name, value in trained.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    assert any(not np.array_equal(toy_run["before"][k], trained[k]) for k in trained)  # 30 steps moved it


def test_zero3_two_ranks_two_vllm_engines_gloo_sync_colocation_and_tensorboard(ray_session, tmp_path):
    trainer = _trainer(tmp_path, "trainer.total_steps=2", "deepspeed.zero_stage=3", "placement.policy.num_workers=2",
                       "placement.critic.num_workers=2", "trainer.micro_batch_size=4", "rollout.weight_sync=gloo",
                       "rollout.num_engines=2", "placement.reference_in_policy=false",
                       "placement.colocate=[[reference, reward, rollout]]", "logging.tensorboard=true")
    try:
        before = policy_weights(trainer)
        for step in (1, 2):
            m = trainer.train_step(step)
            trainer.logger.log(step, m)
            assert np.isfinite(m["policy/loss"]) and np.isfinite(m["critic/loss"])
            _assert_engines_hold_the_policy(trainer, step)
        after = policy_weights(trainer)
        assert any(not np.array_equal(before[k], after[k]) for k in after)
        assert m["sync/version"] == 2 and m["sync/probe_gap"] < 1e-4
        assert len(trainer.roles._placement_groups) == 3  # policy, critic, and one shared by the colocated roles
    finally:
        trainer.logger.close()
        trainer.close()
    assert list((trainer.cfg.run_dir / "tb").glob("events.out.tfevents.*"))


def test_two_ranks_equal_one_rank_with_twice_the_micro_batches(ray_session, tmp_path):
    """Same seed and data: 2 ranks × 1 micro-batch == 1 rank × 2 micro-batches (ZeRO-2, fp32). HF generate
    rollouts (the fallback backend), whose weights are the trainer's layout: the engine equals the policy bit for bit."""
    common = ("trainer.total_steps=1", "trainer.micro_batch_size=4", "trainer.mini_batch_size=8",
              "placement.critic.num_workers=1", "rollout.backend=hf")
    results = []
    for ranks in (1, 2):
        trainer = _trainer(tmp_path / f"r{ranks}", *common, f"placement.policy.num_workers={ranks}")
        try:
            m = trainer.train_step(1)
            results.append((m, policy_weights(trainer)))
            engine = _engine_weights(trainer)
            assert set(engine) == set(results[-1][1])
            for name, value in results[-1][1].items():
                np.testing.assert_array_equal(engine[name], value, err_msg=name)
        finally:
            trainer.close()
    (m1, w1), (m2, w2) = results
    assert m1["reward/score_mean"] == m2["reward/score_mean"]  # same rollouts
    for name in w1:
        np.testing.assert_allclose(w1[name], w2[name], atol=2e-6, rtol=1e-5, err_msg=name)
    assert m1["policy/loss"] == pytest.approx(m2["policy/loss"], abs=1e-6)
