"""GPU-only paths of the vLLM engine: NCCL and CUDA IPC weight sync, sleep/wake around the update, tensor parallelism.

Marked `gpu`: they run where CUDA and the CUDA build of vLLM are present (a lent GPU machine) and are
skipped elsewhere; the same engine is tested on CPU in tests/integration/test_vllm.py. Each builds a
short toy GRPO run (head size 32, bf16 where the GPU supports it) on a local Ray session.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
GPUS = torch.cuda.device_count()

requires_vllm_gpu = pytest.mark.skipif(
    GPUS == 0 or __import__("importlib").util.find_spec("vllm") is None, reason="needs CUDA and the CUDA build of vLLM")


@pytest.fixture(scope="module")
def ray_gpu_session():
    import ray

    ray.init(address="local", num_cpus=8, num_gpus=GPUS, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _run(tmp_path, *overrides: str) -> list[dict]:
    from rlhf_ray.config import load_config
    from rlhf_ray.trainers.common import prepare_run
    from rlhf_ray.trainers.ppo import PPOTrainer
    from tests.integration.helpers import engine_states, policy_probe, toy_overrides

    cfg = load_config(CONFIGS / "toy_grpo.yaml", toy_overrides(
        tmp_path, "trainer.total_steps=3", "placement.policy.gpus=0.5", "placement.rollout.gpus=0.5",
        "placement.colocate=[[policy, rollout]]", "rollout.vllm.gpu_memory_utilization=0.2", *overrides))
    trainer = PPOTrainer(cfg, prepare_run(cfg))
    rows = []
    try:
        assert cfg.rollout_backend == "vllm"
        for step in range(1, 4):
            rows.append(trainer.train_step(step))
            expected = policy_probe(trainer)
            for held, probe in engine_states(trainer):
                assert held == step
                np.testing.assert_allclose(probe, expected, atol=cfg.probe_tolerance, rtol=0)
    finally:
        trainer.close()
    return rows


@requires_vllm_gpu
def test_nccl_sync_probe_every_step(ray_gpu_session, tmp_path):
    rows = _run(tmp_path, "rollout.weight_sync=nccl")
    assert all(r["sync/probe_gap"] < 1e-4 for r in rows)


@requires_vllm_gpu
def test_cuda_ipc_sync_when_colocated(ray_gpu_session, tmp_path):
    rows = _run(tmp_path, "rollout.weight_sync=cuda_ipc")  # _run colocates policy and rollout on one GPU
    assert all(r["sync/probe_gap"] < 1e-4 for r in rows)


@requires_vllm_gpu
def test_sleep_and_wake_around_the_update(ray_gpu_session, tmp_path):
    rows = _run(tmp_path, "rollout.vllm.enable_sleep=true")
    assert all(np.isfinite(r["policy/loss"]) for r in rows)


@requires_vllm_gpu
@pytest.mark.skipif(GPUS < 2, reason="tensor parallelism needs 2 GPUs")
def test_tensor_parallel_engine_receives_over_nccl(ray_gpu_session, tmp_path):
    rows = _run(tmp_path, "rollout.weight_sync=nccl", "rollout.vllm.tensor_parallel_size=2",
                "placement.rollout.gpus=2", "placement.colocate=[]", "placement.policy.gpus=1")
    assert rows[-1]["sync/version"] == 3
