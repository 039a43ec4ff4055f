"""Each trained role builds its optimizer, LR schedule and DeepSpeed config from its own section:
policy_optim (policy ranks, sft/dpo ranks), critic_optim (critic ranks), reward_optim (rm ranks).

All real: `worker.init_distributed` joins a one-rank gloo group in this process (removed when the
module ends, with the environment it set), loads the toy model of its role and builds its `DeepSpeedModel`
(DeepSpeed's CPU accelerator, ZeRO-0 at one rank); the test reads the optimizer, the LR schedule and
the DeepSpeed config off the engine.
"""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch

from rlhf_ray.batch import position_ids
from rlhf_ray.config import load_config
from rlhf_ray.toy import save_toy_models
from rlhf_ray.workers import CriticWorker, ModelPaths, OfflineWorker, PolicyWorker


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> ModelPaths:
    toy = save_toy_models(tmp_path_factory.mktemp("models"))
    return ModelPaths(policy=toy.policy, reference=toy.policy, critic=toy.critic, tokenizer=toy.policy)


@pytest.fixture(scope="module")
def captured():
    """→ a function starting a worker for real and returning what its DeepSpeed engine holds. The
    module's workers share one one-rank group (a second init_distributed with the same rank and world
    size returns at once, as DeepSpeed caches its groups); it is removed, with the environment it set,
    when the module ends."""
    saved = dict(os.environ)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def start(worker) -> dict:
        with torch.random.fork_rng(devices=[]):  # init_distributed seeds torch with trainer.seed
            worker.init_distributed("127.0.0.1", port)
        engine = worker.model._ds
        return {"optimizer": engine.optimizer, "scheduler": engine.lr_scheduler, "config": worker.model.config}

    yield start
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def lrs(optimizer, scheduler, steps: int) -> list[float]:
    """The lr of each of the first `steps` updates, as DeepSpeed steps them."""
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


# ppo defaults: 8 prompts × 1 sample per step, mini-batch 8 → one optimizer step per RL step
PPO = ["trainer.total_steps=4", "placement.reference_in_policy=false"]


def test_policy_rank_takes_betas_eps_and_schedule_from_policy_optim(captured, paths):
    cfg = load_config(None, PPO + ["policy_optim.betas=[0.8, 0.99]", "policy_optim.eps=1e-6",
                                   "policy_optim.scheduler=cosine", "policy_optim.lr=0.01"])
    built = captured(PolicyWorker(cfg, paths, 0, 1))
    group = built["optimizer"].param_groups[0]
    assert tuple(group["betas"]) == (0.8, 0.99) and group["eps"] == 1e-6
    # cosine over 4 updates, no warm-up: ½(1 + cos(πk/4)) × 0.01
    expected = [0.01, 0.01 * (1 + math.sqrt(0.5)) / 2, 0.005, 0.01 * (1 - math.sqrt(0.5)) / 2]
    assert lrs(built["optimizer"], built["scheduler"], 4) == pytest.approx(expected)
    assert built["config"]["gradient_clipping"] == 1.0  # policy_optim.grad_clip default


def test_critic_rank_takes_its_own_section_not_the_policys(captured, paths):
    cfg = load_config(None, PPO + ["critic_optim.betas=[0.5, 0.9]", "critic_optim.eps=1e-4",
                                   "critic_optim.grad_clip=0.25", "critic_optim.scheduler=linear",
                                   "critic_optim.warmup_steps=2", "critic_optim.lr=0.03"])
    built = captured(CriticWorker(cfg, paths, 0, 1))
    group = built["optimizer"].param_groups[0]
    assert tuple(group["betas"]) == (0.5, 0.9) and group["eps"] == 1e-4
    assert built["config"]["gradient_clipping"] == 0.25
    # warm-up (k+1)/3 for k < 2, then linear decay over the remaining 2 of 4 updates: 1, ½
    assert lrs(built["optimizer"], built["scheduler"], 4) == pytest.approx([0.01, 0.02, 0.03, 0.015])

    built = captured(PolicyWorker(cfg, paths, 0, 1))  # the same config: the policy keeps the defaults
    group = built["optimizer"].param_groups[0]
    assert tuple(group["betas"]) == (0.9, 0.95) and group["eps"] == 1e-8
    assert built["config"]["gradient_clipping"] == 1.0


def test_critic_grad_clip_null_disables_clipping(captured, paths):
    cfg = load_config(None, PPO + ["critic_optim.grad_clip=null"])
    built = captured(CriticWorker(cfg, paths, 0, 1))
    assert built["config"]["gradient_clipping"] == 0.0


def test_reward_model_ranks_take_reward_optim(captured, paths):
    cfg = load_config(None, ["stage=rm", "trainer.total_steps=5", "reward_optim.betas=[0.7, 0.98]",
                             "reward_optim.eps=1e-5", "reward_optim.scheduler=linear",
                             "reward_optim.warmup_steps=1", "reward_optim.lr=0.02",
                             "policy_optim.betas=[0.1, 0.2]"])
    built = captured(OfflineWorker(cfg, paths, 0, 1, loss=None))
    group = built["optimizer"].param_groups[0]
    assert tuple(group["betas"]) == (0.7, 0.98) and group["eps"] == 1e-5
    # offline: total optimizer steps = trainer.total_steps = 5; warm-up ½, then 1 − (k − 1)/4
    assert lrs(built["optimizer"], built["scheduler"], 5) == pytest.approx(
        [0.01, 0.02, 0.015, 0.01, 0.005])


def test_offline_policy_stages_take_policy_optim(captured, paths):
    cfg = load_config(None, ["stage=dpo", "trainer.total_steps=2", "policy_optim.betas=[0.6, 0.97]",
                             "reward_optim.betas=[0.1, 0.2]", "policy_optim.scheduler=linear"])
    built = captured(OfflineWorker(cfg, paths, 0, 1, loss=None))
    assert tuple(built["optimizer"].param_groups[0]["betas"]) == (0.6, 0.97)
    assert lrs(built["optimizer"], built["scheduler"], 2) == pytest.approx([1e-5, 0.5e-5])


def _layer_calls_and_grads(worker) -> tuple[int, dict[str, torch.Tensor]]:
    """One training forward + backward through the worker's engine on a fixed batch: → (MLP forward calls over
    the decoder layers, gradients by parameter name)."""
    module = worker.model.module
    layers = module.base_model.layers  # the decoder, under a causal-LM or a sequence-classification head
    calls = []  # counted inside forward: module hooks do not fire during checkpoint recomputation

    def counted(forward):
        return lambda *args, **kwargs: (calls.append(1), forward(*args, **kwargs))[1]

    for layer in layers:
        layer.mlp.forward = counted(layer.mlp.forward)
    ids = torch.randint(5, 30, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as rollouts have
    worker.model.train()
    out = worker.model.forward(ids, mask, position_ids(mask))
    worker.model.backward(out.float().pow(2).mean())
    for layer in layers:
        del layer.mlp.forward  # the class's forward again
    return len(calls), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("role", ["policy", "policy+packing", "critic", "rm"])
def test_gradient_checkpointing_recomputes_each_layer_and_keeps_the_gradients(captured, paths, role):
    def worker(on: bool):
        overrides = [f"trainer.gradient_checkpointing={str(on).lower()}"]
        if role == "policy+packing":
            overrides.append("trainer.packing=true")
        if role == "rm":
            return OfflineWorker(load_config(None, ["stage=rm", "trainer.total_steps=2", *overrides]), paths, 0, 1, loss=None)
        cls = CriticWorker if role == "critic" else PolicyWorker
        return cls(load_config(None, PPO + overrides), paths, 0, 1)

    runs = {}
    for on in (False, True):
        w = worker(on)
        captured(w)
        assert w.model.module.is_gradient_checkpointing is on
        runs[on] = _layer_calls_and_grads(w)
    (plain_calls, plain_grads), (ckpt_calls, ckpt_grads) = runs[False], runs[True]
    assert ckpt_calls == 2 * plain_calls > 0  # every layer's forward ran again inside the backward
    assert plain_grads.keys() == ckpt_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
