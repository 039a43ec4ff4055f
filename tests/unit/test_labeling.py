"""AI preference labelling (rlhf_ray.rewards.labeling): how one pair's verdicts become a label or a
counted drop, for every unparseable / disagreement policy; agreement and first-position rates; the
labeller with real toy judges steered to be position-biased (always "A") or to prefer vowels, and
with a scorer; the label stage's pairing of samples."""

import pytest

from rlhf_ray.config import JudgeSourceConfig, RunConfig, load_config
from rlhf_ray.data import PromptExample
from rlhf_ray.rewards import FunctionReward, RewardError
from rlhf_ray.rewards.labeling import Decision, LabelRules, PairJudgement, PairLabeler, decide, summarise
from rlhf_ray.toy import build_char_tokenizer
from rlhf_ray.trainers.label import candidate_pairs, label_rules
from rlhf_ray.workers import LabelWorker, ModelPaths
from tests.unit.test_judge import prefers_vowels, steered_judge

PROMPTS = ["<|user|>say: abc\n<|assistant|>", "<|user|>say: hi\n<|assistant|>", "<|user|>say: xyz\n<|assistant|>"]
A = ["aeiou", "brr", "zza"]
B = ["bcd", "oo", "zaz"]  # vowels: A wins, B wins, equal
META = [{"stopped": True}] * 3


def rules(unparseable="drop-order", disagreement="drop", gap=0.0) -> LabelRules:
    return LabelRules(unparseable, disagreement, gap)


@pytest.mark.parametrize("orders, unparseable, disagreement, expected", [
    ((1.0, 1.0), "drop-order", "drop", Decision("A", "kept", 1.0)),
    ((0.0, 0.0), "drop-order", "drop", Decision("B", "kept", 1.0)),
    ((1.0, 0.0), "drop-order", "drop", Decision(None, "disagreement")),  # position bias: each order picks its first
    ((1.0, 0.0), "drop-order", "tie", Decision(None, "tie")),
    ((1.0, 0.5), "drop-order", "drop", Decision(None, "disagreement")),
    ((1.0, 0.5), "drop-order", "tie", Decision("A", "kept", 0.75)),
    ((0.5, 0.5), "drop-order", "drop", Decision(None, "tie")),
    ((None, None), "drop-order", "drop", Decision(None, "unparseable")),
    ((None, 0.0), "drop-order", "drop", Decision("B", "kept", 1.0)),  # the readable order decides alone
    ((None, None), "tie", "drop", Decision(None, "tie")),
    ((1.0, None), "tie", "drop", Decision(None, "disagreement")),
    ((1.0, None), "tie", "tie", Decision("A", "kept", 0.75)),
])
def test_judge_verdicts_to_a_label(orders, unparseable, disagreement, expected):
    assert decide(PairJudgement(orders), rules(unparseable, disagreement)) == expected


def test_unparseable_error_names_the_pair_and_quotes_the_reply():
    judgement = PairJudgement((1.0, None), None, ("q1", "q2"), ("A", "no idea"))
    with pytest.raises(RewardError) as err:
        decide(judgement, rules("error"), index=7, source="judge")
    assert err.value.index == 7 and "judge reply 'no idea' has no verdict" in str(err.value)


@pytest.mark.parametrize("scores, gap, expected", [
    ((0.7, 0.2), 0.0, Decision("A", "kept", pytest.approx(0.5))),
    ((0.2, 0.2), 0.0, Decision(None, "tie")),
    ((0.3, 0.5), 0.25, Decision(None, "tie")),
    ((0.3, 0.6), 0.25, Decision("B", "kept", pytest.approx(0.3))),
])
def test_scores_to_a_label(scores, gap, expected):
    assert decide(PairJudgement((), scores), rules(gap=gap)) == expected


def test_summary_rates():
    judgements = [PairJudgement((1.0, 1.0)), PairJudgement((1.0, 0.0)), PairJudgement((0.5, 0.5)),
                  PairJudgement((None, 0.0)), PairJudgement((0.0, 1.0))]
    decisions = [decide(j, rules()) for j in judgements]
    out = summarise(judgements, decisions)
    assert out["pairs"] == 5 and out["kept"] == 2 and out["dropped"] == {"disagreement": 2, "tie": 1}
    assert out["agreement"] == 2 / 4  # (1,1) and (½,½) agree of the four pairs with both orders read
    # decisive order verdicts (first shown won?): (1,1) yes, no; (1,0) yes, yes; (None,0) yes; (0,1) no, no
    assert out["first_position_rate"] == pytest.approx(4 / 7)
    assert out["unparseable_orders"] == 1


def test_a_position_biased_judge_is_caught_by_both_orders():
    tok = build_char_tokenizer()
    always_a = PairLabeler(steered_judge(tok, lambda text: "A", mode="compare", max_new_tokens=4))
    judgements = always_a.label(PROMPTS, A, B, META, META)
    assert [j.orders for j in judgements] == [(1.0, 0.0)] * 3
    template = JudgeSourceConfig().compare_template
    for p, a, b, j in zip(PROMPTS, A, B, judgements):
        assert j.queries == (template.format(prompt=p, response_a=a, response_b=b),
                             template.format(prompt=p, response_a=b, response_b=a))
        assert j.replies == ("A", "A")
    out = summarise(judgements, [decide(j, rules()) for j in judgements])
    assert (out["kept"], out["agreement"], out["first_position_rate"]) == (0, 0.0, 1.0)
    assert out["dropped"] == {"disagreement": 3}
    assert [decide(j, rules(disagreement="tie")).reason for j in judgements] == ["tie"] * 3


def test_a_consistent_judge_labels_its_preference():
    tok = build_char_tokenizer()
    labeler = PairLabeler(steered_judge(tok, prefers_vowels, mode="compare"))
    judgements = labeler.label(PROMPTS, A, B, META, META)
    # equal vowel shares: the steered judge says "A" in both orders (position-biased on ties)
    assert [j.orders for j in judgements] == [(1.0, 1.0), (0.0, 0.0), (1.0, 0.0)]
    assert [decide(j, rules()).choice for j in judgements] == ["A", "B", None]
    assert summarise(judgements, [decide(j, rules()) for j in judgements])["agreement"] == pytest.approx(2 / 3)


def test_a_scorer_labels_by_score():
    labeler = PairLabeler(FunctionReward("rlhf_ray.toy.task:vowel_reward", name="vowel"))
    judgements = labeler.label(PROMPTS, A, B, META, META)
    assert [j.scores for j in judgements] == [(1.0, 0.0), (0.0, 1.0), (pytest.approx(1 / 3), pytest.approx(1 / 3))]
    assert [decide(j, rules()).choice for j in judgements] == ["A", "B", None]


def test_label_worker_without_ray(tmp_path):
    tok_dir = tmp_path / "tok"
    build_char_tokenizer().save_pretrained(tok_dir)
    cfg = load_config(None, ["stage=label", "label.labeler={kind: function, path: 'rlhf_ray.toy.task:vowel_reward'}"])
    paths = ModelPaths(str(tok_dir), str(tok_dir), str(tok_dir), str(tok_dir))
    worker = LabelWorker(cfg, paths, None)
    assert [j.scores for j in worker.label(PROMPTS[:1], A[:1], B[:1], META[:1], META[:1])] == [(1.0, 0.0)]
    with pytest.raises(RuntimeError, match="no reward.sources"):
        worker.score({}, [])
    assert label_rules(cfg) == LabelRules("error", "drop", 0.0)  # no judge options: unparseable would be an error
    assert label_rules(RunConfig(stage="label")) == LabelRules("drop-order", "drop", 0.0)


def test_candidate_pairs_pair_neighbours_and_drop_empty_or_identical():
    prompts = [PromptExample([1], "p", {}, "p"), PromptExample([2], "q", {}, "q")]
    texts = ["a", "b", "c", "c", " ", "d", "e", "f"]
    pairs, dropped = candidate_pairs(prompts, texts, [True, False] * 4, per_prompt=4)
    assert [(c.prompt.prompt, c.response_a, c.response_b, c.stopped_a, c.stopped_b) for c in pairs] == [
        ("p", "a", "b", True, False), ("q", "e", "f", True, False)]
    assert dropped == {"identical": 1, "empty_response": 1}
