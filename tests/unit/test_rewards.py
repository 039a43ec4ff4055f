"""Reward sources: function rewards and their failure reports, the reward model's last-token
score and its independence of batching, weighted sums, and the config factory."""

import math
import textwrap

import pytest
import torch

from rlhf_ray.config import RewardSourceConfig
from rlhf_ray.rewards import (
    FunctionReward,
    ModelReward,
    RewardError,
    WeightedSum,
    build_reward_sources,
    check_scores,
)
from rlhf_ray.toy import build_char_tokenizer, build_reward_model, toy_score

PROMPTS = ["say: abc\n", "say: hello\n", "say: xyz\n", "say: q\n"]
RESPONSES = ["aeiou", "boom", "zzz a", "a much longer response, with punctuation!"]
METADATA = [{"stopped": True}, {"stopped": False}, {}, {"stopped": True}]

BAD_REWARDS = '''
import math

def raises_on_boom(prompts, responses, metadata):
    return [1 / 0 if r == "boom" else 1.0 for r in responses]

def raises_on_batch(prompts, responses, metadata):
    if len(prompts) > 1:
        raise RuntimeError("batch too big")
    return [1.0]

def nan_at_2(prompts, responses, metadata):
    return [math.nan if i == 2 else 0.0 for i in range(len(prompts))]

def inf_at_1(prompts, responses, metadata):
    return [math.inf if i == 1 else 0.0 for i in range(len(prompts))]

def too_few(prompts, responses, metadata):
    return [0.0] * (len(prompts) - 1)

def text_at_3(prompts, responses, metadata):
    return [0.0, 0.0, 0.0, "high"]

def none_at_0(prompts, responses, metadata):
    return [None, 0.0, 0.0, 0.0]

def scalar(prompts, responses, metadata):
    return 0.5

def numpy_and_tensor(prompts, responses, metadata):
    import numpy as np, torch
    return [np.float32(0.5), torch.tensor(1.5), 2, True]

NOT_CALLABLE = 3
'''


@pytest.fixture(scope="module")
def bad_rewards_module(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_fns")
    (root / "bad_rewards_for_tests.py").write_text(textwrap.dedent(BAD_REWARDS))
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        yield "bad_rewards_for_tests"


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("rm")
    build_reward_model(tokenizer, seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


# --- function rewards -------------------------------------------------------------------------


def test_function_reward_scores_the_toy_task():
    reward = FunctionReward("rlhf_ray.toy.task:vowel_reward")
    assert reward.name == "vowel_reward"
    assert reward.score(PROMPTS, RESPONSES, METADATA) == [toy_score(p, r) for p, r in zip(PROMPTS, RESPONSES)]
    assert FunctionReward("rlhf_ray.toy.task:vowel_reward", name="vowel").name == "vowel"


def test_function_reward_accepts_numeric_types(bad_rewards_module):
    reward = FunctionReward(f"{bad_rewards_module}:numpy_and_tensor")
    scores = reward.score(PROMPTS, RESPONSES, METADATA)
    assert scores == [0.5, 1.5, 2.0, 1.0] and all(type(s) is float for s in scores)


@pytest.mark.parametrize(
    "function, index, words",
    [
        ("raises_on_boom", 1, ["ZeroDivisionError"]),
        ("raises_on_batch", None, ["RuntimeError", "batch too big"]),
        ("nan_at_2", 2, ["nan", "not finite"]),
        ("inf_at_1", 1, ["inf", "not finite"]),
        ("too_few", None, ["3 scores for 4 samples"]),
        ("text_at_3", 3, ["'high'", "not a number"]),
        ("none_at_0", 0, ["None", "not a number"]),
        ("scalar", None, ["0.5", "expected a list of 4 floats"]),
    ],
)
def test_function_reward_failures_name_source_and_sample(bad_rewards_module, function, index, words):
    reward = FunctionReward(f"{bad_rewards_module}:{function}", name="rule")
    with pytest.raises(RewardError) as info:
        reward.score(PROMPTS, RESPONSES, METADATA)
    message = str(info.value)
    assert "reward source 'rule'" in message and info.value.source == "rule"
    assert info.value.index == index
    assert (f"(sample {index})" in message) if index is not None else ("(sample " not in message)
    for word in words:
        assert word in message


def test_function_reward_chains_the_original_exception(bad_rewards_module):
    with pytest.raises(RewardError) as info:
        FunctionReward(f"{bad_rewards_module}:raises_on_boom").score(PROMPTS, RESPONSES, METADATA)
    assert isinstance(info.value.__cause__, ZeroDivisionError)


@pytest.mark.parametrize(
    "spec, words",
    [
        ("no_such_module_xyz:f", ["cannot import module 'no_such_module_xyz'"]),
        ("rlhf_ray.toy.task:no_such_function", ["no attribute 'no_such_function'", "rlhf_ray.toy.task"]),
        ("rlhf_ray.toy.task", ["not of the form module.path:function"]),
        ("{module}:NOT_CALLABLE", ["not a function"]),
    ],
)
def test_function_reward_import_errors_name_the_spec(bad_rewards_module, spec, words):
    spec = spec.format(module=bad_rewards_module)
    with pytest.raises(RewardError) as info:
        FunctionReward(spec, name="rule")
    assert "reward source 'rule'" in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_check_scores_converts_to_floats():
    assert check_scores("s", (1, 2.5), 2) == [1.0, 2.5]
    with pytest.raises(RewardError, match="returned 'ab'"):
        check_scores("s", "ab", 2)


# --- reward model -----------------------------------------------------------------------------


def manual_score(model, tokenizer, text: str, append_eos: bool) -> float:
    """HF's own pooled forward on one unpadded sequence: the score at its last token."""
    ids = tokenizer(text)["input_ids"] + ([tokenizer.eos_token_id] if append_eos else [])
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()


def test_model_reward_is_the_last_token_score(reward_model_dir, tokenizer):
    reward = ModelReward(reward_model_dir, batch_size=3)
    assert reward.name == reward_model_dir.rpartition("/")[2]
    scores = reward.score(PROMPTS, RESPONSES, METADATA)
    expected = [manual_score(reward.model, tokenizer, p + r, m.get("stopped", True))
                for p, r, m in zip(PROMPTS, RESPONSES, METADATA)]
    assert all(type(s) is float for s in scores)
    assert scores == pytest.approx(expected, abs=1e-5)
    # EOS is appended only to responses that stopped: sample 1 did not.
    assert scores[1] != pytest.approx(manual_score(reward.model, tokenizer, PROMPTS[1] + RESPONSES[1], True), abs=1e-4)


def test_model_reward_is_independent_of_batching(reward_model_dir):
    reward = ModelReward(reward_model_dir, batch_size=4, name="rm")
    batched = reward.score(PROMPTS, RESPONSES, METADATA)
    alone = [reward.score([p], [r], [m])[0] for p, r, m in zip(PROMPTS, RESPONSES, METADATA)]
    reordered = reward.score(PROMPTS[::-1], RESPONSES[::-1], METADATA[::-1])[::-1]
    assert batched == pytest.approx(alone, abs=1e-5)
    assert batched == pytest.approx(reordered, abs=1e-5)


def test_model_reward_with_pad_equal_to_eos(reward_model_dir, tokenizer):
    """HF's pooling picks the last non-pad id, which would skip the appended EOS when pad = EOS."""
    pad_is_eos = build_char_tokenizer()
    pad_is_eos.pad_token = pad_is_eos.eos_token
    reward = ModelReward(reward_model_dir, tokenizer=pad_is_eos, batch_size=4)
    expected = [manual_score(reward.model, tokenizer, p + r, True) for p, r in zip(PROMPTS, RESPONSES)]
    assert reward.score(PROMPTS, RESPONSES, [{}] * 4) == pytest.approx(expected, abs=1e-5)


# --- combination ------------------------------------------------------------------------------


class Constant:
    def __init__(self, name, values):
        self.name, self.values = name, values

    def score(self, prompts, responses, metadata):
        return list(self.values)


class Broken:
    name = "broken"

    def score(self, prompts, responses, metadata):
        raise OSError("endpoint down")


def test_weighted_sum_weights_and_per_source_scores():
    combined = WeightedSum([(Constant("a", [1.0, 2.0]), 2.0), (Constant("b", [10.0, -4.0]), -0.5)])
    total, per_source = combined.score_all(["p", "q"], ["r", "s"], [{}, {}])
    assert total == [2.0 - 5.0, 4.0 + 2.0]
    assert per_source == {"a": [1.0, 2.0], "b": [10.0, -4.0]}


def test_weighted_sum_suffixes_duplicate_names():
    combined = WeightedSum([(Constant("rm", [1.0]), 1.0), (Constant("rule", [2.0]), 1.0), (Constant("rm", [3.0]), 1.0)])
    assert combined.names == ["rm_0", "rule", "rm_1"]
    assert combined.score_all(["p"], ["r"], [{}])[1] == {"rm_0": [1.0], "rule": [2.0], "rm_1": [3.0]}


def test_weighted_sum_reports_the_failing_source():
    with pytest.raises(RewardError, match="'b' \\(sample 1\\).*not finite"):
        WeightedSum([(Constant("a", [1.0, 2.0]), 1.0), (Constant("b", [0.0, math.nan]), 1.0)]).score_all(
            ["p", "q"], ["r", "s"], [{}, {}])
    with pytest.raises(RewardError, match="'broken'.*OSError: endpoint down"):
        WeightedSum([(Broken(), 1.0)]).score_all(["p"], ["r"], [{}])
    with pytest.raises(ValueError, match="at least one"):
        WeightedSum([])


def test_build_reward_sources_from_config(reward_model_dir):
    cfgs = [
        RewardSourceConfig(kind="function", path="rlhf_ray.toy.task:vowel_reward"),
        RewardSourceConfig(kind="model", path="toy", weight=0.5),
    ]
    combined = build_reward_sources(cfgs, [cfgs[0].path, reward_model_dir], trust_remote_code=False)
    assert combined.names == ["vowel_reward", "toy"]
    total, per_source = combined.score_all(PROMPTS, RESPONSES, METADATA)
    rm = ModelReward(reward_model_dir).score(PROMPTS, RESPONSES, METADATA)
    assert per_source["toy"] == pytest.approx(rm, abs=1e-6)
    assert total == pytest.approx([toy_score(p, r) + 0.5 * s for p, r, s in zip(PROMPTS, RESPONSES, rm)], abs=1e-6)
