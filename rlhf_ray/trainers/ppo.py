"""The RL driver: generate → score → advantages → update → sync (ARCHITECTURE.md §3).

`PPOTrainer.train_step` is the whole algorithm at one level of detail, one timer per phase;
`Roles` hides the actors behind typed calls with deadlines, and `make_experience` is the pure
math in between (KL shaping, GAE or a group estimator, whitening — ALGORITHMS.md §2–§4).
The driver never holds a model.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace
from typing import Any

import numpy as np
import ray
import torch

from rlhf_ray.algorithms.kl import AdaptiveKLController, FixedKLController
from rlhf_ray.batch import Experience, Samples, concat_samples
from rlhf_ray.config import RunConfig
from rlhf_ray.data import BatchIterator, PromptExample, load_prompts
from rlhf_ray.metrics import MetricsLogger, Timer, mean_over_ranks, summary_table
from rlhf_ray.placement import LocalPool, PhaseError, RoleSpec, WorkerPool, rendezvous, reserve, role_spec
from rlhf_ray.rollout import probe_length
from rlhf_ray.rollout.base import SamplingParams, probe_tokens
from rlhf_ray.threads import split_budget
from rlhf_ray.trainers.checkpointing import RunCheckpoints, StopRequested, stop_requested, with_restarts
from rlhf_ray.trainers.common import (
    RunInputs, data_keys, delete_served_rewards, prepare_run, start_served_rewards)
from rlhf_ray.trainers.evaluation import mean_pass_at_k, win_rate
from rlhf_ray.trainers.rollout_queue import PendingSync, RolloutQueue, fresh_rows
from rlhf_ray.trainers.experience import (
    Rewards, RunningMoments, Scored, concat_scored, fill_invalid, nonfinite_counts, group_rows, group_stats, informative_groups, make_experience, plan_update,
    shape_scores)
from rlhf_ray.workers import (
    CriticWorker, ModelPaths, PolicyWorker, ReferenceWorker, RewardWorker, RolloutWorker)

# ---------------------------------------------------------------------------------------------
# Roles: the actors, behind typed calls
# ---------------------------------------------------------------------------------------------


class Roles:
    """The worker pools of an RL run, created in placement groups, with typed fan-out calls."""

    def __init__(self, cfg: RunConfig, models: ModelPaths, reward_paths: list[str], probe_ids: list[int]):
        self.cfg, self.version, self.probe_ids = cfg, 0, probe_ids
        self.asynchronous = cfg.algo.max_staleness > 0  # the engines generate beside every phase
        self.partial_rollouts = cfg.algo.max_staleness > 0 and cfg.rollout.update_in_flight == "mid_request"
        p, timeout = cfg.placement, cfg.placement.timeout_s
        specs = {
            "policy": _spec("policy", p.policy, p.policy.num_workers, p.torch_threads),
            **({"reference": _spec("reference", p.reference, p.reference.num_workers, p.torch_threads)}
               if cfg.reference_host == "reference" else {}),
            "reward": _spec("reward", p.reward, p.reward.num_workers, p.torch_threads),
            "rollout": _spec("rollout", p.rollout, cfg.rollout.num_engines, p.torch_threads),
        }
        if cfg.uses_critic:
            specs["critic"] = _spec("critic", p.critic, p.critic.num_workers, p.torch_threads)
        in_driver = {"reward": specs.pop("reward")} if cfg.reward_in_driver else {}
        self.served = start_served_rewards(cfg, reward_paths, timeout)  # Serve replicas first: outside our groups
        try:
            pgs = _reserve_all(specs, p.colocate, timeout)
        except BaseException:
            delete_served_rewards(self.served)
            raise
        np_, ncr = specs["policy"].num_workers, specs.get("critic", specs["policy"]).num_workers
        make = {
            "policy": (PolicyWorker, lambda r: (cfg, models, r, np_)),
            "critic": (CriticWorker, lambda r: (cfg, models, r, ncr)),
            "reference": (ReferenceWorker, lambda r: (cfg, models)),
            "reward": (RewardWorker, lambda r: (cfg, models, reward_paths)),
            "rollout": (RolloutWorker, lambda r: (cfg, models, r)),
        }
        self.pools: dict[str, WorkerPool | LocalPool] = {}
        for role, spec in specs.items():
            cls, args = make[role]
            pg, share = pgs[role]
            restarts = 0 if role in ("policy", "critic") else p.max_restarts  # trained ranks: restart the stage
            # idempotent calls retried until the restarted actor answers (a lost node takes seconds to be
            # noticed and its bundle re-placed), bounded by each phase's deadline; rollout re-syncs first
            retries = -1 if restarts and role in ("reference", "reward") else 0
            options = {"concurrency_groups": {"sync": 1}} if role == "rollout" and self.partial_rollouts else None
            self.pools[role] = WorkerPool(spec, cls, pg, share, args, cfg.trainer.timeout_s, restarts, retries, options)
        self._placement_groups = {id(pg): pg for pg, _ in pgs.values()}
        try:
            for role, spec in in_driver.items():  # light roles, no process of their own (built while the actors boot)
                self.pools[role] = LocalPool(spec, make[role][0], make[role][1], cfg.trainer.timeout_s)
            self._start(timeout)
        except BaseException:
            self.shutdown()  # a failed start must not keep the cluster's resources
            raise

    @property
    def policy(self) -> WorkerPool[PolicyWorker]:
        return self.pools["policy"]

    @property
    def critic(self) -> WorkerPool[CriticWorker] | None:
        return self.pools.get("critic")

    @property
    def reference(self) -> tuple[WorkerPool, str, str] | None:
        """(pool, role, log-prob method) of the reference: its own actors, or hosted by the policy ranks;
        None when nothing reads it (`RunConfig.uses_reference`)."""
        host = self.cfg.reference_host
        if host == "reference":
            return self.pools["reference"], "reference", "compute_logprobs"
        return (self.policy, "policy", "reference_logprobs") if host == "policy" else None

    def _start(self, timeout: float) -> None:
        """Rendezvous the trained roles first (their DeepSpeed set-up is the longest path; the other
        actors finish booting meanwhile), then wait for every other actor."""
        rendezvous([g for g in (self.policy, self.critic) if g is not None], timeout)
        for pool in self.pools.values():
            pool.get(pool.call(lambda w: w.ping.remote()), "start", "init", timeout)
        self._locate(timeout)
        self.rollout_pids = self._rollout_pids("init")
        if self.cfg.rollout.weight_sync in ("gloo", "nccl"):
            self._join_channel()

    def _locate(self, timeout: float) -> None:
        """Each worker's node, and each node's thread budget (placement.threads_per_node or its CPUs)."""
        self.node_of: dict[tuple[str, int], str] = {}
        self.budget: dict[str, int] = {}
        for role, pool in self.pools.items():
            for rank, (node, cpus) in enumerate(pool.get(pool.call(lambda w: w.where.remote()), "start", "init", timeout)):
                self.node_of[(role, rank)] = node
                self.budget[node] = self.cfg.placement.threads_per_node or cpus

    def workers(self, *roles: str) -> list[tuple[str, int]]:
        return [(r, i) for r in roles if r in self.pools for i in range(len(self.pools[r]))]

    def threads(self, busy: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """Torch threads of each worker busy at once: placement.torch_threads, or its node's share."""
        if self.asynchronous:  # the engines generate beside every phase
            busy = list(dict.fromkeys(busy + self.workers("rollout")))
        if self.cfg.placement.torch_threads:
            return {w: self.cfg.placement.torch_threads for w in busy}
        return split_budget(busy, self.node_of, self.budget)

    def _join_channel(self) -> None:
        """The stateless sync channel: policy rank 0 and one receiver per engine (per shard when tensor parallel)."""
        rollout = self.pools["rollout"]
        host, port = self.policy.get([self.policy.workers[0].node_address.remote()], "sync-setup", "init", self.cfg.placement.timeout_s)[0]
        shards = self.cfg.rollout.vllm.tensor_parallel_size if self.cfg.rollout_backend == "vllm" else 1
        world = 1 + len(rollout) * shards
        refs = self.policy.call(lambda w: w.join_channel.remote(port, world))
        refs_r = rollout.call_each(lambda w, i: w.join_channel.remote(host, port, world), list(range(len(rollout))))
        self.policy.get(refs, "sync-setup", "init", self.cfg.placement.timeout_s)
        rollout.get(refs_r, "sync-setup", "init", self.cfg.placement.timeout_s)

    # --- phases -----------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int, step: int | str,
                 pad_token_id: int, metadata: list[dict] | None = None) -> Samples:
        """Generate outside the training loop (evaluation): the prompts split over the engines; an engine
        restarted meanwhile is re-synced and the call repeated (seeded, so with the same result)."""
        rollout = self.pools["rollout"]
        chunks = np.array_split(np.arange(len(prompts)), len(rollout))
        engines = self.workers("rollout")
        plan = self.threads(engines)

        def call() -> list:
            refs = [rollout.workers[i].generate.remote([prompts[j] for j in chunk], params, seed, int(chunk[0]),
                                                       [metadata[j] for j in chunk] if metadata else None,
                                                       threads=plan[engine])
                    for i, (chunk, engine) in enumerate(zip(chunks, engines)) if len(chunk)]  # more engines than prompts
            return rollout.get(refs, "rollout", step)

        return concat_samples([Samples.from_numpy(p) for p in self._recovering_rollout(call, step)], pad_token_id)

    def _recovering_rollout(self, call, step: int | str):
        """Run `call`; if it failed because a rollout engine died and Ray restarted it, put the engine back
        in sync (`sync_engines`: the weights of the current version) and run `call` once more. The
        engines are seeded per call, so the retried result is the one the failed call would have given."""
        try:
            return call()
        except PhaseError as err:
            restarted = self.restarted_engines(err, step)
            print(f"{err}\nrollout engine(s) {restarted} restarted; re-syncing weights (version {self.version}) "
                  f"and retrying", flush=True)
            self.sync_engines(self.version, step, restarted)
            return call()

    def _rollout_pids(self, step: int | str) -> list[int]:
        """Each engine's process id, waiting (up to placement.timeout_s) for restarting ones to come back."""
        rollout, deadline = self.pools["rollout"], time.monotonic() + self.cfg.placement.timeout_s
        while True:
            try:
                return rollout.get(rollout.call(lambda w: w.ping.remote()), "rollout", step,
                                   max(1.0, deadline - time.monotonic()))
            except PhaseError as err:
                if "actor died" not in err.cause or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)  # Ray is restarting it

    def score(self, samples: Samples, metadata: list[dict], step: int | str, with_values: bool = True,
              old: str = "recompute") -> Scored:
        """Reference log-probs, values, rewards and, with old="recompute", old log-probs, all in flight
        at once. old="engine": π_old is the engine's behaviour log-probs (one-step off-policy);
        old="update": none, the update's own forward gives them (`RunConfig.reuses_training_logprobs`)."""
        ref_pool, ref_role, ref_method = self.reference or (None, None, None)
        critic = self.critic if self.critic is not None and with_values else None
        roles = [r for r in (ref_role, "policy" if old == "recompute" else None, "critic" if critic else None) if r]
        plan = self.threads(self.workers(*roles, *([] if self.cfg.light_rewards else ["reward"])))  # light: no torch
        fan = lambda pool, role, method: pool.call_each(  # noqa: E731
            lambda w, job: getattr(w, method).remote(job[0], threads=plan[job[1]]),
            list(zip(_shard_refs(samples, len(pool)), self.workers(role))))
        ref = fan(ref_pool, ref_role, ref_method) if ref_pool is not None else None
        old_refs = fan(self.policy, "policy", "compute_logprobs") if old == "recompute" else None
        crit = fan(critic, "critic", "compute_values") if critic else None
        rew = self._reward_call(samples, metadata, plan.get(("reward", 0)))
        n = samples.batch_size
        old_lp = _cat(self.policy.get(old_refs, "score", step))[:n] if old_refs else None
        if old == "engine":
            if samples.logprobs is None:
                raise PhaseError("score", "rollout", step, "one-step off-policy needs the engine's behaviour "
                                 "log-probs, and the engine returned none")
            old_lp = samples.logprobs
        ref_lp = _cat(ref_pool.get(ref, "score", step))[:n] if ref_pool is not None else None
        values = _cat(critic.get(crit, "score", step))[:n] if crit else None
        r = self._reward_result(rew, step)
        return Scored(old_lp, ref_lp, values, r.scores, r.per_source, r.valid, r.violations)

    def rewards(self, samples: Samples, metadata: list[dict], step: int | str) -> Rewards:
        """Reward scores only."""
        return self._reward_result(self._reward_call(samples, metadata), step)

    def _reward_call(self, samples: Samples, metadata: list[dict], threads: int | None = None) -> list[ray.ObjectRef]:
        return [self.pools["reward"].workers[0].score.remote(ray.put(samples.to_numpy()), metadata, threads=threads)]

    def _reward_result(self, refs: list[ray.ObjectRef], step: int | str) -> Rewards:
        total, per_source, valid, violations = self.pools["reward"].get(refs, "score", step)[0]
        return Rewards(torch.tensor(total), {k: torch.tensor(v) for k, v in per_source.items()},
                       torch.tensor(valid), violations)

    def reward_counters(self, step: int | str) -> dict[str, int]:
        reward = self.pools["reward"]
        return reward.get([reward.workers[0].counters.remote()], "score", step)[0]

    def reference_generate(self, prompts: list[list[int]], params: SamplingParams, seed: int, step: int | str,
                           pad_token_id: int) -> Samples:
        """The reference policy's responses (baseline for win-rate)."""
        ref, role, _ = self.reference
        method = "generate" if role == "reference" else "reference_generate"
        call = getattr(ref.workers[0], method).remote(prompts, params, seed)
        return Samples.from_numpy(ref.get([call], "eval", step)[0])

    def update(self, exp: Experience, step: int, epoch_seed: int, kl_coef: float) -> dict[str, float]:
        """E epochs; each a seeded shuffle into mini-batches, sharded over ranks; policy and critic in parallel."""
        cfg, metrics = self.cfg, {}
        plan = self.threads(self.workers("policy", "critic"))
        for epoch in range(cfg.algo.epochs):
            order = torch.from_numpy(np.random.default_rng([epoch_seed, step, epoch]).permutation(exp.batch_size))
            jobs = []
            for role, pool in (("policy", self.policy), ("critic", self.critic)):
                if pool is None:
                    continue
                shards, scales = plan_update(exp.select(order), cfg.trainer.mini_batch_size, len(pool))
                extra = (kl_coef,) if role == "policy" else ()  # the critic's loss has no KL term
                refs = pool.call_each(lambda w, j: w.train.remote(ray.put(j[0]), scales, *extra, threads=plan[j[1]]),
                                       list(zip(shards, self.workers(role))))
                jobs.append((role, pool, refs))
            for role, pool, refs in jobs:
                ranks = pool.get(refs, "update", step)
                metrics |= {f"{role}/{k}": v for k, v in mean_over_ranks(ranks).items()}
        return metrics

    def sync(self, version: int, step: int | str) -> float:
        """New policy weights → every engine; verified before the next rollout: each engine holds `version`
        and its log-probs of the probe sequence equal the policy's within rollout.sync_probe_tol.
        → the largest probe gap."""
        gap = self._recovering_rollout(lambda: self._sync_once(version, step), step)
        self.version = version
        return gap

    def _sync_once(self, version: int, step: int | str) -> float:
        return self.finish_sync(self.start_sync(version, step), step)

    def start_sync(self, version: int, step: int | str, engines: list[int] | None = None) -> PendingSync:
        """Send `version` to the engines (all, or `engines`) without waiting for them to load it."""
        rollout, probe = self.pools["rollout"], self.probe_ids
        engines = list(range(len(rollout))) if engines is None else engines
        on = lambda fn: {i: fn(rollout.workers[i], i) for i in engines}  # noqa: E731
        mode, weights = self.cfg.rollout.weight_sync, []
        if mode == "cuda_ipc":  # rank r → engine r, on one GPU
            sent = self.policy.get(self.policy.call(lambda w: w.send_cuda_ipc.remote(probe)), "sync", step)
            got = on(lambda w, i: w.receive_cuda_ipc.remote(sent[i][0], version, probe))
            expected = sent[0][1]
        elif mode != "object_store":
            sent = self.policy.call(lambda w: w.send_to_channel.remote(probe))
            got = on(lambda w, i: w.receive_from_channel.remote(version, probe))
            expected = self.policy.get(sent, "sync", step)[0]
        elif self.cfg.adapter_sync:  # the LoRA adapter alone, served by vLLM over the engines' base weights
            weights, config, expected = self.policy.get(self.policy.call(lambda w: w.send_adapter.remote(probe)), "sync", step)[0]
            receive = lambda w: (w.receive_adapter.options(concurrency_group="sync")  # noqa: E731
                                 if self.partial_rollouts else w.receive_adapter)
            got = on(lambda w, i: receive(w).remote(weights, config, version, probe))
        else:
            weights, expected = self.policy.get(self.policy.call(lambda w: w.send_to_object_store.remote(probe)), "sync", step)[0]
            receive = lambda w: (w.receive_from_object_store.options(concurrency_group="sync")  # noqa: E731
                                 if self.partial_rollouts else w.receive_from_object_store)
            got = on(lambda w, i: receive(w).remote(weights, version, probe))
        return PendingSync(version, got, expected, weights)

    def finish_sync(self, pending: PendingSync, step: int | str) -> float:
        """Wait for the engines to load `pending`; each must hold its version and give the policy's probe
        log-probs within rollout.sync_probe_tol. → the largest probe gap."""
        rollout, engines = self.pools["rollout"], list(pending.refs)
        states = rollout.get([pending.refs[i] for i in engines], "sync", step)
        if self.cfg.rollout.weight_sync == "cuda_ipc":
            self.policy.get(self.policy.call(lambda w: w.release_cuda_ipc.remote()), "sync", step)
        gaps = [0.0]
        for i, (held, engine_probe) in zip(engines, states):
            gaps.append(probe_gap(engine_probe, pending.expected))
            if held != pending.version or not gaps[-1] <= self.cfg.probe_tolerance:  # a NaN gap fails too
                raise PhaseError("sync", f"rollout[{i}]", step,
                                 f"engine holds version {held} (expected {pending.version}); its probe log-probs differ "
                                 f"from the policy's by up to {gaps[-1]:.3g} relative (rollout.sync_probe_tol="
                                 f"{self.cfg.probe_tolerance:g})")
        return max(gaps)

    def sync_engines(self, version: int, step: int | str, engines: list[int]) -> float:
        """Put restarted engines back in sync (a new channel first for the collective transports)."""
        if self.cfg.rollout.weight_sync in ("gloo", "nccl"):
            self._join_channel()
            engines = list(range(len(self.pools["rollout"])))  # the channel's broadcast reaches every engine
        return self.finish_sync(self.start_sync(version, step, engines), step)

    def restarted_engines(self, err: PhaseError, step: int | str) -> list[int]:
        """The engines Ray restarted after `err` (their process ids changed); re-raises `err` when it was
        not an engine's death, or none came back."""
        if "actor died" not in err.cause and "Connection closed" not in err.cause:
            raise err  # a hang or a bug: no restart would help
        pids = self._rollout_pids(step)
        restarted = [i for i, (a, b) in enumerate(zip(pids, self.rollout_pids)) if a != b]
        if not restarted:
            raise err
        self.rollout_pids = pids
        return restarted

    def submit_part(self, engine: int, prompts: list[list[int]], params: SamplingParams, seed: int, first_index: int,
                    step: int | str, metadata: list[dict] | None = None) -> ray.ObjectRef:
        """One engine's share of a rollout batch (its prompts are items first_index… of the batch; their
        metadata goes with them for an environment, rollout.env)."""
        busy = self.workers("rollout") + (self.workers("policy", "reference", "critic") if self.asynchronous else [])
        threads = self.threads(busy)[("rollout", engine)]
        return self.pools["rollout"].workers[engine].generate_stamped.remote(prompts, params, seed, first_index,
                                                                             metadata, threads=threads)

    def sleep_engines(self, step: int | str) -> None:
        """GPU vLLM with rollout.vllm.enable_sleep: free the engines' memory for the update (woken by the sync)."""
        if self.cfg.rollout.vllm.enable_sleep and self.cfg.rollout_backend == "vllm":
            rollout = self.pools["rollout"]
            rollout.get(rollout.call(lambda w: w.sleep.remote()), "update", step)

    def export(self, out_dir: str) -> dict[str, str]:
        out = {"policy": f"{out_dir}/policy"}
        refs = self.policy.call(lambda w: w.export.remote(out["policy"]))
        if self.critic is not None:
            out["critic"] = f"{out_dir}/critic"
            self.critic.get(self.critic.call(lambda w: w.export.remote(out["critic"])), "export", "final")
        self.policy.get(refs, "export", "final")
        return out

    def shutdown(self) -> None:
        for pool in self.pools.values():
            if isinstance(pool, LocalPool):
                pool.shutdown()
                continue
            for w in pool.workers:
                ray.kill(w)
        for pg in self._placement_groups.values():
            ray.util.remove_placement_group(pg)
        delete_served_rewards(self.served)


def probe_gap(engine: np.ndarray, policy: np.ndarray) -> float:
    """Largest |engine − policy| / max(1, |policy|) over the probe's log-probs: relative for large-magnitude
    log-probs, whose float rounding grows with them (a sharp policy's unlikely tokens reach −20 and more),
    absolute near 0. NaN anywhere gives NaN (which fails every tolerance)."""
    policy = np.asarray(policy, dtype=np.float64)
    return float((np.abs(np.asarray(engine, dtype=np.float64) - policy) / np.maximum(1.0, np.abs(policy))).max())


def _spec(role: str, res, n: int, threads: int | None) -> RoleSpec:
    return role_spec(role, res, n, threads)


def _reserve_all(specs: dict[str, RoleSpec], colocate: list[list[str]], timeout: float) -> dict[str, tuple]:
    """A placement group per role or colocated group; on failure the ones already granted are released."""
    out: dict[str, tuple] = {}
    try:
        for group in colocate:
            members = [specs[r] for r in group if r in specs]
            if members:
                pg = reserve(members, timeout)
                out |= {s.role: (pg, 1.0 / len(members)) for s in members}
        for role, spec in specs.items():
            if role not in out:
                out[role] = (reserve([spec], timeout), 1.0)
    except BaseException:
        for pg in {id(pg): pg for pg, _ in out.values()}.values():
            ray.util.remove_placement_group(pg)
        raise
    return out


def _shard_refs(samples: Samples, n: int) -> list[ray.ObjectRef]:
    """Equal row shards (the last rows repeated to fill: ZeRO-3 forwards are collective), one put each."""
    rows = np.arange(samples.batch_size)
    per = -(-len(rows) // n)
    padded = np.concatenate([rows, np.full(per * n - len(rows), rows[-1])])
    return [ray.put(samples.select(torch.from_numpy(padded[i * per:(i + 1) * per])).to_numpy()) for i in range(n)]


def _cat(parts: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.concatenate(parts))



# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


class PPOTrainer:
    """Owns the loop, the data iterator, the KL controller and the metrics; never a model."""

    def __init__(self, cfg: RunConfig, inputs: RunInputs):
        from rlhf_ray.models import load_tokenizer

        self.cfg, self.inputs = cfg, inputs
        self.tokenizer = load_tokenizer(inputs.models.tokenizer, cfg.model.trust_remote_code)
        self.train_prompts = self._load(inputs.train, cfg.data.split)
        self.eval_prompts = self._load(inputs.eval, cfg.data.eval_split)[: cfg.trainer.eval_prompts] if inputs.eval else []
        self.iterator = BatchIterator(len(self.train_prompts), cfg.trainer.prompts_per_step, seed=cfg.trainer.seed)
        k = cfg.algo.kl
        self.kl_ctl = AdaptiveKLController(k.coef, k.target, k.horizon) if k.adaptive else FixedKLController(k.coef)
        self.moments = RunningMoments()
        self.violations: Counter = Counter()  # reward-contract violations by kind, over the run
        self.version, self.skipped_in_a_row, self.first_eval = 0, 0, {}
        self.watched: list[tuple[int, float, float]] = []  # (step, proxy, gold) fed to the over-optimisation watch
        self.watch = self._new_watch()
        self.reference_samples: Samples | None = None  # win-rate baseline, computed at the first evaluation
        print(f"rollout: {cfg.rollout.num_engines} {cfg.rollout_backend} engine(s)", flush=True)
        self.roles = Roles(cfg, inputs.models, inputs.reward_paths, probe_tokens(len(self.tokenizer), probe_length(cfg)))
        self.queue = RolloutQueue(self.roles, cfg.algo.max_staleness, lambda: self.sampling(logprobs=self._engine_logprobs),
                                  lambda idx: [self.train_prompts[i].prompt_ids for i in idx], self.iterator.next_indices,
                                  self._seed, self.tokenizer.pad_token_id,
                                  (lambda idx: [self.train_prompts[i].metadata for i in idx]) if cfg.rollout.env else None)
        try:
            trained = {"policy": self.roles.policy} | ({"critic": self.roles.critic} if self.roles.critic else {})
            self.checkpoints = RunCheckpoints(cfg, trained)
            self.start_step = self._resume()
        except BaseException:
            self.roles.shutdown()
            raise
        self.logger = MetricsLogger(cfg.run_dir, cfg.logging, cfg.trainer.total_steps, cfg.model_dump(mode="json"),
                                    resume_step=self.start_step - 1)

    def _load(self, source: str, split: str) -> list[PromptExample]:
        d = self.cfg.data
        examples, report = load_prompts(source, self.tokenizer, keys=data_keys(self.cfg), max_prompt_len=d.max_prompt_len,
                                        overlength=d.overlength, on_bad_row=d.on_bad_row, split=split)
        if report.dropped:
            print(report, flush=True)
        return examples

    def sampling(self, greedy: bool = False, n: int | None = None, logprobs: bool = False) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              n=n or r.samples_per_prompt, greedy=greedy, suppress_special_tokens=r.suppress_special_tokens,
                              logprobs=logprobs)

    @property
    def old_logprobs(self) -> str:
        """Where π_old comes from (`Roles.score`'s `old`)."""
        if self.cfg.algo.max_staleness:
            return "engine" if self.cfg.algo.off_policy_objective == "behaviour" else "recompute"
        return "update" if self.cfg.reuses_training_logprobs else "recompute"

    def train_step(self, step: int) -> dict[str, float]:
        timer, t0 = Timer(), time.perf_counter()
        samples, scored, metrics = self.collect(step, timer)
        with timer.phase("advantages"):
            scores = shape_scores(scored.scores, samples.stopped, samples.response_lengths, self.cfg, self.moments)
            exp, exp_metrics = make_experience(samples, scored, scores, self.cfg, self.kl_ctl.value)
            metrics |= exp_metrics
            bad = nonfinite_counts({"scores": scores, "old_logprobs": scored.old_logprobs,
                                    "ref_logprobs": scored.ref_logprobs, "values": scored.values,
                                    "advantages": exp.advantages, "returns": exp.returns}, samples.response_mask)
        if bad:
            print(f"step {step}: non-finite values, first in {next(iter(bad))} ({bad}); update skipped", flush=True)
            metrics |= {f"numerics/nonfinite_{k}": v for k, v in bad.items()}
        else:
            with timer.phase("update"):
                self.roles.sleep_engines(step)
                metrics |= self.roles.update(exp, step, self.cfg.trainer.seed, self.kl_ctl.value)
        skipped = bool(bad) or metrics.get("policy/skipped", 0) > 0 or metrics.get("critic/skipped", 0) > 0
        metrics["numerics/skipped_step"] = float(skipped)
        self._count_skip(step, skipped)
        if "kl/ref" not in metrics and "policy/kl_ref" in metrics:  # π_old came from the update's forward
            metrics["kl/ref"] = metrics["policy/kl_ref"]
        if "rollout/logprob_diff_mean" not in metrics and "policy/logprob_diff_mean" in metrics:  # likewise
            metrics["rollout/logprob_diff_mean"] = metrics["policy/logprob_diff_mean"]
        with timer.phase("sync"):
            if not bad:
                self.version += 1
                self.queue.sync(self.version, step)
            if (gap := self.queue.pop_gap()) is not None:  # asynchronous: the syncs verified during this step
                metrics["sync/probe_gap"] = gap
        metrics |= {f"reward/{k}": v for k, v in self.roles.reward_counters(step).items()}
        metrics["kl/coef"] = self.kl_ctl.value
        if not bad and "kl/ref" in metrics:  # absent without a reference (β = 0: nothing to adapt)
            self.kl_ctl.update(metrics["kl/ref"], samples.batch_size)
        metrics["sync/version"] = self.version
        return metrics | _throughput(samples, timer, time.perf_counter() - t0)

    def _count_skip(self, step: int, skipped: bool) -> None:
        """Consecutive skipped updates; past trainer.max_skipped_steps the run stops (no checkpoint is
        written after the last good one)."""
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        limit = self.cfg.trainer.max_skipped_steps
        if self.skipped_in_a_row >= limit:
            raise PhaseError("update", "policy", step, f"{limit} consecutive updates skipped for non-finite values "
                             f"(trainer.max_skipped_steps={limit})", restartable=False)

    def collect(self, step: int, timer: Timer) -> tuple[Samples, Scored, dict[str, float]]:
        """Take the next rollout batch and score it, leaving out prompt groups generated by a policy older
        than algo.max_staleness (counted). With dynamic sampling (DAPO) keep only groups whose scores
        differ, taking further batches for up to `algo.max_refills` extra rounds, then top up from the
        dropped groups so the batch keeps its size."""
        algo, n, want = self.cfg.algo, self.cfg.rollout.samples_per_prompt, self.cfg.trainer.prompts_per_step
        kept, dropped, metrics = [], [], {}
        generate_s = 0.0  # the engines' own generation time of the batches taken
        last = None if algo.dynamic_sampling else self.cfg.trainer.total_steps  # no batch past the last step's
        for round_ in range(1 + algo.max_refills):
            with timer.phase("prompts"):  # draw and submit the batches the queue is short of
                self.queue.fill(step, last)
            with timer.phase("rollout"):
                batch, samples = self.queue.take(step, last)
                generate_s += batch.generate_s
                metadata = [self.train_prompts[i].metadata for i in batch.indices for _ in range(n)]
                samples, metadata = self._fresh(samples, metadata)
            if not samples.batch_size:
                continue
            with timer.phase("score"):
                scored = self.roles.score(samples, metadata, step, old=self.old_logprobs)
                metrics |= self._reward_contract(scored, step) | _mismatch(samples, scored)
            if round_ == 0:
                metrics |= group_stats(scored.scores, n) if n > 1 else {}
            keep = informative_groups(scored.scores, n) if algo.dynamic_sampling else torch.ones(samples.batch_size // n, dtype=torch.bool)
            for mask, parts in ((keep, kept), (~keep, dropped)):
                rows = group_rows(torch.nonzero(mask).flatten(), n)
                parts.append((samples.select(rows), scored.select(rows)))
            if sum(s.batch_size for s, _ in kept) >= want * n:
                break
            if not algo.dynamic_sampling and last is not None:
                last += 1  # stale groups were dropped: one batch more
        if algo.dynamic_sampling:
            metrics["dynamic/rounds"] = round_ + 1
            metrics["dynamic/kept_groups"] = sum(s.batch_size for s, _ in kept) // n
        parts = [p for p in kept + dropped if p[0].batch_size]
        if sum(s.batch_size for s, _ in parts) < want * n:
            raise PhaseError("rollout", "driver", step, f"only {sum(s.batch_size for s, _ in parts) // n} of {want} prompt "
                             f"groups were fresh enough after {round_ + 1} batches (algo.max_staleness="
                             f"{algo.max_staleness}, {self.queue.stale_dropped} samples dropped as stale)", restartable=False)
        samples = concat_samples([s for s, _ in parts], self.tokenizer.pad_token_id).select(slice(0, want * n))
        metrics |= self.queue.metrics(samples, self.version, generate_s)  # staleness against the version updated
        return samples, concat_scored([c for _, c in parts]).select(torch.arange(want * n)), metrics

    def _fresh(self, samples: Samples, metadata: list[dict]) -> tuple[Samples, list[dict]]:
        """The prompt groups every token of which a policy no older than current − max_staleness produced."""
        n = self.cfg.rollout.samples_per_prompt
        fresh = fresh_rows(samples.versions, self.version, self.cfg.algo.max_staleness, n)
        if bool(fresh.all()):
            return samples, metadata
        self.queue.stale_dropped += int((~fresh).sum())
        rows = torch.nonzero(fresh).flatten()
        return samples.select(rows), [metadata[i] for i in rows.tolist()]

    @property
    def _engine_logprobs(self) -> bool:
        """Ask the engines for behaviour log-probs where they are used: π_old (off-policy), μ of a rollout
        correction, the mismatch metric against π_old; and always from vLLM, where they cost almost nothing."""
        a = self.cfg.algo
        return self.old_logprobs != "update" or a.rollout_correction != "none" or self.cfg.rollout_backend == "vllm"

    def _reward_contract(self, scored: Scored, step: int) -> dict[str, float]:
        """Count violations; fail the step past reward.max_masked_frac; give masked samples their group's
        mean valid score (they are left out of the loss in make_experience)."""
        invalid = int((~scored.valid).sum())
        self.violations.update(scored.violations)
        if invalid > self.cfg.reward.max_masked_frac * scored.valid.numel():
            raise PhaseError("score", "reward", step,
                             f"{invalid} of {scored.valid.numel()} samples violate the reward contract "
                             f"({dict(scored.violations)}), more than reward.max_masked_frac={self.cfg.reward.max_masked_frac}")
        if invalid:
            scored.scores = fill_invalid(scored.scores, scored.valid, self.cfg.rollout.samples_per_prompt)
        return {"reward/masked_frac": invalid / scored.valid.numel(),
                **{f"reward/violations/{k}": v for k, v in self.violations.items()}}

    def evaluate(self, step: int | str) -> dict[str, float]:
        """Held-out prompts: reward per source, KL to the reference, length; pass@k and win-rate against
        the reference policy when configured (ALGORITHMS.md §9). Fixed seed, so evaluations compare."""
        if not self.eval_prompts:
            return {}
        t, tag = self.cfg.trainer, f"eval@{step}"
        self.queue.verify_syncs(tag)  # the engines hold the weights evaluated
        prompts = [e.prompt_ids for e in self.eval_prompts]
        params = self.sampling(greedy=t.eval_greedy, n=t.eval_samples)
        seed = self.cfg.rollout.seed + 10**6
        episodes = [e.metadata for e in self.eval_prompts] if self.cfg.rollout.env else None  # multi-turn
        samples = self.roles.generate(prompts, params, seed, tag, self.tokenizer.pad_token_id, episodes)
        metadata = [e.metadata for e in self.eval_prompts for _ in range(t.eval_samples)]
        scored = self.roles.score(samples, metadata, tag, with_values=False)
        mask = samples.response_mask.float()
        out = {
            "eval/reward_mean": scored.scores[scored.valid].mean().item(),
            "eval/length_mean": mask.sum(-1).mean().item(),
        }
        if scored.ref_logprobs is not None:
            out["eval/kl_ref"] = ((scored.old_logprobs - scored.ref_logprobs) * mask).sum(-1).mean().item()
        out |= {f"eval/{k}_mean": v.mean().item() for k, v in scored.per_source.items()}
        out |= {f"eval/pass@{k}": mean_pass_at_k(scored.scores, t.eval_samples, k, t.eval_pass_threshold)
                for k in t.eval_pass_k}
        if t.eval_win_rate:
            first = torch.arange(0, samples.batch_size, t.eval_samples)  # one policy response per prompt
            reference = self._reference_responses(prompts, replace(params, n=1), seed, tag)
            ref_scores = self.roles.rewards(reference, metadata[:: t.eval_samples], tag).scores
            out["eval/win_rate"] = win_rate(scored.scores[first], ref_scores)
        return out

    def _reference_responses(self, prompts: list[list[int]], params: SamplingParams, seed: int, tag: str) -> Samples:
        """The reference policy's responses to the eval prompts, the win-rate baseline. Prompts and seed are
        fixed, so they are computed once: by the rollout engines while they still hold the initial policy
        (version 0) when that is the reference, else by the reference's own generator."""
        if self.reference_samples is None:
            pad, m = self.tokenizer.pad_token_id, self.inputs.models
            if self.version == 0 and m.reference == m.policy:
                self.reference_samples = self.roles.generate(prompts, params, seed, tag, pad)
            else:
                self.reference_samples = self.roles.reference_generate(prompts, params, seed, tag, pad)
        return self.reference_samples

    def _seed(self, step: int) -> int:
        return self.cfg.rollout.seed * 1_000_003 + step

    def fit(self) -> dict[str, float]:
        t = self.cfg.trainer
        if self.start_step == 1:
            self.first_eval = self.evaluate(0)
            self._watch(0, dict(self.first_eval))
        last: dict[str, float] = self.logger.history[-1] if self.logger.history else {}
        final_step, overoptimised = t.total_steps, False  # trainer.overoptimisation may stop the run early
        for step in range(self.start_step, t.total_steps + 1):
            metrics = self.train_step(step)
            if t.eval_every and step % t.eval_every == 0 and step != t.total_steps:
                metrics |= self.evaluate(step)
                overoptimised = self._watch(step, metrics)
            self.logger.log(step, metrics)
            last = metrics
            if self.checkpoints.due(step) or stop_requested() or overoptimised:
                saved = self.checkpoints.save(step, self.state_dict(step), self.queue.tensors())
                if stop_requested():
                    raise StopRequested(step, saved)
            if overoptimised:  # trainer.overoptimisation.action=stop
                final_step = step
                break
        final_eval = ({k: v for k, v in last.items() if k.startswith("eval/")} if overoptimised  # just evaluated
                      else self.evaluate(final_step))
        exported = self.roles.export(str(self.cfg.run_dir / "export")) if self.cfg.checkpoint.export_hf else {}
        return self._summarise(self.first_eval, final_eval, last, exported)

    def state_dict(self, step: int) -> dict:
        """Everything of the driver a resumed run needs to continue exactly (models are saved by their ranks)."""
        return {"step": step, "version": self.version, "iterator": self.iterator.state_dict(),
                "kl_ctl": self.kl_ctl.state_dict(), "moments": vars(self.moments), "violations": dict(self.violations),
                "skipped_in_a_row": self.skipped_in_a_row, "first_eval": self.first_eval, "watched": self.watched,
                "rollout_queue": self.queue.state_dict(step)}

    def _resume(self) -> int:
        """Load the checkpoint `checkpoint.resume` selects and put the engines in sync; → the first step to run."""
        restored = self.checkpoints.restore()
        if restored is None:
            return 1
        state, tensors = restored
        self.iterator.load_state_dict(state["iterator"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        vars(self.moments).update(state["moments"])
        self.violations = Counter(state["violations"])
        self.skipped_in_a_row, self.first_eval = state["skipped_in_a_row"], state["first_eval"]
        self.watch = self._new_watch()
        for step, proxy, gold in state.get("watched", []):  # replayed: the same state as the uninterrupted run
            self._feed_watch(step, proxy, gold)
        self.version = state["version"]
        self.roles.sync(self.version, "resume")
        self.queue.load_state_dict(state["rollout_queue"], tensors)
        return state["step"] + 1

    def _summarise(self, first: dict, final: dict, last: dict, exported: dict) -> dict[str, float]:
        first_train = self.logger.history[0] if self.logger.history else {}
        rows = [("train reward, first step", first_train.get("reward/score_mean")),
                ("train reward, last step", last.get("reward/score_mean")),
                ("eval reward, before", first.get("eval/reward_mean")),
                ("eval reward, after", final.get("eval/reward_mean")),
                ("eval KL to reference, after", final.get("eval/kl_ref")),
                ("eval response length, after", final.get("eval/length_mean")),
                *[(f"eval {k.removeprefix('eval/')}, after", v) for k, v in final.items()
                  if k.startswith(("eval/pass@", "eval/win_rate"))],
                ("median step time (s)", float(np.median([h["time/step"] for h in self.logger.history]))),
                *self._watch_rows(),
                *self._async_rows(),
                ("run directory", str(self.cfg.run_dir))]
        rows += [(f"exported {k}", v) for k, v in exported.items()]
        self.logger.close()  # the progress bar ends before the table
        print(summary_table([(k, v) for k, v in rows if v is not None],
                            title=f"== RL summary ({self.cfg.algo.advantage}) =="), flush=True)
        return {"eval_before": first.get("eval/reward_mean"), "eval_after": final.get("eval/reward_mean"),
                "first_reward": first_train.get("reward/score_mean"), "last_reward": last.get("reward/score_mean"),
                **{f"export_{k}": v for k, v in exported.items()},
                "overoptimisation": self.watch.reason if self.watch is not None else "",
                "gold_best_step": self.watch.best_step if self.watch is not None else None,
                "eval_first": first, "eval_final": final}  # every eval metric, for the pipeline's summary

    def _new_watch(self):
        from rlhf_ray.eval_metrics import OverOptimisationWatch

        w = self.cfg.trainer.overoptimisation
        self.watched = []
        return OverOptimisationWatch(w.patience, w.min_delta) if w.gold else None

    def _feed_watch(self, step: int, proxy: float, gold: float) -> bool:
        self.watched.append((step, proxy, gold))
        return self.watch.update(step, proxy, gold)

    def _watch(self, step: int, metrics: dict[str, float]) -> bool:
        """Feed the over-optimisation watch one evaluation (adds its metrics); → whether the run stops here."""
        w = self.cfg.trainer.overoptimisation
        if self.watch is None or not metrics:
            return False
        was = self.watch.triggered
        proxy = metrics["eval/reward_mean"] if w.proxy == "reward" else metrics[f"eval/{w.proxy}_mean"]
        fired = self._feed_watch(step, proxy, metrics[f"eval/{w.gold}_mean"])
        metrics |= {"overopt/gold_best": self.watch.best_gold, "overopt/gold_best_step": float(self.watch.best_step),
                    "overopt/triggered": float(fired)}
        if fired and not was:
            print(f"over-optimisation at step {step}: {self.watch.reason}"
                  f"{'; stopping' if w.action == 'stop' else ''}", flush=True)
        return fired and w.action == "stop"

    def _watch_rows(self) -> list[tuple[str, Any]]:
        if self.watch is None:
            return []
        w = self.cfg.trainer.overoptimisation
        rows = [(f"gold reward ({w.gold}), best", self.watch.best_gold), ("gold reward, best at step", self.watch.best_step)]
        if self.watch.triggered:
            rows.append(("over-optimisation", f"{'stopped' if w.action == 'stop' else 'warned'}: {self.watch.reason}"))
        return rows

    def _async_rows(self) -> list[tuple[str, float]]:
        """Asynchronous RL at a glance: how stale the trained samples were and who waited for whom."""
        h = self.logger.history
        if not self.cfg.algo.max_staleness or not h:
            return []
        mean = lambda key: float(np.mean([m[key] for m in h if key in m]))  # noqa: E731
        return [(f"staleness mean / max (k={self.cfg.algo.max_staleness})",
                 f"{mean('rollout/version_lag_mean'):.2f} / {max(m['rollout/version_lag'] for m in h):g}"),
                ("samples dropped as stale", self.queue.stale_dropped),
                ("trainer idle share (waiting for rollouts)", mean("perf/trainer_idle_share")),
                ("engine idle share", h[-1].get("perf/engine_idle_share"))]

    def close(self) -> None:
        self.roles.shutdown()


def _mismatch(samples: Samples, scored: Scored) -> dict[str, float]:
    """How far the engine's behaviour log-probs are from π_old recomputed by the trainer with the
    same weights (numerics only: kernels, batch shapes, KV cache); only when both exist."""
    if samples.logprobs is None or scored.old_logprobs is None or scored.old_logprobs is samples.logprobs:
        return {}
    diff = (samples.logprobs - scored.old_logprobs).abs()[samples.response_mask.bool()]
    return {"rollout/logprob_diff_mean": diff.mean().item(), "rollout/logprob_diff_max": diff.max().item()}


def _throughput(samples: Samples, timer: Timer, step_s: float) -> dict[str, float]:
    tokens = float(samples.attention_mask.sum())
    return timer.times | {"time/step": step_s, "perf/tokens_per_s": tokens / step_s,
                          "perf/trainer_idle_share": timer.times["time/rollout"] / step_s}


def run_ppo(cfg: RunConfig) -> dict[str, float]:
    """Build inputs, start the roles, train, evaluate, export; always release the actors; restart from
    the latest checkpoint after a training rank fails (trainer.max_restarts)."""
    inputs = prepare_run(cfg)

    def once(run_cfg: RunConfig) -> dict[str, float]:
        trainer = PPOTrainer(run_cfg, inputs)
        try:
            return trainer.fit()
        finally:
            trainer.close()

    return with_restarts(cfg, once, {"policy", "critic"})
