from rlhf_ray.rewards.verifiers import final_answer, math_answer
from rlhf_ray.toy.arith import digits_format, exact_answer


def test_final_answer_prefers_boxed_then_last_number():
    assert final_answer("so x = 3, then \\boxed{42}. Also 7") == "42"
    assert final_answer("first 12 then 1,234") == "1234"
    assert final_answer("no digits here") is None


def test_math_answer_numeric_and_textual():
    meta = [{"answer": "42"}, {"answer": "42"}, {"answer": "0.5"}, {"answer": "x+1"}, {"answer": "7"}]
    responses = ["The answer is 42.", "\\boxed{41}", "half: 0.50", "\\boxed{x+1}", "nothing"]
    assert math_answer([""] * 5, responses, meta) == [1.0, 0.0, 1.0, 1.0, 0.0]


def test_toy_arith_rewards():
    meta = [{"answer": "7"}, {"answer": "12"}, {"answer": "3"}]
    assert exact_answer(["3+4=", "5+7=", "1+2="], [" 7", "12x", "4"], meta) == [1.0, 0.0, 0.0]
    assert digits_format(["", "", ""], ["7", "123", "ab"]) == [1.0, 0.0, 0.0]
