"""A single fp32 rank without offload trains with ZeRO-0: there is nothing to partition."""

from rlhf_ray.config import DeepSpeedConfig
from rlhf_ray.deepspeed_model import effective_zero


def test_one_rank_drops_zero_partitioning_only_where_it_changes_nothing():
    assert effective_zero(DeepSpeedConfig(zero_stage=2), 1).zero_stage == 0
    assert effective_zero(DeepSpeedConfig(zero_stage=3), 1).zero_stage == 0
    assert effective_zero(DeepSpeedConfig(zero_stage=2), 2).zero_stage == 2  # ranks to partition across
    assert effective_zero(DeepSpeedConfig(zero_stage=2, precision="bf16"), 1).zero_stage == 2
    assert effective_zero(DeepSpeedConfig(zero_stage=2, offload_optimizer=True), 1).zero_stage == 2
    assert effective_zero(DeepSpeedConfig(zero_stage=3, offload_params=True), 1).zero_stage == 3
    assert effective_zero(DeepSpeedConfig(zero_stage=2), 1).timeout_s == DeepSpeedConfig().timeout_s  # rest kept
