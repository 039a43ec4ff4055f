"""Several reward sources as one weighted sum, each source's raw scores kept for metrics
(reward/<name>), and the factory that builds them from `reward.sources` configs."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from rlhf_ray.config import RewardSourceConfig
from rlhf_ray.rewards.base import RewardError, RewardSource, check_scores
from rlhf_ray.rewards.function import FunctionReward
from rlhf_ray.rewards.http import HttpReward
from rlhf_ray.rewards.judge import JudgeReward
from rlhf_ray.rewards.model import ModelReward

if TYPE_CHECKING:
    from rlhf_ray.rollout.base import RolloutEngine


class WeightedSum:
    """score = Σ_k weight_k · score_k; sources sharing a name become name_0, name_1, …"""

    def __init__(self, sources: list[tuple[RewardSource, float]]):
        if not sources:
            raise ValueError("WeightedSum needs at least one reward source; set reward.sources.")
        self.sources = [source for source, _ in sources]
        self.weights = [float(weight) for _, weight in sources]
        self.names = _unique_names([source.name for source in self.sources])

    def score_all(
        self, prompts: list[str], responses: list[str], metadata: list[dict]
    ) -> tuple[list[float], dict[str, list[float]]]:
        """(weighted total per sample, {name: that source's unweighted scores})."""
        per_source = {name: _score(name, source, prompts, responses, metadata)
                      for name, source in zip(self.names, self.sources)}
        total = [0.0] * len(prompts)
        for name, weight in zip(self.names, self.weights):
            total = [t + weight * s for t, s in zip(total, per_source[name])]
        return total, per_source

    def score_tolerant(
        self, prompts: list[str], responses: list[str], metadata: list[dict]
    ) -> tuple[list[float], dict[str, list[float]], list[bool], Counter]:
        """The reward contract's `mask` policy: like `score_all`, but a sample any source fails on
        (exception, timeout, wrong count or type, NaN/inf) is marked invalid (its total is NaN, never
        a made-up 0) and counted by kind, instead of stopping the run.
        → (total, {name: scores}, valid per sample, Counter of violation kinds)."""
        n = len(prompts)
        valid, violations, per_source = [True] * n, Counter(), {}
        for name, source in zip(self.names, self.sources):
            scores, ok, kinds = _score_tolerant(name, source, prompts, responses, metadata)
            per_source[name] = scores
            valid = [v and o for v, o in zip(valid, ok)]
            violations += kinds
        total = [math.nan if not v else sum(w * per_source[name][i] for name, w in zip(self.names, self.weights))
                 for i, v in enumerate(valid)]
        return total, per_source, valid, violations

    def counters(self) -> dict[str, int | float]:
        """Failure and verdict counters of the sources that keep them (http, judge), as {"<name>/<counter>": n}."""
        return {f"{name}/{key}": value for name, source in zip(self.names, self.sources)
                for key, value in getattr(source, "counters", {}).items()}


def build_reward_sources(
    cfgs: list[RewardSourceConfig],
    paths: list[str | None],
    trust_remote_code: bool = False,
    batch_size: int = 32,
    make_engine: Callable[[str], RolloutEngine] | None = None,
) -> WeightedSum:
    """Sources from config; `paths[i]` is source i's path resolved ('toy' built into a directory), aligned with `cfgs`."""
    if len(paths) != len(cfgs):
        raise ValueError(f"build_reward_sources: {len(paths)} paths for {len(cfgs)} sources; pass one per source.")
    return WeightedSum([(build_reward_source(cfg, path, trust_remote_code, batch_size, make_engine), cfg.weight)
                        for cfg, path in zip(cfgs, paths)])


def build_reward_source(
    cfg: RewardSourceConfig, path: str | None, trust_remote_code: bool = False, batch_size: int = 32,
    make_engine: Callable[[str], RolloutEngine] | None = None,
) -> RewardSource:
    """One source; `path` is `cfg.path` resolved to a local directory or hub id (unused by kind=http).
    `make_engine(path)`: the generation engine of a judge (the run's rollout backend); default HF generate."""
    if cfg.kind == "function":
        return FunctionReward(cfg.path, name=cfg.name)
    if cfg.kind == "http":
        return HttpReward(cfg.http, name=cfg.name)
    if cfg.kind == "serve":  # the replicas hold the source; started by the run (rlhf_ray.rewards.serve.start_apps)
        from rlhf_ray.rewards.serve import ServeReward

        return ServeReward(cfg)
    if cfg.kind == "judge":
        return JudgeReward(path, options=cfg.judge, name=cfg.name, batch_size=batch_size,
                           trust_remote_code=trust_remote_code,
                           engine=make_engine(path) if make_engine and cfg.holds_model else None)
    name = cfg.name or cfg.path.rstrip("/").rpartition("/")[2]
    return ModelReward(path, batch_size=batch_size, trust_remote_code=trust_remote_code, name=name)


def _score(
    name: str, source: RewardSource, prompts: list[str], responses: list[str], metadata: list[dict]
) -> list[float]:
    """The source's checked scores; any exception it raises becomes a RewardError naming it."""
    try:
        scores = source.score(prompts, responses, metadata)
    except RewardError:
        raise
    except Exception as error:
        raise RewardError(name, f"raised {type(error).__name__}: {error}") from error
    return check_scores(name, scores, len(prompts))


def _score_tolerant(
    name: str, source: RewardSource, prompts: list[str], responses: list[str], metadata: list[dict]
) -> tuple[list[float], list[bool], Counter]:
    """(scores with NaN where invalid, valid per sample, violations by kind). A source that raises on a
    batch is asked again sample by sample, so one bad sample does not invalidate its neighbours
    (not after a timeout: that would multiply the wait)."""
    n = len(prompts)
    try:
        raw = source.score(prompts, responses, metadata)
    except Exception as error:  # noqa: BLE001 - every failure of user reward code is a contract violation
        kind = error.kind if isinstance(error, RewardError) else "exception"
        if kind == "timeout" or n == 1:
            return [math.nan] * n, [False] * n, Counter({kind: n})
        parts = [_score_tolerant(name, source, prompts[i:i + 1], responses[i:i + 1], metadata[i:i + 1])
                 for i in range(n)]
        return [p[0][0] for p in parts], [p[1][0] for p in parts], sum((p[2] for p in parts), Counter())
    return _checked_values(name, raw, n)


def _checked_values(name: str, raw, n: int) -> tuple[list[float], list[bool], Counter]:
    """Per-value check of a list of the right length; the list-level problems raise as in check_scores."""
    if isinstance(raw, (str, bytes, dict)) or not hasattr(raw, "__len__"):
        return [math.nan] * n, [False] * n, Counter({"wrong_type": n})
    if len(raw) != n:
        return [math.nan] * n, [False] * n, Counter({"wrong_count": n})
    scores, valid, kinds = [], [], Counter()
    for value in raw:
        try:
            if isinstance(value, (str, bytes)):
                raise TypeError
            x = float(value)
        except (TypeError, ValueError):
            scores.append(math.nan), valid.append(False)
            kinds["wrong_type"] += 1
            continue
        ok = math.isfinite(x)
        scores.append(x if ok else math.nan), valid.append(ok)
        kinds["non_finite"] += not ok
    return scores, valid, +kinds


def _unique_names(names: list[str]) -> list[str]:
    counts, seen = Counter(names), Counter()
    out = []
    for name in names:
        if counts[name] > 1:
            seen[name] += 1
            name = f"{name}_{seen[name] - 1}"
        out.append(name)
    return out
