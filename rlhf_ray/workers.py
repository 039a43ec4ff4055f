"""Role workers: plain classes that `placement.WorkerPool` runs as Ray actors (`ray.remote(cls)`).

Each worker holds one model (or the reward sources) and answers typed calls with numpy payloads
(`batch.TensorRecord.to_numpy`), so nothing here needs Ray except weight transport, which lives in
`weight_sync`. Tests can build any worker directly, without Ray.

- `PolicyWorker`: DeepSpeed-trained policy rank; old log-probs, PPO update, weights for sync, export.
- `CriticWorker`: DeepSpeed-trained value model rank; values, value update, export.
- `ReferenceWorker`: frozen reference; log-probs.
- `RewardWorker`: reward sources; one score per sample and per source.
- `RolloutWorker`: a generation engine (vLLM, or HF generate) and the weight version it holds.
- `LabelWorker`: the preference labeller (`label.labeler`: an LLM judge or a scorer), and reward.sources for evaluation.
- `OfflineWorker`: a DeepSpeed rank of an offline stage (sft, rm, dpo); sequence outputs, update, export.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import resource
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rlhf_ray import faults
from rlhf_ray.batch import Experience, OfflineBatch, Samples, TensorRecord, position_ids, token_budget_splits
from rlhf_ray.config import OFFLINE_ROLE, OptimConfig, RunConfig


@dataclass(frozen=True)
class ModelPaths:
    """Where each role loads from (toy models already resolved to real directories)."""

    policy: str
    reference: str
    critic: str
    tokenizer: str


def set_threads() -> None:
    threads = int(os.environ.get("RLHF_RAY_TORCH_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)


def node_address() -> tuple[str, int]:
    """This node's IP and a free TCP port (rank 0 of a group reports them for rendezvous)."""
    from rlhf_ray.deepspeed_model import free_port, node_ip

    return node_ip(), free_port()


def timed(method):
    """An entry point of a role: adds its wall time to `self.busy[name]` (benchmarks split compute
    from orchestration), is a fault-injection point `<role>.<method>` (`rlhf_ray.faults`), and
    takes `threads=n`: the torch threads for this call, which the driver sets from how many actors
    share the node in this phase (`rlhf_ray.threads`)."""

    @functools.wraps(method)
    def wrapper(self, *args, threads: int | None = None, **kwargs):
        if threads and not self.fixed_threads:
            torch.set_num_threads(threads)
        self.threads_used[method.__name__] = torch.get_num_threads()
        fault = faults.fire(self.role, method.__name__, self.rank)
        start = time.perf_counter()
        try:
            result = method(self, *args, **kwargs)
        finally:
            self.busy[method.__name__] = self.busy.get(method.__name__, 0.0) + time.perf_counter() - start
        return faults.poison(result) if fault == "nan" else result

    # Ray checks call arguments against the innermost function's signature (inspect.unwrap): end the
    # chain here and declare `threads`.
    sig = inspect.signature(method)
    params = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
    params += [inspect.Parameter("threads", inspect.Parameter.KEYWORD_ONLY, default=None)]
    params += [p for p in sig.parameters.values() if p.kind == p.VAR_KEYWORD]
    del wrapper.__wrapped__
    wrapper.__signature__ = sig.replace(parameters=params)
    return wrapper


class Worker:
    """What every role answers: liveness, its address, and where its time and memory went."""

    role = "worker"
    rank = 0  # data-parallel rank or engine index
    fixed_threads = False  # True where torch threads cannot change after start (in-process vLLM on CPU)

    def __init__(self) -> None:
        set_threads()
        self.busy: dict[str, float] = {}
        self.threads_used: dict[str, int] = {}  # torch threads of the last call of each method

    def ping(self) -> int:
        """The process id: liveness, and a changed id tells the driver the actor was restarted."""
        return os.getpid()

    def node_address(self) -> tuple[str, int]:
        return node_address()

    def where(self) -> tuple[str, int]:
        """(Ray node id, CPUs this process may run on): the driver's thread plan is per node."""
        import ray

        return ray.get_runtime_context().get_node_id(), len(os.sched_getaffinity(0))

    def last_threads(self) -> dict[str, int]:
        """Torch threads each method ran with on its last call (the driver's per-phase plan)."""
        return self.threads_used

    def usage(self) -> tuple[dict[str, float], float]:
        """(seconds busy per method since the last call, peak resident memory in MiB); resets the former."""
        busy, self.busy = self.busy, {}
        return busy, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _forward_logits(forward, samples: Samples) -> torch.Tensor:
    """Logits that predict the response tokens: positions P-1 … P+T-2. (B, T, V)

    `forward(input_ids, attention_mask, position_ids) -> logits (B, L, V)`.
    """
    attention_mask = samples.attention_mask
    logits = forward(samples.input_ids, attention_mask, position_ids(attention_mask))
    return logits[:, samples.prompt_ids.shape[1] - 1: -1]


def _plain_forward(model: torch.nn.Module, packing: bool = False):
    """`forward(input_ids, attention_mask, position_ids) -> logits` of a causal LM outside DeepSpeed (a frozen
    reference); with `packing`, on the real tokens as one row (`rlhf_ray.packing`; the same positions)."""
    if packing:
        from rlhf_ray.packing import packed_forward

        return lambda ids, mask, pos: packed_forward(model, ids, mask)
    return lambda ids, mask, pos: model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits


def model_dtype(cfg: RunConfig) -> str:
    return cfg.model_dtype


def _split(n: int, size: int) -> list[slice]:
    return [slice(i, i + size) for i in range(0, n, size)]


def _per_micro_batch(samples: Samples, micro: int, fn) -> np.ndarray:
    """`fn` over micro-batches of `samples`, results stacked along the batch. (B, …)"""
    return torch.cat([fn(samples.select(rows)) for rows in _split(samples.batch_size, micro)]).numpy()


def _response_logprobs(forward, part: Samples, temperature: float) -> torch.Tensor:
    """log π of the response tokens at `temperature`, 0 on padding (never NaN × 0). (B, T)"""
    from rlhf_ray.algorithms.logprobs import logprobs_from_logits

    logits = _forward_logits(forward, part)
    logprobs = logprobs_from_logits(logits, part.response_ids.to(logits.device), temperature)
    return torch.where(part.response_mask.to(logits.device).bool(), logprobs, 0.0).cpu()


CHECKPOINT_TAG = "deepspeed"  # DeepSpeed checkpoint tag inside a role's checkpoint directory


class _TrainedRole(Worker):
    """A DeepSpeed rank (policy or critic): rendezvous, DeepSpeed model, export."""

    role = ""

    def __init__(self, cfg: RunConfig, paths: ModelPaths, rank: int, world_size: int):
        super().__init__()
        self.cfg, self.paths, self.rank, self.world_size = cfg, paths, rank, world_size
        self.model = None

    def init_distributed(self, master_addr: str, master_port: int) -> bool:
        from rlhf_ray.deepspeed_model import DeepSpeedModel, effective_zero, init_distributed, setup_deepspeed_env

        device = "cuda" if torch.cuda.is_available() else "cpu"
        setup_deepspeed_env(device)
        init_distributed(self.rank, self.world_size, master_addr, master_port,
                         "nccl" if device == "cuda" else "gloo", self.cfg.deepspeed.timeout_s)
        torch.manual_seed(self.cfg.trainer.seed)
        model, lora = self.load_model(), None
        if self.cfg.trainer.gradient_checkpointing:
            from rlhf_ray.models import enable_gradient_checkpointing

            enable_gradient_checkpointing(model)
        if self.uses_lora:
            from rlhf_ray.lora import apply_lora

            model, lora = apply_lora(model, self.cfg.model.lora, sequence_classifier=self.role != "policy")
        self.model = DeepSpeedModel(model, self.optim_config(), effective_zero(self.cfg.deepspeed, self.world_size),
                                  micro_batch_size=self.cfg.trainer.micro_batch_size,
                                  grad_accum=self.cfg.grad_accum_steps(self.role),
                                  total_optimizer_steps=self.total_optimizer_steps(),
                                  lora=lora, export_merged=self.cfg.model.lora.export_merged,
                                  packing=self.cfg.trainer.packing)
        return True

    @property
    def uses_lora(self) -> bool:
        """model.lora applies to this role (model.lora.rank > 0 and the role in model.lora.roles)."""
        return self.cfg.model.lora.rank > 0 and self.role in self.cfg.model.lora.roles

    def load_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def optim_config(self) -> OptimConfig:
        return self.cfg.policy_optim if self.role == "policy" else self.cfg.critic_optim

    def total_optimizer_steps(self) -> int:
        """For the lr schedule: RL steps × epochs × mini-batches per step."""
        return self.cfg.trainer.total_steps * self.cfg.algo.epochs * self.cfg.sequences_per_step // self.cfg.trainer.mini_batch_size

    def export(self, path: str) -> str:
        from rlhf_ray.models import load_tokenizer

        self.model.save_hf(path, tokenizer=load_tokenizer(self.paths.tokenizer, self.cfg.model.trust_remote_code))
        return path

    def save_state(self, directory: str) -> bool:
        """DeepSpeed model/optimizer/scheduler state of this rank (every rank calls it) and its RNG."""
        from rlhf_ray.checkpoint import capture_rng, save_rng

        self.model.save_checkpoint(directory, tag=CHECKPOINT_TAG)
        save_rng(directory, f"rng_rank{self.rank}", capture_rng())
        return True

    def load_state(self, directory: str) -> bool:
        from rlhf_ray.checkpoint import load_rng, restore_rng

        self.model.load_checkpoint(directory, tag=CHECKPOINT_TAG)
        restore_rng(load_rng(directory, f"rng_rank{self.rank}"))
        return True

    def _update(self, payload: dict[str, Any], scales: list[Any], micro_loss,
                record: type[TensorRecord] = Experience) -> dict[str, float]:
        """One pass over this rank's shard: len(scales) mini-batches, micro-batched, one optimizer step each.

        `micro_loss(mb, scale) -> (loss, shares, means)`: `loss` and `shares` are this micro-batch's
        part of the mini-batch value (they sum over micro-batches, and over ranks once multiplied by
        world_size); `means` are averaged. Reported: mini-batch values averaged over mini-batches.
        """
        exp = record.from_numpy(payload)
        per_mb = exp.batch_size // len(scales)
        summed: dict[str, float] = {}
        averaged: list[dict[str, float]] = []
        self.model.train()
        for mb_index, scale in enumerate(scales):
            mb = exp.select(slice(mb_index * per_mb, (mb_index + 1) * per_mb))
            splits = self._micro_batches(mb)
            budget = self.cfg.trainer.max_tokens_per_micro_batch is not None
            for index, rows in enumerate(splits):
                loss, shares, means = micro_loss(mb.select(rows).to(self.model.device), scale)
                if faults.fire(self.role, "loss", self.rank) == "nan":
                    loss = loss * float("nan")
                if not torch.isfinite(loss):
                    print(f"non-finite {self.role} loss on rank {self.rank}: {loss.item()} (the optimizer step "
                          f"will be skipped on every rank)", flush=True)
                self.model.backward(loss * self.world_size, last=index == len(splits) - 1 if budget else None)
                _add(summed, {"loss": loss.item(), **shares}, self.world_size / len(scales))
                averaged.append(means)
            averaged.append(self.model.step())
        return summed | _mean(averaged)


    def _micro_batches(self, mb: TensorRecord) -> list[slice]:
        """trainer.micro_batch_size rows each, or (trainer.max_tokens_per_micro_batch) by token count, in
        as many micro-batches as the rank that needs the most (every rank runs the same number)."""
        budget = self.cfg.trainer.max_tokens_per_micro_batch
        if budget is None:
            return _split(mb.batch_size, self.cfg.trainer.micro_batch_size)
        tokens = mb.attention_mask.reshape(mb.batch_size, -1).sum(-1).tolist()
        count = torch.tensor([len(token_budget_splits(tokens, budget))], device=self.model.device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        return token_budget_splits(tokens, budget, int(count))


def _add(into: dict[str, float], values: dict[str, float], weight: float) -> None:
    for k, v in values.items():
        into[k] = into.get(k, 0.0) + float(v) * weight


def _mean(rows: list[dict[str, Any]]) -> dict[str, float]:
    keys = {k for row in rows for k, v in row.items() if v is not None}
    return {k: float(np.mean([float(r[k]) for r in rows if r.get(k) is not None])) for k in keys}


class PolicyWorker(_TrainedRole):
    """A policy rank; with placement.reference_in_policy it also hosts the frozen reference
    (a `ReferenceWorker` held as a plain object) for its shard of each batch."""

    role = "policy"

    def __init__(self, cfg: RunConfig, paths: ModelPaths, rank: int, world_size: int):
        super().__init__(cfg, paths, rank, world_size)
        # with LoRA and the initial policy as reference, the reference is this model without its adapters
        hosted = cfg.reference_host == "policy"
        self.base_is_reference = hosted and self.uses_lora and paths.reference == paths.policy
        self.reference = ReferenceWorker(cfg, paths, hosted=True) if hosted and not self.base_is_reference else None

    @timed
    @torch.no_grad()
    def reference_logprobs(self, payload: dict[str, Any]) -> np.ndarray:
        """log π_ref of the response tokens (B, T), from the hosted reference (or the base model: LoRA)."""
        if not self.base_is_reference:
            return self.reference.compute_logprobs(payload)
        from rlhf_ray.lora import adapters_disabled

        self.model.eval()
        with adapters_disabled(self.model.module):
            return _per_micro_batch(Samples.from_numpy(payload), self.cfg.trainer.micro_batch_size,
                                    lambda part: _response_logprobs(self.model.forward, part, self.cfg.rollout.temperature))

    def reference_generate(self, prompts: list[list[int]], params, seed: int) -> dict[str, Any]:
        """The hosted reference's responses (win-rate baseline)."""
        if not self.base_is_reference:
            return self.reference.generate(prompts, params, seed)
        from rlhf_ray.lora import adapters_disabled
        from rlhf_ray.models import load_tokenizer
        from rlhf_ray.rollout.hf import HFRolloutEngine

        engine = HFRolloutEngine(self.model.module, load_tokenizer(self.paths.tokenizer, self.cfg.model.trust_remote_code))
        with adapters_disabled(self.model.module):
            return engine.generate(prompts, params, seed).to_numpy()

    def load_model(self) -> torch.nn.Module:
        from rlhf_ray.models import load_causal_lm

        return load_causal_lm(self.paths.policy, model_dtype(self.cfg), self.cfg.model.trust_remote_code)

    @timed
    @torch.no_grad()
    def compute_logprobs(self, payload: dict[str, Any]) -> np.ndarray:
        """Old log-probs π_old of the response tokens, recomputed by the trainer (B, T)."""
        self.model.eval()
        return _per_micro_batch(Samples.from_numpy(payload), self.cfg.trainer.micro_batch_size,
                                lambda part: _response_logprobs(self.model.forward, part, self.cfg.rollout.temperature))

    @timed
    def train(self, payload: dict[str, Any], scales: list[Any], kl_coef: float) -> dict[str, float]:
        """PPO policy update over this rank's shard (ALGORITHMS.md §5.1, §5.4)."""
        from rlhf_ray.algorithms.logprobs import entropy_from_logits, logprobs_from_logits
        from rlhf_ray.algorithms.losses import (
            aggregate, kl_loss, mismatch_metrics, policy_loss, sequence_mask_weights, tis_weights, token_mask_weights)

        algo, temperature = self.cfg.algo, self.cfg.rollout.temperature
        bounds = {"low": algo.correction_low, "high": algo.correction_high}
        correction = {"tis": functools.partial(tis_weights, cap=algo.tis_cap),  # ALGORITHMS.md §10
                      "token_mask": functools.partial(token_mask_weights, **bounds),
                      "sequence_mask": functools.partial(sequence_mask_weights, **bounds)}.get(algo.rollout_correction)

        def micro_loss(mb: Experience, scale):
            logits = _forward_logits(self.model.forward, mb)
            logprobs = logprobs_from_logits(logits, mb.response_ids, temperature)
            mask = mb.response_mask
            # π_old = π_θ here when the driver sent none: this update is the rollout policy's only one
            old = mb.old_logprobs if mb.old_logprobs is not None else logprobs.detach()
            is_weights, correction_metrics = correction(old, mb.logprobs, mask) if correction else (None, {})
            loss, metrics = policy_loss(logprobs, old, mb.advantages, mask, clip_low=algo.clip_low, clip_high=algo.clip_high,
                                        dual_clip=algo.dual_clip, agg=algo.loss_agg, scale=scale, is_weights=is_weights)
            if mb.logprobs is not None:  # the engine's μ: how far it is from the trainer's π_old (§10)
                metrics |= mismatch_metrics(old, mb.logprobs, mask)
            metrics |= correction_metrics
            shares = {}
            if mb.ref_logprobs is not None:  # None: no reference loaded (β = 0)
                k1 = ((logprobs.detach() - mb.ref_logprobs) * mask).sum() / scale.num_seqs  # Σ_t k1 per sequence
                shares["kl_ref"] = k1.item()
            if algo.kl.placement == "loss" and kl_coef > 0:
                kl, _ = kl_loss(logprobs, mb.ref_logprobs, mask, kind="k3", agg=algo.loss_agg, scale=scale)
                loss = loss + kl_coef * kl
                shares["kl_loss"] = kl.item()
            entropy = aggregate(entropy_from_logits(logits if algo.entropy_coef > 0 else logits.detach()),
                                mask, algo.loss_agg, scale)
            if algo.entropy_coef > 0:
                loss = loss - algo.entropy_coef * entropy
            shares["entropy"] = entropy.item()
            return loss, shares, {k: float(v) for k, v in metrics.items()}

        return self._update(payload, scales, micro_loss)


    @timed
    def send_to_object_store(self, probe_ids: list[int]) -> tuple[list, np.ndarray]:
        """All ranks walk the buckets (ZeRO-3 gathers are collective); rank 0 puts them.
        → (refs, the policy's log-probs of the probe sequence)"""
        from rlhf_ray.weight_sync import put_buckets

        refs = put_buckets(self.model.gathered_named_parameters(self._bucket_bytes()), self.rank == 0)
        return refs, self.probe_logprobs(probe_ids)

    @timed
    def send_adapter(self, probe_ids: list[int]) -> tuple[list, Any, np.ndarray]:
        """model.lora.sync=adapter: the LoRA adapter alone, in PEFT's naming (all ranks gather it under ZeRO-3;
        rank 0 puts it). → (refs, PEFT LoraConfig, the policy's log-probs of the probe sequence)"""
        from rlhf_ray.lora import adapter_state
        from rlhf_ray.weight_sync import put_buckets

        state = adapter_state(self.model.trained_named_parameters())
        refs = put_buckets(iter([list(state.items())]), self.rank == 0)
        return refs, self.model.lora, self.probe_logprobs(probe_ids)

    def join_channel(self, port: int, world_size: int) -> bool:
        """Rank 0 hosts the stateless sync channel (engines' receivers are ranks 1…); other ranks take no part."""
        from rlhf_ray.deepspeed_model import node_ip
        from rlhf_ray.weight_sync import CollectiveChannel

        if self.rank == 0:
            self.channel = CollectiveChannel(node_ip(), port, 0, world_size, self.cfg.deepspeed.timeout_s,
                                             device=self.model.device)
        return True

    @timed
    def send_cuda_ipc(self, probe_ids: list[int]) -> tuple[list, np.ndarray]:
        """GPU, policy and engine colocated: this rank's full weights as CUDA IPC handles for the engine on
        its GPU (rank r feeds engine r); the copies stay alive until `release_cuda_ipc`.
        → (handles, the policy's probe log-probs)"""
        from rlhf_ray.weight_sync import share_cuda_ipc

        self.ipc_copies = [t for bucket in self.model.gathered_named_parameters(self._bucket_bytes(), self.model.device)
                           for t in bucket]
        return share_cuda_ipc(self.ipc_copies), self.probe_logprobs(probe_ids)

    def release_cuda_ipc(self) -> bool:
        self.ipc_copies = None
        return True

    @timed
    def send_to_channel(self, probe_ids: list[int]) -> np.ndarray:
        device = self.model.device if self.cfg.rollout.weight_sync == "nccl" else "cpu"
        buckets = self.model.gathered_named_parameters(self._bucket_bytes(), device)
        if self.rank != 0:
            for _ in buckets:  # take part in the ZeRO-3 gathers
                pass
        else:
            self.channel.send(buckets, is_source=True)
        return self.probe_logprobs(probe_ids)

    @torch.no_grad()
    def probe_logprobs(self, probe_ids: list[int]) -> np.ndarray:
        """log π(probe[t] | probe[:t]) at temperature 1, float64 (L-1,); every rank takes part (ZeRO-3)."""
        from rlhf_ray.rollout.base import probe_logprobs_from_logits

        self.model.eval()
        ids = torch.tensor([probe_ids], device=self.model.device)
        mask = torch.ones_like(ids)
        return probe_logprobs_from_logits(self.model.forward(ids, mask, position_ids(mask)), ids)

    def _bucket_bytes(self) -> int:
        return int(self.cfg.rollout.sync_bucket_mb * 2**20)


class CriticWorker(_TrainedRole):
    role = "critic"

    def load_model(self) -> torch.nn.Module:
        from rlhf_ray.models import load_sequence_classifier

        return load_sequence_classifier(self.paths.critic, model_dtype(self.cfg), self.cfg.model.trust_remote_code)

    @timed
    @torch.no_grad()
    def compute_values(self, payload: dict[str, Any]) -> np.ndarray:
        """V(s_t) before each response token (B, T), zeros on padding."""
        from rlhf_ray.models import response_values

        self.model.eval()

        def values(part: Samples) -> torch.Tensor:
            part = part.to(self.model.device)
            v = response_values(self.model.module, part.input_ids, part.attention_mask, part.prompt_ids.shape[1],
                                self.cfg.trainer.packing)
            return torch.where(part.response_mask.bool(), v.float(), 0.0).cpu()

        return _per_micro_batch(Samples.from_numpy(payload), self.cfg.trainer.micro_batch_size, values)

    @timed
    def train(self, payload: dict[str, Any], scales: list[Any]) -> dict[str, float]:
        """Clipped value regression on the GAE returns (ALGORITHMS.md §5.2)."""
        from rlhf_ray.algorithms.losses import value_loss
        from rlhf_ray.models import response_values

        algo = self.cfg.algo

        def micro_loss(mb: Experience, scale):
            values = response_values(self.model.module, mb.input_ids, mb.attention_mask, mb.prompt_ids.shape[1],
                                     self.cfg.trainer.packing).float()
            loss, metrics = value_loss(values, mb.values, mb.returns, mb.response_mask, clip=algo.value_clip,
                                       agg=algo.loss_agg, scale=scale)
            return loss, {}, {k: float(v) for k, v in metrics.items()}

        return self._update(payload, scales, micro_loss)


class ReferenceWorker(Worker):
    """The frozen initial policy: log-probs, and responses for win-rate evaluation."""

    role = "reference"

    def __init__(self, cfg: RunConfig, paths: ModelPaths, hosted: bool = False):
        super().__init__()
        from rlhf_ray.models import load_causal_lm

        self.cfg, self.paths, self.hosted, self.generator = cfg, paths, hosted, None
        self.model = load_causal_lm(paths.reference, model_dtype(self.cfg), cfg.model.trust_remote_code).eval()

    def generate(self, prompts: list[list[int]], params, seed: int) -> dict[str, Any]:
        """The reference policy's responses (evaluation baseline for win-rate), from the configured engine
        built once on first use. Hosted in a policy rank, where DeepSpeed owns the process's default
        torch.distributed group that an in-process vLLM engine would also claim, it is HF generate."""
        if self.generator is None:
            from rlhf_ray.models import load_tokenizer
            from rlhf_ray.rollout import build_engine
            from rlhf_ray.rollout.hf import HFRolloutEngine

            if self.hosted:
                tokenizer = load_tokenizer(self.paths.tokenizer, self.cfg.model.trust_remote_code)
                self.generator = HFRolloutEngine(self.model, tokenizer)
            else:
                self.generator = build_engine(self.cfg, self.paths.reference, self.paths.tokenizer, seed=self.cfg.rollout.seed)
        return self.generator.generate(prompts, params, seed).to_numpy()

    @timed
    @torch.no_grad()
    def compute_logprobs(self, payload: dict[str, Any]) -> np.ndarray:
        """log π_ref of the response tokens (B, T)."""
        forward = _plain_forward(self.model, self.cfg.trainer.packing)
        return _per_micro_batch(Samples.from_numpy(payload), self.cfg.trainer.micro_batch_size,
                                lambda part: _response_logprobs(forward, part, self.cfg.rollout.temperature))


def judge_engine_factory(cfg: RunConfig):
    """How an LLM judge builds its generation engine: the run's rollout backend over the judge's model, with
    the model's whole context (judge prompts hold a template, the prompt and one or two responses)."""
    from rlhf_ray.rollout import build_engine

    return lambda path: build_engine(cfg, path, path, max_batch=cfg.reward.batch_size, full_context=True)


class RewardWorker(Worker):
    """Scores decoded (prompt, response) pairs with the configured sources."""

    role = "reward"

    def __init__(self, cfg: RunConfig, paths: ModelPaths, reward_paths: list[str]):
        super().__init__()
        from rlhf_ray.models import load_tokenizer
        from rlhf_ray.rewards import build_reward_sources

        self.tokenizer = load_tokenizer(paths.tokenizer, cfg.model.trust_remote_code)
        self.sources = build_reward_sources(cfg.reward.sources, reward_paths, cfg.model.trust_remote_code,
                                            cfg.reward.batch_size, judge_engine_factory(cfg))
        self.on_error = cfg.reward.on_error

    @timed
    def score(self, payload: dict[str, Any], metadata: list[dict]) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray, dict[str, int]]:
        """→ (total (B,), {source name: (B,)}, valid (B,) bool, {violation kind: count}); with
        reward.on_error=fail any violation raises a RewardError naming source and sample instead."""
        samples = Samples.from_numpy(payload)
        prompts = [self._prompt_text(ids[m.bool()]) for ids, m in zip(samples.prompt_ids, samples.prompt_mask)]
        responses = [self.tokenizer.decode(ids[m.bool()], skip_special_tokens=True)
                     for ids, m in zip(samples.response_ids, samples.response_mask)]
        meta = [{**m, "stopped": bool(s)} for m, s in zip(metadata, samples.stopped.tolist())]
        if samples.env_rewards is not None:  # multi-turn: the episode's return, for the env_return source
            meta = [{**m, "env_return": float(r)} for m, r in zip(meta, samples.env_rewards.sum(-1).tolist())]
        if self.on_error == "mask":
            total, per_source, valid, violations = self.sources.score_tolerant(prompts, responses, meta)
        else:
            (total, per_source), valid, violations = self.sources.score_all(prompts, responses, meta), [True] * len(meta), {}
        return (np.asarray(total, dtype=np.float32), {k: np.asarray(v, dtype=np.float32) for k, v in per_source.items()},
                np.asarray(valid, dtype=bool), dict(violations))

    def counters(self) -> dict[str, int]:
        """Cumulative per-source failure/verdict counters (`<source>/<counter>`)."""
        return self.sources.counters()

    def _prompt_text(self, ids: torch.Tensor) -> str:
        """The prompt as rendered (chat role tokens kept), without a leading BOS the scorer adds itself."""
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        bos = self.tokenizer.bos_token
        return text[len(bos):] if bos and text.startswith(bos) else text


class RolloutWorker(Worker):
    """One generation engine (`rlhf_ray.rollout.build_engine`: vLLM or HF) and the policy weight version it holds.

    Generation and weight loads take turns on the engine (`_turn`). Calls run one at a time in the
    order the driver sent them, except with rollout.update_in_flight=mid_request: there a weight
    load arrives beside a running `generate` (Ray concurrency group "sync") and goes in at the next
    segment boundary, so the request continues under the new weights (`generate_in_segments`)."""

    role = "rollout"

    def __init__(self, cfg: RunConfig, paths: ModelPaths, engine_index: int):
        super().__init__()
        from rlhf_ray.rollout import build_engine

        self.cfg, self.engine_index, self.rank, self.version = cfg, engine_index, engine_index, 0
        self.backend = cfg.rollout_backend
        self.fixed_threads = self.backend == "vllm"  # vLLM fixes its threads at start (rollout.vllm.threads)
        self.engine = build_engine(cfg, paths.policy, paths.tokenizer, seed=cfg.rollout.seed + engine_index,
                                   lora_rank=cfg.model.lora.rank if cfg.adapter_sync else 0)
        self.channel = None
        self.paths, self.env_parts = paths, None  # rollout.env: (tokenizer, environment factory, reply format), built on first use
        self.partial = cfg.stage == "ppo" and cfg.algo.max_staleness > 0 and cfg.rollout.update_in_flight == "mid_request"
        self._cv = threading.Condition()
        self._engine_busy, self._loads_waiting = False, 0

    @timed
    def generate(self, prompts: list[list[int]], params, seed: int, first_index: int = 0,
                 metadata: list[dict] | None = None) -> dict[str, Any]:
        """Samples of `prompts`; with rollout.env and the prompts' `metadata`, whole episodes (multi-turn)."""
        return self._generate(prompts, params, seed, first_index, metadata).to_numpy()

    def generate_stamped(self, prompts: list[list[int]], params, seed: int, first_index: int = 0,
                         metadata: list[dict] | None = None, threads: int | None = None) -> tuple[dict[str, Any], float, float]:
        """`generate`, with the wall-clock interval the engine spent on it (the driver's engine-idle share)."""
        start = time.time()
        return self.generate(prompts, params, seed, first_index, metadata, threads=threads), start, time.time()

    def _generate(self, prompts: list[list[int]], params, seed: int, first_index: int,
                  metadata: list[dict] | None = None) -> Samples:
        from rlhf_ray.rollout.partial import generate_in_segments

        with self._turn("generate", loading=False):
            self.engine.wake()
            if self.cfg.rollout.env is not None and metadata is not None:
                samples = self._episodes(prompts, params, seed, first_index, metadata)
            elif self.partial:
                return generate_in_segments(self.engine, prompts, params, seed, first_index,
                                            self.cfg.rollout.segment_tokens, self._boundary, self.version)
            else:
                samples = self.engine.generate(prompts, params, seed, first_index)
        samples.versions = torch.full((samples.batch_size,), self.version, dtype=torch.long)
        return samples

    def _episodes(self, prompts: list[list[int]], params, seed: int, first_index: int, metadata: list[dict]) -> Samples:
        """Multi-turn: one episode per sample with a fresh environment (`rlhf_ray.rollout.multiturn`)."""
        from rlhf_ray.envs import load_environment
        from rlhf_ray.models import load_tokenizer
        from rlhf_ray.rollout import max_trajectory_tokens
        from rlhf_ray.rollout.multiturn import run_episodes
        from rlhf_ray.rollout.turns import turn_format

        r = self.cfg.rollout
        if self.env_parts is None:
            tokenizer = load_tokenizer(self.paths.tokenizer, self.cfg.model.trust_remote_code)
            self.env_parts = (tokenizer, load_environment(r.env, **r.env_kwargs), turn_format(tokenizer, r.env_turns))
        tokenizer, make_env, turns = self.env_parts
        samples, _ = run_episodes(self.engine, tokenizer, prompts, metadata, make_env, params, seed, first_index,
                                  r.max_turns, max_trajectory_tokens(self.cfg), turns=turns)
        return samples

    @contextlib.contextmanager
    def _turn(self, what: str, loading: bool):
        """Hold the engine; a weight load goes before generations waiting for it, and is let in by a
        running generation at its next segment boundary (`_boundary`)."""
        timeout = self.cfg.trainer.timeout_s
        with self._cv:
            self._loads_waiting += loading
            try:
                if not self._cv.wait_for(lambda: not self._engine_busy and (loading or not self._loads_waiting), timeout):
                    raise TimeoutError(f"rollout[{self.engine_index}] {what}: the engine stayed busy for "
                                       f"trainer.timeout_s={timeout:g} s")
            finally:
                self._loads_waiting -= loading
            self._engine_busy = True
        try:
            yield
        finally:
            with self._cv:
                self._engine_busy = False
                self._cv.notify_all()

    def _boundary(self) -> int:
        """Between two segments of running requests: let waiting weight loads in; → the version now held."""
        faults.fire(self.role, "segment", self.rank)
        with self._cv:
            if self._loads_waiting:
                self._engine_busy = False
                self._cv.notify_all()
                timeout = self.cfg.trainer.timeout_s
                if not self._cv.wait_for(lambda: not self._engine_busy and not self._loads_waiting, timeout):
                    raise TimeoutError(f"rollout[{self.engine_index}] generate: a weight load held the engine for "
                                       f"more than trainer.timeout_s={timeout:g} s")
                self._engine_busy = True
        return self.version

    def sleep(self) -> bool:
        """Free the engine's memory while the policy trains (GPU vLLM with rollout.vllm.enable_sleep)."""
        self.engine.sleep()
        return True

    def named_weights(self) -> dict[str, np.ndarray]:
        """Every weight an HF engine holds, by name (tests compare them with the policy's bit for bit)."""
        from rlhf_ray.weight_sync import to_numpy

        return {name: to_numpy(p) for name, p in self.engine.model.named_parameters()}

    def weight_state(self, probe_ids: list[int]) -> tuple[int, np.ndarray]:
        """(version held, log-probs of the probe sequence under the weights held)."""
        return self.version, self.engine.probe_logprobs(probe_ids)

    @timed
    def receive_from_object_store(self, refs: list, version: int, probe_ids: list[int]) -> tuple[int, np.ndarray]:
        from rlhf_ray.weight_sync import get_weights

        weights = get_weights(refs, self.cfg.trainer.timeout_s)
        if self.partial:  # fetched before taking the engine from a running request
            weights = list(weights)
        return self._take(weights, version, probe_ids)

    @timed
    def receive_adapter(self, refs: list, config: Any, version: int, probe_ids: list[int]) -> tuple[int, np.ndarray]:
        """The policy's LoRA adapter (model.lora.sync=adapter) over the engine's base weights; hold `version`."""
        from rlhf_ray.weight_sync import get_weights

        state = dict(get_weights(refs, self.cfg.trainer.timeout_s))  # fetched before taking the engine
        with self._turn("load adapter", loading=True):
            self.engine.wake()
            self.engine.load_adapter(state, config)
            self.version = version
            return self.weight_state(probe_ids)

    def _take(self, weights, version: int, probe_ids: list[int]) -> tuple[int, np.ndarray]:
        """Load the policy's full weights, hold `version`; → what `weight_state` reports."""
        with self._turn("load weights", loading=True):
            self.engine.wake()
            self.engine.load_weights(weights)
            self.version = version
            return self.weight_state(probe_ids)

    @timed
    def receive_cuda_ipc(self, handles: list, version: int, probe_ids: list[int]) -> tuple[int, np.ndarray]:
        """The colocated policy rank's weights, opened from CUDA IPC handles on the same GPU and copied in."""
        from rlhf_ray.weight_sync import open_cuda_ipc

        return self._take(open_cuda_ipc(handles), version, probe_ids)

    def join_channel(self, host: str, port: int, world_size: int) -> bool:
        """Join the sync channel: as rank 1 + index, or, for a tensor-parallel vLLM engine, one rank per shard."""
        from rlhf_ray.weight_sync import CollectiveChannel

        tp = self.cfg.rollout.vllm.tensor_parallel_size if self.backend == "vllm" else 1
        first, timeout = 1 + self.engine_index * tp, self.cfg.deepspeed.timeout_s
        if tp > 1:
            self.engine.join_channel(host, port, first, world_size, timeout)
        else:
            device = "cuda" if self.cfg.rollout.weight_sync == "nccl" else "cpu"
            self.channel = CollectiveChannel(host, port, first, world_size, timeout, device=device)
        return True

    @timed
    def receive_from_channel(self, version: int, probe_ids: list[int]) -> tuple[int, np.ndarray]:
        if self.channel is not None:
            return self._take(((name, t) for bucket in self.channel.receive() for name, t in bucket.items()),
                              version, probe_ids)
        self.engine.wake()  # tensor-parallel vLLM: its shards receive
        self.engine.receive_from_channel()
        self.version = version
        return self.weight_state(probe_ids)


class LabelWorker(Worker):
    """The reward side of the data stages (label, cai): the preference labeller (`label.labeler`, a
    `rlhf_ray.rewards.labeling.PairLabeler`) and, given `reward_paths`, reward.sources for evaluation
    (a `RewardWorker` held as a plain object, so one actor serves both)."""

    role = "reward"

    def __init__(self, cfg: RunConfig, paths: ModelPaths, labeler_path: str | None,
                 reward_paths: list[str | None] | None = None):
        super().__init__()
        from rlhf_ray.rewards import build_reward_source
        from rlhf_ray.rewards.labeling import PairLabeler

        source = build_reward_source(cfg.label.labeler, labeler_path, cfg.model.trust_remote_code, cfg.reward.batch_size,
                                     judge_engine_factory(cfg))
        self.labeler = PairLabeler(source)
        self.scorer = RewardWorker(cfg, paths, reward_paths) if reward_paths is not None else None

    @timed
    def label(self, prompts: list[str], responses_a: list[str], responses_b: list[str],
              metadata_a: list[dict], metadata_b: list[dict]) -> list:
        """One `PairJudgement` per pair: the judge's verdict in both orders, or the scorer's two scores."""
        return self.labeler.label(prompts, responses_a, responses_b, metadata_a, metadata_b)

    def score(self, payload: dict[str, Any], metadata: list[dict]):
        """`RewardWorker.score` with reward.sources (evaluation)."""
        if self.scorer is None:
            raise RuntimeError("LabelWorker was built without reward_paths: it has no reward.sources to score with")
        return self.scorer.score(payload, metadata)


# ---------------------------------------------------------------------------------------------
# Offline stages (sft, rm, dpo)
# ---------------------------------------------------------------------------------------------


class OfflineWorker(_TrainedRole):
    """A data-parallel rank of an offline stage: one model, the stage's loss, no rollouts.

    Role "policy" (sft, dpo): a causal LM from `paths.policy`; its outputs are the summed
    response log-probs ℓ(y), (N, K). Role "reward" (rm): a sequence classifier (num_labels=1)
    from `paths.policy` (a causal LM gets a new scalar head); its outputs are the scores at the
    last real token, (N, K), the convention of `rlhf_ray.rewards.model`. `loss(outputs, batch,
    scale) -> (loss share, shares, means)` is the stage's, chosen once at config time.
    """

    def __init__(self, cfg: RunConfig, paths: ModelPaths, rank: int, world_size: int, loss):
        super().__init__(cfg, paths, rank, world_size)
        self.role = OFFLINE_ROLE[cfg.stage]
        self.loss = loss
        self.reference = None  # a frozen reference other than the initial policy, loaded on demand

    def optim_config(self) -> OptimConfig:
        return self.cfg.reward_optim if self.role == "reward" else self.cfg.policy_optim

    def total_optimizer_steps(self) -> int:
        return self.cfg.trainer.total_steps

    def load_model(self) -> torch.nn.Module:
        from rlhf_ray.models import load_causal_lm, load_sequence_classifier, load_tokenizer

        trust = self.cfg.model.trust_remote_code
        if self.role == "policy":
            return load_causal_lm(self.paths.policy, model_dtype(self.cfg), trust)
        model = load_sequence_classifier(self.paths.policy, model_dtype(self.cfg), trust, num_labels=1)
        if model.config.pad_token_id is None:  # HF's own pooling needs it; our scoring reads the mask
            model.config.pad_token_id = load_tokenizer(self.paths.tokenizer, trust).pad_token_id
        return model

    def _outputs(self, batch: OfflineBatch) -> torch.Tensor:
        if self.role == "policy":
            return sequence_logprobs(self.model.forward, batch)
        return last_token_scores(self.model.module, batch, self.cfg.trainer.packing)

    @timed
    def train(self, payload: dict[str, Any], scale) -> dict[str, float]:
        """One optimizer step over this rank's shard of the mini-batch (`scale`: the whole mini-batch's)."""
        return self._update(payload, [scale], lambda mb, sc: self.loss(self._outputs(mb), mb, sc), OfflineBatch)

    @timed
    @torch.no_grad()
    def outputs(self, payload: dict[str, Any]) -> np.ndarray:
        """ℓ(y) (policy) or scores (reward) of every sequence, (N, K) float32; no update."""
        batch = OfflineBatch.from_numpy(payload)
        self.model.eval()
        parts = [self._outputs(batch.select(rows)) for rows in _split(batch.batch_size, self.cfg.trainer.micro_batch_size)]
        return torch.cat(parts).float().numpy()

    @timed
    @torch.no_grad()
    def reference_logprobs(self, payload: dict[str, Any]) -> np.ndarray:
        """ℓ_ref(y), (N, K): the trained model itself before the first update when the reference is the
        initial policy (the default), else a frozen copy of `paths.reference` loaded here."""
        if self.paths.reference == self.paths.policy:
            return self.outputs(payload)
        from rlhf_ray.models import load_causal_lm

        if self.reference is None:
            self.reference = load_causal_lm(self.paths.reference, model_dtype(self.cfg), self.cfg.model.trust_remote_code)
            self.reference.to(self.model.module.device).eval()
        batch = OfflineBatch.from_numpy(payload)
        forward = _plain_forward(self.reference, self.cfg.trainer.packing)
        parts = [sequence_logprobs(forward, batch.select(rows))
                 for rows in _split(batch.batch_size, self.cfg.trainer.micro_batch_size)]
        return torch.cat(parts).float().numpy()

    def release_reference(self) -> bool:
        """Drop the separate reference once its log-probs are computed (frees its memory)."""
        self.reference = None
        return True


def _flat(batch: OfflineBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K, L) → (N·K, W) input_ids, attention_mask, response_mask; W = the longest real row (padding cut)."""
    width = int(batch.attention_mask.sum(-1).max())
    return tuple(t.flatten(0, 1)[:, :width] for t in (batch.input_ids, batch.attention_mask, batch.response_mask))


def sequence_logprobs(forward, batch: OfflineBatch) -> torch.Tensor:
    """ℓ(y) = Σ_t log π(y_t | prompt, y_<t) over each response, (N, K) float32; differentiable.

    `forward(input_ids, attention_mask, position_ids) -> logits (B, L, V)`.
    """
    from rlhf_ray.algorithms.logprobs import logprobs_from_logits

    input_ids, attention_mask, response_mask = _flat(batch)
    logits = forward(input_ids, attention_mask, position_ids(attention_mask))  # (N·K, W, V)
    labels, mask = input_ids[:, 1:].to(logits.device), response_mask[:, 1:].to(logits.device)
    logprobs = logprobs_from_logits(logits[:, :-1], labels)  # (N·K, W-1): logits at t-1 predict token t
    logprobs = torch.where(mask.bool(), logprobs, torch.zeros((), dtype=logprobs.dtype, device=logprobs.device))
    return logprobs.sum(-1).view(batch.input_ids.shape[:2]).cpu()  # the losses run on CPU tensors


def last_token_scores(model: torch.nn.Module, batch: OfflineBatch, packing: bool = False) -> torch.Tensor:
    """The scalar head at each sequence's last real token, (N, K) float32; differentiable.

    Exactly how `rlhf_ray.rewards.model.ModelReward` scores: right padding, default positions,
    the `score` head read at the last attention-mask position (not HF's pad-id pooling).
    """
    from rlhf_ray.models import token_scores

    input_ids, attention_mask, _ = _flat(batch)
    device = next(model.parameters()).device
    per_token = token_scores(model, input_ids.to(device), attention_mask.to(device), packing=packing).cpu()  # (N·K, W)
    last = attention_mask.sum(-1) - 1  # (N·K,)
    return per_token.gather(1, last[:, None]).squeeze(1).view(batch.input_ids.shape[:2])
