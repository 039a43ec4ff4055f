"""Nothing lost, nothing hangs (issue 6): exact resume, stateless-role recovery, training-rank restart,
deadlines on hangs, checkpoint corruption fallback, the reward contract, numerical safety.

Real Ray actors, real DeepSpeed, toy models, faults injected through RLHF_RAY_FAULTS (rlhf_ray/faults.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
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
VOLATILE = ("time/", "perf/")  # wall-clock metrics differ run to run; everything else must not
DEADLINE = 20  # seconds: well above a healthy phase on a loaded 2-core machine, far below a hang


def _cfg(tmp_path, *extra: str):
    # adaptive KL and running reward normalisation: driver state a resume must restore exactly
    return load_config(CONFIGS / "toy_ppo.yaml", toy_overrides(
        tmp_path, f"trainer.total_steps={STEPS}", "trainer.prompts_per_step=8", "trainer.mini_batch_size=8",
        "trainer.micro_batch_size=4", "checkpoint.export_hf=false", "algo.kl.adaptive=true", "algo.kl.target=0.5",
        "algo.kl.horizon=64", "reward.normalize=running", *extra))


@dataclass
class Run:
    rows: list[dict]  # the metrics rows of the whole run (a resumed run keeps those before its checkpoint)
    weights: dict[str, np.ndarray]  # the final policy
    result: dict  # what fit returns (evaluations before and after)
    driver: dict  # the driver state a checkpoint would hold after the last step (KL controller, moments, …)


def _fit(cfg) -> Run:
    """The stage as launch.py runs it: PPOTrainer.fit (resuming when the config says so)."""
    trainer = PPOTrainer(cfg, prepare_run(cfg))
    try:
        result = trainer.fit()
        driver = trainer.state_dict(STEPS)
        return Run(list(trainer.logger.history), policy_weights(trainer), result, driver)
    finally:
        trainer.close()


def _assert_same_run(a: Run, b: Run, from_step: int = 1) -> None:
    by_step = {r["step"]: r for r in a.rows}
    rows = [r for r in b.rows if r["step"] >= from_step]
    assert [r["step"] for r in rows] == list(range(from_step, STEPS + 1))
    for row in rows:
        expected = by_step[row["step"]]
        assert set(row) == set(expected), row["step"]
        for key, value in row.items():
            if not key.startswith(VOLATILE) and isinstance(value, float):
                assert value == pytest.approx(expected[key], rel=1e-6, abs=1e-7), (row["step"], key)
    for name in a.weights:
        np.testing.assert_array_equal(a.weights[name], b.weights[name], err_msg=name)
    assert b.result["eval_before"] == pytest.approx(a.result["eval_before"], rel=1e-6)
    assert b.result["eval_after"] == pytest.approx(a.result["eval_after"], rel=1e-6)
    assert b.driver["kl_ctl"] == pytest.approx(a.driver["kl_ctl"], rel=1e-9)
    assert b.driver["moments"] == pytest.approx(a.driver["moments"], rel=1e-9)
    assert b.driver["iterator"] == a.driver["iterator"] and b.driver["version"] == a.driver["version"]


@pytest.fixture(scope="module")
def uninterrupted(ray_session, tmp_path_factory):
    """The reference run: 4 steps, a checkpoint after every step, all kept."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    cfg = _cfg(tmp, "checkpoint.every=1", "checkpoint.keep_last=10")
    run = _fit(cfg)
    kl = [r["kl/coef"] for r in run.rows]
    assert len(set(kl)) == STEPS, kl  # the adaptive controller moved β every step: resuming it is tested
    assert run.driver["moments"]["count"] == STEPS * 8 * 1  # every score went into the running moments
    return {"run": run, "ckpt": cfg.run_dir / "checkpoints"}


@pytest.mark.parametrize("resume_step", [1, 3])
def test_resume_at_any_step_equals_the_uninterrupted_run(uninterrupted, tmp_path, resume_step):
    path = uninterrupted["ckpt"] / f"step_{resume_step:08d}"
    run = _fit(_cfg(tmp_path, f"checkpoint.resume={path}"))
    _assert_same_run(uninterrupted["run"], run, from_step=resume_step + 1)


def test_a_crashed_run_resumed_with_auto_equals_the_uninterrupted_run(uninterrupted, tmp_path, monkeypatch):
    """The stage fails in step 3 (an exception in the policy's update); running it again with
    checkpoint.resume=auto continues from step 2's checkpoint: the whole metrics file, the final
    weights and both evaluations equal the uninterrupted run's."""
    monkeypatch.setenv("RLHF_RAY_FAULTS", "raise@policy.train#3")
    monkeypatch.setenv("RLHF_RAY_FAULTS_DIR", str(tmp_path / "faults"))
    cfg = _cfg(tmp_path, "checkpoint.every=1", "checkpoint.resume=auto")
    with pytest.raises(PhaseError) as err:
        _fit(cfg)
    assert (err.value.phase, err.value.role, err.value.step) == ("update", "policy", 3), str(err.value)
    run = _fit(cfg)
    _assert_same_run(uninterrupted["run"], run)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # no step lost, none logged twice


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
    run = _fit(_cfg(tmp_path, "checkpoint.resume=auto", f"checkpoint.dir={root}"))
    _assert_same_run(uninterrupted["run"], run, from_step=STEPS)


def test_killed_stateless_roles_recover_with_identical_results(uninterrupted, tmp_path, monkeypatch):
    """A rollout engine, the reference and the reward worker (as actors of their own, not hosted by
    the policy and the driver as in the uninterrupted run) each die mid-step; the run goes on."""
    monkeypatch.setenv("RLHF_RAY_FAULTS", "crash@rollout.generate#2,crash@reference.compute_logprobs#3,"
                                          "crash@reward.score#3,crash@rollout.receive_from_object_store#3")
    monkeypatch.setenv("RLHF_RAY_FAULTS_DIR", str(tmp_path / "faults"))
    run = _fit(_cfg(tmp_path, "placement.reward_in_driver=false", "placement.reference_in_policy=false"))
    assert len(list((tmp_path / "faults").iterdir())) == 4  # every fault fired once
    _assert_same_run(uninterrupted["run"], run)


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
    assert elapsed < 3 * DEADLINE, elapsed  # the deadline once, plus the rest of that step (not one per retry)


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
