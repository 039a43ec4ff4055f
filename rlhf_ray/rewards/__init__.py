"""Reward sources: Python functions and HF reward models, combined as a weighted sum (ARCHITECTURE.md §5)."""

from rlhf_ray.rewards.base import RewardError, RewardSource, check_scores
from rlhf_ray.rewards.combine import WeightedSum, build_reward_sources
from rlhf_ray.rewards.function import FunctionReward
from rlhf_ray.rewards.model import ModelReward

__all__ = [
    "FunctionReward",
    "ModelReward",
    "RewardError",
    "RewardSource",
    "WeightedSum",
    "build_reward_sources",
    "check_scores",
]
