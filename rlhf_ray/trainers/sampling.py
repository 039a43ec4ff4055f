"""What the data-making stages run on (cai, label, and the iterate loop's evaluations): a policy on
`rollout.num_engines` rollout engines, and where asked one reward-side actor — a `LabelWorker`
(the preference labeller, plus reward.sources when evaluating) or a `RewardWorker` (evaluation
only) — each a `WorkerPool` with deadlines, started together and released together.

Generation is token-in/token-out (`RolloutWorker` → the configured `RolloutEngine`): prompts go in as token
ids, split over the engines, each part seeded from the call's seed and its first row, so a call's
result does not depend on how many engines there are or whether a restarted engine re-ran it.
The driver decodes responses (special tokens skipped) only to write text datasets and to label.
Evaluation: held-out prompts, sampled as `trainer.eval_greedy` / `trainer.eval_samples` say with a
fixed seed (evaluations of different policies compare), scored by `reward.sources` in a
`RewardWorker`: eval/reward_mean, eval/<source>_mean, eval/length_mean.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import ray
from transformers import PreTrainedTokenizerBase

from rlhf_ray.batch import Samples, concat_samples
from rlhf_ray.config import TOY, RunConfig
from rlhf_ray.data import PromptExample, load_prompts, render_messages
from rlhf_ray.placement import RoleSpec, WorkerPool, reserve, role_spec
from rlhf_ray.rewards.labeling import PairJudgement
from rlhf_ray.rollout.base import SamplingParams
from rlhf_ray.trainers.common import data_keys, delete_served_rewards, start_served_rewards, toy_model
from rlhf_ray.workers import LabelWorker, ModelPaths, RewardWorker, RolloutWorker

EVAL_SEED_OFFSET = 10**6  # as the RL trainer's evaluation: the same seed for every evaluated policy


class SamplingSession:
    """The policy's engines (+ the labeller and/or the eval scorer); `close()` releases every actor."""

    def __init__(self, cfg: RunConfig, models: ModelPaths, *, labeler: bool = False, labeler_path: str | None = None,
                 reward_paths: list[str | None] | None = None):
        self.cfg, p = cfg, cfg.placement
        self._pgs, self.pools = [], {}
        self.served = start_served_rewards(cfg, reward_paths, p.timeout_s) if reward_paths is not None else []
        try:
            self.pools["rollout"] = self._group(role_spec("rollout", p.rollout, cfg.rollout.num_engines, p.torch_threads),
                                                 RolloutWorker, lambda r: (cfg, models, r))
            if labeler:  # one actor labels and, with reward_paths, scores the evaluation
                self.pools["reward"] = self._group(self._reward_spec(), LabelWorker,
                                                    lambda r: (cfg, models, labeler_path, reward_paths))
            elif reward_paths is not None:
                self.pools["reward"] = self._group(self._reward_spec(), RewardWorker,
                                                    lambda r: (cfg, models, reward_paths))
            pending = [(g, g.call(lambda w: w.ping.remote())) for g in self.pools.values()]
            for pool, refs in pending:
                pool.get(refs, "start", "init", p.timeout_s)
        except BaseException:
            self.close()
            raise

    def _reward_spec(self) -> RoleSpec:
        return role_spec("reward", self.cfg.placement.reward, 1, self.cfg.placement.torch_threads)

    def _group(self, spec: RoleSpec, cls: type, make_args) -> WorkerPool:
        """Stateless actors: a dead one is restarted (weights from its path) and its call retried."""
        pg = reserve([spec], self.cfg.placement.timeout_s)
        self._pgs.append(pg)
        restarts = self.cfg.placement.max_restarts
        return WorkerPool(spec, cls, pg, 1.0, make_args, self.cfg.trainer.timeout_s, restarts, -1 if restarts else 0)

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int, phase: str,
                 pad_token_id: int) -> Samples:
        """`params.n` samples per prompt, rows [i·n, (i+1)·n) from prompt i."""
        engines = self.pools["rollout"]
        chunks = [c for c in np.array_split(np.arange(len(prompts)), len(engines)) if len(c)]
        refs = [engines.workers[e].generate.remote([prompts[i] for i in c], params, seed, int(c[0]))
                for e, c in enumerate(chunks)]
        return concat_samples([Samples.from_numpy(p) for p in engines.get(refs, phase, phase)], pad_token_id)

    def probe_logprobs(self, probe_ids: list[int]) -> list[float]:
        """Each engine's summed log-probs of the probe sequence: which policy the samples came from."""
        engines = self.pools["rollout"]
        states = engines.get(engines.call(lambda w: w.weight_state.remote(probe_ids)), "start", "init")
        return [float(np.sum(probe)) for _, probe in states]

    def label(self, prompts: list[str], responses_a: list[str], responses_b: list[str],
              metadata_a: list[dict], metadata_b: list[dict]) -> list[PairJudgement]:
        pool = self.pools["reward"]
        ref = pool.workers[0].label.remote(prompts, responses_a, responses_b, metadata_a, metadata_b)
        return pool.get([ref], "label", "label")[0]

    def evaluate(self, examples: list[PromptExample], pad_token_id: int) -> dict[str, float]:
        """The policy on held-out prompts, scored by reward.sources (invalid scores left out of the means)."""
        t, r = self.cfg.trainer, self.cfg.rollout
        params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                n=t.eval_samples, greedy=t.eval_greedy)
        samples = self.generate([e.prompt_ids for e in examples], params, r.seed + EVAL_SEED_OFFSET, "eval", pad_token_id)
        metadata = [e.metadata for e in examples for _ in range(t.eval_samples)]
        scorer = self.pools["reward"]
        total, per_source, valid, _ = scorer.get([scorer.workers[0].score.remote(samples.to_numpy(), metadata)],
                                                 "eval", "eval")[0]
        out = {"eval/reward_mean": float(np.mean(total[valid])) if valid.any() else float("nan")}
        out |= {f"eval/{name}_mean": float(np.mean(v[valid])) for name, v in per_source.items() if valid.any()}
        return out | {"eval/length_mean": float(samples.response_mask.sum(-1).float().mean())}

    def close(self) -> None:
        for pool in self.pools.values():
            for worker in pool.workers:
                ray.kill(worker)
        for pg in self._pgs:
            ray.util.remove_placement_group(pg)
        delete_served_rewards(self.served)
        self.pools, self._pgs, self.served = {}, [], []


# ---------------------------------------------------------------------------------------------
# Helpers of the data-making stages
# ---------------------------------------------------------------------------------------------


def sampling_params(cfg: RunConfig, n: int = 1, max_new_tokens: int | None = None) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(max_new_tokens=max_new_tokens or r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                          top_k=r.top_k, n=n, suppress_special_tokens=r.suppress_special_tokens)


def load_prompt_examples(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, source: str | None,
                         split: str) -> list[PromptExample]:
    if source is None:
        return []
    d = cfg.data
    examples, report = load_prompts(source, tokenizer, keys=data_keys(cfg), max_prompt_len=d.max_prompt_len,
                                    overlength=d.overlength, on_bad_row=d.on_bad_row, split=split)
    if report.dropped or report.truncated:
        print(report, flush=True)
    return examples


def draw(examples: list, count: int, seed: int) -> list:
    """`count` examples (all when there are fewer) in a seeded random order."""
    order = np.random.default_rng(seed).permutation(len(examples))[:count]
    return [examples[i] for i in order]


def decode_responses(tokenizer: PreTrainedTokenizerBase, samples: Samples) -> list[str]:
    return [tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            for ids, mask in zip(samples.response_ids, samples.response_mask)]


def prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: Any) -> str:
    """A row's prompt as the model reads it: a string as-is, chat messages rendered (for a judge or an RM)."""
    return prompt if isinstance(prompt, str) else render_messages(tokenizer, prompt)


def labeler_path(cfg: RunConfig) -> str | None:
    """`label.labeler.path` with 'toy' built: the toy policy for a judge, the toy reward model for kind=model."""
    labeler = cfg.label.labeler
    if labeler.path == TOY and labeler.kind in ("judge", "model"):
        return toy_model(cfg, "policy" if labeler.kind == "judge" else "reward")
    return labeler.path


def generation_seed(cfg: RunConfig, *parts: int) -> int:
    """A sampling seed from rollout.seed, trainer.seed (the iterate loop shifts it per round) and the call."""
    return int(np.random.default_rng([cfg.rollout.seed, cfg.trainer.seed, *parts]).integers(2**31))


def with_policy(models: ModelPaths, policy: str) -> ModelPaths:
    return dataclasses.replace(models, policy=policy)
