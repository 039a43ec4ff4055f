"""Reward sources (ARCHITECTURE.md §5): Python functions, HF reward models, an LLM judge and a remote
HTTP server, combined as a weighted sum; `server` serves any of them over HTTP."""

from rlhf_ray.rewards.base import RewardError, RewardSource, check_scores
from rlhf_ray.rewards.combine import WeightedSum, build_reward_source, build_reward_sources
from rlhf_ray.rewards.function import FunctionReward
from rlhf_ray.rewards.http import HttpReward
from rlhf_ray.rewards.judge import JudgeReward, parse_choice, parse_grade
from rlhf_ray.rewards.model import ModelReward

__all__ = [
    "FunctionReward",
    "HttpReward",
    "JudgeReward",
    "ModelReward",
    "RewardError",
    "RewardSource",
    "WeightedSum",
    "build_reward_source",
    "build_reward_sources",
    "check_scores",
    "parse_choice",
    "parse_grade",
]
