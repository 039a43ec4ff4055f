"""LoRA (model.lora) through the real stack: GRPO and PPO on vLLM engines with DeepSpeed ranks whose
optimizer holds the adapters only, the reference as the base model with adapters off, merged weights
synced into the engines (the merged model, or the adapter served by vLLM over its base weights) and
verified by the probe, an exact resume from an adapter-only checkpoint,
the export (merged model + PEFT adapter) reloaded with the usual calls, and the offline stages."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import peft
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from rlhf_ray.config import load_config
from rlhf_ray.models import load_causal_lm, response_logprobs
from rlhf_ray.trainers.common import prepare_run
from rlhf_ray.trainers.dpo import run_dpo
from rlhf_ray.trainers.ppo import PPOTrainer
from rlhf_ray.trainers.rm import run_rm
from rlhf_ray.trainers.sft import run_sft
from tests.integration.helpers import engine_states, policy_probe, policy_weights, toy_overrides

pytestmark = pytest.mark.integration
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
LORA = ("model.lora.rank=8", "model.lora.alpha=16")


def _raw_parameters(pool) -> dict[str, np.ndarray]:
    """Rank 0's parameters as DeepSpeed holds them (LoRA names), copied."""
    fn = lambda w: {n: p.detach().float().numpy().copy() for n, p in w.model.module.named_parameters()}  # noqa: E731
    return ray.get(pool.workers[0].__ray_call__.remote(fn), timeout=120)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _engine_adapters(trainer) -> tuple:
    """(the adapter id engine 0 serves or None, the adapter directories it keeps)."""
    def read(worker):
        engine = worker.engine
        kept = sorted(os.listdir(engine._adapter_dir.name)) if engine._adapter_dir else []
        return (engine.lora_request.lora_int_id if engine.lora_request else None), kept

    return ray.get(trainer.roles.pools["rollout"].workers[0].__ray_call__.remote(read), timeout=120)


@pytest.mark.parametrize("sync", ["merged", "adapter"])
def test_grpo_with_lora_trains_adapters_only_against_the_base_as_reference(ray_session, tmp_path, sync):
    cfg = load_config(CONFIGS / "toy_grpo.yaml", toy_overrides(tmp_path, *LORA, "trainer.total_steps=4",
                                                                 "policy_optim.lr=1e-2", f"model.lora.sync={sync}"))
    assert cfg.adapter_sync == (sync == "adapter")
    inputs = prepare_run(cfg)
    trainer = PPOTrainer(cfg, inputs)
    try:
        before = _raw_parameters(trainer.roles.policy)
        result = trainer.fit()
        after = _raw_parameters(trainer.roles.policy)
        changed = {n for n in after if not np.array_equal(before[n], after[n])}
        assert changed and all(".lora_A." in n or ".lora_B." in n for n in changed)  # the base never moves
        assert not any("lora" in n for n in policy_weights(trainer))  # the engines get base names, merged
        # the merged weights (or the adapter over the engine's base) reached every engine: its probe
        # log-probs are the trained policy's
        probe = policy_probe(trainer)
        for version, engine_probe in engine_states(trainer):
            assert version == 4 and np.max(np.abs(engine_probe - probe)) < 1e-3
        served, kept = _engine_adapters(trainer)
        if sync == "adapter":  # one adapter per sync (the first before step 1), only the latest kept
            assert served is not None and served >= 4 and kept == [str(served)]
        else:
            assert (served, kept) == (None, [])
        # the reference is the base model: log-probs with adapters off = a fresh load of the initial policy's
        ids = torch.tensor([[5, 40, 41, 42, 6, 50, 51, 52, 53]])
        mask = torch.ones_like(ids)
        payload = {"prompt_ids": ids[:, :5].numpy(), "prompt_mask": mask[:, :5].numpy(), "response_ids": ids[:, 5:].numpy(),
                   "response_mask": mask[:, 5:].numpy(), "stopped": np.array([True])}
        from rlhf_ray.batch import Samples

        payload = Samples.from_numpy(payload).to_numpy()
        ref = ray.get(trainer.roles.policy.workers[0].reference_logprobs.remote(payload), timeout=120)
        base = load_causal_lm(inputs.models.policy)
        with torch.no_grad():
            want = response_logprobs(base, ids, mask, 5, cfg.rollout.temperature)
        assert np.allclose(ref, want.numpy(), atol=1e-5)
        assert math.isfinite(result["eval_after"])
    finally:
        trainer.close()
    export = Path(result["export_policy"])
    merged = AutoModelForCausalLM.from_pretrained(export)
    adapted = peft.PeftModel.from_pretrained(load_causal_lm(inputs.models.policy), str(export / "adapter"))
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)
        assert not torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-4)


def test_ppo_with_lora_on_policy_and_critic_resumes_exactly(ray_session, tmp_path):
    """The checkpoint holds the adapters (and the critic's head) only; resumed from step 2, steps 3-4 and
    the final weights equal the uninterrupted run's. The engines serve the adapter (model.lora.sync=adapter):
    the resumed run's fresh engines get the checkpoint's adapter over their base weights."""
    common = (*LORA, "model.lora.roles=[policy, critic]", "model.lora.sync=adapter", "trainer.total_steps=4", "checkpoint.every=2",
              "checkpoint.keep_last=5", "checkpoint.export_hf=false")
    cfg = load_config(CONFIGS / "toy_ppo.yaml", toy_overrides(tmp_path / "a", *common))
    trainer = PPOTrainer(cfg, prepare_run(cfg))
    try:
        trainer.fit()
        weights = policy_weights(trainer)
        critic = _raw_parameters(trainer.roles.critic)
    finally:
        trainer.close()
    assert any(n.startswith("score.modules_to_save.") for n in critic)
    step_2 = cfg.run_dir / "checkpoints" / "step_00000002"
    for role in ("policy", "critic"):  # no frozen base in the checkpoint: adapters (and the critic's head) only
        (states,) = (step_2 / role).rglob("*model_states.pt")
        saved = torch.load(states, map_location="cpu", weights_only=False)["module"]
        assert saved and all(".lora_" in n or ".modules_to_save." in n for n in saved), sorted(saved)[:5]
    resumed = load_config(CONFIGS / "toy_ppo.yaml", toy_overrides(tmp_path / "b", *common, f"checkpoint.resume={step_2}"))
    trainer = PPOTrainer(resumed, prepare_run(resumed))
    try:
        trainer.fit()
        resumed_weights = policy_weights(trainer)
    finally:
        trainer.close()
    a, b = _rows(cfg.run_dir / "metrics.jsonl"), _rows(resumed.run_dir / "metrics.jsonl")
    assert [r["step"] for r in b] == [3, 4]
    for want, got in zip(a[2:], b):
        for key, value in want.items():
            if isinstance(value, float) and not key.startswith(("time/", "perf/")):
                assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-7), (got["step"], key)
    for name in weights:
        np.testing.assert_array_equal(weights[name], resumed_weights[name], err_msg=name)


OFFLINE = {  # stage → (config, run, its LoRA options beyond rank and alpha)
    "sft": ("toy_sft.yaml", run_sft, ("model.lora.target_modules=[q_proj, v_proj]",)),
    "dpo": ("toy_dpo.yaml", run_dpo, ("model.lora.export_merged=false",)),
    "rm": ("toy_rm.yaml", run_rm, ("model.lora.roles=[reward]", "model.lora.dropout=0.05")),
}


@pytest.mark.parametrize("stage", list(OFFLINE))
def test_offline_stages_train_with_lora(ray_session, tmp_path, stage):
    """SFT, DPO and the reward model train their adapters (the RM its head too); the held-out loss falls;
    the export is the merged model with the adapter beside it, or (export_merged=false) the adapter alone,
    which PEFT loads onto the base; the adapter config is what model.lora says."""
    config, run, options = OFFLINE[stage]
    cfg = load_config(CONFIGS / config, [f"trainer.output_dir={tmp_path}", "logging.progress_bar=false", "trainer.eval_every=0",
                                        *LORA, *options, "trainer.total_steps=20", "policy_optim.lr=1e-2",
                                        "reward_optim.lr=1e-2"])
    result = run(cfg)
    assert result["eval_after"]["eval/loss"] < result["eval_before"]["eval/loss"], result
    export = Path(result["export"])
    adapter = export if stage == "dpo" else export / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["lora_alpha"] == 16
    if stage == "sft":
        assert set(saved["target_modules"]) == {"q_proj", "v_proj"} and (export / "config.json").exists()
    if stage == "dpo":  # the adapter alone: no merged weights; PEFT puts it on the base policy
        assert not (export / "model.safetensors").exists()
        base = load_causal_lm(prepare_run(cfg).models.policy)
        loaded = peft.PeftModel.from_pretrained(base, str(export))
        assert any(".lora_B." in n and p.abs().sum() > 0 for n, p in loaded.named_parameters())
    if stage == "rm":
        assert saved["lora_dropout"] == 0.05 and saved["task_type"] == "SEQ_CLS"
