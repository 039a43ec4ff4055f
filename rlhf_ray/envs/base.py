"""The environment protocol of multi-turn RL, how environments are named in config, and single-turn
tasks as the one-step special case.

A trajectory is prompt, first observation, then turns of (action, observation): the policy writes an
action (its decoded turn text), the environment answers with an observation that the rollout loop
appends to the context before the next generation, plus a reward and whether the episode is over.
This is the text-in/text-out shape of SkyRL-Gym's `BaseTextEnv` (init/step returning observations,
reward, done, metadata; https://github.com/NovaSky-AI/SkyRL) and of the `verifiers` multi-turn envs,
reduced to plain strings: chat formatting of observations is the rollout loop's job.

Environments are plain Python objects, one per trajectory, built by a zero-argument factory that
`load_environment` makes from an import path, the way reward functions are named
(`kind: function`, `module.path:function`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from rlhf_ray.rewards.base import RewardSource


@dataclasses.dataclass
class StepResult:
    observation: str  # text the environment appends after the action; "" when there is nothing to say
    reward: float  # this turn's reward; on the final step, the outcome reward
    done: bool  # the episode is over: the rollout loop stops generating for this trajectory
    info: dict  # per-step facts for metrics and debugging (JSON-able), e.g. {"won": True, "tool_used": False}


class Environment(Protocol):
    """One trajectory's environment. `reset` once, then `step` until a result has done=True."""

    def reset(self, prompt: str, metadata: dict) -> str:
        """Start an episode for `prompt` (its row's other columns in `metadata`); the first observation,
        appended after the prompt, may be ""."""

    def step(self, action: str) -> StepResult:
        """Answer the policy's turn `action` (its decoded text, without the prompt or earlier turns)."""


class LoadError(ValueError):
    """An import path ("package.module:attribute") that does not name a usable environment or tool."""


def load_environment(path: str, **kwargs: Any) -> Callable[[], Environment]:
    """A factory of fresh environments from "package.module:ClassName", each built as `ClassName(**kwargs)`.

    The class and the kwargs are checked here, when the config is read, rather than on the first
    trajectory: a LoadError names the path and what to change."""
    cls = import_path(path, "environment")
    if not inspect.isclass(cls):
        raise LoadError(f"environment '{path}' is a {type(cls).__name__}, not a class; point it at a class "
                        "with reset(prompt, metadata) and step(action)")
    missing = [name for name in ("reset", "step") if not callable(getattr(cls, name, None))]
    if missing:
        raise LoadError(f"environment class '{path}' has no {' and no '.join(missing)} method; an environment "
                        "needs reset(prompt, metadata) -> str and step(action) -> StepResult")
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as error:
        raise LoadError(f"environment '{path}' does not accept the arguments {sorted(kwargs)}: {error}; "
                        f"fix the environment's kwargs in the config") from None
    return functools.partial(cls, **kwargs)


def import_path(path: str, what: str) -> Any:
    """The object named by "package.module:attribute", or a LoadError naming `path` and the fix.

    Not `rlhf_ray.rewards.function.import_function`: importing the reward package loads torch (~4 s),
    which the tool sandbox's worker process must not pay on every start."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise LoadError(f"{what} '{path}' is not of the form package.module:Name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise LoadError(f"cannot import module '{module_name}' of {what} '{path}' ({error}); make it importable "
                        "where the rollout runs (install it or put it on PYTHONPATH)") from error
    if not hasattr(module, attr):
        raise LoadError(f"module '{module_name}' has no attribute '{attr}' (from {what} '{path}'); "
                        "check the name after the colon")
    return getattr(module, attr)


def ensure_running(env: Any, done: bool) -> None:
    """Stepping a finished episode is a rollout-loop bug; say so instead of inventing a reward."""
    if done:
        raise RuntimeError(f"{type(env).__name__}.step called after the episode ended; "
                           "call reset(prompt, metadata) to start a new one")


class SingleTurn:
    """A single-turn task as an environment: the first action is the response, scored by a reward
    source, and the episode ends. `reward` is a reward function's path "module:function" with the
    reward contract's signature `fn(prompts, responses, metadata) -> list[float]` (scored here as a
    batch of one, with its checks and errors), or any `RewardSource`."""

    def __init__(self, reward: str | RewardSource, name: str | None = None):
        if isinstance(reward, str):
            # lazy: the reward package loads torch
            from rlhf_ray.rewards.function import FunctionReward

            reward = FunctionReward(reward, name=name)
        self.source = reward
        self.prompt, self.metadata, self.done = "", {}, True

    def reset(self, prompt: str, metadata: dict) -> str:
        self.prompt, self.metadata, self.done = prompt, dict(metadata), False
        return ""

    def step(self, action: str) -> StepResult:
        ensure_running(self, self.done)
        from rlhf_ray.rewards.base import check_scores

        (score,) = check_scores(self.source.name, self.source.score([self.prompt], [action], [self.metadata]), 1)
        self.done = True
        return StepResult(observation="", reward=score, done=True, info={})


def env_return(prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
    """The reward source of multi-turn runs (`{kind: function, path: rlhf_ray.envs:env_return}`): each
    episode's return, the sum of its environment's rewards, which the rollout recorded per turn and the
    reward worker puts in `metadata["env_return"]`. A sample without one is a reward-contract error."""
    missing = [i for i, m in enumerate(metadata) if "env_return" not in m]
    if missing:
        raise ValueError(f"env_return: samples {missing[:5]} carry no episode return; this source needs rollout.env "
                         f"(a multi-turn environment) to be set")
    return [float(m["env_return"]) for m in metadata]
