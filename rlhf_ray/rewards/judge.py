"""`JudgeReward`: a generative model asked to grade a response or compare two (LLM-as-judge, RLAIF;
ALGORITHMS.md §9, ARCHITECTURE.md §5). It is one more reward source, run inside the reward worker.

- `grade`: the prompt from `grade_template` asks for a number in [min_score, max_score];
  score = the parsed grade.
- `compare`: the response is compared with a baseline, `metadata[reference_key]` (e.g. a
  reference answer column). Each pair is asked in BOTH orders, A/B and B/A, which cancels the
  judge's position bias; score = the response's share of wins over the two orders, a tie
  counting ½. `compare_pairs(prompts, a, b)` exposes the same for evaluation win-rates
  (1 = A better, 0 = B better, 0.5 tie); `compare_orders` gives each order's verdict apart
  (AI preference labelling: `rlhf_ray.rewards.labeling`).
- Replies are greedy, at most `max_new_tokens` tokens, from one of two askers:
  a local model (`EngineAsker`): the run's rollout engine (vLLM or HF), every query of a call in
  one `generate` batch; the rendered prompt is sent as one user message through the judge
  tokenizer's chat template when it has one (`chat_template`);
  an OpenAI-compatible endpoint (`judge.endpoint`: `rlhf_ray.rewards.endpoint.OpenAIEndpoint`):
  one request per query, no model or tokenizer in the run; `chat_template` does not apply (with
  api=chat the server applies its own). Its request, failure, token and estimated-cost counters
  join the judge's `counters`.
- Verdicts are parsed by the pure functions `parse_grade` and `parse_choice`; a reply they cannot
  read is *unparseable*, counted, and handled by `on_unparseable`:
    error       the call fails with a RewardError naming the sample and quoting the reply;
    tie         the reply counts as a tie: ½ for that order (compare), the mid grade
                (min_score + max_score) / 2 (grade);
    drop-order  (compare only) the order is left out and the other order decides alone; a
                sample with no readable order at all scores ½.
  It is never scored 0. `counters` (cumulative) and `last_counts` (the latest call) hold
  `verdicts` (replies read), `unparseable` (replies without a verdict) and `no_verdict`
  (samples scored without any readable verdict); `last_queries` keeps the latest call's
  prompts and replies for inspection.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:  # transformers' modeling stack costs ~3 s CPU to import: only processes that hold a model pay it
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_ray.config import JudgeSourceConfig
from rlhf_ray.rewards.base import RewardError
from rlhf_ray.rollout.base import RolloutEngine, SamplingParams

Choice = Literal["A", "B", "tie"]

# --- verdict parsing (pure) ---------------------------------------------------------------------

_NUMBER = r"[-+]?\d+(?:\.\d+)?"
_GRADE_LABELLED = re.compile(
    rf"\b(?i:score|rating|grade|verdict|mark)\s*(?:is|of|=|:|-)?\s*[*\[(\"']*\s*({_NUMBER})\s*(?:/\s*({_NUMBER})|out\s+of\s+({_NUMBER}))?")
_GRADE_FRACTION = re.compile(rf"({_NUMBER})\s*(?:/|(?i:out\s+of))\s*({_NUMBER})")
_GRADE_BARE = re.compile(rf"^\W*?({_NUMBER})\W*$")

_CHOICE_BRACKETED = re.compile(r"\[\[\s*([ABC])\s*\]\]")  # MT-Bench style: [[A]], [[B]], [[C]] = tie
_LETTER = r"(?<![A-Za-z])([AB])(?![A-Za-z])"  # a capital A/B standing alone (not the article "a", not "AB")
_CHOICE_LABELLED = re.compile(
    r"\b(?i:verdict|answer|winner|choice|prefer(?:red|ence)?|better(?:\s+response)?)\s*(?:is|:|=|-)?\s*"
    r"(?i:(?:response|output|option|assistant)\s+)?[*\[(\"']*\s*" + r"(?:" + _LETTER + r"|((?i:tie|draw)))")
_CHOICE_IS_BETTER = re.compile(
    r"(?i:(?:response|output|option|assistant)\s+)?" + _LETTER + r"\s+(?i:is\s+(?:better|preferred|superior)|wins)")
_CHOICE_TIE = re.compile(r"(?i)\b(?:tie|draw|equally\s+(?:good|bad|well)|no\s+preference)\b")
_CHOICE_BARE = re.compile(r"^\W*(?i:(?:response|output|option|assistant)\s+)?([AB])\W*$")


def parse_grade(text: str, min_score: float, max_score: float) -> float | None:
    """The grade in a judge reply, or None when there is none or it lies outside [min_score, max_score].

    Read in order: the last labelled grade ("Score: 7", "rating = 8/10"), else the last
    fraction "7/10" / "7 out of 10", else a reply that is just a number. A fraction counts only
    when its denominator is max_score.
    """
    labelled = _GRADE_LABELLED.findall(text)
    if labelled:
        value, *denominators = labelled[-1]
        return _in_range(value, next((d for d in denominators if d), None), min_score, max_score)
    fractions = _GRADE_FRACTION.findall(text)
    if fractions:
        return _in_range(*fractions[-1], min_score, max_score)
    bare = _GRADE_BARE.match(text.strip())
    return _in_range(bare.group(1), None, min_score, max_score) if bare else None


def _in_range(value: str, denominator: str | None, min_score: float, max_score: float) -> float | None:
    if denominator is not None and float(denominator) != max_score:
        return None
    x = float(value)
    return x if min_score <= x <= max_score else None


def parse_choice(text: str) -> Choice | None:
    """"A", "B" or "tie" from a comparison reply, or None when it names no winner or contradicts itself.

    Read in order, the first kind of evidence present decides: MT-Bench brackets ([[A]], [[C]] =
    tie); labelled verdicts ("Verdict: B", "the better response is A"); "A is better" / "B wins";
    tie words (tie, draw, equally good, no preference); a reply that is just "A" or "(B)".
    Letters must be capitals standing alone, so the article "a" never counts. Two different
    answers of the same kind are a contradiction: None.
    """
    for pattern in (_CHOICE_BRACKETED, _CHOICE_LABELLED, _CHOICE_IS_BETTER):
        found = {_as_choice(m) for m in pattern.findall(text)}
        if found:
            return found.pop() if len(found) == 1 else None
    if _CHOICE_TIE.search(text):
        return "tie"
    bare = _CHOICE_BARE.match(text.strip())
    return bare.group(1) if bare else None


def _as_choice(match: str | tuple[str, ...]) -> Choice:
    token = next(m for m in match if m) if isinstance(match, tuple) else match
    return token if token in ("A", "B") else "tie"  # "C", "tie", "draw"


# --- the reward source ----------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeQuery:
    sample: int  # index of the sample in the call
    swapped: bool  # compare: the scored response was shown as B (the B/A order)
    prompt: str  # the rendered template, before the chat template
    reply: str  # the judge's decoded reply


class EngineAsker:
    """Greedy replies from a generation engine over a local model, every text of a call in one `generate` batch."""

    def __init__(self, engine: RolloutEngine, tokenizer: PreTrainedTokenizerBase, chat_template: bool):
        self.engine = engine
        self.tokenizer = tokenizer
        self.chat_template = chat_template

    @property
    def counters(self) -> dict[str, int]:
        return {}  # nothing to count beyond the judge's verdicts

    def ask(self, texts: list[str], max_tokens: int) -> list[str]:
        ids = [self._encode(text) for text in texts]
        samples = self.engine.generate(ids, SamplingParams(max_new_tokens=max_tokens, greedy=True), seed=0)
        return [self.tokenizer.decode(row[mask.bool()], skip_special_tokens=True)
                for row, mask in zip(samples.response_ids, samples.response_mask)]

    def _encode(self, text: str) -> list[int]:
        if self.chat_template and self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]  # the template holds any BOS
        return self.tokenizer(text)["input_ids"]


class JudgeReward:
    def __init__(
        self,
        model: str | PreTrainedModel | None,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        options: JudgeSourceConfig | None = None,
        name: str | None = None,
        batch_size: int = 32,
        trust_remote_code: bool = False,
        dtype: str | torch.dtype = "auto",
        engine: RolloutEngine | None = None,
    ):
        """`model`: a causal LM or its path (moved to CUDA when one is visible); `tokenizer`: default the model's.
        `engine`: the generation engine already built over `model` (the run's configured backend, e.g. vLLM);
        default: HF generate over `model`. With `options.endpoint` the endpoint's model judges: `model`,
        `tokenizer` and `engine` stay None (`self.engine` / `self.tokenizer` too)."""
        self.options = options or JudgeSourceConfig()
        self.name = name or "judge"
        self.last_counts = {"verdicts": 0, "unparseable": 0, "no_verdict": 0}
        self._verdict_counts = dict(self.last_counts)  # cumulative
        self.last_queries: list[JudgeQuery] = []
        if self.options.endpoint is not None:
            # imported here: the openai client costs ~0.5 s, which local judges need not pay
            from rlhf_ray.rewards.endpoint import OpenAIEndpoint

            if model is not None or tokenizer is not None or engine is not None:
                raise ValueError(f"judge {self.name!r}: judge.endpoint is set, so the endpoint's model judges; "
                                 f"pass no model, tokenizer or engine (path must be unset).")
            self.engine = self.tokenizer = None
            self.asker = OpenAIEndpoint(self.options.endpoint, self.name)
            return
        self.engine, self.tokenizer = self._local_model(model, tokenizer, batch_size, trust_remote_code, dtype, engine)
        self.asker = EngineAsker(self.engine, self.tokenizer, self.options.chat_template)

    @property
    def counters(self) -> dict[str, int | float]:
        """Cumulative verdict counters; with an endpoint also its requests, failures by kind, tokens and estimated_cost."""
        return self._verdict_counts | self.asker.counters

    @staticmethod
    def _local_model(model: str | PreTrainedModel | None, tokenizer: str | PreTrainedTokenizerBase | None,
                     batch_size: int, trust_remote_code: bool, dtype: str | torch.dtype,
                     engine: RolloutEngine | None) -> tuple[RolloutEngine, PreTrainedTokenizerBase]:
        from rlhf_ray.models import load_causal_lm, load_tokenizer
        from rlhf_ray.rollout.hf import HFRolloutEngine

        if model is None:
            raise ValueError("JudgeReward needs a model (a causal LM or its path), or options.endpoint.")
        if engine is not None:
            if tokenizer is None or isinstance(tokenizer, str):
                tokenizer = load_tokenizer(tokenizer or model, trust_remote_code)
            return engine, tokenizer
        if isinstance(model, str):
            tokenizer = tokenizer or model
            model = load_causal_lm(model, dtype, trust_remote_code)
            model.to("cuda" if torch.cuda.is_available() else "cpu")
        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer or model.name_or_path, trust_remote_code)
        return HFRolloutEngine(model, tokenizer, max_batch=batch_size), tokenizer

    def score(self, prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
        if self.options.mode == "grade":
            return self._grade(prompts, responses)
        key = self.options.reference_key
        missing = next((i for i, m in enumerate(metadata) if not isinstance(m.get(key), str)), None)
        if missing is not None:
            raise RewardError(self.name, f"compare mode needs a baseline response in metadata[{key!r}] (a data column), "
                                         f"got {metadata[missing].get(key)!r}; add that column or use mode=grade", missing)
        return self.compare_pairs(prompts, responses, [m[key] for m in metadata])

    def compare_pairs(self, prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[float]:
        """Per pair: 1 = A better, 0 = B better, ½ = tie, averaged over the A/B and B/A orders."""
        orders = self.compare_orders(prompts, responses_a, responses_b)
        replies = [q.reply for q in self.last_queries]
        return [self._pair_score(i, list(wins), replies[2 * i : 2 * i + 2]) for i, wins in enumerate(orders)]

    def compare_orders(self, prompts: list[str], responses_a: list[str],
                       responses_b: list[str]) -> list[tuple[float | None, float | None]]:
        """Per pair, A's result in the A/B order and in the B/A order: 1 win, 0 loss, ½ tie, None when
        the reply has no verdict (counted; `on_unparseable` is the caller's to apply). `last_queries`
        holds the two rendered prompts and replies of pair i at 2i (A/B) and 2i+1 (B/A)."""
        queries = [(i, swapped, self._render(self.options.compare_template, prompt=p,
                                            response_a=b if swapped else a, response_b=a if swapped else b))
                   for i, (p, a, b) in enumerate(zip(prompts, responses_a, responses_b)) for swapped in (False, True)]
        replies = self._ask(queries)
        wins = [_win_of_a(parse_choice(reply), swapped) for (_, swapped, _), reply in zip(queries, replies)]
        self._count(wins, n_samples=len(prompts), per_sample=2)
        return [(wins[2 * i], wins[2 * i + 1]) for i in range(len(prompts))]

    def _grade(self, prompts: list[str], responses: list[str]) -> list[float]:
        o = self.options
        queries = [(i, False, self._render(o.grade_template, prompt=p, response=r, min_score=_fmt(o.min_score),
                                           max_score=_fmt(o.max_score)))
                   for i, (p, r) in enumerate(zip(prompts, responses))]
        replies = self._ask(queries)
        grades = [parse_grade(reply, o.min_score, o.max_score) for reply in replies]
        self._count(grades, n_samples=len(prompts), per_sample=1)
        middle = (o.min_score + o.max_score) / 2
        return [g if g is not None else self._unparseable(i, replies[i], "grade", middle) for i, g in enumerate(grades)]

    def _pair_score(self, i: int, wins: list[float | None], replies: list[str]) -> float:
        if self.options.on_unparseable == "drop-order":
            kept = [w for w in wins if w is not None]
            return sum(kept) / len(kept) if kept else 0.5
        orders = ("A/B order", "B/A order")
        values = [w if w is not None else self._unparseable(i, reply, order, 0.5)
                  for w, reply, order in zip(wins, replies, orders)]
        return sum(values) / len(values)

    def _unparseable(self, i: int, reply: str, what: str, tie_value: float) -> float:
        if self.options.on_unparseable == "error":
            raise RewardError(self.name, f"judge reply {reply[:120]!r} ({what}) has no verdict; on_unparseable=error "
                                         f"stops here: fix the template or max_new_tokens, or set on_unparseable=tie"
                                         f"{' or drop-order' if self.options.mode == 'compare' else ''}", i)
        return tie_value

    def _render(self, template: str, **fields: str) -> str:
        return string.Formatter().vformat(template, (), fields)

    def _ask(self, queries: list[tuple[int, bool, str]]) -> list[str]:
        """The judge's greedy reply to each rendered prompt, in order."""
        replies = self.asker.ask([text for _, _, text in queries], self.options.max_new_tokens)
        self.last_queries = [JudgeQuery(i, swapped, text, reply) for (i, swapped, text), reply in zip(queries, replies)]
        return replies

    def _count(self, verdicts: list, n_samples: int, per_sample: int) -> None:
        missing = [v is None for v in verdicts]
        unscored = sum(all(missing[i * per_sample : (i + 1) * per_sample]) for i in range(n_samples))
        self.last_counts = {"verdicts": len(verdicts), "unparseable": sum(missing), "no_verdict": unscored}
        for key, value in self.last_counts.items():
            self._verdict_counts[key] += value


def _win_of_a(choice: Choice | None, swapped: bool) -> float | None:
    """The first response's result in one order: 1 win, 0 loss, ½ tie, None unparseable."""
    if choice is None:
        return None
    if choice == "tie":
        return 0.5
    return float((choice == "A") != swapped)


def _fmt(x: float) -> str:
    return f"{x:g}"
