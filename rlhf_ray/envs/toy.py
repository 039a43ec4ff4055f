"""Toy multi-turn tasks a tiny model can learn on CPU, and their seeded prompt rows.

- `GuessingGame`: find a secret integer in [1, n] from "higher"/"lower" replies. The information is
  in the observations, so only a policy that reads them wins reliably; bisection always wins within
  floor(log2 n) + 1 = n.bit_length() guesses, the default limit.
- `CalculatorArithmetic`: the product of two 2-digit numbers, which a tiny model cannot compute but
  can get by calling the `calculator` tool and copying its result (tool use must pay off). A tiny
  random model cannot find the call format by chance: `calculator_demonstrations` are SFT data for a
  cold start (half of them call the tool), after which RL raises the share that does.

All text is printable ASCII and newlines, which the char-level toy tokenizer (rlhf_ray/toy) encodes
exactly. Prompt rows are `{"prompt": str, "metadata": dict}`, deterministic in their seed; the
environments read everything per episode from the metadata. Written to a prompt file for
`load_prompts`, a row's metadata keys must be top-level columns (the loader hands a row's other
columns to the reward and environment as metadata).
"""

from __future__ import annotations

import ast
import json
import operator
import random
import re
from fractions import Fraction
from pathlib import Path

from rlhf_ray.envs.base import StepResult, ensure_running
from rlhf_ray.envs.tools import ToolEnvironment

_INTEGER = re.compile(r"-?\d+")


def first_integer(text: str) -> int | None:
    match = _INTEGER.search(text)
    return int(match.group()) if match else None


# ---- the guessing game --------------------------------------------------------------------------

class GuessingGame:
    """Each step is one guess (the first integer in the action). Replies: "higher" / "lower", "correct!"
    (reward 1.0, done) or, after the last allowed guess, the secret (done). A wrong or unreadable guess
    earns `wrong_guess_reward` (0 by default: the outcome reward alone), plus `valid_guess_reward` when
    it is a number in range (a per-turn reward that teaches a tiny policy the answer format)."""

    def __init__(self, n: int = 64, max_guesses: int | None = None, wrong_guess_reward: float = 0.0,
                 valid_guess_reward: float = 0.0):
        self.default_n, self.default_max_guesses = n, max_guesses
        self.wrong_guess_reward, self.valid_guess_reward = wrong_guess_reward, valid_guess_reward
        self.n = n
        self.max_guesses = max_guesses or n.bit_length()
        self.secret, self.guesses, self.done = 0, 0, True

    def reset(self, prompt: str, metadata: dict) -> str:
        """metadata: "secret", or "seed" to draw it; optional "n" and "max_guesses" override the defaults."""
        self.n = int(metadata.get("n", self.default_n))
        self.max_guesses = int(metadata.get("max_guesses") or self.default_max_guesses or self.n.bit_length())
        self.secret = _secret(metadata, self.n)
        self.guesses, self.done = 0, False
        return f"Guess a number from 1 to {self.n}.\n"

    def step(self, action: str) -> StepResult:
        ensure_running(self, self.done)
        self.guesses += 1
        guess = first_integer(action)
        won = guess == self.secret
        self.done = won or self.guesses >= self.max_guesses
        valid = guess is not None and 1 <= guess <= self.n
        info = {"guesses": self.guesses, "won": won, "invalid": guess is None}
        reward = 1.0 if won else self.wrong_guess_reward + (self.valid_guess_reward if valid else 0.0)
        return StepResult(self._reply(guess, won), reward, self.done, info)

    def _reply(self, guess: int | None, won: bool) -> str:
        if won:
            return "correct!\n"
        if self.done:
            return f"no guesses left; it was {self.secret}.\n"
        if guess is None:
            return f"no number found; guess a number from 1 to {self.n}.\n"
        return "higher\n" if guess < self.secret else "lower\n"


def _secret(metadata: dict, n: int) -> int:
    if "secret" in metadata:
        secret = int(metadata["secret"])
        if not 1 <= secret <= n:
            raise ValueError(f"GuessingGame: metadata secret={secret} is outside [1, {n}]; fix the row or its 'n'")
        return secret
    if "seed" in metadata:
        return random.Random(metadata["seed"]).randint(1, n)
    raise ValueError(f"GuessingGame needs metadata 'secret' or 'seed', got keys {sorted(metadata)}; "
                     "use guessing_game_prompts rows (in a prompt file, as top-level columns)")


def guessing_game_prompts(n_rows: int, seed: int, n: int = 64, max_guesses: int | None = None) -> list[dict]:
    """n_rows games with secrets drawn from `seed`; the prompt states the rules, the metadata the game."""
    rng = random.Random(seed)
    max_guesses = max_guesses or n.bit_length()
    prompt = f"Find my number from 1 to {n} in {max_guesses} guesses. I reply higher or lower.\n"
    return [{"prompt": prompt, "metadata": {"secret": rng.randint(1, n), "n": n, "max_guesses": max_guesses}}
            for _ in range(n_rows)]


# ---- arithmetic with a calculator tool ----------------------------------------------------------

MAX_EXPRESSION_CHARS = 200
_ALLOWED = set("0123456789+-*/() ")
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: integers with + - * / and parentheses, e.g. "12*(3+4)".
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression of {len(expression)} characters; at most {MAX_EXPRESSION_CHARS}")
    if bad := set(expression) - _ALLOWED:
        raise ValueError(f"only digits, + - * / and parentheses are allowed, not {''.join(sorted(bad))!r}")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise ValueError(f"{expression!r} is not an arithmetic expression") from None
    value = _evaluate(tree.body)
    return str(value.numerator) if value.denominator == 1 else f"{float(value):.12g}"


def _evaluate(node: ast.AST) -> Fraction:
    """Exact value of a parsed expression built from integers and + - * / only (no names, no calls)."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ValueError("division by zero")
        return _OPERATORS[type(node.op)](left, right)
    raise ValueError("only integers, + - * / and parentheses are allowed")


def final_answer(text: str) -> int | None:
    """The integer after the last "answer:" (any case), else the last integer; "4,517,277" reads as one."""
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)
    _, sep, tail = text.lower().rpartition("answer:")
    if sep:
        return first_integer(tail)
    numbers = _INTEGER.findall(text)
    return int(numbers[-1]) if numbers else None


class CalculatorArithmetic(ToolEnvironment):
    """Multiply two numbers with a calculator tool: reward 1.0 when the final answer equals
    metadata["answer"] exactly, else 0.0; `info["tool_used"]` says whether a calculator call succeeded."""

    tools = ("rlhf_ray.envs.toy:calculator",)

    def reset(self, prompt: str, metadata: dict) -> str:
        if "answer" not in metadata:
            raise ValueError(f"CalculatorArithmetic needs metadata 'answer', got keys {sorted(metadata)}; "
                             "use calculator_prompts rows (in a prompt file, as top-level columns)")
        return super().reset(prompt, metadata)

    def final_reward(self, answer: str) -> float:
        return float(final_answer(answer) == int(self.metadata["answer"]))


def calculator_call(expression: str) -> str:
    """The policy's call of the calculator, in the tool-call format."""
    return f"<tool_call>{json.dumps({'name': 'calculator', 'arguments': {'expression': expression}})}</tool_call>"


def calculator_prompts(n_rows: int, seed: int, digits: tuple[int, int] = (2, 2)) -> list[dict]:
    """n_rows products of a digits[0]- and a digits[1]-digit number drawn from `seed`. The prompt is the
    question as a user message (rendered with the tokenizer's chat template by the loader); metadata
    holds the exact "answer" and the "expression"."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_rows):
        a, b = (rng.randint(10 ** (d - 1), 10**d - 1) for d in digits)
        rows.append({"prompt": [{"role": "user", "content": f"What is {a}*{b}?"}],
                     "metadata": {"answer": str(a * b), "expression": f"{a}*{b}"}})
    return rows


def calculator_demonstrations(n_rows: int, seed: int, tool_share: float = 0.5,
                              digits: tuple[int, int] = (2, 2)) -> list[dict]:
    """SFT conversations for a cold start (the tool-call format, then the answer read off the result):
    a `tool_share` of them call the calculator, then answer with its result (assistant, tool,
    assistant turns); the others answer at once, correctly, which a tiny model cannot learn to do
    reliably, so RL finds the tool pays. The tool turn is exactly what `CalculatorArithmetic`
    answers, so SFT and the episodes share one layout."""
    from rlhf_ray.envs.tools import ToolResult, format_tool_results

    rng = random.Random(seed)
    rows = []
    for row in calculator_prompts(n_rows, seed, digits):
        question, answer = row["prompt"], row["metadata"]["answer"]
        if rng.random() < tool_share:
            result = format_tool_results([ToolResult(ok=True, output=answer)])
            turns = [{"role": "assistant", "content": calculator_call(row["metadata"]["expression"])},
                     {"role": "tool", "content": result}, {"role": "assistant", "content": answer}]
        else:
            turns = [{"role": "assistant", "content": answer}]
        rows.append({"messages": question + turns})
    return rows


# ---- prompt files for the toy agent configs (data.toy_task: guess | calc) ----------------------

TOY_GUESS_N = 8  # the toy guessing game's range: small enough for a random tiny policy to win sometimes


def write_env_prompts(out_dir: Path, task: str, seed: int, n_train: int, n_eval: int) -> tuple[Path, Path]:
    """Train and eval prompt files (JSONL, the metadata keys as top-level columns, as `load_prompts`
    hands a row's other columns to the environment) for the toy agent tasks."""
    rows = {"guess": lambda n, s: guessing_game_prompts(n, s, n=TOY_GUESS_N),
            "calc": lambda n, s: calculator_prompts(n, s)}[task]
    return _write_splits(out_dir, f"{task}_prompts", seed, n_train, n_eval,
                         lambda n, s: [{"prompt": r["prompt"], **r["metadata"]} for r in rows(n, s)])


def write_env_demonstrations(out_dir: Path, task: str, seed: int, n_train: int, n_eval: int) -> tuple[Path, Path]:
    """Train and eval SFT files (JSONL, a `messages` column) for a toy agent task's cold start (calc)."""
    if task != "calc":
        raise ValueError(f"data.toy_task={task} has no SFT demonstrations (only calc has); train it with stage ppo")
    return _write_splits(out_dir, f"{task}_demonstrations", seed, n_train, n_eval, calculator_demonstrations)


def _write_splits(out_dir: Path, name: str, seed: int, n_train: int, n_eval: int, rows) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, n, split_seed in (("train", n_train, seed), ("eval", n_eval, seed + 1)):
        path = out_dir / f"{name}_{split}.jsonl"
        with open(path, "w") as f:
            for row in rows(n, split_seed):
                f.write(json.dumps(row) + "\n")
        paths.append(path)
    return paths[0], paths[1]
