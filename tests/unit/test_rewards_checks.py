"""The score checks of every reward source (rewards/base.py) and the weighted sum with its two
policies (rewards/combine.py): exact messages naming source and sample, the violation kind of each
bad value, the per-sample retry of `mask`, and what the config factory passes to each kind."""

import math
import pickle

import numpy as np
import pytest

from rlhf_ray.config import HttpSourceConfig, RewardSourceConfig
from rlhf_ray.rewards import RewardError, WeightedSum, build_reward_source, build_reward_sources, check_scores
from rlhf_ray.rewards import combine


class Constant:
    def __init__(self, name, values):
        self.name, self.values, self.calls = name, values, []

    def score(self, prompts, responses, metadata):
        self.calls.append(list(responses))
        return self.values


class RaisesOn:
    """Raises `error` on any batch holding a response in `bad`; 1.0 per sample otherwise."""

    def __init__(self, name, bad, error):
        self.name, self.bad, self.error, self.calls, self.metadata = name, set(bad), error, [], []

    def score(self, prompts, responses, metadata):
        self.calls.append(list(responses))
        self.metadata.append(list(metadata))
        if self.bad & set(responses):
            raise self.error
        return [1.0] * len(responses)


class Unconvertible:
    def __float__(self):
        raise ValueError("no value")


P3, R3, M3 = ["p"] * 3, ["a", "b", "c"], [{}] * 3


# --- base.check_scores and RewardError ---------------------------------------------------------------


def test_reward_error_message_and_fields():
    err = RewardError("rm", "went wrong")
    assert str(err) == "reward source 'rm': went wrong"
    assert (err.source, err.message, err.index, err.kind) == ("rm", "went wrong", None, "exception")
    err = RewardError("rm", "went wrong", 0, kind="timeout")
    assert str(err) == "reward source 'rm' (sample 0): went wrong"  # sample 0 is a sample, not "no sample"
    copy = pickle.loads(pickle.dumps(RewardError("rm", "bad", None)))
    assert (str(copy), copy.message, copy.index, copy.kind) == ("reward source 'rm': bad", "bad", None, "exception")


def test_check_scores_returns_python_floats():
    out = check_scores("s", [np.float32(0.5), 2, True, np.int64(-3)], 4)
    assert out == [0.5, 2.0, 1.0, -3.0] and all(type(x) is float for x in out)
    assert check_scores("s", (), 0) == []


@pytest.mark.parametrize("scores, shown", [
    ("ab", "'ab' (str)"), (b"ab", "b'ab' (bytes)"), ({0: 1.0, 1: 2.0}, "{0: 1.0, 1: 2.0} (dict)"),
    (0.5, "0.5 (float)"), (None, "None (NoneType)"),
])
def test_check_scores_refuses_a_non_list(scores, shown):
    with pytest.raises(RewardError) as err:
        check_scores("rule", scores, 2)
    assert str(err.value) == f"reward source 'rule': returned {shown}, expected a list of 2 floats"
    assert (err.value.kind, err.value.index) == ("wrong_type", None)
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_check_scores_counts():
    with pytest.raises(RewardError) as err:
        check_scores("rule", [1.0], 2)
    assert str(err.value) == "reward source 'rule': returned 1 scores for 2 samples"
    assert (err.value.kind, err.value.index) == ("wrong_count", None)
    with pytest.raises(RewardError, match="returned 3 scores for 2 samples"):
        check_scores("rule", [1.0, 2.0, 3.0], 2)


@pytest.mark.parametrize("bad, message, kind", [
    ("1.0", "score '1.0' (str) is not a number", "wrong_type"),  # float("1.0") works, but text is not a score
    (b"1", "score b'1' (bytes) is not a number", "wrong_type"),
    (None, "score None (NoneType) is not a number", "wrong_type"),
    ([1.0], "score [1.0] (list) is not a number", "wrong_type"),
    (Unconvertible(), "is not a number", "wrong_type"),  # __float__ raising ValueError
    (math.nan, "score nan is not finite", "non_finite"),
    (-math.inf, "score -inf is not finite", "non_finite"),
    (np.float64("inf"), "score inf is not finite", "non_finite"),
])
def test_check_scores_names_the_first_bad_sample(bad, message, kind):
    with pytest.raises(RewardError) as err:
        check_scores("rule", [0.0, bad, math.nan], 3)
    assert str(err.value).startswith("reward source 'rule' (sample 1): ") and message in str(err.value)
    assert (err.value.source, err.value.index, err.value.kind) == ("rule", 1, kind)
    assert err.value.__cause__ is None


def test_long_values_are_shortened_to_80_characters():
    long = "x" * 200
    with pytest.raises(RewardError) as err:
        check_scores("rule", [long], 1)
    assert err.value.message == f"score {repr(long)[:80]}… (str) is not a number"
    exactly = "y" * 78  # its repr is 80 characters: shown whole
    with pytest.raises(RewardError) as err:
        check_scores("rule", [exactly], 1)
    assert err.value.message == f"score {exactly!r} (str) is not a number"
    just_over = "z" * 79
    with pytest.raises(RewardError) as err:
        check_scores("rule", [just_over], 1)
    assert err.value.message == f"score {repr(just_over)[:80]}… (str) is not a number"


# --- WeightedSum.score_all (the `fail` policy) ----------------------------------------------------


def test_score_all_totals_three_sources():
    combined = WeightedSum([(Constant("a", [1.0, 2.0, 3.0]), 2), (Constant("b", [0.5, 0.0, -1.0]), -4),
                            (Constant("c", [10.0, 20.0, 30.0]), 0.1)])
    assert combined.weights == [2.0, -4.0, 0.1] and all(type(w) is float for w in combined.weights)
    total, per_source = combined.score_all(P3, R3, M3)
    assert total == pytest.approx([2 - 2 + 1, 4 + 0 + 2, 6 + 4 + 3])
    assert per_source == {"a": [1.0, 2.0, 3.0], "b": [0.5, 0.0, -1.0], "c": [10.0, 20.0, 30.0]}
    assert all(type(x) is float for x in per_source["a"])


def test_score_all_passes_a_reward_error_through_unchanged():
    original = RewardError("inner", "timed out", 2, kind="timeout")
    with pytest.raises(RewardError) as err:
        WeightedSum([(RaisesOn("outer", ["a"], original), 1.0)]).score_all(P3, R3, M3)
    assert err.value is original


def test_score_all_wraps_other_exceptions_naming_the_source():
    cause = KeyError("label")
    with pytest.raises(RewardError) as err:
        WeightedSum([(Constant("ok", [1.0] * 3), 1.0), (RaisesOn("rm", ["b"], cause), 1.0)]).score_all(P3, R3, M3)
    assert str(err.value) == "reward source 'rm': raised KeyError: 'label'"
    assert (err.value.source, err.value.index, err.value.kind) == ("rm", None, "exception")
    assert err.value.__cause__ is cause


def test_score_all_checks_each_source_against_the_batch_size():
    with pytest.raises(RewardError) as err:
        WeightedSum([(Constant("short", [1.0, 2.0]), 1.0)]).score_all(P3, R3, M3)
    assert str(err.value) == "reward source 'short': returned 2 scores for 3 samples"


def test_duplicate_names_are_numbered_in_order():
    sources = [(Constant(n, [0.0]), 1.0) for n in ("a", "b", "a", "c", "a", "b")]
    assert WeightedSum(sources).names == ["a_0", "b_0", "a_1", "c", "a_2", "b_1"]
    with pytest.raises(ValueError) as err:
        WeightedSum([])
    assert str(err.value) == "WeightedSum needs at least one reward source; set reward.sources."


def test_counters_are_prefixed_with_the_source_name():
    a, b, c = Constant("http", [0.0]), Constant("rule", [0.0]), Constant("http", [0.0])
    a.counters, c.counters = {"timeouts": 2, "retries": 5}, {"timeouts": 1}
    assert WeightedSum([(a, 1.0), (b, 1.0), (c, 1.0)]).counters() == {
        "http_0/timeouts": 2, "http_0/retries": 5, "http_1/timeouts": 1}


# --- WeightedSum.score_tolerant (the `mask` policy) -----------------------------------------------


def test_tolerant_total_is_the_weighted_sum_of_valid_samples():
    combined = WeightedSum([(Constant("a", [1.0, math.inf, 3.0]), 2.0), (Constant("b", [1.0, 1.0, -1.0]), 0.5)])
    total, per_source, valid, violations = combined.score_tolerant(P3, R3, M3)
    assert total[0] == 2.5 and total[2] == 5.5 and math.isnan(total[1])
    assert valid == [True, False, True]
    assert dict(violations) == {"non_finite": 1}
    assert per_source["b"] == [1.0, 1.0, -1.0]
    assert per_source["a"][0] == 1.0 and math.isnan(per_source["a"][1]) and per_source["a"][2] == 3.0


def test_tolerant_all_valid_counts_nothing():
    _, _, valid, violations = WeightedSum([(Constant("a", [1, 2.0, 3.0]), 1.0)]).score_tolerant(P3, R3, M3)
    assert valid == [True] * 3 and dict(violations) == {}  # no zero-count entries either


def test_tolerant_retries_a_raising_batch_sample_by_sample():
    source = RaisesOn("rule", ["b"], OSError("down"))
    meta = [{"i": 0}, {"i": 1}, {"i": 2}]
    total, per_source, valid, violations = WeightedSum([(source, 3.0)]).score_tolerant(P3, R3, meta)
    assert source.calls == [["a", "b", "c"], ["a"], ["b"], ["c"]]
    assert source.metadata == [meta, meta[:1], meta[1:2], meta[2:]]  # each sample with its own metadata
    assert valid == [True, False, True] and dict(violations) == {"exception": 1}
    assert total[0] == 3.0 and total[2] == 3.0 and math.isnan(total[1])
    assert per_source["rule"][0] == 1.0 and math.isnan(per_source["rule"][1])


def test_tolerant_keeps_the_kind_of_a_reward_error():
    source = RaisesOn("rule", ["c"], RewardError("rule", "bad", kind="wrong_type"))
    _, _, valid, violations = WeightedSum([(source, 1.0)]).score_tolerant(P3, R3, M3)
    assert valid == [True, True, False] and dict(violations) == {"wrong_type": 1}


def test_tolerant_does_not_retry_after_a_timeout():
    source = RaisesOn("http", ["a"], RewardError("http", "no reply in 5 s", kind="timeout"))
    other = Constant("rule", [1.0, 1.0, 1.0])
    total, per_source, valid, violations = WeightedSum([(other, 1.0), (source, 1.0)]).score_tolerant(P3, R3, M3)
    assert source.calls == [["a", "b", "c"]]  # asked once: retrying would multiply the wait
    assert valid == [False] * 3 and dict(violations) == {"timeout": 3}
    assert all(math.isnan(t) for t in total) and all(math.isnan(s) for s in per_source["http"])
    assert per_source["rule"] == [1.0, 1.0, 1.0]


def test_tolerant_single_sample_that_raises_is_asked_once():
    source = RaisesOn("rule", ["a"], ValueError("x"))
    _, _, valid, violations = WeightedSum([(source, 1.0)]).score_tolerant(["p"], ["a"], [{}])
    assert source.calls == [["a"]] and valid == [False] and dict(violations) == {"exception": 1}


@pytest.mark.parametrize("raw, kind", [
    ("abc", "wrong_type"), (b"abc", "wrong_type"), ({0: 1.0, 1: 1.0, 2: 1.0}, "wrong_type"), (1.0, "wrong_type"),
    ([1.0, 2.0], "wrong_count"), ([1.0] * 4, "wrong_count"),
])
def test_tolerant_malformed_batch_invalidates_every_sample(raw, kind):
    total, per_source, valid, violations = WeightedSum([(Constant("rule", raw), 1.0)]).score_tolerant(P3, R3, M3)
    assert valid == [False] * 3 and dict(violations) == {kind: 3}
    assert all(math.isnan(x) for x in per_source["rule"]) and all(math.isnan(t) for t in total)


def test_tolerant_marks_each_bad_value_by_kind():
    raw = ["1.0", None, math.nan, 2, b"x", -math.inf, Unconvertible(), np.float32(0.5)]
    n = len(raw)
    total, per_source, valid, violations = WeightedSum([(Constant("rule", raw), 2.0)]).score_tolerant(
        ["p"] * n, ["r"] * n, [{}] * n)
    assert valid == [False, False, False, True, False, False, False, True]
    assert dict(violations) == {"wrong_type": 4, "non_finite": 2}
    assert total[3] == 4.0 and total[7] == 1.0
    scores = per_source["rule"]
    assert scores[3] == 2.0 and scores[7] == 0.5 and all(math.isnan(scores[i]) for i in (0, 1, 2, 4, 5, 6))


def test_tolerant_sums_violations_over_sources():
    a = Constant("a", [math.nan, 1.0, math.nan])
    b = RaisesOn("b", ["a", "c"], RuntimeError("x"))
    _, _, valid, violations = WeightedSum([(a, 1.0), (b, 1.0)]).score_tolerant(P3, R3, M3)
    assert valid == [False, True, False] and dict(violations) == {"non_finite": 2, "exception": 2}


# --- the factory -------------------------------------------------------------------------------


def test_build_reward_sources_needs_one_path_per_source():
    cfgs = [RewardSourceConfig(kind="function", path="rlhf_ray.toy.task:vowel_reward")]
    with pytest.raises(ValueError) as err:
        build_reward_sources(cfgs, ["a", "b"])
    assert str(err.value) == "build_reward_sources: 2 paths for 1 sources; pass one per source."


def test_build_reward_sources_weights_and_names():
    cfgs = [RewardSourceConfig(kind="function", path="rlhf_ray.toy.task:vowel_reward", weight=0.25),
            RewardSourceConfig(kind="function", path="rlhf_ray.toy.task:vowel_reward", name="v", weight=-2)]
    combined = build_reward_sources(cfgs, [None, None])
    assert combined.names == ["vowel_reward", "v"] and combined.weights == [0.25, -2.0]


@pytest.fixture
def recorded(monkeypatch):
    """The factory's constructors replaced by recorders of their arguments."""
    calls = []

    def recorder(kind):
        def make(*args, **kwargs):
            calls.append((kind, args, kwargs))
            return kind
        return make

    for kind in ("ModelReward", "JudgeReward", "HttpReward"):
        monkeypatch.setattr(combine, kind, recorder(kind))
    return calls


def test_build_model_source_names_it_after_the_path(recorded):
    cfg = RewardSourceConfig(kind="model", path="org/reward-model/")
    assert build_reward_source(cfg, "/resolved/dir", trust_remote_code=True, batch_size=7) == "ModelReward"
    assert recorded == [("ModelReward", ("/resolved/dir",),
                         {"batch_size": 7, "trust_remote_code": True, "name": "reward-model"})]
    build_reward_source(RewardSourceConfig(kind="model", path="toy", name="rm"), "/d")
    assert recorded[-1] == ("ModelReward", ("/d",), {"batch_size": 32, "trust_remote_code": False, "name": "rm"})


def test_build_judge_source_gets_its_engine(recorded):
    cfg = RewardSourceConfig(kind="judge", path="toy", name="j")
    engines = []
    build_reward_source(cfg, "/judge", trust_remote_code=True, batch_size=3,
                        make_engine=lambda path: engines.append(path) or "engine")
    assert engines == ["/judge"]
    assert recorded == [("JudgeReward", ("/judge",), {"options": None, "name": "j", "batch_size": 3,
                                                       "trust_remote_code": True, "engine": "engine"})]
    build_reward_source(cfg, "/judge")
    assert recorded[-1][2]["engine"] is None and recorded[-1][2]["batch_size"] == 32


def test_build_http_source_gets_its_options(recorded):
    cfg = RewardSourceConfig(kind="http", name="remote", http=HttpSourceConfig(url="http://127.0.0.1:9/score"))
    build_reward_source(cfg, None)
    assert recorded == [("HttpReward", (cfg.http,), {"name": "remote"})]


def test_build_function_source(recorded):
    source = build_reward_source(RewardSourceConfig(kind="function", path="rlhf_ray.toy.task:vowel_reward",
                                                    name="vowel"), "ignored")
    assert source.name == "vowel" and source.spec == "rlhf_ray.toy.task:vowel_reward" and recorded == []
