"""Metric names and their meanings (the one table), and the sinks: JSONL, TensorBoard, W&B, console.

Every step writes one JSON line to `<run_dir>/metrics.jsonl`. TensorBoard and W&B are used when
enabled (W&B only when installed; it is never required). Names are `area/name`.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from rlhf_ray.config import LoggingConfig

METRICS: dict[str, str] = {
    "step": "RL step (rollout batch) or optimizer step of offline stages",
    "reward/score_mean": "mean summed reward score of the step's samples (before KL shaping)",
    "reward/score_std": "std of the summed reward score",
    "reward/<source>_mean": "mean score of one reward source",
    "reward/group_std_mean": "mean within-group std of scores (group estimators)",
    "reward/zero_adv_group_frac": "share of prompt groups whose scores are all equal (zero advantage)",
    "kl/ref": "mean per-sequence KL(π_θ‖π_ref), k1 estimate summed over response tokens (absent at algo.kl.coef=0: no reference)",
    "kl/coef": "KL coefficient β in force this step",
    "response/length_mean": "mean response length in tokens",
    "response/truncated_frac": "share of responses that hit max_new_tokens without EOS",
    "adv/mean": "mean advantage over response tokens (after whitening)",
    "adv/std": "std of advantages over response tokens",
    "policy/loss": "PPO clipped policy loss (mini-batch mean)",
    "policy/clip_frac": "share of response tokens where the ratio clip was active",
    "policy/approx_kl": "k3 estimate of KL(π_old‖π_θ) during the update",
    "policy/ratio_mean": "mean importance ratio π_θ/π_old",
    "policy/ratio_max": "max importance ratio",
    "policy/entropy": "mean token entropy of π_θ on the batch",
    "policy/kl_loss": "KL term of the loss (algo.kl.placement=loss)",
    "policy/grad_norm": "policy gradient norm before clipping",
    "policy/lr": "policy learning rate",
    "critic/loss": "clipped value loss",
    "critic/clip_frac": "share of tokens where the value clip was active",
    "critic/values_mean": "mean predicted value",
    "critic/explained_var": "1 - Var(returns - values) / Var(returns) at generation time",
    "critic/grad_norm": "critic gradient norm before clipping",
    "critic/lr": "critic learning rate",
    "eval/reward_mean": "mean reward on held-out prompts",
    "eval/kl_ref": "per-sequence KL to the reference on held-out prompts",
    "eval/length_mean": "mean response length on held-out prompts",
    "eval/<source>_mean": "mean score of one reward source on held-out prompts",
    "eval/pass@<k>": "unbiased pass@k over held-out prompts (trainer.eval_samples per prompt, trainer.eval_pass_threshold)",
    "eval/win_rate": "share of held-out prompts where the policy's response outscores the reference policy's (ties ½)",
    "overopt/gold_best": "best held-out gold reward so far (trainer.overoptimisation.gold), at evaluations",
    "overopt/gold_best_step": "the step of that best gold reward",
    "overopt/triggered": "1 once the gold reward fell for `patience` evaluations while the proxy rose (the watch fired)",
    "reward/<source>/<counter>": "cumulative counters of a reward source (judge: verdicts, unparseable, no_verdict; judge.endpoint: requests, retries, failures by kind, prompt_tokens, completion_tokens, estimated_cost; http: failures by kind; serve: requests, retries, replica_died, timeout, source_error)",
    "reward/shaped_mean": "mean score after penalties, normalisation and clipping (what advantages see)",
    "dynamic/rounds": "generation rounds this step (dynamic sampling)",
    "dynamic/kept_groups": "prompt groups with differing scores found this step (dynamic sampling)",
    "time/<phase>": "seconds spent in a phase of the step (prompts, rollout, score, advantages, update, sync, eval)",
    "time/step": "seconds for the whole step",
    "perf/tokens_per_s": "(prompt + response) tokens processed per second of step time",
    "perf/response_tokens_per_s": "response tokens generated per second of rollout time",
    "numerics/skipped_step": "1 when this step's update was skipped: non-finite values before it, or a non-finite gradient norm in it",
    "numerics/nonfinite_<name>": "count of non-finite values found in <name> (scores, old_logprobs, ref_logprobs, values, advantages, returns)",
    "policy/skipped": "share of this step's optimizer steps the engine skipped for a non-finite gradient norm (critic/skipped likewise)",
    "reward/masked_frac": "share of samples masked out of the loss by the reward contract (reward.on_error=mask)",
    "reward/violations/<kind>": "cumulative reward-contract violations by kind: exception, timeout, wrong_count, wrong_type, non_finite",
    "sync/version": "policy weight version held by every rollout engine after the sync",
    "policy/kl_ref": "the update's own k1 KL(π_θ‖π_ref) per sequence before its step (kl/ref when π_old comes from the update)",
    "rollout/version_lag": "staleness: policy versions between the oldest weights that generated a sample of the batch and the ones updated (≤ algo.max_staleness)",
    "rollout/turns_mean": "multi-turn (rollout.env): policy turns per episode",
    "rollout/env_token_share": "multi-turn: share of the tokens after the prompt that the environment wrote (attended, not trained)",
    "rollout/tool_calls_mean": "tool-using environments: tool calls per episode (malformed ones included)",
    "rollout/tool_use_share": "share of episodes with at least one successful tool call",
    "rollout/tool_failure_share": "share of this batch's tool calls that failed (any kind)",
    "rollout/tool_failures/<kind>": "this batch's failed tool calls by kind: timeout, crash, exception, bad_json, unknown_tool, output_too_large",
    "rollout/version_lag_mean": "staleness averaged over the batch's samples",
    "rollout/stale_dropped": "cumulative samples left out because a policy older than algo.max_staleness produced them (0 by construction; a guard)",
    "rollout/in_flight": "rollout batches submitted to the engines after this one was taken (≤ algo.max_staleness)",
    "perf/rollout_ready": "of those, batches already generated (the trainer is the bottleneck when this stays high)",
    "perf/engine_idle_share": "share of engine time since the first rollout not spent generating (cumulative, all engines)",
    "perf/trainer_idle_share": "share of the step the driver waited for the rollout batch (time/rollout ÷ time/step)",
    "rollout/logprob_diff_mean": "mean |behaviour log-prob (engine) − π_old recomputed by the trainer| over response tokens, same weights",
    "rollout/logprob_diff_max": "max of that difference",
    # offline stages (sft, rm, dpo): <stage>/<name> per optimizer step (mini-batch means), eval/<name> on
    # the whole held-out set (trainer.eval_every and the last step); time/batch, time/update, time/eval
    "sft/loss": "SFT loss: response-token NLL aggregated as algo.loss_agg (ALGORITHMS.md §8)",
    "sft/nll": "token-mean NLL of the response tokens",
    "rm/loss": "reward-model loss: Bradley–Terry (pairwise, ranked_pairs) or listwise InfoNCE (§6)",
    "rm/accuracy": "share of pairs with r_chosen > r_rejected (listwise: the best beats every other)",
    "rm/pair_accuracy": "listwise: share of a list's ordered pairs scored in order",
    "rm/margin": "mean r_chosen − r_rejected (listwise: best − best other)",
    "rm/score_mean": "mean reward-model score over all candidates",
    "rm/score_std": "std of the reward-model scores",
    "dpo/loss": "DPO-family loss of dpo.loss (§7)",
    "dpo/rewards/chosen": "mean implicit reward of chosen (KTO: desirable) responses, β(ℓ_θ − ℓ_ref); SimPO β·ℓ/|y|",
    "dpo/rewards/rejected": "mean implicit reward of rejected (KTO: undesirable) responses",
    "dpo/rewards/accuracy": "share of pairs whose chosen implicit reward exceeds the rejected one (ORPO: log-odds)",
    "dpo/rewards/margin": "mean implicit reward of chosen minus rejected",
    "dpo/<term>": "a variant's own terms: orpo nll, odds_ratio_loss, log_odds_ratio; kto kl (z_0); rrhf rank_loss, nll",
    "<stage>/grad_norm": "gradient norm before clipping (offline stages)",
    "<stage>/lr": "learning rate (offline stages)",
    "eval/loss": "offline stages: the stage's loss on the held-out set (eval/<name> likewise for every metric above)",
    # stage eval (one row, step 0; eval.json): eval/<policy>/… per policy of eval.policies, eval/rm/… for eval.reward_model
    "eval/<policy>/n": "golden prompts the policy answered",
    "eval/<policy>/reward_mean": "mean summed score of reward.sources (weight-0 sources excluded) over its answers",
    "eval/<policy>/<source>_mean": "mean score of one reward source over its answers",
    "eval/<policy>/length_mean": "mean response length in tokens (EOS included); _median, _p90, _max likewise",
    "eval/<policy>/length_median": "median response length in tokens",
    "eval/<policy>/length_p90": "90th percentile of the response lengths",
    "eval/<policy>/length_max": "longest response in tokens",
    "eval/<policy>/truncated_share": "share of answers cut at rollout.max_new_tokens without EOS",
    "eval/<policy>/refusal_share": "share of answers matching an eval.refusal_patterns regex",
    "eval/<policy>/refusal_share_judge": "share of answers eval.refusal_judge graded as refusals (above the middle of its range)",
    "eval/<policy>/rule/<function>": "pass share of one eval.rules function (mean of its per-answer values)",
    "eval/<policy>/win_rate": "share of prompts where the policy's answer beats the baseline's (judge both orders, or scores; ties ½); _low/_high: 95% bootstrap interval",
    "eval/<policy>/win_rate_low": "lower end of the win-rate's 95% bootstrap interval",
    "eval/<policy>/win_rate_high": "upper end of the win-rate's 95% bootstrap interval",
    "eval/<policy>/lc_win_rate": "length-controlled win-rate: the logistic fit's prediction at equal lengths (ALGORITHMS.md §11)",
    "eval/<policy>/lc_win_rate_low": "lower end of the length-controlled win-rate's 95% bootstrap interval",
    "eval/<policy>/lc_win_rate_high": "upper end of the length-controlled win-rate's 95% bootstrap interval",
    "eval/<policy>/length_coef": "the fit's coefficient on the length difference (> 0: longer answers win)",
    "eval/<policy>/comparisons": "prompts compared with the baseline",
    "eval/rm/accuracy": "reward model: share of pairs with score(chosen) > score(rejected); eval/rm/<subset>/accuracy per subset",
    "eval/rm/n": "pairs the reward model was evaluated on",
    "eval/rm/ece": "expected calibration error of σ(score difference) as P(chosen ≻ rejected), 10 bins",
    "eval/rm/log_loss": "Bradley–Terry log-loss −log σ(r_chosen − r_rejected)",
    "eval/rm/<subset>/accuracy": "accuracy on one subset of eval.preference_data",
    "eval/rm/<subset>/n": "pairs in that subset",
    "eval/rm/chosen_shorter_accuracy": "accuracy on pairs whose chosen response is shorter (length bias: compare with _longer)",
    "eval/rm/chosen_longer_accuracy": "accuracy on pairs whose chosen response is longer",
    "eval/rm/equal_length_accuracy": "accuracy on pairs of equal length",
    "eval/rm/<split>_n": "pairs in that length split",
    "eval/seconds": "wall time of the evaluation",
}


class Timer:
    """Collects `time/<phase>` seconds for one step."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[f"time/{name}"] = self.times.get(f"time/{name}", 0.0) + time.perf_counter() - start


class MetricsLogger:
    """Writes each step's metrics to the enabled sinks and keeps them for the final summary."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, total_steps: int, config_dump: dict | None = None,
                 resume_step: int = 0):
        """`resume_step` > 0: a resumed run keeps the rows up to that step (dropping any logged after
        the checkpoint it resumes from) and appends."""
        self.cfg = cfg
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        self.history: list[dict[str, Any]] = _rows_up_to(path, resume_step) if resume_step else []
        if cfg.jsonl:
            path.write_text("".join(json.dumps(row) + "\n" for row in self.history))
        self.jsonl = path.open("a") if cfg.jsonl else None
        self.tb = _tensorboard(run_dir / "tb") if cfg.tensorboard else None
        self.wandb = _wandb(cfg, run_dir, config_dump) if cfg.wandb else None
        self.bar = _progress_bar(total_steps, initial=resume_step) if cfg.progress_bar else None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.history.append(row)
        if self.jsonl:
            self.jsonl.write(json.dumps(row) + "\n")
            self.jsonl.flush()
        if self.tb:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(row, step=step)
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix_str(_short(row))
        elif step % self.cfg.log_every == 0:
            print(f"step {step}: {_short(row)}", flush=True)

    def close(self) -> None:
        for sink in (self.jsonl, self.tb, self.bar):
            if sink:
                sink.close()
        if self.wandb:
            self.wandb.finish()


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _short(row: dict[str, Any]) -> str:
    keys = ("reward/score_mean", "kl/ref", "policy/loss", "sft/loss", "rm/loss", "rm/accuracy", "dpo/loss",
            "dpo/rewards/margin", "time/step")
    return " ".join(f"{k.split('/')[-1]}={row[k]:.4g}" for k in keys if isinstance(row.get(k), (int, float)))


def _tensorboard(path: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(path))


def _wandb(cfg: LoggingConfig, run_dir: Path, config_dump: dict | None):
    try:
        import wandb
    except ImportError:
        print("logging.wandb=true but wandb is not installed; skipping W&B (pip install wandb).", flush=True)
        return None
    return wandb.init(project=cfg.wandb_project, name=run_dir.name, dir=str(run_dir), config=config_dump)


def _progress_bar(total: int, initial: int = 0):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="steps", dynamic_ncols=True)


def _rows_up_to(path: Path, step: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if row.get("step", 0) <= step]


def mean_over_ranks(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per key, the mean over the ranks that reported it (ranks' metrics → one row)."""
    keys = set().union(*rows)
    return {k: sum(r[k] for r in rows if k in r) / sum(k in r for r in rows) for k in keys}


def summary_table(rows: list[tuple[str, Any]], title: str = "") -> str:
    """A plain two-column table for the end of a run."""
    width = max((len(k) for k, _ in rows), default=0)
    lines = [title] if title else []
    lines += [f"  {k.ljust(width)}  {_fmt(v)}" for k, v in rows]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
