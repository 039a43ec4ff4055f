"""Training layouts give the update of the padded, row-count layout: trainer.max_tokens_per_micro_batch
(micro-batches by token count; the loss is scaled over the whole mini-batch, so how it is split cannot
matter), with two data-parallel ranks that need different numbers of micro-batches (agreed by an
all-reduce), and trainer.packing (every role's forwards on packed rows: policy, critic, reward model,
reference)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rlhf_ray.config import load_config
from rlhf_ray.trainers.common import prepare_run
from rlhf_ray.trainers.ppo import PPOTrainer
from rlhf_ray.trainers.dpo import run_dpo
from rlhf_ray.trainers.rm import run_rm
from rlhf_ray.trainers.sft import run_sft
from tests.integration.helpers import policy_weights, toy_overrides

pytestmark = pytest.mark.integration
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _grpo(tmp_path, *extra: str) -> tuple[dict, list[dict]]:
    cfg = load_config(CONFIGS / "toy_grpo.yaml", toy_overrides(
        tmp_path, "trainer.total_steps=2", "placement.policy.num_workers=2", "deepspeed.zero_stage=2",
        "trainer.mini_batch_size=16", "trainer.micro_batch_size=4", "checkpoint.export_hf=false", *extra))
    trainer = PPOTrainer(cfg, prepare_run(cfg))
    try:
        trainer.fit()
        return policy_weights(trainer), list(trainer.logger.history)
    finally:
        trainer.close()


@pytest.mark.parametrize("layout", ["trainer.max_tokens_per_micro_batch=40", "trainer.packing=true"])
def test_grpo_update_is_the_same_in_another_layout(ray_session, tmp_path, layout):
    rows, rows_history = _grpo(tmp_path / "rows")
    other, other_history = _grpo(tmp_path / "other", layout)
    # The gradients agree to float rounding (summation order): the loss and the gradient norm before each
    # step match to 1e-5; a wrong loss scale or a sequence attending to another would move them by far
    # more. Adam's first steps are close to lr·sign(g), so an element whose gradient is ~0 may move
    # either way: a few elements per tensor may differ by up to 2·lr per step, every other one to 1e-6.
    for a, b in zip(rows_history, other_history):
        assert b["policy/loss"] == pytest.approx(a["policy/loss"], rel=1e-5, abs=1e-7)
        assert b["policy/grad_norm"] == pytest.approx(a["policy/grad_norm"], rel=1e-5)
        assert b["reward/score_mean"] == a["reward/score_mean"]  # the same samples: the same weights synced
    for name in rows:
        close = np.isclose(other[name], rows[name], rtol=1e-4, atol=1e-6)
        assert close.mean() > 0.999, (name, close.mean())
        assert np.abs(other[name] - rows[name]).max() <= 2 * 3e-3 * 2, name


@pytest.mark.parametrize("config, layout", [
    ("toy_sft.yaml", "trainer.max_tokens_per_micro_batch=64"),
    ("toy_sft.yaml", "trainer.packing=true"),
    ("toy_rm.yaml", "trainer.packing=true"),  # the scalar head read at each pair's last real token
    ("toy_dpo.yaml", "trainer.packing=true"),  # policy and reference (the initial policy) log-probs
])
def test_offline_stage_is_the_same_in_another_layout(ray_session, tmp_path, config, layout):
    def run(path, *extra):
        cfg = load_config(CONFIGS / config, [f"trainer.output_dir={path}", "logging.progress_bar=false",
                                             "trainer.eval_every=0", "trainer.total_steps=3",
                                             "trainer.micro_batch_size=8", "checkpoint.export_hf=false", *extra])
        return {"sft": run_sft, "rm": run_rm, "dpo": run_dpo}[cfg.stage](cfg)

    rows, other = run(tmp_path / "rows"), run(tmp_path / "other", layout)
    assert other["eval_after"]["eval/loss"] == pytest.approx(rows["eval_after"]["eval/loss"], rel=1e-5)
    assert other["first_loss"] == pytest.approx(rows["first_loss"], rel=1e-6)
    assert other["last_loss"] == pytest.approx(rows["last_loss"], rel=1e-5)


def test_ppo_critic_and_separate_reference_are_the_same_packed(ray_session, tmp_path):
    # GAE with a critic (values and value update on packed rows) and a reference actor of its own.
    def run(path, *extra):
        cfg = load_config(CONFIGS / "toy_ppo.yaml", toy_overrides(
            path, "trainer.total_steps=2", "checkpoint.export_hf=false", "placement.reference_in_policy=false",
            "algo.kl.coef=0.1", *extra))
        trainer = PPOTrainer(cfg, prepare_run(cfg))
        try:
            trainer.fit()
            return list(trainer.logger.history)
        finally:
            trainer.close()

    rows, packed = run(tmp_path / "rows"), run(tmp_path / "packed", "trainer.packing=true")
    for a, b in zip(rows, packed):
        for key in ("critic/loss", "critic/grad_norm", "policy/grad_norm", "kl/ref"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
        # the policy loss is a mean of normalised advantages ≈ 0: float rounding is its whole size
        assert b["policy/loss"] == pytest.approx(a["policy/loss"], abs=1e-6)
        assert b["reward/score_mean"] == a["reward/score_mean"]
