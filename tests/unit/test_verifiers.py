"""rlhf_ray.rewards.verifiers on references as GSM8K and MATH write them (rows written here in the
published schemas), many spellings of the same answer, and the reward contract for unreadable references."""

import json
import math

import pytest

from rlhf_ray.data import Keys, load_prompts
from rlhf_ray.rewards import FunctionReward, RewardError, WeightedSum
from rlhf_ray.rewards.verifiers import (
    final_answer,
    math_answer,
    normalise_answer,
    reference_answer,
    same_answer,
)
from rlhf_ray.toy import build_char_tokenizer
from rlhf_ray.toy.arith import digits_format, exact_answer

GSM8K_ROW = {  # openai/gsm8k "main": question, answer = worked solution ending in "#### <number>"
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                "How many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
              "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
}
MATH_ROW = {  # hendrycks MATH: problem, level, type, solution with the answer in \boxed{}
    "problem": "What is $\\sin 60^\\circ$ divided by $\\sqrt{3}$, doubled?",
    "level": "Level 2",
    "type": "Precalculus",
    "solution": "We have $\\sin 60^\\circ = \\frac{\\sqrt{3}}{2}$, so the answer is "
                "$2 \\cdot \\frac{\\sqrt{3}}{2} / \\sqrt{3} = \\boxed{1}$.",
}
MATH_FRACTION = "The probability is $\\frac{6}{8}$, which simplifies to $\\boxed{\\dfrac{3}{4}}$."
MATH_NESTED = "Thus $\\cos 30^\\circ = \\boxed{\\frac{\\sqrt{3}}{2}}$."


def score(reference, responses):
    return math_answer([""] * len(responses), responses, [{"answer": reference}] * len(responses))


# ---- GSM8K ---------------------------------------------------------------------------------

GSM8K_GOLD = [
    "#### 72", "She sold 48 + 24 = 72 clips.\n#### 72", "The answer is 72.", "The answer is: 72 clips",
    "Final answer: $72", "\\boxed{72}", "So the answer is $\\boxed{72}$.", "In total she sold 72 clips.",
    "72", "72.", "72.0", "72.00", "+72", "\\boxed{72 \\text{ clips}}", "The answer is 72 because 48+24=72.",
    "#### 72 clips", "\\(\\boxed{72}\\)",
]
GSM8K_WRONG = [
    "#### 24", "The answer is 24.", "\\boxed{71}", "In May she sold 24 clips.", "7.2", "720", "-72",
    "\\boxed{72/2}", "", "I don't know.", "\\boxed{72} is wrong; the answer is \\boxed{73}",
]


@pytest.mark.parametrize("response", GSM8K_GOLD)
def test_gsm8k_gold_answer_scores_one(response):
    assert score(GSM8K_ROW["answer"], [response]) == [1.0]


@pytest.mark.parametrize("response", GSM8K_WRONG)
def test_gsm8k_wrong_answer_scores_zero(response):
    assert score(GSM8K_ROW["answer"], [response]) == [0.0]


def test_gsm8k_file_with_question_key_scores_without_remapping(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text(json.dumps(GSM8K_ROW) + "\n")
    examples, _ = load_prompts(str(path), build_char_tokenizer(), keys=Keys(prompt="question"), max_prompt_len=512)
    metadata = [examples[0].metadata] * 2
    assert metadata[0] == {"answer": GSM8K_ROW["answer"]}
    assert math_answer([examples[0].prompt_text] * 2, ["#### 72", "#### 71"], metadata) == [1.0, 0.0]


@pytest.mark.parametrize("reference, gold, wrong", [
    ("Total: 500 * 2 = <<500*2=1000>>1000 dollars.\n#### 1000", "$1,000", "$1,001"),
    ("#### 1,000", "1000", "100"),
    ("He is left with 5 - 8 = <<5-8=-3>>-3 degrees.\n#### -3", "The answer is -3.", "3"),
    ("Half of it is 1/2 = <<1/2=0.5>>0.5\n#### 0.5", "\\boxed{\\frac{1}{2}}", "\\boxed{\\frac{1}{3}}"),
    ("So 18/100 = 18 percent.\n#### 18", "18%", "0.18"),
    ("#### 18.90", "\\boxed{\\$18.9}", "18.09"),
    ("#### 1234567", "\\boxed{1{,}234{,}567}", "1,234,568"), ("#### 1000", "\\boxed{1\\,000}", "10,00"),
])
def test_gsm8k_number_spellings(reference, gold, wrong):
    assert score(reference, [gold, wrong]) == [1.0, 0.0]


# ---- MATH ----------------------------------------------------------------------------------

@pytest.mark.parametrize("solution, gold, wrong", [
    (MATH_ROW["solution"], "\\boxed{1}", "\\boxed{\\sqrt{3}}"),
    (MATH_FRACTION, "\\boxed{\\frac{3}{4}}", "\\boxed{\\frac{4}{3}}"),
    (MATH_FRACTION, "\\boxed{\\dfrac34}", "\\boxed{\\frac{6}{9}}"),
    (MATH_FRACTION, "\\boxed{0.75}", "\\boxed{0.7}"),
    (MATH_FRACTION, "\\boxed{3/4}", "\\boxed{3/5}"),
    (MATH_FRACTION, "So the probability is $\\tfrac{3}{4}$.", "So the probability is $\\frac{1}{4}$."),
    (MATH_NESTED, "\\boxed{\\dfrac{\\sqrt3}{2}}", "\\boxed{\\frac{\\sqrt{2}}{2}}"),
    (MATH_NESTED, "$\\boxed{\\frac{\\sqrt{3}}{2}}$", "\\boxed{\\frac{\\sqrt{3}}{3}}"),
    ("so the winner is $\\boxed{\\text{Evelyn}}$.", "\\boxed{evelyn}", "\\boxed{\\text{Devon}}"),
    ("The point is $\\boxed{\\left(2, -1\\right)}$.", "\\boxed{(2,-1)}", "\\boxed{(-1, 2)}"),
    ("The angle is $\\boxed{30^\\circ}$.", "\\boxed{30}", "\\boxed{60^{\\circ}}"),
    ("The rate is $\\boxed{25\\%}$.", "The answer is 25%.", "\\boxed{0.25}"),
    ("The root is $\\boxed{x = -\\frac{1}{2}}$.", "\\boxed{-0.5}", "\\boxed{0.5}"),
    ("so $\\boxed{\\frac{-1}{2}}$", "\\boxed{-\\frac{1}{2}}", "\\boxed{\\frac{1}{-3}}"),
    ("so $\\boxed{5\\sqrt{2}}$", "\\boxed{5 \\sqrt2}", "\\boxed{5\\sqrt{3}}"),
    ("so $\\boxed{x^{2} + 1}$", "\\boxed{x^2+1}", "\\boxed{x^3+1}"),
    ("the area is $\\boxed{12 \\text{ cm}^2}$", "\\boxed{12}", "\\boxed{13}"),
])
def test_math_gold_and_wrong_answers(solution, gold, wrong):
    assert score(solution, [gold, wrong]) == [1.0, 0.0]


def test_math_row_reference_comes_from_its_solution_column():
    metadata = {k: v for k, v in MATH_ROW.items() if k != "problem"}  # data.prompt_key=problem
    assert math_answer(["", ""], ["\\boxed{1}", "\\boxed{2}"], [metadata] * 2) == [1.0, 0.0]


def test_math500_answer_column_wins_over_solution():
    metadata = {"answer": "\\frac{3}{4}", "solution": "so $\\boxed{\\frac{6}{8}}$", "unique_id": "x"}
    assert math_answer([""], ["\\boxed{0.75}"], [metadata]) == [1.0]
    assert reference_answer(metadata["answer"]) == "\\frac{3}{4}"


def test_boxed_reference_keeps_nested_braces():
    assert reference_answer(MATH_NESTED) == "\\frac{\\sqrt{3}}{2}"
    assert reference_answer("a \\boxed{1} then \\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"


# ---- plain references ----------------------------------------------------------------------

@pytest.mark.parametrize("reference, gold, wrong", [
    (72, "#### 72", "#### 27"), (0.75, "\\boxed{3/4}", "\\boxed{3/5}"), (1e-7, "0.0000001", "0.000001"),
    ("72", "The answer is 72.", "The answer is 7."), ("Paris", "The answer is Paris.", "\\boxed{Lyon}"),
    ("\\text{ Paris }", "\\boxed{PARIS}", "\\boxed{Rome}"), ("x = 5", "\\boxed{5}", "\\boxed{-5}"),
    ("The answer is 12.", "\\boxed{12}", "\\boxed{21}"), ("-4", "\u22124", "4"), ("2", "2.0", "2.01"),
])
def test_plain_references(reference, gold, wrong):
    assert score(reference, [gold, wrong]) == [1.0, 0.0]


# ---- unreadable references: never 0.0 ------------------------------------------------------

@pytest.mark.parametrize("reference, says", [
    ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.", "not a plain answer"),
    ("She sold 48 + 24 = 72 clips in total", "not a plain answer"),
    ("Natalia sold 48+24 clips.\n####", "nothing follows"),
    ("so $\\boxed{\\frac{1}{2}$.", "never closed"),
    ("so $\\boxed{}$.", "empty or never closed"),
    ("", "empty"),
    ("   ", "empty"),
    (["72"], "is a list"),
    (True, "is a bool"),
    (float("nan"), "not a finite"),
])
def test_unreadable_reference_raises_naming_it(reference, says):
    with pytest.raises((ValueError, TypeError), match="reference answer") as err:
        score(reference, ["#### 72"])
    assert says in str(err.value)
    if isinstance(reference, str) and reference.strip():
        assert repr(reference)[:40] in str(err.value)


def test_missing_reference_column_raises_naming_the_columns():
    with pytest.raises(ValueError, match=r"no non-null 'answer' or 'solution' column.*\['level', 'target'\]"):
        math_answer([""], ["72"], [{"target": "72", "level": None}])
    with pytest.raises(ValueError, match="no reference answer"):
        math_answer([""], ["72"], [{"answer": None}])


BAD_META = [{"answer": "#### 72"}, {"answer": "Natalia sold some clips.\nThen more."}, {"answer": "#### 5"}]


def test_contract_fail_names_source_and_sample():
    source = FunctionReward("rlhf_ray.rewards.verifiers:math_answer", name="correct")
    with pytest.raises(RewardError) as err:
        source.score([""] * 3, ["72", "72", "4"], BAD_META)
    assert (err.value.source, err.value.index, err.value.kind) == ("correct", 1, "exception")
    assert "cannot read the reference answer 'Natalia sold some clips." in str(err.value)


def test_contract_mask_leaves_out_only_the_unreadable_reference():
    rewards = WeightedSum([(FunctionReward("rlhf_ray.rewards.verifiers:math_answer", name="correct"), 1.0)])
    total, _, valid, violations = rewards.score_tolerant([""] * 3, ["72", "72", "4"], BAD_META)
    assert valid == [True, False, True] and violations == {"exception": 1}
    assert total[0] == 1.0 and total[2] == 0.0 and math.isnan(total[1])


# ---- response extraction -------------------------------------------------------------------

@pytest.mark.parametrize("text, answer", [
    ("so x = 3, then \\boxed{42}. Also 7", "42"),
    ("\\boxed{1} first, finally \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{5} and then cut off: \\boxed{\\frac{1", "5"),  # a truncated last box is not an answer
    ("work... #### 18\nextra", "18"),
    ("The final answer is 7 apples. Then 9", "7 apples"),
    ("first 12 then 1,234", "1,234"),
    ("5-3", "3"),  # a minus, not a negative sign
    ("it drops to -3.", "-3"),
    ("3/4 of them", "3/4"),
    ("Answer: let me think it through step by step. 3 + 4 = 7", "7"),
    ("The answer is 5. Wait, no: the answer is 6. Yes.", "6"),
    ("no digits here", None),
])
def test_final_answer(text, answer):
    assert final_answer(text) == answer


def test_same_answer_is_exact_on_rationals():
    assert same_answer("1/3", "\\frac{1}{3}") and not same_answer("0.333", "\\frac{1}{3}")
    assert not same_answer("1/0", "0") and same_answer("1/0", "1/0")  # no value, so compared as text
    assert same_answer("9" * 5000, "9" * 5000) and not same_answer("9" * 5000, "9" * 4999)  # no int() digit limit


def test_toy_arith_rewards():
    meta = [{"answer": "7"}, {"answer": "12"}, {"answer": "3"}]
    assert exact_answer(["3+4=", "5+7=", "1+2="], [" 7", "12x", "4"], meta) == [1.0, 0.0, 0.0]
    assert digits_format(["", "", ""], ["7", "123", "ab"]) == [1.0, 0.0, 0.0]


# ---- normalisation, number parsing and messages, exactly ---------------------------------------

@pytest.mark.parametrize("text, normalised", [
    ("\u22124", "-4"), ("a\\;b", "a b"), ("(1,\\ 2)", "(1, 2)"), ("\\tfrac{1}{2}", "\\frac{1}{2}"),
    ("\\dfrac{1}{2}", "\\frac{1}{2}"), ("\\frac12", "\\frac{1}{2}"), ("\\sqrt3", "\\sqrt{3}"), ("x = 5.", "5"),
    (".5", ".5"), ("Paris.", "Paris"), ("MAX", "MAX"), ("\\text{\\textbf{A}}", "A"),
    ("\\left( 2, -1 \\right)", "( 2, -1 )"), ("1\\,000", "1,000"), ("30^{\\circ}", "30"), ("25\\%", "25"),
    ("\\(x\\)", "x"), ("$\\$18.9$", "18.9"),
])
def test_normalise_answer(text, normalised):
    assert normalise_answer(text) == normalised


@pytest.mark.parametrize("answer, reference, same", [
    ("5cm", "5 cm", True),  # a unit glued to the number: not a number, but the same text
    ("0" * 63 + "7", "7", True), ("0" * 64 + "7", "7", False),  # over 64 characters: compared as text
    ("1 2", "12.0", False),  # two numbers, not twelve
    ("3 / 4", "0.75", True), ("- 5", "-5", True), ("1,000/2", "500", True), ("2/1,000", "0.002", True),
    ("5 or more", "5", False), ("3 plus x", "3", False), ("72 Apples", "72", True),
    (".5", "0.5", True), ("\\tfrac{3}{4}", "0.75", True),
])
def test_same_answer_numbers_and_units(answer, reference, same):
    assert same_answer(answer, reference) is same


@pytest.mark.parametrize("text, answer", [
    ("\\boxed 5", "5"), ("\\fbox{7}", "7"), ("#### 5\n#### 7", "7"), ("#### 18\nnote\nmore", "18"),
    ("The answer is 12\nThen 3 more lines\nand 7", "12"), ("the answer was: 9", "9"), ("answer = 4", "4"),
    ("The answer is Paris\nnot Berlin\nnot Rome", "Paris"),  # the answer's own line only
])
def test_final_answer_markers(text, answer):
    assert final_answer(text) == answer


@pytest.mark.parametrize("value, answer", [
    (1e20, "100000000000000000000"), (1e-7, "0.0000001"), (2.5, "2.5"), (72, "72"), (" 72 \n", "72"),
    ("New York City", "New York City"), ("x = 5", "x = 5"),
])
def test_plain_reference_answers(value, answer):
    assert reference_answer(value) == answer


EXPECTED = ". Expected a GSM8K-style '#### <answer>', a MATH-style '\\boxed{...}', or a plain number or short string"


@pytest.mark.parametrize("reference, why", [
    ("sold 48 clips\n####", "nothing follows its '####'"),
    ("so \\boxed{}", "its \\boxed{} is empty or never closed"),
    ("Paris\nLondon", "no '#### <answer>', no \\boxed{...}, no 'answer is', and not a plain answer "
     "(more than three words, several lines, or an '=' among words)"),
    ("the New York City", "no '#### <answer>', no \\boxed{...}, no 'answer is', and not a plain answer "
     "(more than three words, several lines, or an '=' among words)"),
    ("speed = 5", "no '#### <answer>', no \\boxed{...}, no 'answer is', and not a plain answer "
     "(more than three words, several lines, or an '=' among words)"),
])
def test_unreadable_reference_message_is_exact(reference, why):
    with pytest.raises(ValueError) as err:
        reference_answer(reference)
    assert str(err.value) == f"cannot read the reference answer {reference!r}: {why}{EXPECTED}"


def test_unreadable_reference_is_shown_up_to_80_characters():
    for length, shown in ((78, None), (79, 80)):  # repr adds the two quotes
        text = "Natalia sold clips " + "y" * (length - 19)
        with pytest.raises(ValueError) as err:
            reference_answer(text)
        expected = repr(text) if shown is None else repr(text)[:shown] + "…"
        assert str(err.value).startswith(f"cannot read the reference answer {expected}: ")


def test_bad_reference_types_and_empty_message_are_exact():
    with pytest.raises(TypeError) as err:
        reference_answer(["72"])
    assert str(err.value) == "reference answer ['72'] is a list, not a number or string"
    with pytest.raises(ValueError) as err:
        reference_answer(" \n")
    assert str(err.value) == "reference answer is empty"
    with pytest.raises(ValueError) as err:
        reference_answer(float("inf"))
    assert str(err.value) == "reference answer inf is not a finite number"


@pytest.mark.parametrize("response, score", [
    ("The answer is 12cm.", 1.0), ("\\boxed{12cm}", 1.0), ("The answer is 12kg", 1.0), ("The answer is 12m^2", 1.0),
    ("The answer is 12 cm.", 1.0), ("The answer is 13cm", 0.0),
    ("The answer is 3x", 0.0), ("\\boxed{2\\pi}", 0.0),  # algebra, not a unit: not the number 3 or 2
])
def test_a_unit_written_onto_the_number_is_read_as_the_number(response, score):
    """GSM8K reference `#### 12`: "12cm" said plainly was a false negative while "12 cm" passed."""
    assert math_answer([""], [response], [{"answer": "#### 12"}]) == [score]


def test_algebra_with_a_letter_is_compared_as_text():
    assert math_answer(["", ""], ["\\boxed{3x}", "\\boxed{3}"], [{"answer": "\\boxed{3x}"}] * 2) == [1.0, 0.0]
