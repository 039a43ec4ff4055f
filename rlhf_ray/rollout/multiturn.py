"""Multi-turn rollouts: the policy's turn, the environment's reply appended as tokens, repeated until
the environment says done, `max_turns` or the trajectory's token budget.

Token-in/token-out across turns: each turn continues from the context's token ids plus every token
so far; the policy's tokens are the ids the engine sampled, never decoded and re-encoded (re-tokenising
chat text between turns can change ids and would break the log-prob ratio). Only the environment's
replies are encoded, once each, as `rlhf_ray.rollout.turns` formats them (a chat-template turn, or
plain text). In the resulting `Samples` the response block holds the whole trajectory after the
prompt: `response_mask` marks the policy's tokens (trained, each with its behaviour log-prob),
`observation_mask` the environment's (attended, never trained, log-prob 0), and `env_rewards` carries
each turn's reward at that turn's last policy token (the final outcome at the last). The
environment's first observation (`reset`) joins the prompt block.

Scheduling. An engine that takes requests one at a time (`submit`/`poll`: vLLM) runs episodes
continuously: a trajectory's next turn is submitted as soon as its environment has answered, while
the engine keeps stepping the others, and environment steps run on a thread pool, overlapping
generation (no turn-by-turn lock-step for the batch). Each request is seeded from (batch seed, turn,
trajectory index) alone, so its samples do not depend on which other requests share its engine
steps. An engine without it (HF generate) runs each turn of the batch as one call (lock-step).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from rlhf_ray.batch import Samples
from rlhf_ray.envs.tools import FAILURE_KINDS
from rlhf_ray.rollout.base import Completion, RolloutEngine, SamplingParams, item_seeds, left_pad
from rlhf_ray.rollout.partial import segment_seed
from rlhf_ray.rollout.turns import RawTurns, TurnFormat

if TYPE_CHECKING:
    from rlhf_ray.envs.base import Environment, StepResult

_REQUEST_IDS = itertools.count()


@dataclass
class Trajectory:
    """One episode so far: the context (prompt + first observation) and every token after it."""

    env: Environment
    context: list[int]
    index: int  # in the batch of all engines (seeds its requests)
    tokens: list[int] = field(default_factory=list)
    is_policy: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    turns: int = 0
    turn_start: int = 0  # where the policy's latest turn begins in `tokens`
    closed: bool = False  # the policy's latest turn ended with EOS
    done: bool = False
    ended_by_env: bool = False  # the environment ended it (not max_turns or the token budget)
    infos: list[dict] = field(default_factory=list)

    def add(self, ids: list[int], policy: bool, logprobs: list[float] | None = None) -> None:
        self.tokens += ids
        self.is_policy += [policy] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)
        self.rewards += [0.0] * len(ids)


@dataclass(frozen=True)
class Episodes:
    """What a batch of episodes shares: the tokenizer and reply format, the limits, the seeding."""

    tokenizer: Any
    turns: TurnFormat
    params: SamplingParams  # one turn's sampling (n: episodes per prompt)
    seed: int
    max_turns: int
    max_tokens: int  # policy + environment tokens of one trajectory

    def room(self, trajectory: Trajectory) -> int:
        return max(1, min(self.params.max_new_tokens, self.max_tokens - len(trajectory.tokens)))


def run_episodes(engine: RolloutEngine, tokenizer: Any, prompts: list[list[int]], metadata: list[dict],
                 make_env: Callable[[], Environment], params: SamplingParams, seed: int, first_index: int,
                 max_turns: int, max_tokens: int, threads: int = 8,
                 turns: TurnFormat | None = None) -> tuple[Samples, list[list[dict]]]:
    """`params.n` episodes per prompt (rows [i·n, (i+1)·n) from prompt i), each with its own environment;
    `params.max_new_tokens` caps one turn, `max_tokens` the policy and environment tokens of a trajectory;
    `turns` formats the environment's replies (default: plain text). → (Samples as the module docstring
    describes, each trajectory's `info` dicts per turn)."""
    run = Episodes(tokenizer, turns or RawTurns(tokenizer), params, seed, max_turns, max_tokens)
    rows = [(prompt, meta) for prompt, meta in zip(prompts, metadata) for _ in range(params.n)]
    trajectories = [_start(make_env(), tokenizer, prompt, meta, first_index * params.n + k)
                    for k, (prompt, meta) in enumerate(rows)]
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(trajectories)))) as pool:
        if hasattr(engine, "submit"):
            _continuous(engine, run, trajectories, pool)
        else:
            _lockstep(engine, run, trajectories, pool)
    return _to_samples(trajectories, tokenizer.pad_token_id, params), [t.infos for t in trajectories]


def _start(env: Environment, tokenizer: Any, prompt: list[int], metadata: dict, index: int) -> Trajectory:
    first = env.reset(tokenizer.decode(prompt, skip_special_tokens=True), metadata)
    return Trajectory(env, list(prompt) + _encode(tokenizer, first), index)


# ---- continuous: requests one at a time, environment steps beside generation --------------------

def _continuous(engine: Any, run: Episodes, trajectories: list[Trajectory], pool: ThreadPoolExecutor) -> None:
    """Every trajectory's turn is its own engine request; a finished turn goes to its environment on
    the pool, and an answered one back to the engine, while the engine steps the rest."""
    requests: dict[str, Trajectory] = {}
    stepping: dict[Future, Trajectory] = {}

    def submit(trajectory: Trajectory) -> None:
        request_id = f"episode-{next(_REQUEST_IDS)}"
        requests[request_id] = trajectory
        engine.submit(request_id, trajectory.context + trajectory.tokens, replace(run.params, n=1, max_new_tokens=run.room(trajectory)),
                      request_seed(run.seed, trajectory.turns, trajectory.index))

    try:
        for trajectory in trajectories:
            submit(trajectory)
        while requests or stepping:
            finished = engine.poll() if requests else []
            for completion in finished:
                trajectory = requests.pop(completion.request_id)
                _policy_turn(trajectory, completion, run)
                stepping[pool.submit(trajectory.env.step, _decode(run.tokenizer, trajectory))] = trajectory
            answered = [f for f in stepping if f.done()]
            if not requests and not answered and stepping:  # nothing to generate: wait for an environment
                answered = list(wait(stepping, return_when=FIRST_COMPLETED)[0])
            for future in answered:
                trajectory = stepping.pop(future)
                _environment_turn(trajectory, future.result(), run)
                if not trajectory.done:
                    submit(trajectory)
    except BaseException:
        engine.abort(list(requests))
        raise


def request_seed(seed: int, turn: int, index: int) -> int:
    """The seed of trajectory `index`'s request for turn `turn` of a batch seeded with `seed`."""
    return item_seeds(segment_seed(seed, turn), index, 1)[0]


# ---- lock-step: each turn of the batch as one engine call ---------------------------------------

def _lockstep(engine: RolloutEngine, run: Episodes, trajectories: list[Trajectory], pool: ThreadPoolExecutor) -> None:
    turn = 0
    while active := [t for t in trajectories if not t.done]:
        room = min(run.room(t) for t in active)
        out = engine.generate([t.context + t.tokens for t in active], replace(run.params, n=1, max_new_tokens=room),
                              segment_seed(run.seed, turn), active[0].index)
        lengths = out.response_mask.sum(-1).tolist()
        for row, (trajectory, length) in enumerate(zip(active, lengths)):
            logprobs = out.logprobs[row, :length].tolist() if out.logprobs is not None else None
            _policy_turn(trajectory, Completion("", out.response_ids[row, :length].tolist(), logprobs,
                                               bool(out.stopped[row])), run)
        results = list(pool.map(lambda t: t.env.step(_decode(run.tokenizer, t)), active))
        for trajectory, result in zip(active, results):
            _environment_turn(trajectory, result, run)
        turn += 1


# ---- one turn each ------------------------------------------------------------------------------

def _policy_turn(trajectory: Trajectory, completion: Completion, run: Episodes) -> None:
    """The policy's turn, cut to the trajectory's token budget."""
    length = min(len(completion.token_ids), run.max_tokens - len(trajectory.tokens))
    logprobs = completion.logprobs[:length] if completion.logprobs is not None and run.params.logprobs else None
    trajectory.add(completion.token_ids[:length], policy=True, logprobs=logprobs)
    trajectory.turns += 1
    trajectory.turn_start = len(trajectory.tokens) - length
    trajectory.closed = completion.stopped and length == len(completion.token_ids)


def _environment_turn(trajectory: Trajectory, result: StepResult, run: Episodes) -> None:
    """The environment's reply to the turn just taken: its reward on the turn's last policy token, then
    (unless the episode ends) its observation as tokens."""
    trajectory.rewards[len(trajectory.tokens) - 1] += float(result.reward)
    trajectory.infos.append(dict(result.info))
    trajectory.ended_by_env = bool(result.done)
    if result.done or trajectory.turns >= run.max_turns:
        trajectory.done = True
        return
    role = getattr(trajectory.env, "observation_role", "user")
    observation = run.turns.observation_ids(result.observation, role, trajectory.closed)
    trajectory.add(observation[: max(0, run.max_tokens - len(trajectory.tokens) - 1)], policy=False)
    trajectory.done = len(trajectory.tokens) >= run.max_tokens - 1  # no room left for a policy token


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
        tool_counts=torch.tensor([tool_counts(t.infos) for t in trajectories], dtype=torch.long),
    )


def episode_metrics(samples: Samples) -> dict[str, float]:
    """Turns, the environment's share of the tokens, and tool use of a batch of episodes."""
    policy = samples.response_mask.bool()
    starts = policy[:, :1].sum() + (policy[:, 1:] & ~policy[:, :-1]).sum()  # a policy token after a non-policy one
    after_prompt = samples.attention_mask[:, samples.prompt_ids.shape[1]:].sum()
    out = {"rollout/turns_mean": starts.item() / samples.batch_size,
           "rollout/env_token_share": (samples.observation_mask.sum() / after_prompt.clamp(min=1)).item()}
    if samples.tool_counts is not None and samples.tool_counts[:, 0].any():
        calls, failed = samples.tool_counts[:, 0], samples.tool_counts[:, 1:]
        out |= {"rollout/tool_calls_mean": calls.float().mean().item(),
                "rollout/tool_use_share": (calls > failed.sum(-1)).float().mean().item(),
                "rollout/tool_failure_share": (failed.sum() / calls.sum()).item(),
                **{f"rollout/tool_failures/{kind}": float(failed[:, k].sum()) for k, kind in enumerate(FAILURE_KINDS)}}
    return out


def tool_counts(infos: list[dict]) -> list[int]:
    """[tool calls, then failed calls per kind of FAILURE_KINDS] of an episode, from its last step's
    info (a `ToolEnvironment` counts over the episode); zeros for environments without tools."""
    last = infos[-1] if infos else {}
    failures = last.get("tool_failures") or {}
    return [int(last.get("tool_calls", 0))] + [int(failures.get(kind, 0)) for kind in FAILURE_KINDS]


def _decode(tokenizer: Any, trajectory: Trajectory) -> str:
    """The policy's last turn as text, for the environment (the ids themselves stay as sampled)."""
    return tokenizer.decode(trajectory.tokens[trajectory.turn_start:], skip_special_tokens=True)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []
