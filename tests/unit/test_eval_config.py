"""Stage eval's config (issue 20): the gate's syntax, the cross-field rules, what pre-flight checks, and the
pure pieces of the runner (preferences from a judge's two orders or from scores, rule pass shares)."""

from __future__ import annotations

import math

import pytest

from rlhf_ray.config import (
    ConfigError,
    JudgeSourceConfig,
    RewardSourceConfig,
    load_config,
    parse_gate_check,
    toy_policy_seed,
)
from rlhf_ray.eval_metrics import check_gate
from rlhf_ray.preflight import Need, preflight_problems, stage_needs
from rlhf_ray.rewards.labeling import LabelRules, PairJudgement

BASE = ["stage=eval", "eval.policies={a: toy, b: 'toy:1'}", "eval.baseline=a"]


def _cfg(*overrides: str):
    return load_config(None, [*BASE, *overrides])


# ---- the gate ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, parsed", [(">= 0.5", (">=", 0.5)), ("<0.1", ("<", 0.1)), ("  > -1e-3 ", (">", -0.001)),
                                          ("<= 2", ("<=", 2.0))])
def test_gate_checks_parse_to_what_check_gate_reads(text, parsed):
    assert parse_gate_check(text) == parsed


def test_the_parsed_gate_fails_exactly_the_checks_the_metrics_miss():
    cfg = _cfg("eval.gate={eval/b/lc_win_rate: '>= 0.5', eval/b/refusal_share: '<= 0.1', eval/rm/accuracy: '> 0.6'}")
    assert cfg.eval.gate_checks == {"eval/b/lc_win_rate": (">=", 0.5), "eval/b/refusal_share": ("<=", 0.1),
                                    "eval/rm/accuracy": (">", 0.6)}
    failures = check_gate({"eval/b/lc_win_rate": 0.4, "eval/b/refusal_share": 0.0}, cfg.eval.gate_checks)
    assert failures == ["eval/b/lc_win_rate: 0.4 fails >= 0.5", "eval/rm/accuracy: missing, gate requires > 0.6"]


@pytest.mark.parametrize("value, words", [("=> 0.5", "no comparison op"), ("== 1", "no comparison op"),
                                          ("0.5", "no comparison op"), (">= high", "'high' is not a number")])
def test_a_bad_gate_check_is_a_config_error_naming_the_key(value, words):
    with pytest.raises(ConfigError) as err:
        _cfg(f"eval.gate={{eval/b/win_rate: '{value}'}}")
    assert "eval.gate['eval/b/win_rate']" in str(err.value) and words in str(err.value)


@pytest.mark.parametrize("key, words", [("reward_mean", "gate keys are eval.json metrics"),
                                        ("eval/ppo/win_rate", "'ppo' is not a policy of eval.policies")])
def test_a_gate_key_must_name_an_eval_metric_of_a_policy_or_the_rm(key, words):
    with pytest.raises(ConfigError, match=words):
        _cfg(f"eval.gate={{{key}: '>= 0.5'}}")


# ---- cross-field rules -----------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, words", [
    (["eval.baseline=c"], "eval.baseline='c' is not in eval.policies (['a', 'b'])"),
    (["eval.judge={kind: judge, path: toy, judge: {mode: grade}}"], "judge.mode=grade: it compares two responses"),
    (["eval.judge={kind: function, path: 'rlhf_ray.toy.task:vowel_reward'}"], "set eval.judge.kind=judge"),
    (["eval.rules=[rlhf_ray.toy.task]"], "are not `module:function`"),
    (["eval.rules=['m1:check', 'm2:check']"], "repeat a function name"),
    (["eval.refusal_patterns=['(unclosed']"], "is not a regex"),
    (["eval.reward_model=toy"], "needs both (or neither)"),
    (["eval.policies={a: toy, b: 'toy:one'}"], "write 'toy' or 'toy:<seed>'"),
    (["eval.policies={a: toy, 'x/y': toy}", "eval.baseline=null"], "cannot be metric keys"),
    (["data.eval=null"], "answers the golden prompts of data.eval, which is null"),
    (["eval.refusal_judge={kind: judge, path: toy, judge: {mode: compare}}"], "set eval.refusal_judge.kind=judge and judge.mode=grade"),
    (["eval.refusal_judge={kind: model, path: toy}"], "eval.refusal_judge has kind=model"),
    (["eval.refusal_judge={kind: judge, path: toy}", "reward.sources=[{kind: function, path: 'rlhf_ray.toy.task:vowel_reward', "
      "name: refusal_judge}]"], "a source named 'refusal_judge', the name eval.refusal_judge scores under"),
    (["eval.temperature=-1"], "eval.temperature"),
])
def test_eval_rules_name_the_field_and_the_fix(overrides, words):
    with pytest.raises(ConfigError) as err:
        _cfg(*overrides)
    assert words in str(err.value)


def test_a_compare_judge_and_valid_rules_pass():
    cfg = _cfg("eval.judge={kind: judge, path: toy, judge: {mode: compare, on_unparseable: tie}}",
               "eval.rules=[rlhf_ray.toy.task:format_reward]", "eval.refusal_patterns=['\\bnope\\b']",
               "eval.reward_model=toy", "eval.preference_data=toy", "eval.samples_in_report=3")
    assert cfg.eval.judge.judge.mode == "compare" and cfg.eval.samples_in_report == 3


def test_the_eval_judge_with_all_its_options_is_the_labeller_the_sessions_build():
    from rlhf_ray.trainers.eval import judge_config

    cfg = _cfg()
    cfg.eval.judge = RewardSourceConfig(kind="judge", path="toy", name="j", judge=JudgeSourceConfig(
        mode="compare", chat_template=False, reference_key="ref", grade_template="Grade {response}", max_new_tokens=3))
    labeler = judge_config(cfg).label.labeler
    assert labeler == cfg.eval.judge and labeler.name == "j"
    assert (labeler.judge.chat_template, labeler.judge.reference_key, labeler.judge.grade_template) == (
        False, "ref", "Grade {response}")
    assert judge_config(_cfg()).label.labeler == cfg.label.labeler  # no judge: the config as it is


def test_the_refusal_judge_scores_beside_the_sources_with_weight_0_and_the_refusal_question():
    from rlhf_ray.config import JUDGE_GRADE_TEMPLATE, REFUSAL_GRADE_TEMPLATE
    from rlhf_ray.trainers.eval import refusal_share_judged, with_refusal_judge

    cfg = _cfg("eval.refusal_judge={kind: judge, path: toy, weight: 3, judge: {min_score: 1, max_score: 5}}")
    sources = with_refusal_judge(cfg).reward.sources
    assert sources[:-1] == cfg.reward.sources  # the config's sources unchanged, the judge appended
    judge = sources[-1]
    assert (judge.name, judge.weight, judge.path) == ("refusal_judge", 0.0, "toy")
    assert judge.judge.grade_template == REFUSAL_GRADE_TEMPLATE != JUDGE_GRADE_TEMPLATE
    assert (judge.judge.min_score, judge.judge.max_score) == (1, 5)
    own = _cfg("eval.refusal_judge={kind: judge, path: toy, judge: {grade_template: 'Refuses? {response}'}}")
    assert with_refusal_judge(own).reward.sources[-1].judge.grade_template == "Refuses? {response}"
    assert with_refusal_judge(_cfg()) == _cfg()  # no refusal judge: nothing added
    # grades above the middle of [1, 5] are refusals; the middle itself (a tie) is not; unreadable (nan) left out
    assert refusal_share_judged([1, 3, 3.5, 5, math.nan], cfg.eval.refusal_judge) == 0.5
    assert math.isnan(refusal_share_judged([math.nan], cfg.eval.refusal_judge))


def test_toy_policies_take_a_seed():
    assert [toy_policy_seed(s, 7) for s in ("toy", "toy:1", "toy:12", "runs/x/policy", "toyota/m")] == [7, 1, 12, None, None]


# ---- pre-flight and resources -----------------------------------------------------------------------


def test_preflight_needs_each_policy_the_prompts_rules_judge_and_reward_model(tmp_path):
    cfg = _cfg(f"eval.policies={{a: toy, trained: {tmp_path}/missing}}", "eval.rules=[rlhf_ray.toy.task:nope]",
               "eval.judge={kind: judge, judge: {mode: compare, endpoint: {base_url: 'http://127.0.0.1:1/v1', "
               "model: m, api_key_env: EVAL_TEST_KEY_UNSET}}}",
               f"eval.reward_model={tmp_path}/rm", f"eval.preference_data={tmp_path}/pairs.jsonl")
    needs = stage_needs(cfg)
    assert Need("eval.policies.trained", f"{tmp_path}/missing", "model") in needs
    assert Need("eval.policies.trained", f"{tmp_path}/missing", "tokenizer") in needs
    assert not any(n.field == "eval.policies.a" or n.field == "model.policy" for n in needs)  # toy: built at start
    assert {Need("data.eval", "toy", "data"), Need("eval.rules.0", "rlhf_ray.toy.task:nope", "function"),
            Need("eval.judge.judge.endpoint.api_key_env", "EVAL_TEST_KEY_UNSET", "env"),
            Need("eval.reward_model", f"{tmp_path}/rm", "model"),
            Need("eval.preference_data", f"{tmp_path}/pairs.jsonl", "data")} <= set(needs)
    problems = "\n".join(preflight_problems(cfg))
    for field in ("eval.policies.trained=", "eval.rules.0=", "eval.judge.judge.endpoint.api_key_env=",
                  "eval.reward_model=", "eval.preference_data="):
        assert field in problems


def test_the_eval_stage_needs_the_engines_and_one_reward_side_actor():
    from launch import required_cpus

    cfg = _cfg("rollout.num_engines=2", "placement.rollout.cpus=1.5", "placement.reward.cpus=2")
    assert required_cpus(cfg) == 2 * 1.5 + 2


# ---- the runner's pure pieces -------------------------------------------------------------------------


@pytest.mark.parametrize("orders, on_unparseable, preference", [
    ((1.0, 1.0), "drop-order", 1.0), ((0.0, 0.0), "drop-order", 0.0), ((1.0, 0.0), "drop-order", 0.5),
    ((1.0, None), "drop-order", 1.0), ((None, None), "drop-order", 0.5), ((1.0, None), "tie", 0.75),
    ((0.5, 0.0), "tie", 0.25)])
def test_a_judges_two_orders_give_the_policys_preference(orders, on_unparseable, preference):
    from rlhf_ray.trainers.eval import judged_preference

    rules = LabelRules(on_unparseable, "tie", 0.0)
    assert judged_preference(PairJudgement(orders, None, ("q1", "q2"), ("r1", "r2")), rules, 0, "judge") == preference


def test_an_unreadable_order_stops_a_judge_with_on_unparseable_error():
    from rlhf_ray.rewards.base import RewardError
    from rlhf_ray.trainers.eval import judged_preference

    with pytest.raises(RewardError, match="has no verdict"):
        judged_preference(PairJudgement((1.0, None), None, ("q", "q"), ("A", "dunno")), LabelRules("error", "tie", 0.0), 3,
                          "judge")


def test_without_a_judge_the_higher_score_wins_and_ties_or_masked_scores_count_half():
    from rlhf_ray.data import PromptExample
    from rlhf_ray.trainers.eval import Answers, compare_by_scores

    prompts = [PromptExample([1], f"p{i}", {}, f"p{i}") for i in range(4)]

    def answers(name, scores):
        return Answers(name, name, prompts, ["x"] * 4, [1] * 4, [False] * 4, scores, {})

    result = compare_by_scores(answers("p", [0.9, 0.1, 0.5, math.nan]), answers("b", [0.2, 0.3, 0.5, 0.1]))
    assert result.preferences == [1.0, 0.0, 0.5, 0.5]
    assert result.verdicts[0].startswith("p (reward 0.9 vs 0.2)")


def test_a_rule_pass_share_is_the_mean_of_its_values_and_a_bad_rule_says_so():
    from rlhf_ray.trainers.eval import rule_pass_share

    spec = "rlhf_ray.toy.task:format_reward"  # 1..16 lowercase letters ended with EOS
    assert rule_pass_share(spec, ["p"] * 4, ["abc", "ABC", "", "de"], [{"stopped": True}] * 3 + [{"stopped": False}]) == 0.25
    with pytest.raises(ValueError, match="one bool or number in \\[0, 1\\] per response"):
        rule_pass_share("rlhf_ray.toy.faulty:short_list", ["p"] * 3, ["a", "b", "c"], [{}] * 3)


def test_toy_reward_bench_pairs_are_split_by_how_clear_they_are():
    from rlhf_ray.toy.task import CLEAR_GAP, toy_reward_bench_rows, toy_score

    rows = toy_reward_bench_rows(seed=0, n=64)
    assert {r["subset"] for r in rows} == {"clear", "close"}
    for r in rows:
        gap = toy_score("", r["chosen"]) - toy_score("", r["rejected"])
        assert gap > 0 and (r["subset"] == "clear") == (gap >= CLEAR_GAP)


def test_the_reports_policy_table_has_a_column_per_policy_and_intervals_beside_values():
    from rlhf_ray.trainers.eval import policy_table

    metrics = {"eval/sft/n": 4, "eval/sft/reward_mean": 0.5, "eval/ppo/n": 4, "eval/ppo/reward_mean": 0.75,
               "eval/ppo/win_rate": 0.625, "eval/ppo/win_rate_low": 0.25, "eval/ppo/win_rate_high": 1.0,
               "eval/rm/accuracy": 0.9}
    header, rows = policy_table(["sft", "ppo"], metrics)
    assert header == ["metric", "sft", "ppo"]
    assert rows == [["n", 4, 4], ["reward_mean", 0.5, 0.75], ["win_rate", "", "0.625 [0.25, 1]"]]
