"""rlhf_ray: distributed RLHF (PPO, GRPO family, SFT, reward models, DPO) on Ray + DeepSpeed."""

__version__ = "0.1.0"
