"""The reward contract (issue 6): one finite float per sample, or `fail` naming source and sample,
or `mask` marking exactly the violating samples, counted by kind."""

import math

import pytest

from rlhf_ray.rewards import FunctionReward, RewardError, WeightedSum
from rlhf_ray.toy.task import toy_score

RESPONSES = ["aei", "qa", "zoo", "bb", "qz"]  # 'q' → raise_on_q fails, 'z' → nan_on_z fails
PROMPTS = ["say: x\n"] * len(RESPONSES)
META = [{}] * len(RESPONSES)


def _sum(*specs: str) -> WeightedSum:
    return WeightedSum([(FunctionReward(f"rlhf_ray.toy.faulty:{s}"), 1.0) for s in specs])


@pytest.mark.parametrize("spec, sample, kind", [
    ("raise_on_q", 1, "exception"), ("nan_on_z", 2, "non_finite"), ("short_list", None, "wrong_count"),
    ("not_numbers", 0, "wrong_type"),
])
def test_fail_policy_names_source_sample_and_kind(spec, sample, kind):
    with pytest.raises(RewardError) as err:
        _sum(spec).score_all(PROMPTS, RESPONSES, META)
    assert err.value.source == spec and err.value.kind == kind
    assert err.value.index == sample
    assert f"reward source '{spec}'" in str(err.value)


def test_mask_policy_marks_exactly_the_violating_samples():
    total, per_source, valid, violations = _sum("raise_on_q", "nan_on_z").score_tolerant(PROMPTS, RESPONSES, META)
    assert valid == [True, False, False, True, False]
    assert violations == {"exception": 2, "non_finite": 2}  # q: samples 1, 4; z: samples 2, 4
    for i in (0, 3):
        assert total[i] == pytest.approx(2 * toy_score(PROMPTS[i], RESPONSES[i]))
    assert all(math.isnan(total[i]) for i in (1, 2, 4))  # never a made-up 0


@pytest.mark.parametrize("spec, kind", [("short_list", "wrong_count"), ("not_numbers", "wrong_type")])
def test_mask_policy_invalidates_a_malformed_batch(spec, kind):
    _, _, valid, violations = _sum(spec).score_tolerant(PROMPTS, RESPONSES, META)
    assert not any(valid) and violations == {kind: len(RESPONSES)}


def test_reward_error_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(RewardError("src", "bad", 3, kind="timeout")))
    assert (err.source, err.index, err.kind) == ("src", 3, "timeout")
