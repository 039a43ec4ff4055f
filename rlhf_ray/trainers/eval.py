"""Evaluation of finished models and the gate (stage `eval`; ALGORITHMS.md §9, §11; the math is
`rlhf_ray.eval_metrics`).

1. **answer**: each policy of `eval.policies` in turn ('toy' / 'toy:N' built into the run directory),
   on its own `SamplingSession` (rollout engines loading that policy + a reward-side actor), closed
   before the next starts, answers the golden prompts (data.eval, the first trainer.eval_prompts)
   greedily (or at eval.temperature) with rollout.max_new_tokens; the responses are decoded and scored by reward.sources on
   the reward-side actor, as the label and cai stages evaluate.
2. **per policy**: `eval/<policy>/reward_mean`, `…/<source>_mean`, length statistics, refusal share
   (eval.refusal_patterns) and the pass share of each rule function `eval/<policy>/rule/<function>`
   (called in the driver).
3. **compare** every other policy with `eval.baseline`, prompt by prompt: the judge (eval.judge) in
   both orders through the labeller of a `LabelWorker`, as the label stage asks it (in the last
   policy's session; the preference is the mean of the readable orders, judge.on_unparseable
   applied, ½ when none is readable), or without a judge the higher summed reward score (ties ½).
   Identical responses count ½ without asking (alpaca_eval does the same). → raw and
   length-controlled win-rate with 95% percentile-bootstrap intervals (`win_rate_report`).
4. **reward model** (eval.reward_model on eval.preference_data): chosen and rejected scored by a
   `ModelReward` in the driver (its convention: prompt ⊕ response ⊕ EOS, read at the last token)
   → `reward_model_report`: accuracy overall and per subset, ECE, Bradley–Terry log-loss, length bias.
5. **write** `eval.json` (every metric, flat `eval/…` keys), `responses.jsonl` (every prompt: each
   policy's response and score, the verdicts), a metrics.jsonl row at step 0, `report.html` (samples
   side by side, win-rate and per-subset accuracy bars), and print a summary table.
6. **gate** (eval.gate, `check_gate`): each failed check printed as `gate: <message>`, then
   `GateFailed`, which launch.py turns into exit code 3.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from rlhf_ray.config import (
    JUDGE_GRADE_TEMPLATE,
    REFUSAL_GRADE_TEMPLATE,
    REFUSAL_SOURCE,
    JudgeSourceConfig,
    RewardSourceConfig,
    RunConfig,
    toy_policy_seed,
)
from rlhf_ray.data import PromptExample, load_rows
from rlhf_ray.eval_metrics import (
    DEFAULT_REFUSAL_PATTERNS,
    check_gate,
    length_stats,
    refusal_share,
    reward_model_report,
    win_rate_report,
)
from rlhf_ray.metrics import MetricsLogger, summary_table
from rlhf_ray.models import load_tokenizer
from rlhf_ray.rewards.function import import_function
from rlhf_ray.rewards.labeling import LabelRules, PairJudgement, decide
from rlhf_ray.rollout import check_rollout_model
from rlhf_ray.rollout.base import SamplingParams
from rlhf_ray.trainers.common import RunInputs, prepare_run, toy_model
from rlhf_ray.trainers.sampling import (
    EVAL_SEED_OFFSET,
    SamplingSession,
    decode_responses,
    labeler_path,
    load_prompt_examples,
    prompt_text,
)
from rlhf_ray.workers import ModelPaths

GATE_EXIT_CODE = 3  # launch.py's exit code when the gate fails (config errors: 2, a failed phase: 1)
N_BOOTSTRAP = 1000  # resamples of the win-rate intervals


class GateFailed(RuntimeError):
    """The evaluation ran and its outputs are written, but checks of eval.gate failed."""

    def __init__(self, failures: list[str], metrics: dict[str, float] | None = None):
        self.failures, self.metrics = failures, metrics or {}
        super().__init__(f"gate failed: {len(failures)} check(s): " + "; ".join(failures))


@dataclass(frozen=True)
class Answers:
    """One policy's greedy responses to the golden prompts, and their scores by reward.sources."""

    name: str
    path: str
    prompts: list[PromptExample]
    responses: list[str]  # (N,) decoded, special tokens skipped
    lengths: list[int]  # (N,) response tokens (EOS included)
    truncated: list[bool]  # (N,) hit rollout.max_new_tokens without EOS
    scores: list[float]  # (N,) summed reward.sources; nan where masked (reward.on_error=mask)
    per_source: dict[str, list[float]]  # source name → (N,)


@dataclass(frozen=True)
class Comparison:
    """A policy against the baseline, prompt by prompt."""

    policy: str
    preferences: list[float]  # (N,) P(policy ≻ baseline): 1, 0, ½ ties
    verdicts: list[str]  # (N,) how each preference came about, for the report


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def run_eval(cfg: RunConfig) -> dict[str, float]:
    """Answer, score, compare, evaluate the reward model, write the outputs, then apply the gate."""
    cfg = with_refusal_judge(cfg)
    start, inputs = time.perf_counter(), prepare_run(cfg)
    e = cfg.eval
    judge_cfg = judge_config(cfg)
    names = list(e.policies)
    answers: dict[str, Answers] = {}
    comparisons: list[Comparison] = []
    for i, name in enumerate(names):
        path = policy_path(cfg, e.policies[name])
        judges_here = i == len(names) - 1 and e.judge is not None and e.baseline is not None and len(names) > 1
        answers[name], compared = _answer(judge_cfg, inputs, name, path, judges_here, answers)
        comparisons += compared
    if e.baseline is not None and e.judge is None:
        comparisons = [compare_by_scores(answers[n], answers[e.baseline]) for n in names if n != e.baseline]
    metrics = {k: v for name in names for k, v in policy_metrics(answers[name], cfg.eval.rules, cfg).items()}
    for c in comparisons:
        metrics |= win_rate_metrics(c, answers[c.policy], answers[e.baseline], cfg.trainer.seed)
    rm_report = None
    if e.reward_model is not None:
        rm_metrics, rm_report = evaluate_reward_model(cfg)
        metrics |= rm_metrics
    metrics["eval/seconds"] = time.perf_counter() - start
    failures = _write(cfg, answers, comparisons, metrics, rm_report)
    if failures:
        raise GateFailed(failures, metrics)
    return metrics


def with_refusal_judge(cfg: RunConfig) -> RunConfig:
    """eval.refusal_judge as one more scoring source, weight 0 (outside the summed score), named
    REFUSAL_SOURCE; the default grade template becomes the refusal question."""
    judge = cfg.eval.refusal_judge
    if judge is None:
        return cfg
    options = judge.judge or JudgeSourceConfig()
    if options.grade_template == JUDGE_GRADE_TEMPLATE:
        options = options.model_copy(update={"grade_template": REFUSAL_GRADE_TEMPLATE})
    source = judge.model_copy(update={"name": REFUSAL_SOURCE, "weight": 0.0, "judge": options})
    reward = cfg.reward.model_copy(update={"sources": [*cfg.reward.sources, source]})
    return cfg.model_copy(update={"reward": reward})


def refusal_share_judged(grades: list[float], judge: RewardSourceConfig) -> float:
    """Share of the readable grades above the middle of [min_score, max_score] (a tie is not a refusal)."""
    options = judge.judge or JudgeSourceConfig()
    values = np.asarray(grades, dtype=np.float64)
    values = values[np.isfinite(values)]
    middle = (options.min_score + options.max_score) / 2
    return float(np.mean(values > middle)) if values.size else math.nan


def judge_config(cfg: RunConfig) -> RunConfig:
    """The config the sessions run with: label.labeler = eval.judge, which the LabelWorker builds its labeller from."""
    if cfg.eval.judge is None:
        return cfg
    return cfg.model_copy(update={"label": cfg.label.model_copy(update={"labeler": cfg.eval.judge})})


def policy_path(cfg: RunConfig, spec: str) -> str:
    """An eval.policies value as a model directory: 'toy' and 'toy:N' built into <run_dir>/toy."""
    t = cfg.model.toy
    seed = toy_policy_seed(spec, t.seed)
    if seed is None:
        return spec
    if seed == t.seed:
        return toy_model(cfg, "policy")
    from rlhf_ray.toy import save_toy_models

    return save_toy_models(cfg.run_dir / "toy" / f"models_seed{seed}", seed=seed, hidden_size=t.hidden_size,
                           intermediate_size=t.intermediate_size, num_layers=t.num_layers, num_heads=t.num_heads).policy


def _answer(cfg: RunConfig, inputs: RunInputs, name: str, path: str, judges: bool,
            earlier: dict[str, Answers]) -> tuple[Answers, list[Comparison]]:
    """One policy's session: its answers, and with `judges` (the last session) the judge's comparisons."""
    check_rollout_model(cfg, path)
    models = ModelPaths(policy=path, reference=path, critic=path, tokenizer=cfg.model.tokenizer or path)
    tokenizer = load_tokenizer(models.tokenizer, cfg.model.trust_remote_code)
    prompts = load_prompt_examples(cfg, tokenizer, inputs.eval, cfg.data.eval_split)[: cfg.trainer.eval_prompts]
    session = SamplingSession(cfg, models, labeler=judges, labeler_path=labeler_path(cfg) if judges else None,
                              reward_paths=inputs.reward_paths)
    try:
        answers = _generate_and_score(session, cfg, tokenizer, name, path, prompts)
        compared = []
        if judges:
            everyone = earlier | {name: answers}
            baseline = everyone[cfg.eval.baseline]
            compared = compare_by_judge(session, cfg, [everyone[n] for n in everyone if n != cfg.eval.baseline], baseline)
    finally:
        session.close()
    return answers, compared


def _generate_and_score(session: SamplingSession, cfg: RunConfig, tokenizer, name: str, path: str,
                        prompts: list[PromptExample]) -> Answers:
    t = cfg.eval.temperature
    params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, greedy=t == 0, temperature=t or 1.0)
    samples = session.generate([p.prompt_ids for p in prompts], params, cfg.rollout.seed + EVAL_SEED_OFFSET,
                               f"eval/{name}", tokenizer.pad_token_id)
    scorer = session.pools["reward"]
    ref = scorer.workers[0].score.remote(samples.to_numpy(), [p.metadata for p in prompts])
    total, per_source, valid, _ = scorer.get([ref], "eval", f"eval/{name}")[0]
    masked = np.where(valid, total, np.nan)
    return Answers(name, path, prompts, decode_responses(tokenizer, samples), samples.response_mask.sum(-1).tolist(),
                   (~samples.stopped).tolist(), masked.tolist(),
                   {k: np.where(valid, v, np.nan).tolist() for k, v in per_source.items()})


# ---------------------------------------------------------------------------------------------
# Comparisons with the baseline
# ---------------------------------------------------------------------------------------------


def compare_by_judge(session: SamplingSession, cfg: RunConfig, policies: list[Answers],
                     baseline: Answers) -> list[Comparison]:
    """Every policy's response (A) against the baseline's (B) on each prompt, both orders in one labelling call."""
    _check_same_prompts(policies, baseline)
    asked = [(k, i) for k, p in enumerate(policies) for i in range(len(p.responses))
             if p.responses[i] != baseline.responses[i]]
    judgements = session.label([baseline.prompts[i].prompt_text for _, i in asked],
                               [policies[k].responses[i] for k, i in asked], [baseline.responses[i] for _, i in asked],
                               [{"stopped": not policies[k].truncated[i]} for k, i in asked],
                               [{"stopped": not baseline.truncated[i]} for _, i in asked]) if asked else []
    rules = LabelRules(cfg.eval.judge.judge.on_unparseable, "tie", 0.0)
    verdict = dict(zip(asked, judgements))
    out = []
    for k, policy in enumerate(policies):
        prefs, notes = [], []
        for i in range(len(policy.responses)):
            j = verdict.get((k, i))
            prefs.append(0.5 if j is None else judged_preference(j, rules, i, cfg.eval.judge.name or "judge"))
            notes.append("identical responses: tie" if j is None else _verdict_text(policy.name, baseline.name, prefs[-1], j))
        out.append(Comparison(policy.name, prefs, notes))
    return out


def judged_preference(judgement: PairJudgement, rules: LabelRules, index: int, source: str) -> float:
    """P(A ≻ B) from a judge's two orders: the labelling decision (`decide`, disagreements averaged) as a
    preference; a tie, or no readable order, is ½."""
    decision = decide(judgement, rules, index, source)
    if decision.choice is None:
        return 0.5
    return decision.strength if decision.choice == "A" else 1.0 - decision.strength


def compare_by_scores(policy: Answers, baseline: Answers) -> Comparison:
    """The higher summed reward score wins, ties ½; a masked score (nan) on either side is a tie."""
    _check_same_prompts([policy], baseline)
    prefs, notes = [], []
    for a, b in zip(policy.scores, baseline.scores):
        prefs.append(0.5 if math.isnan(a) or math.isnan(b) or a == b else float(a > b))
        notes.append(f"{policy.name if prefs[-1] == 1 else baseline.name if prefs[-1] == 0 else 'tie'} "
                     f"(reward {a:.4g} vs {b:.4g})")
    return Comparison(policy.name, prefs, notes)


def _verdict_text(policy: str, baseline: str, preference: float, judgement: PairJudgement) -> str:
    winner = policy if preference > 0.5 else baseline if preference < 0.5 else "tie"
    orders = ", ".join("?" if w is None else f"{w:g}" for w in judgement.orders)
    return f"{winner} (P({policy} ≻ {baseline}) = {preference:.3g}; {policy}'s result A/B, B/A: {orders})"


def _check_same_prompts(policies: list[Answers], baseline: Answers) -> None:
    for p in policies:
        if [x.prompt for x in p.prompts] != [x.prompt for x in baseline.prompts]:
            raise ValueError(f"eval: policies {p.name!r} and {baseline.name!r} kept different golden prompts (their "
                             f"tokenizers dropped different rows, e.g. with data.overlength=skip); set "
                             f"data.overlength=error or truncate_left, or raise data.max_prompt_len.")


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def policy_metrics(answers: Answers, rules: list[str], cfg: RunConfig) -> dict[str, float]:
    """Reward means, lengths, refusal share and rule pass shares of one policy: eval/<policy>/…."""
    key = f"eval/{answers.name}"
    scores = np.asarray(answers.scores, dtype=np.float64)
    out = {f"{key}/n": len(answers.responses), f"{key}/reward_mean": _nanmean(scores)}
    out |= {f"{key}/{source}_mean": _nanmean(np.asarray(v, dtype=np.float64)) for source, v in answers.per_source.items()}
    stats = length_stats(answers.lengths, answers.truncated)
    out |= {f"{key}/length_mean": stats.mean, f"{key}/length_median": stats.median, f"{key}/length_p90": stats.p90,
            f"{key}/length_max": stats.max, f"{key}/truncated_share": stats.truncated_share}
    patterns = cfg.eval.refusal_patterns or DEFAULT_REFUSAL_PATTERNS
    out[f"{key}/refusal_share"] = refusal_share(answers.responses, patterns).share
    if cfg.eval.refusal_judge is not None:
        out[f"{key}/refusal_share_judge"] = refusal_share_judged(answers.per_source[REFUSAL_SOURCE], cfg.eval.refusal_judge)
    texts = [p.prompt_text for p in answers.prompts]
    metadata = [{**p.metadata, "stopped": not t} for p, t in zip(answers.prompts, answers.truncated)]
    for spec in rules:
        out[f"{key}/rule/{spec.rpartition(':')[2]}"] = rule_pass_share(spec, texts, answers.responses, metadata)
    return out


def rule_pass_share(spec: str, prompts: list[str], responses: list[str], metadata: list[dict]) -> float:
    """Mean of the rule's per-response values (True = 1); each must be a bool or a number in [0, 1]."""
    values = import_function(spec, spec)(prompts, responses, metadata)
    values = list(values)
    if len(values) != len(responses) or not all(isinstance(v, (bool, int, float)) and 0 <= v <= 1 for v in values):
        raise ValueError(f"eval.rules {spec}: must return one bool or number in [0, 1] per response "
                         f"({len(responses)}), got {values[:8]!r}{'…' if len(values) > 8 else ''}")
    return float(np.mean([float(v) for v in values]))


def win_rate_metrics(comparison: Comparison, policy: Answers, baseline: Answers, seed: int) -> dict[str, float]:
    report = win_rate_report(comparison.preferences, policy.lengths, baseline.lengths, n_bootstrap=N_BOOTSTRAP, seed=seed)
    key = f"eval/{comparison.policy}"
    return {f"{key}/win_rate": report.win_rate, f"{key}/win_rate_low": report.win_rate_interval[0],
            f"{key}/win_rate_high": report.win_rate_interval[1], f"{key}/lc_win_rate": report.lc_win_rate,
            f"{key}/lc_win_rate_low": report.lc_win_rate_interval[0],
            f"{key}/lc_win_rate_high": report.lc_win_rate_interval[1], f"{key}/length_coef": report.length_coef,
            f"{key}/comparisons": report.n}


def evaluate_reward_model(cfg: RunConfig) -> tuple[dict[str, float], Any]:
    """eval.reward_model on eval.preference_data → (eval/rm/… metrics, the RewardModelReport)."""
    from rlhf_ray.rewards.model import ModelReward

    e, d = cfg.eval, cfg.data
    path = toy_model(cfg, "reward") if e.reward_model == "toy" else e.reward_model
    data = e.preference_data
    if data == "toy":
        from rlhf_ray.toy.task import write_toy_reward_bench

        data = write_toy_reward_bench(cfg.run_dir / "toy" / "data" / "reward_bench.jsonl", cfg.trainer.seed,
                                      d.toy_eval_size)
    rows = load_rows(data, d.eval_split)
    missing = [k for k in (d.prompt_key, d.chosen_key, d.rejected_key) if k not in rows.column_names]
    if missing:
        raise ValueError(f"eval.preference_data={data}: no column(s) {missing} (has {rows.column_names}); set "
                         f"data.prompt_key / data.chosen_key / data.rejected_key")
    rm = ModelReward(path, batch_size=cfg.reward.batch_size, trust_remote_code=cfg.model.trust_remote_code,
                     name="rm", dtype=cfg.model_dtype)
    prompts = [prompt_text(rm.tokenizer, p) for p in rows[d.prompt_key]]
    chosen, rejected = list(rows[d.chosen_key]), list(rows[d.rejected_key])
    subsets = list(rows["subset"]) if "subset" in rows.column_names else ["all"] * len(prompts)
    metadata = [{} for _ in prompts]  # stopped defaults to True: the RM reads the response ⊕ EOS it was trained on
    report = reward_model_report(rm.score(prompts, chosen, metadata), rm.score(prompts, rejected, metadata), subsets,
                                 _token_lengths(rm.tokenizer, chosen), _token_lengths(rm.tokenizer, rejected))
    out = {"eval/rm/accuracy": report.accuracy, "eval/rm/n": report.n, "eval/rm/ece": report.ece,
           "eval/rm/log_loss": report.log_loss}
    for name, acc in report.subsets.items():
        out |= {f"eval/rm/{name}/accuracy": acc.accuracy, f"eval/rm/{name}/n": acc.n}
    for name in ("chosen_shorter", "chosen_longer", "equal_length"):
        acc = getattr(report, name)
        out |= {f"eval/rm/{name}_accuracy": acc.accuracy, f"eval/rm/{name}_n": acc.n}
    return out, report


def _token_lengths(tokenizer, texts: list[str]) -> list[int]:
    return [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan


# ---------------------------------------------------------------------------------------------
# Outputs and the gate
# ---------------------------------------------------------------------------------------------


def _write(cfg: RunConfig, answers: dict[str, Answers], comparisons: list[Comparison], metrics: dict[str, float],
           rm_report) -> list[str]:
    """eval.json, responses.jsonl, metrics.jsonl, report.html and the summary; → the gate's failures."""
    from rlhf_ray.report import write_report

    run_dir = cfg.run_dir
    (run_dir / "eval.json").write_text(json.dumps({k: _json_value(v) for k, v in metrics.items()}, indent=2) + "\n")
    with open(run_dir / "responses.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in response_rows(answers, comparisons))
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # one evaluation: one row
    logger = MetricsLogger(run_dir, cfg.logging, total_steps=1)
    logger.log(0, metrics)
    logger.close()
    bars = {f"win-rate against {cfg.eval.baseline} (raw, length-controlled)":
            {f"{c.policy} {kind}": metrics[f"eval/{c.policy}/{key}"] for c in comparisons
             for kind, key in (("raw", "win_rate"), ("LC", "lc_win_rate"))}}
    if rm_report is not None:
        bars["reward model accuracy by subset"] = {f"{name} (n={acc.n})": acc.accuracy
                                                  for name, acc in rm_report.subsets.items()}
    samples = report_samples(answers, comparisons, cfg.eval.baseline, cfg.eval.samples_in_report)
    tables = {"Policies side by side": policy_table(list(answers), metrics)}
    report = write_report(run_dir, samples=samples, bars=bars, tables=tables, title=f"rlhf_ray eval: {cfg.trainer.name}")
    failures = check_gate(metrics, cfg.eval.gate_checks)
    rows = [(k, v) for k, v in metrics.items()]
    rows += [("gate", "passed" if not failures else f"FAILED ({len(failures)} of {len(cfg.eval.gate)} checks)")
             if cfg.eval.gate else ("gate", "none"), ("report", str(report)), ("run directory", str(run_dir))]
    print(summary_table(rows, title="== Evaluation summary =="), flush=True)
    for failure in failures:
        print(f"gate: {failure}", flush=True)
    return failures


def policy_table(names: list[str], metrics: dict[str, float]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the report's table: one row per metric a policy has (eval/<policy>/<metric>), one
    column per policy ('' where a policy lacks it, e.g. the baseline's win-rate); intervals beside their value."""
    suffixes: list[str] = []
    for name in names:
        prefix = f"eval/{name}/"
        suffixes += [k[len(prefix):] for k in metrics if k.startswith(prefix) and k[len(prefix):] not in suffixes]
    shown = [s for s in suffixes if not s.endswith(("_low", "_high"))]

    def cell(name: str, suffix: str) -> Any:
        value = metrics.get(f"eval/{name}/{suffix}")
        low, high = metrics.get(f"eval/{name}/{suffix}_low"), metrics.get(f"eval/{name}/{suffix}_high")
        if value is None:
            return ""
        return f"{value:.4g} [{low:.3g}, {high:.3g}]" if low is not None and high is not None else value

    return ["metric", *names], [[suffix, *(cell(n, suffix) for n in names)] for suffix in shown]


def response_rows(answers: dict[str, Answers], comparisons: list[Comparison]) -> list[dict[str, Any]]:
    """One row per golden prompt: every policy's response and score, and each comparison's verdict."""
    first = next(iter(answers.values()))
    rows = []
    for i, prompt in enumerate(first.prompts):
        row: dict[str, Any] = {"prompt": prompt.prompt}
        for a in answers.values():
            row[a.name] = {"response": a.responses[i], "score": _json_value(a.scores[i]), "length": a.lengths[i]}
        for c in comparisons:
            row[f"{c.policy}_vs_baseline"] = {"preference": c.preferences[i], "verdict": c.verdicts[i]}
        rows.append(row)
    return rows


def report_samples(answers: dict[str, Answers], comparisons: list[Comparison], baseline: str | None,
                   count: int) -> list[dict[str, Any]]:
    """report.html's samples: per compared policy, `count` prompts with both responses, scores and the verdict;
    without a baseline, each policy's responses (the judge column names the policy)."""
    if not comparisons:
        return [{"prompt": a.prompts[i].prompt_text, "response": a.responses[i], "score": a.scores[i],
                 "judge": f"policy {a.name} (no baseline)"} for a in answers.values() for i in range(min(count, len(a.responses)))]
    base = answers[baseline]
    return [{"prompt": base.prompts[i].prompt_text, "response": answers[c.policy].responses[i],
             "score": answers[c.policy].scores[i], "baseline_response": base.responses[i],
             "baseline_score": base.scores[i], "judge": f"{c.policy} vs {baseline}: {c.verdicts[i]}"}
            for c in comparisons for i in range(min(count, len(c.preferences)))]


def _json_value(v: Any) -> Any:
    """Non-finite floats as null (strict JSON)."""
    return None if isinstance(v, float) and not math.isfinite(v) else v
