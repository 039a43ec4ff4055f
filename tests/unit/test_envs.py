"""Multi-turn environments: the reset/step protocol on the toy tasks with scripted policies, loading
an environment by import path (and its errors), single-turn rewards as one-step environments, and
the seeded prompt rows. The tool layer (calls, sandbox, calculator task) is in test_env_tools.py."""

import pytest

from rlhf_ray.envs import LoadError, SingleTurn, StepResult, load_environment
from rlhf_ray.envs.toy import (
    CalculatorArithmetic, GuessingGame, calculator_demonstrations, calculator_prompts, guessing_game_prompts)

PRINTABLE = set("\n" + "".join(chr(code) for code in range(32, 127)))  # what the char-level toy tokenizer encodes


def bisect(env: GuessingGame, secret: int, n: int) -> list[StepResult]:
    """A scripted policy that halves [low, high] on each reply."""
    env.reset("", {"secret": secret, "n": n})
    low, high, results = 1, n, []
    while not results or not results[-1].done:
        guess = (low + high) // 2
        results.append(env.step(f"I guess {guess}."))
        if "higher" in results[-1].observation:
            low = guess + 1
        elif "lower" in results[-1].observation:
            high = guess - 1
    return results


# ---- GuessingGame -------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [64, 100])
def test_bisection_wins_every_game_within_log2_n_plus_1_guesses(n):
    env = GuessingGame(n=n)
    for secret in range(1, n + 1):
        results = bisect(env, secret, n)
        assert len(results) <= n.bit_length()  # floor(log2 n) + 1
        assert results[-1].done and results[-1].reward == 1.0 and results[-1].info["won"]
        assert results[-1].observation == "correct!\n"
        assert all(r.reward == 0.0 and not r.done and not r.info["won"] for r in results[:-1])


def test_wrong_guesses_get_higher_or_lower():
    env = GuessingGame(n=64)
    first = env.reset("", {"secret": 40})
    assert first == "Guess a number from 1 to 64.\n"
    low, high, right = env.step("10"), env.step("maybe 50? or 3"), env.step("it is 40")
    assert (low.observation, low.done, low.info["guesses"]) == ("higher\n", False, 1)
    assert (high.observation, high.done) == ("lower\n", False)  # the first integer is the guess
    assert (right.reward, right.done, right.info["guesses"]) == (1.0, True, 3)


def test_out_of_guesses_ends_with_the_secret_and_no_reward():
    env = GuessingGame(n=64, max_guesses=2, wrong_guess_reward=-0.1)
    env.reset("", {"secret": 7})
    first, last = env.step("1"), env.step("2")
    assert (first.reward, first.done) == (-0.1, False)
    assert (last.reward, last.done, last.info["won"]) == (-0.1, True, False)
    assert last.observation == "no guesses left; it was 7.\n"
    with pytest.raises(RuntimeError, match="after the episode ended; call reset"):
        env.step("7")


def test_an_action_without_a_number_uses_up_a_guess():
    env = GuessingGame(n=16)
    env.reset("", {"secret": 3})
    result = env.step("no idea")
    assert result.info == {"guesses": 1, "won": False, "invalid": True}
    assert result.observation == "no number found; guess a number from 1 to 16.\n" and not result.done


def test_secret_from_seed_is_deterministic_and_metadata_overrides_the_defaults():
    env = GuessingGame(n=1000)
    secrets = []
    for seed in range(20):
        env.reset("", {"seed": seed, "n": 8, "max_guesses": 5})
        secrets.append(env.secret)
        env.reset("", {"seed": seed, "n": 8})
        assert env.secret == secrets[-1]
    assert all(1 <= s <= 8 for s in secrets) and len(set(secrets)) > 1
    env.reset("", {"seed": 0, "n": 8, "max_guesses": 5})
    assert (env.n, env.max_guesses) == (8, 5)


def test_guessing_game_metadata_errors_name_the_fix():
    env = GuessingGame(n=10)
    with pytest.raises(ValueError, match=r"needs metadata 'secret' or 'seed', got keys \['metadata'\]"):
        env.reset("", {"metadata": {"secret": 3}})  # a nested row: the loader flattens columns
    with pytest.raises(ValueError, match=r"secret=11 is outside \[1, 10\]"):
        env.reset("", {"secret": 11})


def test_guessing_game_text_is_within_the_toy_vocabulary():
    env = GuessingGame(n=64, max_guesses=3)
    texts = [env.reset("", {"secret": 50})] + [env.step(a).observation for a in ("10", "x", "60")]
    texts += [row["prompt"] for row in guessing_game_prompts(3, seed=0)]
    assert all(set(text) <= PRINTABLE for text in texts)


# ---- prompt sources -----------------------------------------------------------------------------

def test_prompt_sources_are_deterministic_in_their_seed():
    assert guessing_game_prompts(50, seed=1) == guessing_game_prompts(50, seed=1)
    assert guessing_game_prompts(50, seed=1) != guessing_game_prompts(50, seed=2)
    assert calculator_prompts(50, seed=1) == calculator_prompts(50, seed=1)
    assert calculator_prompts(50, seed=1) != calculator_prompts(50, seed=2)


def test_guessing_game_rows_play_as_stated():
    rows = guessing_game_prompts(30, seed=0, n=100)
    assert {row["metadata"]["max_guesses"] for row in rows} == {7}
    assert rows[0]["prompt"] == "Find my number from 1 to 100 in 7 guesses. I reply higher or lower.\n"
    env = GuessingGame()  # defaults differ: the row's metadata rules
    for row in rows:
        env.reset(row["prompt"], row["metadata"])
        assert env.secret == row["metadata"]["secret"] and env.n == 100


def test_calculator_rows_hold_the_exact_product():
    for row in calculator_prompts(30, seed=3):
        a, b = map(int, row["metadata"]["expression"].split("*"))
        assert 10 <= a <= 99 and 10 <= b <= 99
        assert row["metadata"]["answer"] == str(a * b)
        assert row["prompt"] == [{"role": "user", "content": f"What is {a}*{b}?"}]


def test_calculator_demonstrations_are_the_episodes_the_environment_plays():
    """Each tool-using demonstration, replayed against CalculatorArithmetic, gets the environment's own
    tool turn and reward 1; the others answer at once; about `tool_share` of them use the tool."""
    rows = calculator_demonstrations(200, seed=4, tool_share=0.5)
    assert 0.35 < sum(len(r["messages"]) == 4 for r in rows) / len(rows) < 0.65
    env = CalculatorArithmetic()
    for row, prompt in zip(rows[:20], calculator_prompts(20, seed=4)):
        user, *turns = row["messages"]
        assert [user] == prompt["prompt"] and turns[-1] == {"role": "assistant", "content": prompt["metadata"]["answer"]}
        env.reset(user["content"], prompt["metadata"])
        if len(turns) == 3:
            call, tool, answer = turns
            result = env.step(call["content"])
            assert (result.observation, result.done, tool["role"]) == (tool["content"], False, "tool")
            assert set(call["content"] + tool["content"]) <= PRINTABLE
        final = env.step(turns[-1]["content"])
        assert (final.reward, final.done, final.info["tool_used"]) == (1.0, True, len(turns) == 3)


# ---- load_environment ---------------------------------------------------------------------------

def test_load_environment_makes_fresh_instances_with_the_kwargs():
    factory = load_environment("rlhf_ray.envs.toy:GuessingGame", n=16, max_guesses=3)
    first, second = factory(), factory()
    assert first is not second and isinstance(first, GuessingGame)
    assert (first.n, first.max_guesses) == (16, 3)


@pytest.mark.parametrize(("path", "message"), [
    ("rlhf_ray.envs.toy.GuessingGame", "is not of the form package.module:Name"),
    ("rlhf_ray.envs.no_such_module:Game", "cannot import module 'rlhf_ray.envs.no_such_module'.*PYTHONPATH"),
    ("rlhf_ray.envs.toy:NoSuchGame", "module 'rlhf_ray.envs.toy' has no attribute 'NoSuchGame'"),
    ("rlhf_ray.envs.toy:calculator", "'rlhf_ray.envs.toy:calculator' is a function, not a class"),
    ("rlhf_ray.envs.tools:ToolCall", "has no reset and no step method"),
])
def test_load_environment_errors_name_the_path_and_the_fix(path, message):
    with pytest.raises(LoadError, match=message):
        load_environment(path)


def test_load_environment_checks_the_kwargs_when_the_config_is_read():
    with pytest.raises(LoadError, match=r"'rlhf_ray.envs.toy:GuessingGame' does not accept the arguments \['size'\]"):
        load_environment("rlhf_ray.envs.toy:GuessingGame", size=3)


# ---- SingleTurn ---------------------------------------------------------------------------------

def test_single_turn_scores_the_first_action_with_the_reward_function():
    env = load_environment("rlhf_ray.envs.base:SingleTurn", reward="rlhf_ray.toy.arith:exact_answer")()
    assert env.reset("3+4=", {"answer": "7"}) == ""
    result = env.step(" 7 ")
    assert (result.observation, result.reward, result.done) == ("", 1.0, True)
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step("7")
    env.reset("3+4=", {"answer": "7"})
    assert env.step("8").reward == 0.0


def test_single_turn_passes_reward_errors_through():
    from rlhf_ray.rewards import RewardError

    env = SingleTurn("rlhf_ray.toy.faulty:nan_on_z", name="nan")
    env.reset("say: a\n", {})
    assert env.step("aei").reward == 1.0
    env.reset("say: a\n", {})
    with pytest.raises(RewardError, match="reward source 'nan'.*not finite"):
        env.step("zzz")
    with pytest.raises(RewardError, match="no attribute 'missing'"):
        SingleTurn("rlhf_ray.toy.task:missing")
