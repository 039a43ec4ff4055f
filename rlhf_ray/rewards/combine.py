"""Several reward sources as one weighted sum, each source's raw scores kept for metrics
(reward/<name>), and the factory that builds them from `reward.sources` configs."""

from __future__ import annotations

from collections import Counter

from rlhf_ray.config import RewardSourceConfig
from rlhf_ray.rewards.base import RewardError, RewardSource, check_scores
from rlhf_ray.rewards.function import FunctionReward
from rlhf_ray.rewards.http import HttpReward
from rlhf_ray.rewards.judge import JudgeReward
from rlhf_ray.rewards.model import ModelReward


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

    def counters(self) -> dict[str, int]:
        """Failure and verdict counters of the sources that keep them (http, judge), as {"<name>/<counter>": n}."""
        return {f"{name}/{key}": value for name, source in zip(self.names, self.sources)
                for key, value in getattr(source, "counters", {}).items()}


def build_reward_sources(
    cfgs: list[RewardSourceConfig],
    paths: list[str | None],
    trust_remote_code: bool = False,
    batch_size: int = 32,
) -> WeightedSum:
    """Sources from config; `paths[i]` is source i's path resolved ('toy' built into a directory), aligned with `cfgs`."""
    if len(paths) != len(cfgs):
        raise ValueError(f"build_reward_sources: {len(paths)} paths for {len(cfgs)} sources; pass one per source.")
    return WeightedSum([(build_reward_source(cfg, path, trust_remote_code, batch_size), cfg.weight)
                        for cfg, path in zip(cfgs, paths)])


def build_reward_source(
    cfg: RewardSourceConfig, path: str | None, trust_remote_code: bool = False, batch_size: int = 32
) -> RewardSource:
    """One source; `path` is `cfg.path` resolved to a local directory or hub id (unused by kind=http)."""
    if cfg.kind == "function":
        return FunctionReward(cfg.path, name=cfg.name)
    if cfg.kind == "http":
        return HttpReward(cfg.http, name=cfg.name)
    if cfg.kind == "judge":
        return JudgeReward(path, options=cfg.judge, name=cfg.name, batch_size=batch_size,
                           trust_remote_code=trust_remote_code)
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


def _unique_names(names: list[str]) -> list[str]:
    counts, seen = Counter(names), Counter()
    out = []
    for name in names:
        if counts[name] > 1:
            seen[name] += 1
            name = f"{name}_{seen[name] - 1}"
        out.append(name)
    return out
