"""The math of the evaluation stage (ALGORITHMS.md §9, §11): pure functions on lists / numpy, no Ray, no I/O.

- `fit_length_controlled`, `win_rate_report`: raw and length-controlled win-rate against a baseline
  with a seeded percentile bootstrap (§11).
- `reward_model_report`: a reward model on preference pairs (RewardBench columns): accuracy overall,
  per subset and per section, calibration (ECE, Bradley–Terry log-loss) and length bias (§9).
- `refusal_share`: share of responses matching refusal patterns.
- `length_stats`: mean / median / p90 / max response length and the truncated share.
- `OverOptimisationWatch`: fires when the gold reward falls while the proxy reward rises.
- `check_gate`: the failed checks of a metrics dict against `metric: (op, threshold)`.

Ties count ½ everywhere (a preference of ½, or equal reward scores).

References: Dubois et al., "Length-Controlled AlpacaEval" (2024) and alpaca_eval's
`metrics/glm_winrate.py` (the GLM `tanh(std_delta_len) + instruction_difficulty + quality`);
Lambert et al., "RewardBench" (2024, subsets, sections); Guo et al., "On Calibration of Modern
Neural Networks" (2017, ECE); Gao et al., "Scaling Laws for Reward Model Overoptimization" (2023,
proxy vs gold reward); Efron & Tibshirani, "An Introduction to the Bootstrap" (1993, percentile
interval).
"""

from __future__ import annotations

import math
import operator
import re
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

# ---------------------------------------------------------------------------------------------
# Win-rate and length-controlled win-rate (§11)
# ---------------------------------------------------------------------------------------------

# L2 penalties are Gaussian priors on the summed log-likelihood: ½·λ·w², i.e. w ~ N(0, 1/λ).
INTERCEPT_L2 = 1e-8  # keeps the fit finite when every preference is 0 or 1; moves LC by ~1e-7 at most
LENGTH_L2 = 1e-2  # weak prior N(0, 10²) on the length coefficient: finite when length separates wins
INSTRUCTION_L2 = 1.0  # prior N(0, 1) on each instruction's difficulty term (a random-effect-like shrink)


@dataclass(frozen=True)
class LengthControlledFit:
    """A logistic model of the judge's preference: σ(quality + d_instruction + length_coef·tanh(Δlen/σ_len))."""

    win_rate: float  # raw: mean preference, ties ½
    lc_win_rate: float  # mean over comparisons of the predicted preference with the length term at 0
    quality: float  # intercept: the model's quality term (logit)
    length_coef: float  # coefficient of tanh((len_m − len_b)/σ_len); > 0: the judge favours longer
    sigma_len: float  # population std of len_m − len_b; 0 drops the length term
    n: int


@dataclass(frozen=True)
class WinRateReport:
    win_rate: float  # raw: mean preference, ties ½
    lc_win_rate: float  # length-controlled (`fit_length_controlled`)
    n: int  # comparisons
    win_rate_interval: tuple[float, float]  # percentile bootstrap interval (`confidence`)
    lc_win_rate_interval: tuple[float, float]
    length_coef: float


def _softplus(z: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, z)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-_softplus(-z))


def fit_logistic_soft(
    features: np.ndarray, targets: np.ndarray, l2: np.ndarray, tol: float = 1e-10, max_iter: int = 100
) -> np.ndarray:
    """Weights w maximising Σ_i [p_i log σ(x_i·w) + (1−p_i) log(1−σ(x_i·w))] − ½ Σ_j l2_j w_j².

    features (n, d), targets p (n,) in [0, 1] (soft labels), l2 (d,) > 0. Newton's method with
    step halving on the convex objective; deterministic.
    """

    def objective(w: np.ndarray) -> float:
        z = features @ w
        return float(np.sum(_softplus(z) - targets * z) + 0.5 * np.sum(l2 * w * w))

    weights = np.zeros(features.shape[1])
    value = objective(weights)
    for _ in range(max_iter):
        probs = _sigmoid(features @ weights)  # (n,)
        grad = features.T @ (probs - targets) + l2 * weights  # (d,)
        if np.max(np.abs(grad)) < tol:
            break
        hessian = (features.T * (probs * (1.0 - probs))) @ features + np.diag(l2)  # (d, d)
        step = np.linalg.solve(hessian, grad)
        scale = 1.0
        while scale > 1e-8:
            candidate = weights - scale * step
            candidate_value = objective(candidate)
            if candidate_value <= value:
                break
            scale *= 0.5
        else:
            break  # no descent left: at the optimum to machine precision
        weights, value = candidate, candidate_value
    return weights


def _check_preferences(preferences: np.ndarray, *others: np.ndarray) -> None:
    if preferences.size == 0:
        raise ValueError("no comparisons")
    if any(other.shape != preferences.shape for other in others):
        raise ValueError("preferences, lengths and instruction ids must have one entry per comparison")
    if np.any((preferences < 0) | (preferences > 1)):
        raise ValueError("preferences must lie in [0, 1] (1 win, 0 loss, ½ tie)")


def fit_length_controlled(
    preferences: Sequence[float],
    model_lengths: Sequence[float],
    baseline_lengths: Sequence[float],
    instruction_ids: Sequence[str | int] | None = None,
) -> LengthControlledFit:
    """Length-controlled win-rate (ALGORITHMS.md §11; Dubois et al. 2024).

    preferences: the judge's preference for the model over the baseline per comparison, in [0, 1],
    already averaged over both presentation orders. Fits
        logit P(model ≻ baseline) = quality + d_instruction + length_coef · tanh((len_m − len_b)/σ_len)
    by maximising the soft-target Bernoulli log-likelihood with L2 priors (`LENGTH_L2`,
    `INSTRUCTION_L2`, a vanishing `INTERCEPT_L2`), σ_len = population std of len_m − len_b.
    The LC win-rate is the mean predicted preference with the length term set to 0.

    instruction_ids (optional): one difficulty term d_k per distinct id, shrunk towards 0 by the
    N(0, 1) prior. AlpacaEval 2 instead uses one precomputed difficulty per instruction, fitted
    across many models; with a single model the terms only make sense when ids repeat (instruction
    categories, or several samples per prompt): with one comparison per id they absorb the
    residuals, length effect included. Default: no instruction terms (alpaca_eval's
    "length_controlled_minimal").
    """
    prefs = np.asarray(preferences, dtype=np.float64)
    lengths_m = np.asarray(model_lengths, dtype=np.float64)
    lengths_b = np.asarray(baseline_lengths, dtype=np.float64)
    ids = None if instruction_ids is None else np.asarray(instruction_ids)
    _check_preferences(prefs, lengths_m, lengths_b, *([] if ids is None else [ids]))
    delta = lengths_m - lengths_b  # (n,)
    sigma_len = float(np.std(delta))
    length_term = np.tanh(delta / sigma_len) if sigma_len > 0 else np.zeros_like(delta)  # (n,)
    columns = [np.ones_like(prefs), length_term]
    l2 = [INTERCEPT_L2, LENGTH_L2]
    if ids is not None:
        _, index = np.unique(ids, return_inverse=True)
        one_hot = np.eye(index.max() + 1)[index]  # (n, K)
        columns.extend(one_hot.T)
        l2.extend([INSTRUCTION_L2] * one_hot.shape[1])
    features = np.stack(columns, axis=1)  # (n, 2 + K)
    weights = fit_logistic_soft(features, prefs, np.asarray(l2))
    no_length = features.copy()
    no_length[:, 1] = 0.0  # counterfactual: equal lengths
    return LengthControlledFit(
        win_rate=float(prefs.mean()),
        lc_win_rate=float(_sigmoid(no_length @ weights).mean()),
        quality=float(weights[0]),
        length_coef=float(weights[1]),
        sigma_len=sigma_len,
        n=int(prefs.size),
    )


def win_rate_report(
    preferences: Sequence[float],
    model_lengths: Sequence[float],
    baseline_lengths: Sequence[float],
    instruction_ids: Sequence[str | int] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> WinRateReport:
    """Raw and LC win-rate (§11) with percentile bootstrap intervals.

    Each of the `n_bootstrap` resamples draws n comparisons with replacement (numpy
    `default_rng(seed)`) and refits the whole estimator, σ_len included. Comparisons are resampled
    one by one, not by instruction. Cost: one Newton fit of 2 + K parameters per resample.
    """
    if n_bootstrap < 1:
        raise ValueError("n_bootstrap must be ≥ 1")
    prefs = np.asarray(preferences, dtype=np.float64)
    lengths_m = np.asarray(model_lengths, dtype=np.float64)
    lengths_b = np.asarray(baseline_lengths, dtype=np.float64)
    ids = None if instruction_ids is None else np.asarray(instruction_ids)
    fit = fit_length_controlled(prefs, lengths_m, lengths_b, ids)
    rng = np.random.default_rng(seed)
    raw, lc = np.empty(n_bootstrap), np.empty(n_bootstrap)
    for b in range(n_bootstrap):
        idx = rng.integers(0, fit.n, size=fit.n)
        resampled = fit_length_controlled(prefs[idx], lengths_m[idx], lengths_b[idx], None if ids is None else ids[idx])
        raw[b], lc[b] = resampled.win_rate, resampled.lc_win_rate
    tail = 100.0 * (1.0 - confidence) / 2.0
    return WinRateReport(
        win_rate=fit.win_rate,
        lc_win_rate=fit.lc_win_rate,
        n=fit.n,
        win_rate_interval=_percentiles(raw, tail),
        lc_win_rate_interval=_percentiles(lc, tail),
        length_coef=fit.length_coef,
    )


def _percentiles(values: np.ndarray, tail: float) -> tuple[float, float]:
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


# ---------------------------------------------------------------------------------------------
# Reward model on preference pairs (§9)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Accuracy:
    accuracy: float  # share of pairs with chosen_score > rejected_score, ties ½; nan when n == 0
    n: int


@dataclass(frozen=True)
class RewardModelReport:
    accuracy: float  # over all pairs, ties ½
    n: int
    subsets: dict[str, Accuracy]  # per subset name, in order of first appearance
    sections: dict[str, float]  # RewardBench section → pooled accuracy of its subsets; {} without a mapping
    section_average: float  # unweighted mean of the sections (RewardBench's score); nan without a mapping
    ece: float  # expected calibration error of σ(margin) (`expected_calibration_error`)
    log_loss: float  # Bradley–Terry NLL, mean −log σ(chosen − rejected)
    chosen_shorter: Accuracy  # pairs where len(chosen) < len(rejected)
    chosen_longer: Accuracy  # len(chosen) > len(rejected)
    equal_length: Accuracy


def pair_correct(margins: np.ndarray) -> np.ndarray:
    """Per pair 1 if chosen_score > rejected_score, ½ on a tie, 0 otherwise; margins = chosen − rejected."""
    return (margins > 0) + 0.5 * (margins == 0)


def _accuracy(correct: np.ndarray) -> Accuracy:
    return Accuracy(float(correct.mean()) if correct.size else math.nan, int(correct.size))


def bradley_terry_log_loss(margins: np.ndarray) -> float:
    """Mean −log σ(chosen − rejected): the reward model's NLL of the labels under Bradley–Terry (§6)."""
    return float(np.mean(_softplus(-margins)))


def expected_calibration_error(margins: np.ndarray, n_bins: int = 10) -> float:
    """ECE (Guo et al. 2017) of the pairwise prediction P(chosen ≻ rejected) = σ(margin).

    The label is always "chosen", so a reliability diagram of σ(margin) against it is degenerate;
    as for a classifier, take the predicted winner (the higher score), its confidence
    σ(|margin|) ∈ [0.5, 1] and whether it is right (½ on a tie), bin the confidence into `n_bins`
    equal bins over [0.5, 1] and sum (n_bin / n) · |accuracy_bin − mean confidence_bin|.
    """
    confidence = _sigmoid(np.abs(margins))  # (n,)
    correct = pair_correct(margins)  # (n,)
    bins = np.minimum(((confidence - 0.5) * 2.0 * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in np.unique(bins):
        in_bin = bins == b
        ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def reward_model_report(
    chosen_scores: Sequence[float],
    rejected_scores: Sequence[float],
    subsets: Sequence[str],
    chosen_lengths: Sequence[float],
    rejected_lengths: Sequence[float],
    sections: Mapping[str, str] | None = None,
    n_bins: int = 10,
) -> RewardModelReport:
    """A reward model on preference pairs (RewardBench-style: prompt, chosen, rejected, subset).

    sections (optional) maps each subset to a section ("Chat", "Chat Hard", "Safety", "Reasoning");
    a section's accuracy pools its subsets' pairs (RewardBench's count-weighted mean; its extra
    up-weighting of math within Reasoning is not done) and `section_average` is their plain mean.
    """
    margins = np.asarray(chosen_scores, dtype=np.float64) - np.asarray(rejected_scores, dtype=np.float64)
    names = np.asarray(subsets, dtype=object)
    length_delta = np.asarray(chosen_lengths, dtype=np.float64) - np.asarray(rejected_lengths, dtype=np.float64)
    if margins.size == 0:
        raise ValueError("no preference pairs")
    if names.shape != margins.shape or length_delta.shape != margins.shape:
        raise ValueError("scores, subsets and lengths must have one entry per pair")
    correct = pair_correct(margins)  # (n,)
    per_subset = {name: _accuracy(correct[names == name]) for name in dict.fromkeys(subsets)}
    section_scores: dict[str, float] = {}
    if sections is not None:
        unmapped = sorted(set(per_subset) - set(sections))
        if unmapped:
            raise ValueError(f"subsets without a section: {unmapped}")
        section_of = np.asarray([sections[name] for name in subsets], dtype=object)
        section_scores = {s: float(correct[section_of == s].mean()) for s in dict.fromkeys(section_of)}
    return RewardModelReport(
        accuracy=float(correct.mean()),
        n=int(margins.size),
        subsets=per_subset,
        sections=section_scores,
        section_average=float(np.mean(list(section_scores.values()))) if section_scores else math.nan,
        ece=expected_calibration_error(margins, n_bins),
        log_loss=bradley_terry_log_loss(margins),
        chosen_shorter=_accuracy(correct[length_delta < 0]),
        chosen_longer=_accuracy(correct[length_delta > 0]),
        equal_length=_accuracy(correct[length_delta == 0]),
    )


# ---------------------------------------------------------------------------------------------
# Refusals and lengths
# ---------------------------------------------------------------------------------------------

# Case-insensitive, searched anywhere in the response; ['’] admits the typographic apostrophe.
DEFAULT_REFUSAL_PATTERNS: tuple[str, ...] = (
    r"\bI can(?:not|['’]t|\s+not) (?:help|assist) (?:you )?with\b",
    r"\bI can(?:not|['’]t|\s+not) (?:assist|comply|provide|fulfill|fulfil)\b",
    r"\bI (?:won['’]t|will not) be able to\b",
    r"\bI(?:['’]m| am) (?:not able|unable) to (?:help|assist|provide|comply)\b",
    r"\bI(?:['’]m| am) sorry,? but\b",
    r"\bI apologi[sz]e,? but\b",
    r"\bAs an AI\b",
    r"\bI must (?:decline|refuse)\b",
)


@dataclass(frozen=True)
class RefusalShare:
    share: float  # share of responses flagged
    flags: tuple[bool, ...]  # per response: matches at least one pattern


def refusal_share(responses: Sequence[str], patterns: Sequence[str] = DEFAULT_REFUSAL_PATTERNS) -> RefusalShare:
    """Share of responses matching any of `patterns` (regexes, case-insensitive, `re.search`)."""
    if not responses:
        raise ValueError("no responses")
    matcher = re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)
    flags = tuple(matcher.search(text) is not None for text in responses)
    return RefusalShare(share=sum(flags) / len(flags), flags=flags)


@dataclass(frozen=True)
class LengthStats:
    n: int
    mean: float
    median: float
    p90: float  # 90th percentile, linear interpolation between order statistics (numpy's default)
    max: float
    truncated_share: float  # share of responses that hit the length limit without EOS


def length_stats(lengths: Sequence[float], truncated: Sequence[bool]) -> LengthStats:
    """Response-length statistics; `truncated` flags each response cut at the generation limit."""
    values = np.asarray(lengths, dtype=np.float64)
    flags = np.asarray(truncated, dtype=bool)
    if values.size == 0:
        raise ValueError("no responses")
    if flags.shape != values.shape:
        raise ValueError("lengths and truncated flags must have one entry per response")
    return LengthStats(
        n=int(values.size),
        mean=float(values.mean()),
        median=float(np.median(values)),
        p90=float(np.percentile(values, 90)),
        max=float(values.max()),
        truncated_share=float(flags.mean()),
    )


# ---------------------------------------------------------------------------------------------
# Over-optimisation watch and the gate
# ---------------------------------------------------------------------------------------------


class OverOptimisationWatch:
    """Fires when the gold reward falls while the proxy keeps rising (Gao et al. 2023).

    Fed one evaluation at a time. Fires at the evaluation t when the last `patience` evaluations
    each had gold < best gold so far − `min_delta`, and the proxy at t is higher than at the
    evaluation just before those `patience` (the start of the span). Once fired it stays fired;
    `reason` names the steps and values of the firing.
    """

    def __init__(self, patience: int, min_delta: float) -> None:
        if patience < 1 or min_delta < 0:
            raise ValueError("patience must be ≥ 1 and min_delta ≥ 0")
        self.patience = patience
        self.min_delta = min_delta
        self.best_step: int | None = None  # step of the highest gold reward so far
        self.best_gold = -math.inf
        self.triggered = False
        self.reason = ""
        self._below = 0  # consecutive evaluations with gold < best_gold − min_delta
        # (step, proxy) of the latest patience + 1 evaluations; the first is the span's start
        self._recent: deque[tuple[int, float]] = deque(maxlen=patience + 1)

    def update(self, step: int, proxy_reward: float, gold_reward: float) -> bool:
        """Record one evaluation; returns `triggered`."""
        if self.triggered:
            return True
        self._recent.append((step, proxy_reward))
        if gold_reward > self.best_gold:
            self.best_step, self.best_gold = step, gold_reward
        self._below = self._below + 1 if gold_reward < self.best_gold - self.min_delta else 0
        # _below ≥ patience implies ≥ patience + 1 evaluations (the best one is not below), so _recent is full
        start_step, start_proxy = self._recent[0]
        if self._below >= self.patience and proxy_reward > start_proxy:
            self.triggered = True
            self.reason = (
                f"gold reward {gold_reward:.4g} at step {step} is more than min_delta {self.min_delta:.4g} "
                f"below its best {self.best_gold:.4g} at step {self.best_step} for {self._below} evaluations, "
                f"while the proxy reward rose from {start_proxy:.4g} at step {start_step} to {proxy_reward:.4g}"
            )
        return self.triggered


Op = Literal[">=", "<=", ">", "<"]
_OPS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def check_gate(metrics: Mapping[str, float], gate: Mapping[str, tuple[Op, float]]) -> list[str]:
    """One message per failed check of `gate` (metric → (op, threshold)), in the gate's order; [] = passed.

    A missing metric fails; NaN fails every op. An unknown op raises ValueError (a config error).
    """
    failures = []
    for name, (op, threshold) in gate.items():
        if op not in _OPS:
            raise ValueError(f"gate on {name!r}: unknown op {op!r}, expected one of {sorted(_OPS)}")
        if name not in metrics:
            failures.append(f"{name}: missing, gate requires {op} {threshold:g}")
        elif not _OPS[op](metrics[name], threshold):
            failures.append(f"{name}: {metrics[name]:g} fails {op} {threshold:g}")
    return failures
