"""Multi-turn rollouts: the policy's turn, the environment's reply appended as tokens, repeated until
the environment says done, `max_turns` or the trajectory's token budget.

Token-in/token-out across turns: each turn continues from the context's token ids plus every token
so far; the policy's tokens are the ids the engine sampled, never decoded and re-encoded (re-tokenising
chat text between turns can change ids and would break the log-prob ratio). Only the environment's
replies are encoded, once each. In the resulting `Samples` the response block holds the whole
trajectory after the prompt: `response_mask` marks the policy's tokens (trained, each with its
behaviour log-prob), `observation_mask` the environment's (attended, never trained, log-prob 0), and
`env_rewards` carries each turn's reward at that turn's last policy token (the final outcome at the
last). The environment's first observation (`reset`) joins the prompt block.

Every turn runs the trajectories still going as one engine call, and their environment steps run
concurrently on a thread pool (a tool call waiting on its sandbox does not hold up the others).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from rlhf_ray.batch import Samples
from rlhf_ray.rollout.base import RolloutEngine, SamplingParams, left_pad
from rlhf_ray.rollout.partial import segment_seed

if TYPE_CHECKING:
    from rlhf_ray.envs.base import Environment


@dataclass
class Trajectory:
    """One episode so far: the context (prompt + first observation) and every token after it."""

    env: Environment
    context: list[int]
    tokens: list[int] = field(default_factory=list)
    is_policy: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    turns: int = 0
    turn_start: int = 0  # where the policy's latest turn begins in `tokens`
    done: bool = False
    ended_by_env: bool = False  # the environment ended it (not max_turns or the token budget)
    infos: list[dict] = field(default_factory=list)

    def add(self, ids: list[int], policy: bool, logprobs: list[float] | None = None) -> None:
        self.tokens += ids
        self.is_policy += [policy] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)
        self.rewards += [0.0] * len(ids)


def run_episodes(engine: RolloutEngine, tokenizer: Any, prompts: list[list[int]], metadata: list[dict],
                 make_env: Callable[[], Environment], params: SamplingParams, seed: int, first_index: int,
                 max_turns: int, max_tokens: int, threads: int = 8) -> tuple[Samples, list[list[dict]]]:
    """`params.n` episodes per prompt (rows [i·n, (i+1)·n) from prompt i), each with its own environment;
    `params.max_new_tokens` caps one turn, `max_tokens` the policy and environment tokens of a trajectory.
    → (Samples as the module docstring describes, each trajectory's `info` dicts per turn)."""
    trajectories = [_start(make_env(), tokenizer, prompt, meta)
                    for prompt, meta in zip(prompts, metadata) for _ in range(params.n)]
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(trajectories)))) as pool:
        turn = 0
        while active := [t for t in trajectories if not t.done]:
            _policy_turn(engine, active, params, segment_seed(seed, turn), first_index * params.n, max_tokens)
            results = list(pool.map(lambda t: t.env.step(_decode(tokenizer, t)), active))
            for trajectory, result in zip(active, results):
                _environment_turn(trajectory, result, tokenizer, max_turns, max_tokens)
            turn += 1
    return _to_samples(trajectories, tokenizer.pad_token_id, params), [t.infos for t in trajectories]


def _start(env: Environment, tokenizer: Any, prompt: list[int], metadata: dict) -> Trajectory:
    first = env.reset(tokenizer.decode(prompt, skip_special_tokens=True), metadata)
    return Trajectory(env, list(prompt) + _encode(tokenizer, first))


def _policy_turn(engine: RolloutEngine, active: list[Trajectory], params: SamplingParams, seed: int,
                 first_index: int, max_tokens: int) -> None:
    """One engine call continues every active trajectory by one policy turn (up to EOS or the turn's limit)."""
    room = min(max_tokens - len(t.tokens) for t in active)
    out = engine.generate([t.context + t.tokens for t in active],
                          replace(params, n=1, max_new_tokens=max(1, min(params.max_new_tokens, room))),
                          seed, first_index)
    lengths = out.response_mask.sum(-1).tolist()
    for row, (trajectory, length) in enumerate(zip(active, lengths)):
        length = min(length, max_tokens - len(trajectory.tokens))
        logprobs = out.logprobs[row, :length].tolist() if out.logprobs is not None else None
        trajectory.add(out.response_ids[row, :length].tolist(), policy=True, logprobs=logprobs)
        trajectory.turns += 1
        trajectory.turn_start = len(trajectory.tokens) - length


def _environment_turn(trajectory: Trajectory, result, tokenizer: Any, max_turns: int, max_tokens: int) -> None:
    """The environment's reply to the turn just taken: its reward on the turn's last policy token, then
    (unless the episode ends) its observation as tokens."""
    trajectory.rewards[len(trajectory.tokens) - 1] += float(result.reward)
    trajectory.infos.append(dict(result.info))
    trajectory.ended_by_env = bool(result.done)
    if result.done or trajectory.turns >= max_turns:
        trajectory.done = True
        return
    observation = _encode(tokenizer, result.observation)[: max(0, max_tokens - len(trajectory.tokens) - 1)]
    trajectory.add(observation, policy=False)
    trajectory.done = len(trajectory.tokens) >= max_tokens - 1  # no room left for a policy token


def _to_samples(trajectories: list[Trajectory], pad_token_id: int, params: SamplingParams) -> Samples:
    prompt_ids, prompt_mask = left_pad([t.context for t in trajectories], pad_token_id)
    width = max(1, max(len(t.tokens) for t in trajectories))

    def rows(values: Callable[[Trajectory], list], fill, dtype) -> torch.Tensor:
        out = torch.full((len(trajectories), width), fill, dtype=dtype)
        for i, t in enumerate(trajectories):
            out[i, : len(t.tokens)] = torch.tensor(values(t), dtype=dtype)
        return out

    policy = rows(lambda t: t.is_policy, False, torch.bool)
    real = rows(lambda t: [True] * len(t.tokens), False, torch.bool)
    return Samples(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask,
        response_ids=rows(lambda t: t.tokens, pad_token_id, torch.long),
        response_mask=policy.long(),
        stopped=torch.tensor([t.ended_by_env for t in trajectories]),
        logprobs=rows(lambda t: t.logprobs, 0.0, torch.float32) if params.logprobs and not params.greedy else None,
        observation_mask=(real & ~policy).long(),
        env_rewards=rows(lambda t: t.rewards, 0.0, torch.float32),
    )


def _decode(tokenizer: Any, trajectory: Trajectory) -> str:
    """The policy's last turn as text, for the environment (the ids themselves stay as sampled)."""
    return tokenizer.decode(trajectory.tokens[trajectory.turn_start:], skip_special_tokens=True)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []
