"""Nothing lost, nothing hangs (issue 6): exact resume, stateless-role recovery, training-rank restart,
deadlines on hangs, checkpoint corruption fallback, the reward contract, numerical safety.

Real Ray actors, real DeepSpeed, toy models, faults injected through RLHF_RAY_FAULTS (rlhf_ray/faults.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from rlhf_ray.checkpoint import CheckpointStore
from rlhf_ray.config import load_config
from rlhf_ray.placement import PhaseError
from rlhf_ray.trainers.common import prepare_run
from rlhf_ray.trainers.ppo import PPOTrainer, run_ppo
from tests.integration.helpers import policy_weights, toy_overrides

pytestmark = pytest.mark.integration
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STEPS = 4
VOLATILE = ("time/", "perf/")
DEADLINE = 20  # seconds: well above a healthy phase on a loaded 2-core machine, far below a hang  # wall-clock metrics differ run to run; everything else must not


def _cfg(tmp_path, *extra: str):
    return load_config(CONFIGS / "toy_ppo.yaml", toy_overrides(
        tmp_path, f"trainer.total_steps={STEPS}", "trainer.prompts_per_step=8", "trainer.mini_batch_size=8",
        "trainer.micro_batch_size=4", "checkpoint.export_hf=false", *extra))


def _train(cfg, until: int = STEPS) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Steps start_step..until on a fresh trainer (resuming when the config says so)."""
    trainer = PPOTrainer(cfg, prepare_run(cfg))
    try:
        rows = []
        for step in range(trainer.start_step, until + 1):
            metrics = trainer.train_step(step)
            rows.append({"step": step, **metrics})
            if trainer.checkpoints.due(step):
                trainer.checkpoints.save(step, trainer.state_dict(step))
        return rows, policy_weights(trainer)
    finally:
        trainer.close()


def _assert_same_run(rows_a: list[dict], rows_b: list[dict], w_a: dict, w_b: dict) -> None:
    by_step = {r["step"]: r for r in rows_a}
    for row in rows_b:
        expected = by_step[row["step"]]
        for key, value in row.items():
            if not key.startswith(VOLATILE) and isinstance(value, float):
                assert value == pytest.approx(expected[key], rel=1e-6, abs=1e-7), (row["step"], key)
    for name in w_a:
        np.testing.assert_array_equal(w_a[name], w_b[name], err_msg=name)


@pytest.fixture(scope="module")
def uninterrupted(ray_session, tmp_path_factory):
    """The reference run: 4 steps, a checkpoint after every step, all kept."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    cfg = _cfg(tmp, "checkpoint.every=1", "checkpoint.keep_last=10")
    rows, weights = _train(cfg)
    return {"rows": rows, "weights": weights, "ckpt": cfg.run_dir / "checkpoints"}


@pytest.mark.parametrize("resume_step", [1, 3])
def test_resume_at_any_step_equals_the_uninterrupted_run(uninterrupted, tmp_path, resume_step):
    path = uninterrupted["ckpt"] / f"step_{resume_step:08d}"
    rows, weights = _train(_cfg(tmp_path, f"checkpoint.resume={path}"))
    assert [r["step"] for r in rows] == list(range(resume_step + 1, STEPS + 1))
    _assert_same_run(uninterrupted["rows"], rows, uninterrupted["weights"], weights)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(uninterrupted, tmp_path):
    """Copy the checkpoints, flip a byte in the newest one's policy state: resume=auto takes the one before."""
    import shutil

    root = tmp_path / "ckpt"
    shutil.copytree(uninterrupted["ckpt"], root)
    newest = root / f"step_{STEPS:08d}"
    victim = max((p for p in (newest / "policy").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert CheckpointStore(root, keep_last=10).latest_valid() == root / f"step_{STEPS - 1:08d}"
    rows, weights = _train(_cfg(tmp_path, "checkpoint.resume=auto", f"checkpoint.dir={root}"))
    assert [r["step"] for r in rows] == [STEPS]
    _assert_same_run(uninterrupted["rows"], rows, uninterrupted["weights"], weights)


def test_killed_stateless_roles_recover_with_identical_results(uninterrupted, tmp_path, monkeypatch):
    """A rollout engine, the reference and the reward worker (as actors of their own, not hosted by
    the policy and the driver as in the uninterrupted run) each die mid-step; the run goes on."""
    monkeypatch.setenv("RLHF_RAY_FAULTS", "crash@rollout.generate#2,crash@reference.compute_logprobs#3,"
                                          "crash@reward.score#3,crash@rollout.receive_from_object_store#3")
    monkeypatch.setenv("RLHF_RAY_FAULTS_DIR", str(tmp_path / "faults"))
    rows, weights = _train(_cfg(tmp_path, "placement.reward_in_driver=false", "placement.reference_in_policy=false"))
    assert len(list((tmp_path / "faults").iterdir())) == 4  # every fault fired once
    _assert_same_run(uninterrupted["rows"], rows, uninterrupted["weights"], weights)


def test_killed_policy_rank_restarts_the_stage_from_its_checkpoint(ray_session, tmp_path, monkeypatch):
    common = ("checkpoint.every=1", "checkpoint.export_hf=true", "trainer.eval_prompts=8")
    plain = run_ppo(_cfg(tmp_path / "plain", *common))
    monkeypatch.setenv("RLHF_RAY_FAULTS", "crash@policy.train#3")
    monkeypatch.setenv("RLHF_RAY_FAULTS_DIR", str(tmp_path / "faults"))
    restarted = run_ppo(_cfg(tmp_path / "crashed", *common, "trainer.max_restarts=1", "deepspeed.timeout_s=30"))
    assert restarted["eval_after"] == pytest.approx(plain["eval_after"], rel=1e-6)
    from safetensors.numpy import load_file

    a = load_file(f"{plain['export_policy']}/model.safetensors")
    b = load_file(f"{restarted['export_policy']}/model.safetensors")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("fault, phase, role", [
    ("hang@rollout.generate#2", "rollout", "rollout"),
    ("hang@rollout.receive_from_object_store#1", "sync", "rollout"),
    ("hang@reward.score#2", "score", "reward"),
])
def test_a_hang_fails_within_its_deadline_naming_phase_role_and_step(ray_session, tmp_path, monkeypatch,
                                                                     fault, phase, role):
    monkeypatch.setenv("RLHF_RAY_FAULTS", fault)
    monkeypatch.setenv("RLHF_RAY_FAULTS_DIR", str(tmp_path / "faults"))
    cfg = _cfg(tmp_path, f"trainer.timeout_s={DEADLINE}")
    trainer = PPOTrainer(cfg, prepare_run(cfg))
    try:
        start = time.monotonic()
        with pytest.raises(PhaseError) as err:
            for step in range(1, STEPS + 1):
                start = time.monotonic()
                trainer.train_step(step)
        elapsed = time.monotonic() - start
    finally:
        trainer.close()
    assert (err.value.phase, err.value.role) == (phase, role)
    assert str(err.value).startswith(f"FAILED phase={phase} role={role} step=")
    assert f"no answer within {DEADLINE}s" in str(err.value)
    assert elapsed < DEADLINE + 30, elapsed  # the deadline, plus the rest of that step


def test_reward_contract_fail_names_source_and_sample(ray_session, tmp_path):
    cfg = _cfg(tmp_path, "reward.sources=[{kind: function, path: 'rlhf_ray.toy.faulty:nan_on_z', name: flaky}]",
               "rollout.max_new_tokens=16")
    trainer = PPOTrainer(cfg, prepare_run(cfg))
    try:
        with pytest.raises(PhaseError) as err:
            for step in range(1, STEPS + 1):
                trainer.train_step(step)
    finally:
        trainer.close()
    assert err.value.phase == "score" and err.value.role == "reward"
    assert "reward source 'flaky' (sample " in err.value.cause and "is not finite" in err.value.cause


def test_reward_contract_mask_drops_samples_and_counts_them(ray_session, tmp_path):
    cfg = _cfg(tmp_path, "reward.sources=[{kind: function, path: 'rlhf_ray.toy.faulty:nan_on_z', name: flaky}]",
               "reward.on_error=mask", "reward.max_masked_frac=0.9", "rollout.max_new_tokens=16")
    trainer = PPOTrainer(cfg, prepare_run(cfg))
    try:
        rows = [trainer.train_step(step) for step in range(1, STEPS + 1)]
    finally:
        trainer.close()
    masked = [r["reward/masked_frac"] for r in rows]
    assert any(m > 0 for m in masked)
    assert rows[-1]["reward/violations/non_finite"] == round(sum(m * 8 for m in masked))
    assert all(np.isfinite(r["reward/score_mean"]) and np.isfinite(r["policy/loss"]) for r in rows)


def test_non_finite_values_skip_the_update_then_stop_the_run(ray_session, tmp_path, monkeypatch):
    """NaN old log-probs twice in a row: both updates skipped on every rank, weights untouched, then the
    run stops at trainer.max_skipped_steps=2 without a new checkpoint."""
    monkeypatch.setenv("RLHF_RAY_FAULTS", "nan@policy.compute_logprobs#2,nan@policy.compute_logprobs#3")
    monkeypatch.setenv("RLHF_RAY_FAULTS_DIR", str(tmp_path / "faults"))
    cfg = _cfg(tmp_path, "trainer.max_skipped_steps=2", "checkpoint.every=1")
    trainer = PPOTrainer(cfg, prepare_run(cfg))
    try:
        trainer.train_step(1)
        trainer.checkpoints.save(1, trainer.state_dict(1))
        before = policy_weights(trainer)
        skipped = trainer.train_step(2)
        assert skipped["numerics/skipped_step"] == 1 and skipped["numerics/nonfinite_old_logprobs"] > 0
        assert skipped["sync/version"] == 1  # no update, no sync
        for name, value in policy_weights(trainer).items():
            np.testing.assert_array_equal(value, before[name])
        with pytest.raises(PhaseError, match="2 consecutive updates skipped"):
            trainer.train_step(3)
    finally:
        trainer.close()
    assert CheckpointStore(cfg.run_dir / "checkpoints", keep_last=2).latest_valid().name == "step_00000001"
