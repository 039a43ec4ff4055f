"""LLM-as-judge: verdict parsing on hand-written replies, and the judge source end to end with toy
policies as judges: the random one (its replies are unparseable: counters and every on_unparseable
policy checked exactly), and one whose logits are steered by what it reads (always "A", or the
response with more vowels), which shows both orders are asked and position bias cancels."""

import re
import string

import pytest
import torch

from rlhf_ray.config import JudgeSourceConfig, RewardSourceConfig
from rlhf_ray.rewards import JudgeReward, RewardError, build_reward_sources, parse_choice, parse_grade
from rlhf_ray.toy import build_char_tokenizer, build_policy, toy_score

PROMPTS = ["<|user|>say: abc\n<|assistant|>", "<|user|>say: hello\n<|assistant|>", "<|user|>say: xyz\n<|assistant|>",
           "<|user|>say: q\n<|assistant|>"]
RESPONSES = ["aeiou", "brr", "zzz a", "oo"]
REFERENCES = ["bab", "aei", "zzz a", "ox"]
METADATA = [{"stopped": True, "reference": ref} for ref in REFERENCES]


# --- parsing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("7", 7.0), (" 7.\n", 7.0), ("**4**", 4.0), ("Score: 7", 7.0), ("score = 8.5", 8.5), ("Rating: 9/10", 9.0),
    ("I'd give it a score of 6 out of 10.", 6.0), ("**Score:** 4", 4.0), ("The answer has 3 flaws. Score: 2", 2.0),
    ("Score: 3. On reflection, final score: 8", 8.0), ("7/10", 7.0), ("8 out of 10", 8.0), ("Grade: 0", 0.0),
    ("Score: 7.5/10", 7.5), ("Score: 10", 10.0), ("score is 5", 5.0),
    # unparseable
    ("3/5", None), ("Score: 11", None), ("Score: -1", None), ("Score: 7/5", None), ("great response!", None),
    ("", None), ('4Ev:="MV4Ev:="MV', None), ("The response mentions 3 cats", None), ("underscore 5", None),
    ("Score:", None),
])
def test_parse_grade(text, expected):
    assert parse_grade(text, 0, 10) == expected


def test_parse_grade_range_and_denominator():
    assert parse_grade("5/5", 1, 5) == 5.0 and parse_grade("Score: 3/5", 1, 5) == 3.0
    assert parse_grade("Grade: 0", 1, 5) is None and parse_grade("4/10", 1, 5) is None


@pytest.mark.parametrize("text, expected", [
    ("A", "A"), ("B", "B"), ("(B)", "B"), ("**A**", "A"), ("Response A", "A"), ("A.", "A"), (" B\n", "B"),
    ("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie"), ("My final verdict is [[B]].", "B"),
    ("Verdict: B", "B"), ("The better response is A.", "A"), ("Answer: Response B", "B"), ("I prefer B.", "B"),
    ("Winner: tie", "tie"), ("verdict - A", "A"), ("Preferred: **B**", "B"),
    ("Response A is better than response B.", "A"), ("B wins.", "B"), ("Output B is preferred", "B"),
    ("tie", "tie"), ("It's a tie.", "tie"), ("Both are equally good.", "tie"), ("No preference", "tie"), ("Draw", "tie"),
    ("Verdict: A. It is not a tie.", "A"),
    # unparseable
    ("", None), ("4wW`7S 4wW`7S 4w", None), ("a", None), ("b", None), ("The answer is a good one.", None),
    ("AB", None), ("A or B", None), ("Verdict: A. Verdict: B.", None), ("I cannot decide between these", None),
    ("entities", None), ("Response A is better. Response B is better.", None), ("[[A]] [[B]]", None),
])
def test_parse_choice(text, expected):
    assert parse_choice(text) == expected


# --- judges -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("judge")
    build_policy(tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def random_judge(judge_dir, **options) -> JudgeReward:
    return JudgeReward(judge_dir, options=JudgeSourceConfig(**options))


def steered_judge(tokenizer, choose, **options) -> JudgeReward:
    """A toy policy whose first reply token is `choose(prompt text)` ("A", "B", "7", …) and then EOS.

    A forward hook rewrites the last-position logits: at the prefill step (the whole prompt in
    view) towards the chosen character, at later steps towards EOS.
    """
    model = build_policy(tokenizer, seed=0)

    def steer(module, args, kwargs, output):
        input_ids = kwargs["input_ids"]  # (B, L)
        for row in range(input_ids.shape[0]):
            target = tokenizer.eos_token_id
            if input_ids.shape[1] > 1:
                target = tokenizer.convert_tokens_to_ids(choose(tokenizer.decode(input_ids[row])))
            output.logits[row, -1] = torch.where(torch.arange(len(tokenizer)) == target, 100.0, -100.0)
        return output

    model.register_forward_hook(steer, with_kwargs=True)
    return JudgeReward(model, tokenizer, options=JudgeSourceConfig(**options))


def prefers_vowels(text: str) -> str:
    """Picks the response with the larger share of vowels; "A" when equal (a position-biased judge)."""
    a, b = re.search(r"Response A: (.*)\nResponse B: (.*)\n", text).groups()
    return "B" if toy_score("", b) > toy_score("", a) else "A"


def expected_pair_score(wins: list, policy: str) -> float:
    """The documented on_unparseable semantics, from the per-order results (None = unparseable)."""
    if policy == "drop-order":
        kept = [w for w in wins if w is not None]
        return sum(kept) / len(kept) if kept else 0.5
    return sum(0.5 if w is None else w for w in wins) / len(wins)


def order_result(reply: str, swapped: bool):
    choice = parse_choice(reply)
    return None if choice is None else 0.5 if choice == "tie" else float((choice == "A") != swapped)


def test_both_orders_are_asked_with_the_template(judge_dir):
    judge = random_judge(judge_dir, mode="compare", on_unparseable="tie")
    judge.score(PROMPTS, RESPONSES, METADATA)
    queries = judge.last_queries
    assert [(q.sample, q.swapped) for q in queries] == [(i, s) for i in range(4) for s in (False, True)]
    template = JudgeSourceConfig().compare_template
    for q in queries:
        response, reference = RESPONSES[q.sample], REFERENCES[q.sample]
        a, b = (reference, response) if q.swapped else (response, reference)
        assert q.prompt == template.format(prompt=PROMPTS[q.sample], response_a=a, response_b=b)


@pytest.mark.parametrize("policy", ["tie", "drop-order"])
def test_random_judge_compare_policies_exactly(judge_dir, policy):
    judge = random_judge(judge_dir, mode="compare", on_unparseable=policy)
    scores = judge.score(PROMPTS, RESPONSES, METADATA)
    wins = [order_result(q.reply, q.swapped) for q in judge.last_queries]
    unparseable = sum(w is None for w in wins)
    assert unparseable >= 6, "the random toy judge should mostly babble"
    assert judge.last_counts == {"verdicts": 8, "unparseable": unparseable,
                                 "no_verdict": sum(wins[2 * i] is None and wins[2 * i + 1] is None for i in range(4))}
    assert scores == [expected_pair_score(wins[2 * i : 2 * i + 2], policy) for i in range(4)]
    judge.score(PROMPTS, RESPONSES, METADATA)  # same replies again: cumulative counters double
    assert judge.counters == {k: 2 * v for k, v in judge.last_counts.items()}


def test_random_judge_error_policy_names_the_sample(judge_dir):
    for mode in ("compare", "grade"):
        judge = random_judge(judge_dir, mode=mode, on_unparseable="error")
        with pytest.raises(RewardError) as info:
            judge.score(PROMPTS, RESPONSES, METADATA)
        replies = [q.reply for q in judge.last_queries]
        parsed = [parse_choice(r) if mode == "compare" else parse_grade(r, 0, 10) for r in replies]
        first = next(i for i, p in enumerate(parsed) if p is None)
        assert info.value.source == "judge" and info.value.index == judge.last_queries[first].sample
        assert f"judge reply {replies[first][:120]!r}" in str(info.value)
        assert "has no verdict; on_unparseable=error" in str(info.value)
        assert judge.counters["unparseable"] == sum(p is None for p in parsed) > 0  # the whole call was counted


def test_random_judge_grade_tie_is_the_mid_grade(judge_dir):
    judge = random_judge(judge_dir, mode="grade", on_unparseable="tie", min_score=1, max_score=5)
    scores = judge.score(PROMPTS, RESPONSES, METADATA)
    grades = [parse_grade(q.reply, 1, 5) for q in judge.last_queries]
    assert len(judge.last_queries) == 4 and judge.last_counts["unparseable"] == sum(g is None for g in grades) >= 3
    assert scores == [3.0 if g is None else g for g in grades]
    assert "from 1 (worst) to 5 (best)" in judge.last_queries[0].prompt


def test_position_bias_cancels(tokenizer):
    always_a = steered_judge(tokenizer, lambda text: "A", mode="compare", max_new_tokens=4)
    assert always_a.score(PROMPTS, RESPONSES, METADATA) == [0.5] * 4
    assert [q.reply for q in always_a.last_queries] == ["A"] * 8
    assert always_a.last_counts == {"verdicts": 8, "unparseable": 0, "no_verdict": 0}


def test_judge_that_prefers_vowels(tokenizer):
    judge = steered_judge(tokenizer, prefers_vowels, mode="compare")
    scores = judge.score(PROMPTS, RESPONSES, METADATA)
    # more vowels than the reference: wins both orders; fewer: loses both; equal ("zzz a"): A both times → ½
    assert scores == [1.0, 0.0, 0.5, 1.0]
    assert judge.compare_pairs(PROMPTS, REFERENCES, RESPONSES) == [0.0, 1.0, 0.5, 0.0]


def test_compare_pairs_of_identical_responses_is_a_tie(judge_dir, tokenizer):
    judges = (random_judge(judge_dir, on_unparseable="tie"),  # grade mode: compare_pairs still compares
              random_judge(judge_dir, mode="compare", on_unparseable="drop-order"), steered_judge(tokenizer, prefers_vowels))
    for judge in judges:
        assert judge.compare_pairs(PROMPTS, RESPONSES, RESPONSES) == [0.5] * 4
        assert len(judge.last_queries) == 8


def test_steered_grade(tokenizer):
    judge = steered_judge(tokenizer, lambda text: "7", mode="grade", on_unparseable="error")
    assert judge.score(PROMPTS, RESPONSES, METADATA) == [7.0] * 4
    assert judge.counters == {"verdicts": 4, "unparseable": 0, "no_verdict": 0}


def test_compare_needs_the_reference(judge_dir):
    judge = random_judge(judge_dir, mode="compare", on_unparseable="tie")
    with pytest.raises(RewardError, match=r"'judge' \(sample 1\).*metadata\['reference'\].*got None"):
        judge.score(PROMPTS[:2], RESPONSES[:2], [{"reference": "x"}, {}])


def test_config_builds_a_judge(judge_dir):
    judge_cfg = JudgeSourceConfig(mode="compare", on_unparseable="drop-order", max_new_tokens=4,
                                  compare_template="{prompt} | {response_a} | {response_b} ->")
    cfgs = [RewardSourceConfig(kind="judge", path="toy", name="rlaif", judge=judge_cfg),
            RewardSourceConfig(kind="function", path="rlhf_ray.toy.task:vowel_reward")]
    combined = build_reward_sources(cfgs, [judge_dir, cfgs[1].path])
    judge = combined.sources[0]
    assert isinstance(judge, JudgeReward) and judge.options == judge_cfg and combined.names == ["rlaif", "vowel_reward"]
    total, per_source = combined.score_all(PROMPTS, RESPONSES, METADATA)
    assert all(0 <= s <= 1 for s in per_source["rlaif"])
    assert judge.last_queries[1].prompt == f"{PROMPTS[0]} | {REFERENCES[0]} | {RESPONSES[0]} ->"
    assert all(len(tokens) <= 4 for tokens in (judge.tokenizer(q.reply)["input_ids"] for q in judge.last_queries))
    counters = combined.counters()
    assert counters["rlaif/verdicts"] == 8 and counters["rlaif/unparseable"] == judge.counters["unparseable"]


def test_default_templates_use_every_placeholder():
    cfg = JudgeSourceConfig()
    fields = {name for name in (f for _, f, _, _ in string.Formatter().parse(cfg.grade_template)) if name}
    assert fields == {"prompt", "response", "min_score", "max_score"}
    fields = {name for name in (f for _, f, _, _ in string.Formatter().parse(cfg.compare_template)) if name}
    assert fields == {"prompt", "response_a", "response_b"}
