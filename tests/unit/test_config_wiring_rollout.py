"""Rollout and model fields reach generation: the sampling settings the trainers build from `rollout`
(`PPOTrainer.sampling`, `trainers.sampling.sampling_params`) drive a real HF engine that
`RolloutWorker` builds from the config in-process; the vLLM settings reach `vllm.LLM`'s arguments
through `build_engine` → `vllm_options` → `_start` (a stand-in `vllm` module records them, so no
engine starts); the toy model sizes reach the models a run builds; trust_remote_code gates custom code."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.rollout import build_engine, engine_batch_seqs, engine_threads, probe_length, vllm_options
from rlhf_ray.rollout.vllm import cpu_kv_cache_mb, cpu_max_num_seqs
from rlhf_ray.toy import build_char_tokenizer, build_policy
from rlhf_ray.trainers import ppo, sampling
from rlhf_ray.trainers.common import toy_model
from rlhf_ray.workers import ModelPaths, RolloutWorker

SIZES = {"hidden_size": 32, "intermediate_size": 32, "num_layers": 1, "num_heads": 1}


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tokenizer) -> str:
    path = tmp_path_factory.mktemp("policy")
    build_policy(tokenizer, seed=0, **SIZES).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer(p)["input_ids"] for p in ("say: abc\n", "hi\n", "count: 1 2 3\n", "x")]


def worker_and_params(policy_dir: str, overrides: list[str], engine_index: int = 0):
    """A rollout engine built by `RolloutWorker` and the sampling settings of the RL trainer, both from one config."""
    cfg = load_config(None, ["rollout.backend=hf", "rollout.max_new_tokens=12"] + overrides)
    worker = RolloutWorker(cfg, ModelPaths(policy_dir, policy_dir, policy_dir, policy_dir), engine_index)
    trainer = SimpleNamespace(cfg=cfg)  # PPOTrainer.sampling reads only the config
    params = ppo.PPOTrainer.sampling(trainer)
    assert params == sampling.sampling_params(cfg, n=params.n)  # the data stages map the section the same way
    return worker, params, cfg


def response_ids(samples) -> list[list[int]]:
    return [ids[m.bool()].tolist() for ids, m in zip(samples.response_ids, samples.response_mask)]


def greedy(worker, params, prompts):
    return response_ids(worker.engine.generate(prompts, SimpleNamespace(**{**params.__dict__, "greedy": True}), 0))


@pytest.mark.parametrize("override", ["rollout.top_k=1", "rollout.top_p=0.01"])
def test_top_k_one_and_tiny_top_p_sample_the_greedy_tokens(policy_dir, prompts, override):
    worker, params, _ = worker_and_params(policy_dir, [override])
    sampled = [response_ids(worker.engine.generate(prompts, params, seed)) for seed in (1, 2)]
    assert sampled[0] == sampled[1] == greedy(worker, params, prompts)
    plain, plain_params, _ = worker_and_params(policy_dir, [])
    assert response_ids(plain.engine.generate(prompts, plain_params, 1)) != greedy(plain, plain_params, prompts)


def test_suppress_special_tokens_gives_full_length_responses_without_specials(policy_dir, prompts, tokenizer):
    specials = set(tokenizer.all_special_ids)
    worker, params, _ = worker_and_params(policy_dir, ["rollout.suppress_special_tokens=true", "rollout.samples_per_prompt=4"])
    samples = worker.engine.generate(prompts, params, 3)
    assert samples.response_mask.sum(-1).tolist() == [12] * 16 and not samples.stopped.any()
    assert not specials & {t for row in response_ids(samples) for t in row}
    plain, plain_params, _ = worker_and_params(policy_dir, ["rollout.samples_per_prompt=4"])
    ordinary = plain.engine.generate(prompts, plain_params, 3)  # the same seed without it: specials do appear
    assert specials & {t for row in response_ids(ordinary) for t in row}


def test_rollout_seed_sets_the_samples(policy_dir, prompts):
    def samples(seed: int | None):
        worker, params, cfg = worker_and_params(policy_dir, [f"rollout.seed={seed}"] if seed is not None else [])
        step_seed = ppo.PPOTrainer._seed(SimpleNamespace(cfg=cfg), 1)  # the RL step's seed
        data_seed = sampling.generation_seed(cfg, 1)  # the data stages' seed
        return step_seed, data_seed, response_ids(worker.engine.generate(prompts, params, step_seed))

    default, seeded, again = samples(None), samples(7), samples(7)
    assert seeded == again
    assert seeded[0] != default[0] and seeded[1] != default[1] and seeded[2] != default[2]


# ---- vLLM: options and engine threads ---------------------------------------------------------------


def test_vllm_max_model_len_and_threads_in_options():
    cfg = load_config(None, ["rollout.vllm.max_model_len=300", "rollout.vllm.threads=5", "placement.torch_threads=2"])
    options = vllm_options(cfg, "m", seed=0)
    assert options.max_model_len == 300 and options.threads == 5  # vllm.threads beats placement.torch_threads
    assert vllm_options(cfg, "m", seed=0, full_context=True).max_model_len is None  # a judge: the model's own


def test_a_rollout_engines_kv_cache_holds_its_largest_batch_at_full_length(tmp_path):
    """rollout.vllm.kv_cache_mb null on CPU: the cache an engine gets holds its share of a step's or an
    evaluation's sequences at full length (whole blocks of 32 tokens on CPU), and max_num_seqs lets them all run."""
    cfg = load_config(None, ["trainer.prompts_per_step=32", "rollout.samples_per_prompt=4", "rollout.num_engines=2",
                             "trainer.eval_prompts=40", "data.max_prompt_len=16", "rollout.max_new_tokens=128"])
    assert engine_batch_seqs(cfg) == 64  # 128 sequences a step over 2 engines (evaluation: 40 × 1)
    assert engine_batch_seqs(load_config(None, ["trainer.eval_prompts=100", "trainer.eval_samples=2"])) == 200
    options = vllm_options(cfg, "m", seed=0)
    assert options.batch_seqs == 64 and options.kv_cache_mb is None and options.max_model_len == 144
    assert vllm_options(cfg, "m", seed=0, full_context=True).batch_seqs is None  # a judge: no batch known
    model = tmp_path / "m"
    model.mkdir()  # a Llama of 6 layers, 8 heads of 64, 2 KV heads
    (model / "config.json").write_text(json.dumps({"num_attention_heads": 8, "num_key_value_heads": 2,
                                                   "hidden_size": 512, "num_hidden_layers": 6}))
    per_sequence = 2 * 6 * 2 * 64 * 4 * 160  # K and V × layers × KV heads × head size × fp32 × 5 blocks of 32
    assert cpu_kv_cache_mb(str(model), 64, 144, 4) * 2**20 == 64 * per_sequence
    assert cpu_max_num_seqs(str(model), 64 * per_sequence, 144, 4) == 64


def test_kv_cache_blocks_of_the_configured_size_hold_a_sequence_in_fewer_tokens(tmp_path):
    """rollout.vllm.block_size reaches the engine options, and the cache sized for a batch counts whole blocks of
    that size: 144 tokens take 160 in blocks of 32 against 256 in blocks of 128."""
    cfg = load_config(None, ["rollout.vllm.block_size=32", "data.max_prompt_len=16", "rollout.max_new_tokens=128"])
    assert vllm_options(cfg, "m", seed=0).block_size == 32
    assert vllm_options(load_config(None, []), "m", seed=0).block_size is None  # the CPU default (CPU_BLOCK_SIZE)
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_attention_heads": 8, "num_key_value_heads": 2,
                                                   "hidden_size": 512, "num_hidden_layers": 6}))
    per_token = 2 * 6 * 2 * 64 * 4
    assert cpu_kv_cache_mb(str(model), 10, 144, 4, block_size=32) * 2**20 == 10 * per_token * 160
    assert cpu_kv_cache_mb(str(model), 10, 144, 4, block_size=128) * 2**20 == 10 * per_token * 256
    assert cpu_max_num_seqs(str(model), 10 * per_token * 160, 144, 4, block_size=32) == 10


def test_a_block_size_that_is_not_a_multiple_of_16_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match="rollout.vllm.block_size"):
        load_config(None, ["rollout.vllm.block_size=24"])


def test_the_sync_probe_fits_the_engines_context():
    """vLLM scores the probe as a prompt, which must leave room for one token: a 16-token prompt budget
    and 8-token responses (24 tokens of context) probe with 23 tokens, not 32."""
    assert probe_length(load_config(None, [])) == 32
    assert probe_length(load_config(None, ["data.max_prompt_len=16", "rollout.max_new_tokens=8"])) == 23
    assert probe_length(load_config(None, ["rollout.vllm.max_model_len=20"])) == 19


def test_engine_threads_order():
    assert engine_threads(load_config(None, ["placement.torch_threads=3"])) == 3
    assert engine_threads(load_config(None, ["placement.torch_threads=3", "rollout.vllm.threads=2"])) == 2
    off_policy = load_config(None, ["algo.max_staleness=1", "placement.rollout.cpus=2",
                                    "algo.recompute_old_logprobs=true"])
    assert engine_threads(off_policy) == 2
    assert engine_threads(load_config(None, ["placement.torch_threads=4", "algo.max_staleness=2",
                                             "placement.rollout.cpus=2"])) == 4


# ---- model.toy and model.trust_remote_code --------------------------------------------------------


def test_toy_sizes_and_seed_shape_the_models_a_run_builds(tmp_path, tokenizer):
    cfg = load_config(None, [f"trainer.output_dir={tmp_path}", "model.toy.num_layers=3", "model.toy.intermediate_size=48",
                             "model.toy.seed=5", "model.toy.hidden_size=32", "model.toy.num_heads=1"])
    path = toy_model(cfg, "policy")
    config = json.loads(Path(path, "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["intermediate_size"] == 48
    from safetensors.torch import load_file

    weights = load_file(f"{path}/model.safetensors")
    sizes = {"hidden_size": 32, "intermediate_size": 48, "num_layers": 3, "num_heads": 1}
    same_seed = build_policy(tokenizer, seed=5, **sizes).state_dict()
    seed_zero = build_policy(tokenizer, seed=0, **sizes).state_dict()
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(weights[name], same_seed[name]) and not torch.equal(weights[name], seed_zero[name])


CUSTOM_CONFIG = """from transformers import LlamaConfig


class ToyCustomConfig(LlamaConfig):
    model_type = "toy_custom"
"""
CUSTOM_MODEL = """from transformers import LlamaForCausalLM

from .configuration_toy_custom import ToyCustomConfig


class ToyCustomForCausalLM(LlamaForCausalLM):
    config_class = ToyCustomConfig
"""


def test_trust_remote_code_gates_a_model_with_its_own_code(tmp_path, policy_dir):
    """A model directory whose config names its own classes (auto_map) loads only with trust_remote_code."""
    model_dir = tmp_path / "custom"
    build_policy(build_char_tokenizer(), seed=0, **SIZES).save_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config |= {"model_type": "toy_custom", "architectures": ["ToyCustomForCausalLM"],
               "auto_map": {"AutoConfig": "configuration_toy_custom.ToyCustomConfig",
                            "AutoModelForCausalLM": "modeling_toy_custom.ToyCustomForCausalLM"}}
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "configuration_toy_custom.py").write_text(CUSTOM_CONFIG)
    (model_dir / "modeling_toy_custom.py").write_text(CUSTOM_MODEL)
    with pytest.raises(ValueError, match="trust_remote_code"):
        build_engine(load_config(None, ["rollout.backend=hf"]), str(model_dir), policy_dir)
    engine = build_engine(load_config(None, ["rollout.backend=hf", "model.trust_remote_code=true"]), str(model_dir),
                          policy_dir)
    assert type(engine.model).__name__ == "ToyCustomForCausalLM"


def test_environment_fields_reach_the_episode_budget_the_engine_context_and_the_environment():
    """rollout.max_trajectory_tokens caps an episode and sizes vLLM's context (+ room for the first
    observation); rollout.env_kwargs construct the environment the rollout worker steps."""
    from rlhf_ray.envs import load_environment
    from rlhf_ray.rollout import FIRST_OBSERVATION_TOKENS, max_trajectory_tokens

    agent = ["rollout.env=rlhf_ray.envs.toy:GuessingGame", "reward.sources.0.path=rlhf_ray.envs:env_return",
             "rollout.max_turns=3", "rollout.max_new_tokens=4"]
    default = load_config(None, agent)
    assert max_trajectory_tokens(default) == 3 * 4 * 2
    capped = load_config(None, [*agent, "rollout.max_trajectory_tokens=10", "rollout.env_kwargs={n: 5, max_guesses: 2}"])
    assert max_trajectory_tokens(capped) == 10
    assert vllm_options(capped, "m", seed=0).max_model_len == capped.data.max_prompt_len + 10 + FIRST_OBSERVATION_TOKENS
    env = load_environment(capped.rollout.env, **capped.rollout.env_kwargs)()
    env.reset("", {"secret": 3})
    assert env.n == 5 and env.max_guesses == 2


def test_a_rollout_context_longer_than_the_models_positions_fails_before_any_actor(tmp_path):
    """vLLM refuses a context beyond the model's max_position_embeddings (inside the engine's actor, after
    start-up); prepare_run's check names the parts of the context, the model and the fixes first."""
    from rlhf_ray.config import ConfigError
    from rlhf_ray.rollout import check_rollout_model

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 2,
                                                   "max_position_embeddings": 256}))
    long = ["stage=ppo", "rollout.backend=vllm", "data.max_prompt_len=64", "rollout.max_new_tokens=256"]
    with pytest.raises(ConfigError, match=r"context is 320 tokens \(data.max_prompt_len=64 \+ "
                                          r"rollout.max_new_tokens=256\).*max_position_embeddings=256"):
        check_rollout_model(load_config(None, long), str(model))
    episodes = long[:3] + ["rollout.env=rlhf_ray.envs.toy:GuessingGame", "rollout.max_trajectory_tokens=200",
                           "reward.sources=[{kind: function, path: 'rlhf_ray.envs:env_return', name: env}]"]
    with pytest.raises(ConfigError, match="an episode's 200 tokens"):
        check_rollout_model(load_config(None, episodes), str(model))
    check_rollout_model(load_config(None, long[:3] + ["rollout.max_new_tokens=192"]), str(model))  # 256: fits
    check_rollout_model(load_config(None, ["stage=ppo", "rollout.backend=hf", *long[2:]]), str(model))  # HF: no limit
