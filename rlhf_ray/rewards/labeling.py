"""AI preference labelling (RLAIF: Bai et al. 2022 §4, Lee et al. 2023; seed notes 003 §6.1–6.2):
which of two responses to a prompt is better, by an LLM judge or a scorer.

- A judge (`JudgeReward`) is asked about every pair in BOTH orders, A/B and B/A
  (`JudgeReward.compare_orders`), so a judge that favours a position cannot decide alone. Each
  order's verdict is A's result: 1 win, 0 loss, ½ tie, None when the reply has no verdict.
- A scorer (a reward model, a function, an HTTP source) scores both responses; the higher wins.

`decide` turns one pair's judgement into a label or a reason to drop it (pure):
- an unreadable order follows the judge's `on_unparseable`: `error` stops naming the pair and
  quoting the reply; `tie` reads it as a tie; `drop-order` leaves it out (the other order decides);
- `on_disagreement=drop`: orders that differ (A then B, or A then tie) drop the pair — only
  position-consistent verdicts are kept; `tie`: the orders are averaged as the judge reward does
  (A then B is a tie, A then tie is A);
- the mean of the kept orders decides: > ½ A, < ½ B, = ½ a tie (dropped: a pair needs a winner);
- a scorer's pair is a tie when |score_A − score_B| <= `min_score_gap`.

`summarise` reports the agreement rate (pairs whose two orders both have a verdict and agree,
over pairs whose two orders both have one) and the first-position rate (share of decisive order
verdicts that chose the response shown first; ½ for an unbiased judge).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

from rlhf_ray.rewards.base import RewardError, RewardSource, check_scores
from rlhf_ray.rewards.judge import JudgeReward

Choice = Literal["A", "B"]


@dataclass(frozen=True)
class PairJudgement:
    """What the labeller said about one pair (A = responses_a[i], B = responses_b[i])."""

    orders: tuple[float | None, ...]  # judge: A's result in the A/B then the B/A order; scorer: ()
    scores: tuple[float, float] | None = None  # scorer: (score of A, score of B)
    queries: tuple[str, ...] = ()  # judge: the rendered prompts, A/B then B/A
    replies: tuple[str, ...] = ()  # judge: its replies to them


@dataclass(frozen=True)
class LabelRules:
    on_unparseable: Literal["error", "tie", "drop-order"]  # the judge's policy for a reply without a verdict
    on_disagreement: Literal["drop", "tie"]
    min_score_gap: float  # scorer: a smaller difference is a tie


class PairLabeler:
    """Labels pairs with one reward source; built inside a worker (it may hold a model)."""

    def __init__(self, source: RewardSource):
        self.source = source

    def label(self, prompts: list[str], responses_a: list[str], responses_b: list[str],
              metadata_a: list[dict[str, Any]], metadata_b: list[dict[str, Any]]) -> list[PairJudgement]:
        if isinstance(self.source, JudgeReward):
            orders = self.source.compare_orders(prompts, responses_a, responses_b)
            q = self.source.last_queries
            return [PairJudgement(o, None, (q[2 * i].prompt, q[2 * i + 1].prompt), (q[2 * i].reply, q[2 * i + 1].reply))
                    for i, o in enumerate(orders)]
        n = len(prompts)
        scores = check_scores(self.source.name, self.source.score(prompts + prompts, responses_a + responses_b,
                                                                  metadata_a + metadata_b), 2 * n)
        return [PairJudgement((), (scores[i], scores[n + i])) for i in range(n)]


@dataclass(frozen=True)
class Decision:
    choice: Choice | None  # the better response, None when the pair is dropped
    reason: str  # "kept", or why dropped: tie | disagreement | unparseable
    strength: float | None = None  # kept pairs: the winner's share of the verdicts (judge) or the score margin (scorer)


def decide(judgement: PairJudgement, rules: LabelRules, index: int = 0, source: str = "judge") -> Decision:
    """The label of one pair, or why it has none (see the module docstring)."""
    if judgement.scores is not None:
        gap = judgement.scores[0] - judgement.scores[1]
        return Decision(None, "tie") if abs(gap) <= rules.min_score_gap else \
            Decision("A" if gap > 0 else "B", "kept", abs(gap))
    wins = list(judgement.orders)
    if None in wins and rules.on_unparseable == "error":
        reply = judgement.replies[wins.index(None)] if judgement.replies else ""
        raise RewardError(source, f"judge reply {reply[:120]!r} has no verdict; on_unparseable=error stops here: fix "
                                  f"the template or max_new_tokens, or set on_unparseable=tie or drop-order", index)
    readable = [0.5 if w is None else w for w in wins] if rules.on_unparseable == "tie" else \
        [w for w in wins if w is not None]
    if not readable:
        return Decision(None, "unparseable")
    if rules.on_disagreement == "drop" and len(set(readable)) > 1:
        return Decision(None, "disagreement")
    mean = sum(readable) / len(readable)
    if mean == 0.5:
        return Decision(None, "tie")
    return Decision("A", "kept", mean) if mean > 0.5 else Decision("B", "kept", 1 - mean)


def summarise(judgements: list[PairJudgement], decisions: list[Decision]) -> dict[str, Any]:
    """Counts and rates over one labelling call."""
    reasons = [d.reason for d in decisions]
    out: dict[str, Any] = {"pairs": len(judgements), "kept": reasons.count("kept"),
                           "dropped": dict(Counter(r for r in reasons if r != "kept"))}
    both = [j.orders for j in judgements if len(j.orders) == 2 and None not in j.orders]
    out["agreement"] = sum(a == b for a, b in both) / len(both) if both else None
    first = [w == 1.0 if order == 0 else w == 0.0 for j in judgements for order, w in enumerate(j.orders)
             if w in (0.0, 1.0)]
    out["first_position_rate"] = sum(first) / len(first) if first else None
    out["unparseable_orders"] = sum(w is None for j in judgements for w in j.orders)
    return out
