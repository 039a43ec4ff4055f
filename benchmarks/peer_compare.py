"""rlhf_ray against TRL's GRPOTrainer and a single-process floor, on one fixed workload (issue 8).

    pip install -e .[bench]                            # TRL (only this benchmark needs it)
    python benchmarks/peer_compare.py                  # GRPO + PPO, 1 and 2 torch threads, 20 measured steps (~6 min idle)
    python benchmarks/peer_compare.py --quick          # the same, 6 measured steps each: a smoke run
    python benchmarks/peer_compare.py --steps 40 --threads 2 --only rlhf_ray,trl,floor
    python benchmarks/peer_compare.py --threads 1 --variant GRPO:zero0:deepspeed.zero_stage=0   # a config change, alongside
    python benchmarks/peer_compare.py --scaling --threads 1   # step time vs response length, batch and model size (~6 min)
    python benchmarks/peer_compare.py --workload gen --threads 2 --only rlhf_ray,rlhf_ray+k1,rlhf_ray+k2,rlhf_ray+k4,trl,floor
    python benchmarks/peer_compare.py --workload gen20m --threads 2 --steps 4 --warmup 1 --chunk 1   # issue 22 (~30 min)
    python benchmarks/peer_compare.py --workload gen20m --scaling --threads 2 --steps 12   # 1M → 113M, 32 → 512 tokens, vLLM

The workload is `configs/bench_grpo.yaml` (PPO variant: `configs/bench_ppo.yaml`); every contender
reads its hyper-parameters from that config, loads the same model files (built once, offline) and
the same prompts (`benchmarks/data/bench_prompts.jsonl`). Contenders, each in its own subprocess:

- `rlhf_ray`: GRPO through launch.py's code path (`init_ray` + `PPOTrainer` on local Ray, every
  role an actor, as in production); `placement.threads_per_node` = the thread setting.
- `rlhf_ray+k1`, `+k2`, `+k4`: the same with `algo.max_staleness=k` (asynchronous RL: the engines
  generate k batches ahead of the trainer; π_old = the engine's log-probs).
- `trl`: TRL `GRPOTrainer` on CPU (`use_cpu`, `num_generations`, batch 32, 32 completion tokens,
  β, special tokens suppressed through `generation_kwargs` so every completion has 32 tokens).
- `floor`: one process, plain PyTorch + HF generate, the same math as few passes as it needs: the
  old log-probs of an on-policy single epoch are the training forward's, detached (as TRL does).
- `floor_recompute`: the floor with a separate no-grad old-log-prob forward (the pass rlhf_ray runs).
- `rlhf_ray_ppo`, `floor_ppo`, `floor_ppo_recompute`: PPO with a critic and GAE, the same way.

Thread budget: a single-process contender gets T torch threads. rlhf_ray gets a budget of T threads
for the node (`placement.threads_per_node=T`), which the driver splits per call among the actors
busy at the same time (`rlhf_ray.threads`): a lone rollout or update gets T, two concurrent forwards
T/2 each, at least 1 — so with T = 1 actors running side by side still use one core each (the
concurrency a distributed trainer is entitled to), and with T = 2 no phase oversubscribes 2 cores.

Contenders of one group (GRPO or PPO, one thread setting) start one after another (start-up, from
launching the process to the first step, is measured alone), run their warm-up steps, then take
turns in chunks of `--chunk` steps (a b c, b c a, ...) so machine noise hits all alike; each
chunk also records the share of the machine's CPU used by processes outside the benchmark.
Memory: PSS of the driver and of every process of its Ray cluster (smaps_rollup), sampled after
each step; peak RSS (VmHWM) for single-process contenders. Not a test: it prints figures (and
writes them all to --json). Figures and their analysis: docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

WORKLOAD_ENV = "PEER_COMPARE_WORKLOAD"  # the parent's --workload, inherited by every contender's process
WORKLOADS = {  # --workload → (GRPO config, model size)
    "toy": (ROOT / "configs" / "bench_grpo.yaml", "1M"),
    "gen": (ROOT / "configs" / "bench_grpo_gen.yaml", "20M"),  # generation-heavy: 20M params, 32 × 128 tokens, vLLM
    "gen20m": (ROOT / "configs" / "bench_grpo_real.yaml", "20M"),  # issue 22: 128 sequences × 128 tokens, vLLM
    "gen100m": (ROOT / "configs" / "bench_grpo_real.yaml", "100M"),
}
WORKLOAD = os.environ.get(WORKLOAD_ENV, "toy")
GRPO_CONFIG, MODEL_SIZE = WORKLOADS[WORKLOAD]
REAL_SIZE = WORKLOAD.startswith("gen") and WORKLOAD != "gen"  # issue 22's workloads: GRPO only, vLLM contenders
PPO_CONFIG = ROOT / "configs" / "bench_ppo.yaml"
PROMPTS = ROOT / "benchmarks" / "data" / "bench_prompts.jsonl"
GROUPS = {  # group → (config, contenders; those named rlhf_ray* are the ratios' numerators)
    "GRPO": (GRPO_CONFIG, ["rlhf_ray", "rlhf_ray+k1", "rlhf_ray+k2", "rlhf_ray+k4", "trl", "floor", "floor_recompute"]),
    "PPO": (PPO_CONFIG, ["rlhf_ray_ppo", "floor_ppo", "floor_ppo_recompute"]),
}
if REAL_SIZE:
    GROUPS = {"GRPO": (GRPO_CONFIG, ["rlhf_ray", "rlhf_ray+k1", "rlhf_ray+k2", "trl", "trl_vllm", "floor",
                                     "floor_vllm"])}
BUILTIN_VARIANTS = {f"rlhf_ray+k{k}": [f"algo.max_staleness={k}"] for k in (1, 2, 4)}  # contender → config overrides
MODEL_SIZES = {  # name → toy Llama sizes (hidden, intermediate, layers, heads); ~params with the char vocab
    "1M": (128, 512, 4, 4),
    "10M": (256, 1024, 10, 4),
    "20M": (512, 1536, 6, 8),  # head size 64: vLLM's CPU kernels run it
    "50M": (512, 2048, 12, 8),
    "100M": (768, 3072, 12, 12),  # 113M with the char vocab; head size 64
}


def write_prompts(path: Path = PROMPTS, n: int = 256, seed: int = 0) -> Path:
    """The benchmark prompts: "say " + 1-5 random lowercase letters + newline (6-10 characters)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(n):
            word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 5)))
            f.write(json.dumps({"prompt": f"say {word}\n"}) + "\n")
    return path


# =============================================================================================
# Process memory and CPU, from /proc
# =============================================================================================


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (a local Ray's daemons and workers descend from its driver)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def smaps_kib(pid: int) -> dict[str, int]:
    """Pss and Rss (KiB) of one process from /proc/<pid>/smaps_rollup; {} if it is gone."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("Pss", "Rss"):
                out[key] = int(rest.split()[0])
    return out


def vm_hwm_kib(pid: int) -> int:
    """Peak resident set size (VmHWM, KiB) of one process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def cpu_jiffies(pids: list[int]) -> int:
    """utime + stime of `pids` (clock ticks)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total


def machine_busy_jiffies() -> int:
    """Non-idle CPU ticks of the whole machine, all cores (/proc/stat)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return user + nice + system + irq + softirq + steal


class ForeignLoad:
    """Share of the machine's CPU used by processes outside this benchmark's process tree."""

    def __enter__(self):
        self.t, self.busy, self.ours = time.perf_counter(), machine_busy_jiffies(), cpu_jiffies(process_tree(os.getpid()))
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t
        busy = machine_busy_jiffies() - self.busy
        ours = cpu_jiffies(process_tree(os.getpid())) - self.ours
        self.share = max(0.0, busy - ours) / (wall * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1))


# =============================================================================================
# Child side: one contender per process, driven by JSON-line commands on stdin
# =============================================================================================


class Phases:
    """Seconds per named phase of the current step."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t


class Channel:
    """Commands in on stdin, replies out on a dedicated pipe (stdout is left to the libraries' logs)."""

    def __init__(self, fd: int):
        self.out = os.fdopen(fd, "w", buffering=1)

    def send(self, msg: dict[str, Any]) -> None:
        self.out.write(json.dumps(msg) + "\n")

    def recv(self) -> dict[str, Any]:
        line = sys.stdin.readline()
        return json.loads(line) if line else {"op": "close"}


def single_process_memory() -> dict[str, float]:
    """PSS of this process and any it started (an engine's helper processes), and this process's peak RSS."""
    pss = sum(smaps_kib(pid).get("Pss", 0) for pid in process_tree(os.getpid()))
    return {"pss_mib": pss / 1024, "peak_rss_mib": vm_hwm_kib(os.getpid()) / 1024}


def load_run_config(config: str, overrides: list[str]):
    from rlhf_ray.config import load_config

    return load_config(config, overrides)


class RlhfRay:
    """rlhf_ray through launch.py's code path: init_ray + prepare_run + PPOTrainer (all roles actors)."""

    def __init__(self, config: str, threads: int, out_dir: str):
        self.config, self.threads, self.out_dir = config, threads, out_dir
        self.trainer, self.step_index, self.ray_up = None, 0, False

    def setup(self, overrides: list[str], total_steps: int) -> dict[str, float]:

        from launch import init_ray, preload

        if self.trainer is not None:
            self.trainer.close()
        cfg = load_run_config(self.config, [f"trainer.output_dir={self.out_dir}", f"trainer.total_steps={total_steps}",
                                            f"placement.threads_per_node={self.threads}", *overrides])
        t0 = time.perf_counter()
        if not self.ray_up:  # as launch.main: the stage's imports load while Ray starts
            loading = preload("ppo")
            init_ray(cfg)
            loading.join()
            self.ray_up = True
        from rlhf_ray.trainers.common import prepare_run
        from rlhf_ray.trainers.ppo import PPOTrainer

        t1 = time.perf_counter()
        self.trainer = PPOTrainer(cfg, prepare_run(cfg))
        self.cfg, self.step_index = cfg, 0
        self.actor_pids = {role: g.get(g.call(lambda w: w.ping.remote()), "benchmark", "pids", 60)
                           for role, g in self.trainer.roles.pools.items()}
        self.actor_pids = {role: [p for p in pids if p != os.getpid()] for role, pids in self.actor_pids.items()}
        return {"ray_init_s": t1 - t0, "trainer_s": time.perf_counter() - t1}

    def step(self) -> dict[str, Any]:
        from ppo_step import PHASE_METHODS, _compute, _usage

        _usage(self.trainer)  # reset the workers' busy counters
        self.step_index += 1
        t = time.perf_counter()
        m = self.trainer.train_step(self.step_index)
        seconds = time.perf_counter() - t
        busy, _ = _usage(self.trainer)
        phases = {p: m.get(f"time/{p}", 0.0) for p in ("prompts", "rollout", "score", "advantages", "update", "sync")}
        compute = {p: _compute(busy, p) for p in PHASE_METHODS} | {p: phases[p] for p in ("prompts", "advantages")}
        detail = {f"{role}.{name}": s for role, methods in busy.items() for name, s in methods.items()}
        return {"s": seconds, "tokens": m["response/length_mean"] * self.cfg.sequences_per_step, "phases": phases,
                "compute": compute, "busy": detail, "orchestration": 1 - sum(compute.values()) / seconds}

    def memory(self) -> dict[str, float]:
        """PSS (MiB) of the driver, of the role actors, and of every process of the run's Ray cluster."""
        me = os.getpid()
        actors = {pid for pids in self.actor_pids.values() for pid in pids}
        pss = {pid: smaps_kib(pid).get("Pss", 0) / 1024 for pid in process_tree(me)}
        return {"pss_mib": pss.get(me, 0) + sum(pss.get(p, 0) for p in actors), "pss_all_mib": sum(pss.values()),
                "pss_driver_mib": pss.get(me, 0),
                **{f"pss_{role}_mib": sum(pss.get(p, 0) for p in pids) for role, pids in self.actor_pids.items()}}

    def close(self) -> None:
        import ray

        if self.trainer is not None:
            self.trainer.close()
        ray.shutdown()


class Floor:
    """The single-process floor: HF generate (or, `engine="vllm"`, an in-process vLLM engine that takes
    the policy's weights after every update), the reward, and the loss math of rlhf_ray.algorithms,
    with as few model passes as the math needs (or, with `recompute`, the separate no-grad
    old-log-prob and value passes rlhf_ray's score phase runs). The update runs in micro-batches of
    trainer.micro_batch_size sequences, one AdamW step per rollout batch (GRPO)."""

    def __init__(self, config: str, recompute: bool, engine: str = "hf"):
        self.config, self.recompute, self.engine_kind = config, recompute, engine
        self.engine = None

    def setup(self, overrides: list[str], total_steps: int, models: dict[str, str]) -> dict[str, float]:
        import torch
        from transformers import AutoModelForCausalLM

        from rlhf_ray.models import enable_gradient_checkpointing, load_sequence_classifier, load_tokenizer
        from rlhf_ray.rewards.function import import_function

        cfg = self.cfg = load_run_config(self.config, overrides)
        self.tokenizer = load_tokenizer(models["tokenizer"])
        torch.manual_seed(cfg.trainer.seed)
        self.policy = AutoModelForCausalLM.from_pretrained(models["policy"], dtype=torch.float32).train()
        # β = 0: no reference, as in rlhf_ray (RunConfig.uses_reference) and TRL (beta=0 loads no ref_model)
        self.reference = (AutoModelForCausalLM.from_pretrained(models["policy"], dtype=torch.float32).eval()
                          if cfg.uses_reference else None)
        self.critic = load_sequence_classifier(models["critic"]).train() if cfg.uses_critic else None
        if cfg.trainer.gradient_checkpointing:
            for model in (self.policy, self.critic):
                if model is not None:
                    enable_gradient_checkpointing(model)
        self.optimizers = [self._adamw(self.policy, cfg.policy_optim)]
        if self.critic is not None:
            self.optimizers.append(self._adamw(self.critic, cfg.critic_optim))
        self.reward_fn = import_function(cfg.reward.sources[0].path, "vowel")
        self.prompts = [json.loads(line)["prompt"] for line in Path(cfg.data.train).read_text().splitlines()]
        self.order = random.Random(cfg.trainer.seed).sample(range(len(self.prompts)), len(self.prompts))
        tok = self.tokenizer
        self.special_ids = sorted({*tok.all_special_ids, tok.eos_token_id, tok.pad_token_id})
        self.step_index = 0
        if self.engine_kind == "vllm":
            self.engine = self._start_vllm(models)
        return {}

    def _start_vllm(self, models: dict[str, str]):
        """vLLM in this process, configured as rlhf_ray's rollout engine is (rollout.vllm of the config)."""
        import torch

        from rlhf_ray.rollout import rl_context
        from rlhf_ray.rollout.vllm import VLLMOptions, VLLMRolloutEngine

        cfg, tok = self.cfg, self.tokenizer
        v = cfg.rollout.vllm
        options = VLLMOptions(model=models["policy"], tokenizer=models["tokenizer"], seed=cfg.trainer.seed,
                              max_model_len=rl_context(cfg),
                              kv_cache_mb=v.kv_cache_mb, batch_seqs=cfg.sequences_per_step, block_size=v.block_size,
                              threads=torch.get_num_threads())
        return VLLMRolloutEngine(options, tok.eos_token_id, tok.pad_token_id, self.special_ids, len(tok))

    @staticmethod
    def _adamw(model, optim):
        import torch

        return torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                 weight_decay=optim.weight_decay)

    def _batch(self) -> list[str]:
        per = self.cfg.trainer.prompts_per_step
        start = (self.step_index * per) % len(self.order)
        return [self.prompts[self.order[(start + i) % len(self.order)]] for i in range(per)]

    def _left_pad(self, texts: list[str]):
        import torch

        ids = [self.tokenizer.encode(t, add_special_tokens=True) for t in texts]
        width = max(map(len, ids))
        input_ids = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, width - len(seq):] = torch.tensor(seq)
            mask[row, width - len(seq):] = 1
        return input_ids, mask

    def _logprobs(self, model, sequences, attention_mask, prompt_len: int):
        from rlhf_ray.algorithms.logprobs import logprobs_from_logits
        from rlhf_ray.batch import position_ids

        logits = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                       use_cache=False).logits[:, prompt_len - 1:-1]  # (B, T, V)
        return logprobs_from_logits(logits, sequences[:, prompt_len:], self.cfg.rollout.temperature)  # (B, T)

    def _values(self, sequences, attention_mask, prompt_len: int):
        from rlhf_ray.models import response_values

        return response_values(self.critic, sequences, attention_mask, prompt_len)

    def _rollout(self, ph: Phases):
        """→ sequences (B, P+T), attention mask (B, P+T), response mask (B, T), prompt length P, scores (B,)."""
        import torch

        r, n = self.cfg.rollout, self.cfg.rollout.samples_per_prompt
        if self.engine is not None:
            return self._rollout_vllm(ph)
        with ph("prompts"):
            texts = [t for t in self._batch() for _ in range(n)]
            prompt_ids, prompt_mask = self._left_pad(texts)
        with ph("rollout"), torch.no_grad():
            sequences = self.policy.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=r.max_new_tokens, do_sample=True,
                temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, use_cache=True,
                suppress_tokens=self.special_ids if r.suppress_special_tokens else None,
                eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
        P = prompt_ids.shape[1]
        response = sequences[:, P:]
        is_eos = response == self.tokenizer.eos_token_id  # a response ends at its first EOS
        after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
        response_mask = (~after_eos).long()
        scores = self._scores(ph, texts, response, response_mask)
        return sequences, torch.cat([prompt_mask, response_mask], 1), response_mask, P, scores

    def _rollout_vllm(self, ph: Phases):
        from rlhf_ray.rollout.base import SamplingParams

        r = self.cfg.rollout
        with ph("prompts"):
            prompts = self._batch()
            texts = [t for t in prompts for _ in range(r.samples_per_prompt)]
            prompt_ids = [self.tokenizer.encode(t, add_special_tokens=True) for t in prompts]
        with ph("rollout"):
            params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                    top_k=r.top_k, n=r.samples_per_prompt,
                                    suppress_special_tokens=r.suppress_special_tokens)
            samples = self.engine.generate(prompt_ids, params, seed=self.cfg.trainer.seed + self.step_index)
        scores = self._scores(ph, texts, samples.response_ids, samples.response_mask)
        return (samples.input_ids, samples.attention_mask, samples.response_mask, samples.prompt_ids.shape[1],
                scores)

    def _scores(self, ph: Phases, texts: list[str], response, response_mask):
        import torch

        with ph("reward"):
            decoded = [self.tokenizer.decode(ids[m.bool()], skip_special_tokens=True)
                       for ids, m in zip(response, response_mask, strict=True)]
            return torch.tensor(self.reward_fn(texts, decoded, [{} for _ in texts]), dtype=torch.float32)

    def step(self) -> dict[str, Any]:
        ph, t = Phases(), time.perf_counter()
        tokens = self._ppo_step(ph) if self.critic is not None else self._grpo_step(ph)
        self.step_index += 1
        return {"s": time.perf_counter() - t, "tokens": tokens, "phases": ph.times}

    def _grpo_step(self, ph: Phases) -> float:
        import torch

        from rlhf_ray.algorithms.advantages import broadcast_to_tokens, group_advantages
        from rlhf_ray.algorithms.losses import kl_loss, policy_loss

        a = self.cfg.algo
        sequences, attention_mask, mask, P, scores = self._rollout(ph)
        with ph("advantages"):
            advantages = broadcast_to_tokens(group_advantages(scores, self.cfg.rollout.samples_per_prompt, a.advantage), mask)
        micro = self._micro_batches(len(sequences))
        if self.reference is not None:
            with ph("reference"), torch.no_grad():
                ref_logprobs = torch.cat([self._logprobs(self.reference, sequences[m], attention_mask[m], P) for m in micro])
        if self.recompute:
            with ph("old_logprobs"), torch.no_grad():
                old_logprobs = torch.cat([self._logprobs(self.policy, sequences[m], attention_mask[m], P) for m in micro])
        tokens = mask.sum()
        for m in micro:  # gradient accumulation; each micro-batch weighted by its share of the batch's tokens
            with ph("policy_forward"):
                logprobs = self._logprobs(self.policy, sequences[m], attention_mask[m], P)
                old = old_logprobs[m] if self.recompute else logprobs.detach()
                loss, _ = policy_loss(logprobs, old, advantages[m], mask[m], clip_low=a.clip_low,
                                      clip_high=a.clip_high, agg=a.loss_agg)
                if self.reference is not None:
                    kl, _ = kl_loss(logprobs, ref_logprobs[m], mask[m], kind="k3", agg=a.loss_agg)
                    loss = loss + a.kl.coef * kl
                loss = loss * (mask[m].sum() / tokens)
            with ph("backward"):
                loss.backward()
        self._optimizer_step(ph)
        self._sync(ph)
        return float(mask.sum())

    def _micro_batches(self, rows: int) -> list[slice]:
        size = min(self.cfg.trainer.micro_batch_size, rows)
        return [slice(i, i + size) for i in range(0, rows, size)]

    def _sync(self, ph: Phases) -> None:
        """The updated weights into the in-process vLLM engine (by HF name, as rlhf_ray's sync sends them)."""
        if self.engine is not None:
            with ph("sync"):
                self.engine.load_weights((name, t.detach()) for name, t in self.policy.state_dict().items())

    def _ppo_step(self, ph: Phases) -> float:
        import torch

        from rlhf_ray.algorithms.advantages import compute_gae, whiten
        from rlhf_ray.algorithms.kl import kl_penalty
        from rlhf_ray.algorithms.losses import policy_loss, value_loss
        from rlhf_ray.trainers.experience import token_rewards

        a = self.cfg.algo
        sequences, attention_mask, mask, P, scores = self._rollout(ph)
        if self.reference is not None:
            with ph("reference"), torch.no_grad():
                ref_logprobs = self._logprobs(self.reference, sequences, attention_mask, P)
        if self.recompute:
            with ph("old_logprobs"), torch.no_grad():
                old_logprobs = self._logprobs(self.policy, sequences, attention_mask, P)
            with ph("old_values"), torch.no_grad():
                old_values = self._values(sequences, attention_mask, P)
        with ph("policy_forward"):
            logprobs = self._logprobs(self.policy, sequences, attention_mask, P)
        with ph("critic_forward"):
            values = self._values(sequences, attention_mask, P)
        with ph("advantages"):
            if not self.recompute:
                old_logprobs, old_values = logprobs.detach(), values.detach()
            fmask = mask.float()
            kl = kl_penalty(old_logprobs, ref_logprobs, a.kl.estimator) * fmask if self.reference is not None \
                else torch.zeros_like(fmask)
            advantages, returns = compute_gae(token_rewards(scores, kl, a.kl.coef, fmask), old_values, fmask, a.gamma, a.lam)
            advantages = whiten(advantages, fmask) * fmask
        with ph("policy_forward"):
            loss, _ = policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=a.clip_low, clip_high=a.clip_high,
                                  agg=a.loss_agg)
        with ph("critic_forward"):
            v_loss, _ = value_loss(values, old_values, returns, mask, clip=a.value_clip, agg=a.loss_agg)
        self._update(ph, loss + v_loss)
        return float(mask.sum())

    def _update(self, ph: Phases, loss) -> None:
        with ph("backward"):
            loss.backward()
        self._optimizer_step(ph)

    def _optimizer_step(self, ph: Phases) -> None:
        import torch

        with ph("optimizer"):
            models = [(self.policy, self.cfg.policy_optim), (self.critic, self.cfg.critic_optim)]
            for (model, optim), opt in zip([m for m in models if m[0] is not None], self.optimizers, strict=True):
                if optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)

    def memory(self) -> dict[str, float]:
        return single_process_memory()

    def close(self) -> None:
        pass


def serve_steps(chan: Channel, contender, models: dict[str, str]) -> None:
    """The command loop of a step-by-step contender: setup / run k steps / close."""
    while True:
        cmd = chan.recv()
        if cmd["op"] == "setup":
            args = (cmd["overrides"], cmd["total_steps"]) + ((cmd.get("models", models),) if isinstance(contender, Floor) else ())
            detail = contender.setup(*args)
            chan.send({"op": "ready", "t": time.time(), "detail": detail})
        elif cmd["op"] == "run":
            steps = []
            for _ in range(cmd["steps"]):
                rec = contender.step()
                rec["mem"] = contender.memory()
                steps.append(rec)
            chan.send({"op": "done", "steps": steps})
        else:
            contender.close()
            chan.send({"op": "closed"})
            return


def run_trl(chan: Channel, config: str, models: dict[str, str], out_dir: str, vllm: bool = False) -> None:
    """TRL GRPOTrainer on the workload; its own training loop, paused between chunks by a callback.
    `vllm`: TRL's colocate mode (vLLM in the trainer's process, weights loaded into it every step)."""
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_ray.models import load_tokenizer
    from rlhf_ray.rewards.function import import_function
    from rlhf_ray.rollout import rl_context

    cmd = chan.recv()  # setup
    cfg = load_run_config(config, cmd["overrides"])
    r, a, o = cfg.rollout, cfg.algo, cfg.policy_optim
    tok = load_tokenizer(models["tokenizer"])
    rule = import_function(cfg.reward.sources[0].path, "vowel")

    def vowel_share(prompts, completions, **kwargs):
        return rule(prompts, completions, [{} for _ in prompts])

    specials = sorted({*tok.all_special_ids, tok.eos_token_id, tok.pad_token_id})
    if not r.suppress_special_tokens:
        generation = None
    elif vllm:  # vLLM's SamplingParams: never EOS, only non-special tokens
        generation = {"ignore_eos": True, "allowed_token_ids": sorted(set(range(len(tok))) - set(specials))}
    else:  # merged into HF generate's GenerationConfig
        generation = {"suppress_tokens": specials}
    micro = min(cfg.trainer.micro_batch_size, cfg.sequences_per_step)
    vllm_args = {}
    if vllm:
        v = cfg.rollout.vllm
        from rlhf_ray.rollout.vllm import cpu_kv_cache_mb

        length = rl_context(cfg)
        vllm_args = dict(use_vllm=True, vllm_mode="colocate", vllm_max_model_length=length)
        # the KV cache rlhf_ray's engine gets, rounded up to whole GiB: TRL's only knob for it on CPU is
        # vLLM's VLLM_CPU_KVCACHE_SPACE (GiB)
        kv_mb = v.kv_cache_mb or cpu_kv_cache_mb(models["policy"], cfg.sequences_per_step, length, 4, v.block_size)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(-(-int(kv_mb) // 1024)))
    args = GRPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, seed=cfg.trainer.seed, report_to="none",
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, max_steps=cmd["total_steps"] + 1,
        per_device_train_batch_size=micro, gradient_accumulation_steps=cfg.sequences_per_step // micro,
        num_generations=r.samples_per_prompt, max_completion_length=r.max_new_tokens,
        temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, generation_kwargs=generation, **vllm_args,
        beta=a.kl.coef, epsilon=a.clip_low, epsilon_high=a.clip_high, num_iterations=a.epochs, loss_type="dapo",
        learning_rate=o.lr, lr_scheduler_type="constant", adam_beta1=o.betas[0], adam_beta2=o.betas[1],
        adam_epsilon=o.eps, weight_decay=o.weight_decay, max_grad_norm=o.grad_clip or 0.0,
        gradient_checkpointing=cfg.trainer.gradient_checkpointing,  # TRL's GRPOConfig default is True
    )
    rows = [json.loads(line) for line in Path(cfg.data.train).read_text().splitlines()]
    t_built = time.perf_counter()
    trainer = GRPOTrainer(model=models["policy"], reward_funcs=[vowel_share], args=args, processing_class=tok,
                          train_dataset=datasets.Dataset.from_list(rows))
    ph = Phases()
    _instrument_trl(trainer, ph)
    detail = {"trainer_s": time.perf_counter() - t_built}

    class Pace(TrainerCallback):
        """Sends 'ready' before the first step, times each step, pauses for the next command after a chunk."""

        def __init__(self):
            self.left, self.steps, self.last = 0, [], 0.0

        def _wait(self, control) -> None:
            cmd = chan.recv()
            if cmd["op"] != "run":
                control.should_training_stop = True
                self.closing = True
                return
            self.left, self.steps = cmd["steps"], []
            ph.times.clear()
            self.last = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 0 and not self.steps and self.left == 0:
                chan.send({"op": "ready", "t": time.time(), "detail": detail})
                self._wait(control)

        def on_pre_optimizer_step(self, args, state, control, **kw):
            self.t_opt = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kw):
            ph.times["optimizer"] = ph.times.get("optimizer", 0.0) + time.perf_counter() - self.t_opt

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            tokens = trainer._metrics["train"]["completions/mean_length"][-1] * cfg.sequences_per_step
            self.steps.append({"s": now - self.last, "tokens": tokens, "phases": dict(ph.times),
                               "mem": single_process_memory()})
            ph.times.clear()
            self.left -= 1
            if self.left == 0:
                chan.send({"op": "done", "steps": self.steps})
                self._wait(control)
            else:
                self.last = time.perf_counter()

    pace = Pace()
    pace.closing = False
    trainer.add_callback(pace)
    torch.manual_seed(cfg.trainer.seed)
    trainer.train()
    if not pace.closing:  # max_steps ran out before the parent said close
        chan.recv()
    chan.send({"op": "closed"})


def _instrument_trl(trainer, ph: Phases) -> None:
    """Per-phase timers around TRL's own methods (instance attributes shadow the class's)."""

    def timed(fn, name):
        def wrapper(*args, **kwargs):
            label = name(*args) if callable(name) else name
            with ph(label):
                return fn(*args, **kwargs)
        return wrapper

    trainer._generate = timed(trainer._generate, "rollout")  # tokenise, generate, decode (+ vLLM's weight load)
    if getattr(trainer, "vllm_generation", None) is not None:  # colocate mode: also timed on its own (within rollout)
        trainer.vllm_generation.sync_weights = timed(trainer.vllm_generation.sync_weights, "sync (in rollout)")
    trainer._calculate_rewards = timed(trainer._calculate_rewards, "reward")
    trainer._get_per_token_logps_and_entropies = timed(
        trainer._get_per_token_logps_and_entropies,
        lambda model, *a: "reference" if model is trainer.ref_model else "policy_forward")
    trainer.accelerator.backward = timed(trainer.accelerator.backward, "backward")
    trainer._clip_grad_norm = timed(trainer._clip_grad_norm, "optimizer")


def child_main(args: argparse.Namespace) -> int:
    """Entry of a contender's process."""
    import torch

    threads = args.threads[0]
    torch.set_num_threads(threads)
    chan = Channel(args.reply_fd)
    models = json.loads(args.models)
    config = str(PPO_CONFIG if "_ppo" in args.child else GRPO_CONFIG)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.child in ("trl", "trl_vllm"):
        run_trl(chan, config, models, args.out_dir, vllm=args.child == "trl_vllm")
        return 0
    if args.child.startswith("rlhf_ray"):  # also variants, "rlhf_ray+<label>" (--variant)
        contender = RlhfRay(config, threads, args.out_dir)
    else:
        contender = Floor(config, recompute=args.child.endswith("recompute"),
                          engine="vllm" if args.child.endswith("_vllm") else "hf")
    serve_steps(chan, contender, models)
    return 0


# =============================================================================================
# Parent side: start the contenders, alternate them, report
# =============================================================================================


class Child:
    """A contender's process: started, set up (start-up timed), then run chunk by chunk."""

    def __init__(self, name: str, threads: int, models: dict[str, str], work: Path, extra_env: dict[str, str]):
        read_fd, write_fd = os.pipe()
        self.name, self.log = name, work / f"{name}_t{threads}.log"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
                "RAY_AUTH_MODE": env.get("RAY_AUTH_MODE", "disabled"), "PYTHONPATH": str(ROOT), **extra_env}
        self.t_launch = time.time()
        out_dir = work / f"{name}_t{threads}"
        with open(self.log, "w") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--child", name, "--threads", str(threads), "--reply-fd", str(write_fd),
                 "--models", json.dumps(models), "--out-dir", str(out_dir)],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, pass_fds=(write_fd,),
                cwd=ROOT, env=env, text=True, start_new_session=True)  # a signal to its process group spares us
        os.close(write_fd)
        self.replies = os.fdopen(read_fd)

    def ask(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.replies.readline()
        if not line:
            tail = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"contender {self.name} died (exit {self.proc.wait()}); log {self.log}:\n{tail}")
        return json.loads(line)

    def setup(self, overrides: list[str], total_steps: int, models: dict[str, str] | None = None) -> dict[str, Any]:
        cmd = {"op": "setup", "overrides": overrides, "total_steps": total_steps}
        if models:
            cmd["models"] = models
        reply = self.ask(cmd)
        return {"startup_s": reply["t"] - self.t_launch, **reply["detail"]}

    def run(self, steps: int) -> list[dict[str, Any]]:
        return self.ask({"op": "run", "steps": steps})["steps"]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.proc.poll() is None:
                self.ask({"op": "close"})
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def build_models(work: Path, size: str) -> dict[str, str]:
    """Toy policy/critic/tokenizer of one size, saved once and shared by every contender."""
    from rlhf_ray.toy import save_toy_models

    hidden, inter, layers, heads = MODEL_SIZES[size]
    paths = save_toy_models(work / f"models_{size}", seed=0, hidden_size=hidden, intermediate_size=inter,
                            num_layers=layers, num_heads=heads, max_position_embeddings=1024)  # 512-token responses
    return {"policy": paths.policy, "critic": paths.critic, "tokenizer": paths.tokenizer}


def count_params(model_dir: str) -> int:
    from safetensors import safe_open

    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def model_overrides(models: dict[str, str], rlhf: bool) -> list[str]:
    base = [f"data.train={PROMPTS}"]
    if rlhf:
        base += [f"model.policy={models['policy']}", f"model.reference={models['policy']}",
                 f"model.critic={models['critic']}", f"model.tokenizer={models['tokenizer']}"]
    return base


def failure_line(message: str) -> str:
    """The last exception line of a dead contender's log tail (what went wrong, in one line)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if "Error" in line.split(":")[0] or "Exception" in line.split(":")[0]]
    if not errors:
        return (lines or ["no output"])[-1][:400]
    first = errors[-1]
    return " ".join(lines[first:first + 3] if lines[first].endswith(":") else lines[first:first + 1])[:400]


def chunk_plan(steps: int, chunk: int) -> list[int]:
    return [min(chunk, steps - i) for i in range(0, steps, chunk)]


def run_group(names: list[str], threads: int, args, models: dict[str, str], work: Path,
              variants: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """Start each contender alone, warm all up, then alternate measured chunks; → per contender results.
    With `args.one_at_a_time` each contender starts, warms up, runs its steps and exits before the next
    starts (real sizes: seven contenders of 20M+ params with their vLLM caches do not fit in 24 GiB at
    once). `variants`: extra config overrides of the rlhf_ray contenders named "<rlhf_ray name>+<label>"."""
    results = {n: {"steps": [], "foreign": [], "idle_others": [], "load": []} for n in names}
    children: dict[str, Child] = {}

    def start(name: str) -> bool:
        child = children[name] = Child(name, threads, models, work, args.env)
        try:
            results[name] |= child.setup(model_overrides(models, name.startswith("rlhf_ray")) + args.set
                                         + variants.get(name, []), args.warmup + args.steps)
        except RuntimeError as e:  # a contender that cannot run here is reported, and the others go on
            results[name]["failed"] = failure_line(str(e))
            print(f"  {name:<20} t={threads}: FAILED to start: {results[name]['failed']} (log {child.log})",
                  flush=True)
            children.pop(name).close()
            return False
        print(f"  {name:<20} t={threads}: started in {results[name]['startup_s']:.1f} s", flush=True)
        return True

    def warm_up(name: str) -> None:
        results[name]["first_step_s"] = children[name].run(args.warmup)[0]["s"]

    def measure(name: str, k: int) -> None:
        idle = [pid for other, c in children.items() if other != name for pid in process_tree(c.proc.pid)]
        idle_before, t = cpu_jiffies(idle), time.perf_counter()
        with ForeignLoad() as load:
            results[name]["steps"] += children[name].run(k)
        idle_share = (cpu_jiffies(idle) - idle_before) / ((time.perf_counter() - t) * os.sysconf("SC_CLK_TCK")
                                                          * (os.cpu_count() or 1))
        results[name]["foreign"].append(load.share)
        results[name]["idle_others"].append(idle_share)
        results[name]["load"].append(os.getloadavg()[0])

    try:
        if args.one_at_a_time:
            for name in names:
                if start(name):
                    warm_up(name)
                    for k in chunk_plan(args.steps, args.chunk):
                        measure(name, k)
                    children.pop(name).close()
            return results
        names = [name for name in names if start(name)]
        for name in names:
            warm_up(name)
        for i, k in enumerate(chunk_plan(args.steps, args.chunk)):
            for name in names[i % len(names):] + names[:i % len(names)]:  # rotate who goes first
                measure(name, k)
    finally:
        for child in children.values():
            child.close()
    return results


# --- statistics and tables ------------------------------------------------------------------


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    """(p10, median, p90)."""
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return q[0], statistics.median(xs), q[-1]


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    steps = res["steps"]
    p10, med, p90 = quantiles([s["s"] for s in steps])
    phases = {}
    for s in steps:
        for k in s["phases"]:
            phases.setdefault(k, [])
    phases = {k: statistics.median([s["phases"].get(k, 0.0) for s in steps]) for k in phases}
    mem = {k: max(s["mem"].get(k, 0.0) for s in steps) for k in steps[0]["mem"]}
    out = {"median_s": med, "p10_s": p10, "p90_s": p90, "tok_s": statistics.median([s["tokens"] / s["s"] for s in steps]),
           "phases": phases, "mem": mem, "startup_s": res["startup_s"], "first_step_s": res["first_step_s"],
           "foreign": statistics.median(res["foreign"]), "idle_others": statistics.median(res["idle_others"]),
           "load": max(res["load"]), "n": len(steps)}
    if "compute" in steps[0]:
        out["compute"] = {k: statistics.median([s["compute"][k] for s in steps]) for k in steps[0]["compute"]}
        out["busy"] = {k: statistics.median([s["busy"].get(k, 0.0) for s in steps]) for k in steps[0]["busy"]}
        out["orchestration"] = statistics.median([s["orchestration"] for s in steps])
        out["startup_detail"] = {k: res[k] for k in ("ray_init_s", "trainer_s") if k in res}
    return out


def memory_cell(mem: dict[str, float]) -> str:
    if "pss_all_mib" in mem:
        return f"{mem['pss_mib']:.0f} PSS ({mem['pss_all_mib']:.0f} w/ Ray daemons)"
    return f"{mem['peak_rss_mib']:.0f} RSS ({mem['pss_mib']:.0f} PSS)"


def print_group(title: str, summary: dict[str, dict[str, Any]]) -> None:
    print(f"\n== {title} ==")
    print(f"{'contender':<21}{'s/step':>8}{'p10-p90':>14}{'resp tok/s':>11}{'start-up s':>11}{'1st step s':>11}"
          f"{'foreign':>8}{'idle peers':>11}  peak memory MiB")
    for name, s in summary.items():
        print(f"{name:<21}{s['median_s']:>8.3f}{s['p10_s']:>7.3f}-{s['p90_s']:<6.3f}{s['tok_s']:>11.0f}"
              f"{s['startup_s']:>11.1f}{s['first_step_s']:>11.2f}{s['foreign'] * 100:>7.0f}%"
              f"{s['idle_others'] * 100:>10.1f}%  {memory_cell(s['mem'])}")
    print("  (foreign: CPU share of the machine used outside the benchmark while it ran; idle peers: used by the "
          "other, idle contenders' processes)")
    for name, s in summary.items():
        cells = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in s["phases"].items())
        print(f"  {name} phases (median ms): {cells}")
        if "compute" in s:
            comp = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in s["compute"].items())
            busy = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in s["busy"].items())
            share = (f"orchestration share {s['orchestration'] * 100:.0f}%" if s["orchestration"] >= 0 else
                     "phases overlap (asynchronous), so no critical-path share")
            print(f"  {name} compute (ms): {comp}; {share}")
            print(f"  {name} worker busy (ms): {busy}")
            print(f"  {name} start-up detail (s): " + ", ".join(f"{k} {v:.1f}" for k, v in s['startup_detail'].items())
                  + "; memory per role (PSS MiB): " + ", ".join(
                      f"{k[4:-4]} {v:.0f}" for k, v in s["mem"].items() if k not in ("pss_mib", "pss_all_mib")))


def print_ratios(all_summaries: dict[tuple[str, int], dict[str, dict[str, Any]]]) -> None:
    print("\n== ratios of median step time (< 1: rlhf_ray faster) ==")
    print(f"{'group':<6}{'threads':>8}  ratios")
    for (group, threads), summary in all_summaries.items():
        ours = [n for n in summary if n.startswith("rlhf_ray")]
        cells = [f"{head}/{other} {summary[head]['median_s'] / summary[other]['median_s']:.2f}×"
                 for head in ours for other in summary if other not in ours]
        if "trl" in summary and "floor" in summary:
            cells.append(f"trl/floor {summary['trl']['median_s'] / summary['floor']['median_s']:.2f}×")
        print(f"{group:<6}{threads:>8}  " + ", ".join(cells))


def print_targets(all_summaries: dict[tuple[str, int], dict[str, dict[str, Any]]]) -> None:
    """Issue 22's targets, each with its measured figure: ✓ met, ✗ missed, — a contender did not run."""
    print("\n== targets (issue 22; median step times of this run) ==")
    for (group, threads), s in all_summaries.items():
        def ratio(a: str, b: str) -> float | None:
            return s[a]["median_s"] / s[b]["median_s"] if a in s and b in s else None

        asynchronous = [n for n in s if re.fullmatch(r"rlhf_ray\+k\d+", n)]  # not a --variant such as +kv256
        best = min(asynchronous, key=lambda n: s[n]["median_s"]) if asynchronous else None
        ours = s.get("rlhf_ray")
        rows = [("on-policy / TRL (HF generate)", ratio("rlhf_ray", "trl"), 0.7, "×"),
                ("on-policy / TRL with vLLM (colocate)", ratio("rlhf_ray", "trl_vllm"), 1.0, "×"),
                (f"k-step async ({best or 'k'}) / TRL", ratio(best, "trl") if best else None, 0.5, "×"),
                ("weight sync share of the on-policy step",
                 ours["phases"].get("sync", 0.0) / ours["median_s"] if ours else None, 0.05, "share"),
                ("start-up with vLLM, launch → first step", ours["startup_s"] if ours else None, 15.0, "s"),
                ("peak memory, all processes (PSS) / TRL's",
                 ours["mem"]["pss_all_mib"] / s["trl"]["mem"]["pss_mib"] if ours and "trl" in s else None, 1.5, "×"),
                ("peak memory, all processes (PSS) / TRL with vLLM's",
                 ours["mem"]["pss_all_mib"] / s["trl_vllm"]["mem"]["pss_mib"] if ours and "trl_vllm" in s else None,
                 1.5, "×")]
        for label, value, limit, unit in rows:
            shown = ("—" if value is None else f"{value * 100:.1f} %" if unit == "share" else
                     f"{value:.1f} s" if unit == "s" else f"{value:.2f}×")
            bound = f"{limit * 100:.0f} %" if unit == "share" else f"{limit:g} s" if unit == "s" else f"{limit:g}×"
            mark = "—" if value is None else "✓" if value <= limit else "✗"
            print(f"{group} t={threads}  {label:<50}{shown:>10}  target ≤ {bound:<7} {mark}")


def compare(args, work: Path) -> dict[str, Any]:
    models = build_models(work, MODEL_SIZE)
    print(f"workload {os.environ.get(WORKLOAD_ENV, 'toy')} ({GRPO_CONFIG.name}); model: {count_params(models['policy']):,} parameters (policy); work dir {work}"
          + (f"; contender environment {args.env}" if args.env else ""))
    summaries, failures = {}, {}
    for group, (_, names) in GROUPS.items():
        chosen = [n for n in names if not args.only or n in args.only]
        variants = {f"{names[0]}+{label}": overrides for label, overrides in args.variant.get(group, {}).items()}
        chosen[1:1] = list(variants)
        variants |= {n: o for n, o in BUILTIN_VARIANTS.items() if n in chosen}
        if not chosen:
            continue
        for threads in args.threads:
            print(f"[{group}, {threads} thread(s)] load average before: {os.getloadavg()[0]:.2f}", flush=True)
            raw = run_group(chosen, threads, args, models, work, variants)
            failures |= {f"{group}/t{threads}/{n}": r["failed"] for n, r in raw.items() if "failed" in r}
            summaries[(group, threads)] = {n: summarise(r) for n, r in raw.items() if "failed" not in r}
            print_group(f"{group}, {threads} torch thread(s) per process / per node", summaries[(group, threads)])
    print_ratios(summaries)
    if REAL_SIZE:
        print_targets(summaries)
    for key, why in failures.items():
        print(f"did not run: {key}: {why}")
    return {f"{g}/t{t}": s for (g, t), s in summaries.items()} | {"failed": failures}


# --- scaling ------------------------------------------------------------------------------------

SCALING_POINTS = [  # (label, model size, overrides of the GRPO workload)
    ("base: 1M, 32 seq × 32 tok", "1M", []),
    ("response 16 tokens", "1M", ["rollout.max_new_tokens=16"]),
    ("response 64 tokens", "1M", ["rollout.max_new_tokens=64"]),
    ("response 128 tokens", "1M", ["rollout.max_new_tokens=128"]),
    ("batch 16 seq (4 prompts)", "1M", ["trainer.prompts_per_step=4", "trainer.mini_batch_size=16", "trainer.micro_batch_size=16"]),
    ("batch 64 seq (16 prompts)", "1M", ["trainer.prompts_per_step=16", "trainer.mini_batch_size=64", "trainer.micro_batch_size=64"]),
    ("model 10M", "10M", []),
    ("model 50M", "50M", []),
]


REAL_SCALING_POINTS = [  # issue 22 (--workload gen20m --scaling): (label, model size, overrides), vLLM rollouts
    ("1M, 128 tokens", "1M", []),
    ("20M, 128 tokens", "20M", []),
    ("113M, 128 tokens", "100M", []),
    ("20M, 32 tokens", "20M", ["rollout.max_new_tokens=32"]),
    ("20M, 512 tokens", "20M", ["rollout.max_new_tokens=512"]),
]
REAL_SCALING_BATCH = ["trainer.prompts_per_step=8", "trainer.mini_batch_size=32"]  # 32 sequences: a quarter
SHARE_PHASES = {  # share → the phases that make it up (rlhf_ray's names, then the floor's)
    "rollout": ("rollout",), "score": ("score", "reference", "reward"),
    "update": ("update", "policy_forward", "backward", "optimizer"), "sync": ("sync",)}


def phase_shares(seconds: float, phases: dict[str, float]) -> dict[str, float]:
    """Each phase's share of the step; "other" is what no phase covers (orchestration, prompts, advantages)."""
    shares = {share: sum(phases.get(p, 0.0) for p in parts) / seconds for share, parts in SHARE_PHASES.items()}
    return shares | {"other": 1.0 - sum(shares.values())}


def scaling(args, work: Path) -> dict[str, Any]:
    """Step time of rlhf_ray and the floor at each point, alternating; rlhf_ray keeps one Ray session. At
    real sizes (--workload gen20m/gen100m) the floor is floor_vllm, in a fresh process per point (one
    vLLM engine per process), and each row also gives the phases' shares of the step."""
    threads = args.threads[-1]
    points = REAL_SCALING_POINTS if REAL_SIZE else SCALING_POINTS
    base = REAL_SCALING_BATCH if REAL_SIZE else []
    floor = "floor_vllm" if REAL_SIZE else "floor"
    models = {size: build_models(work, size) for size in {p[1] for p in points}}
    params = {size: count_params(m["policy"]) for size, m in models.items()}
    names = ["rlhf_ray", floor]
    rows = []
    children = {n: Child(n, threads, models[points[0][1]], work, args.env) for n in names}
    try:
        for label, size, overrides in points:
            if REAL_SIZE and rows:
                children[floor].close()
                children[floor] = Child(floor, threads, models[size], work, args.env)
            heavy = size != "1M"  # ~3 s (10M) and ~11 s (50M) per step on 2 cores: fewer steps
            warmup, steps = (1, max(2, args.steps // 6)) if heavy else (min(2, args.warmup), max(3, args.steps // 2))
            res = {}
            try:
                for name, child in children.items():
                    child.setup(model_overrides(models[size], name == "rlhf_ray") + base + args.set + overrides,
                                warmup + steps, models[size])
                    child.run(warmup)
                    res[name] = {"steps": []}
            except RuntimeError as e:  # a point that cannot run is reported; the table keeps the others
                print(f"  {label:<28} FAILED: {failure_line(str(e))}", flush=True)
                for name in names:
                    children[name].close()
                    children[name] = Child(name, threads, models[size], work, args.env)
                continue
            for i, k in enumerate(chunk_plan(steps, args.chunk)):
                for name in (names if i % 2 == 0 else names[::-1]):
                    res[name]["steps"] += children[name].run(k)
            row = {"label": label, "params": params[size], "load": os.getloadavg()[0]}
            for name in names:
                ss = res[name]["steps"]
                row[name] = statistics.median([s["s"] for s in ss])
                row[f"{name}_phases"] = {k: statistics.median([s["phases"].get(k, 0.0) for s in ss]) for k in ss[0]["phases"]}
                row[f"{name}_shares"] = phase_shares(row[name], row[f"{name}_phases"])
            row["orchestration"] = statistics.median([s["orchestration"] for s in res["rlhf_ray"]["steps"]])
            rows.append(row)
            print(f"  {label:<28} rlhf_ray {row['rlhf_ray']:.3f} s, {floor} {row[floor]:.3f} s, "
                  f"orchestration {row['orchestration'] * 100:.0f}%", flush=True)
    finally:
        for child in children.values():
            child.close()
    print_scaling(rows, names, threads)
    return {"scaling": rows}


def print_scaling(rows: list[dict[str, Any]], names: list[str], threads: int) -> None:
    rlhf, floor = names
    print(f"\n== scaling: GRPO step time, {threads} torch thread(s) per process / per node ==")
    print(f"{'point':<28}{'params':>12}{'rlhf_ray s':>12}{floor + ' s':>14}{'ratio':>8}{'orchestration':>15}"
          f"{'rollout s':>11}{'score s':>9}{'update s':>10}{'sync s':>8}")
    for r in rows:
        p = r[f"{rlhf}_phases"]
        print(f"{r['label']:<28}{r['params']:>12,}{r[rlhf]:>12.3f}{r[floor]:>14.3f}{r[rlhf] / r[floor]:>7.2f}×"
              f"{r['orchestration'] * 100:>14.0f}%{p['rollout']:>11.3f}{p['score']:>9.3f}{p['update']:>10.3f}{p['sync']:>8.3f}")
    print("\nphase shares of the step (rollout / score / update / sync / other):")
    for r in rows:
        cells = [f"{name} " + " / ".join(f"{r[f'{name}_shares'][k] * 100:.0f}%" for k in (*SHARE_PHASES, "other"))
                 for name in names]
        print(f"  {r['label']:<28}" + "   ".join(cells))
    for r in rows:
        print(f"  {floor} at {r['label']} (ms): " + ", ".join(f"{k} {v * 1e3:.0f}" for k, v in r[f"{floor}_phases"].items()))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="measured steps per contender and thread setting")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps before measuring")
    parser.add_argument("--chunk", type=int, default=2, help="steps a contender runs before the next takes its turn")
    parser.add_argument("--threads", default="1,2", help="torch thread settings to measure, comma-separated")
    parser.add_argument("--only", default="", help="comma-separated contenders (default: all): " +
                        ", ".join(n for _, names in GROUPS.values() for n in names))
    parser.add_argument("--variant", action="append", default=[], metavar="GROUP:LABEL:KEY=VALUE[,KEY=VALUE]",
                        help="an extra rlhf_ray contender with config overrides, measured alongside, e.g. "
                        "GRPO:zero0:deepspeed.zero_stage=0 (repeatable)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment of every contender's process (Ray actors inherit it), e.g. "
                        "OMP_WAIT_POLICY=PASSIVE (repeatable)")
    parser.add_argument("--workload", choices=list(WORKLOADS), default="toy",
                        help="toy: the 1M-param workload; gen: generation-heavy (20M params, 32 × 128 tokens, vLLM); "
                        "gen20m / gen100m: issue 22's (128 sequences × 128 tokens at 20M / 113M params, vLLM, with "
                        "TRL's vLLM colocate mode and the floor with vLLM; GRPO only)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a workload change for every contender, e.g. rollout.max_new_tokens=256 (repeatable)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 6 measured steps, 2 warm-up, chunks of 3")
    parser.add_argument("--scaling", action="store_true", help="step time vs response length, batch and model size "
                        "(rlhf_ray and the floor, GRPO; the last --threads setting; --steps/2 measured steps per point, "
                        "--steps/6 for the 10M and 50M models; ~6 min on an idle 2-core machine); with --workload gen20m: "
                        "model size 1M → 113M and response length 32 → 512 at 32 sequences a step, rlhf_ray vs "
                        "floor_vllm, with each phase's share of the step")
    parser.add_argument("--one-at-a-time", choices=("auto", "yes", "no"), default="auto",
                        help="run each contender alone, start to finish, instead of alternating chunks with all "
                        "of them alive (auto: yes for gen20m/gen100m, whose contenders do not fit in memory at once)")
    parser.add_argument("--json", default=str(ROOT / "runs" / "peer_compare.json"), help="where to write all figures")
    # child-process arguments (internal)
    for name, kind in (("--child", str), ("--reply-fd", int), ("--models", str), ("--out-dir", str)):
        parser.add_argument(name, type=kind, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.threads = [int(t) for t in str(args.threads).split(",")]
    args.only = [n for n in args.only.split(",") if n]
    variants: dict[str, dict[str, list[str]]] = {}
    for spec in args.variant:
        group, label, overrides = spec.split(":", 2)
        variants.setdefault(group, {})[label] = overrides.split(",")
    args.variant = variants
    args.env = dict(item.split("=", 1) for item in args.env)
    args.one_at_a_time = args.one_at_a_time == "yes" or (args.one_at_a_time == "auto" and REAL_SIZE)
    if args.quick:
        args.steps, args.warmup, args.chunk = 6, 2, 3
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    if args.workload != os.environ.get(WORKLOAD_ENV, "toy"):  # the module-level choice: run again under it
        return subprocess.call([sys.executable, *sys.argv], env={**os.environ, WORKLOAD_ENV: args.workload})
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no "Writing model shards" bars in the tables
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not PROMPTS.exists():
        write_prompts()
    t0, load0 = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="peer_compare_") as tmp:
        work = Path(tmp)
        figures = scaling(args, work) if args.scaling else compare(args, work)
    info = {"cpus": os.cpu_count(), "load_before": load0, "load_after": os.getloadavg(),
            "wall_s": time.perf_counter() - t0, "argv": sys.argv[1:], "env": args.env}
    print(f"\nload average (1/5/15 min) before {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, after "
          f"{info['load_after'][0]:.2f}/{info['load_after'][1]:.2f}/{info['load_after'][2]:.2f}; "
          f"{os.cpu_count()} CPUs; total {info['wall_s']:.0f} s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"info": info, **figures}, indent=1, default=str))
    print(f"figures: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
