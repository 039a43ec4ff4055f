"""The whole RLHF pipeline on one Ray session: SFT → reward model → PPO (ALGORITHMS.md §6, §8, §9), or
SFT → RL on the config's own rewards (`pipeline.stages: [sft, ppo]`: verifiers, environments), either
optionally followed by eval (the SFT and PPO exports judged on the golden prompts, PPO against SFT, the
RM export on eval.preference_data; a failed eval.gate fails the pipeline after its summary: exit code 3).

Each stage runs the same code as when it runs alone (`stage: sft | rm | ppo`), with the config
that `config.pipeline_stage_configs` builds, and checks together with the others before anything
starts: this config's sections, then the stage's `pipeline.<stage>` overrides, then the wiring —
the stage runs in <run_dir>/<stage>; the reward model starts from the SFT export; PPO's policy
and reference are the SFT export, its critic and its first reward source (kind: model) the RM
export (without an RM stage, PPO keeps the config's critic and reward sources). It ends with one
table of every stage's key figures and where the models are.
"""

from __future__ import annotations

import time
from typing import Any

from rlhf_ray.config import RunConfig, pipeline_exports, pipeline_stage_configs
from rlhf_ray.eval_metrics import check_gate
from rlhf_ray.metrics import summary_table
from rlhf_ray.trainers.eval import GateFailed, run_eval
from rlhf_ray.trainers.ppo import run_ppo
from rlhf_ray.trainers.rm import run_rm
from rlhf_ray.trainers.sft import run_sft

STAGES = {"sft": run_sft, "rm": run_rm, "ppo": run_ppo, "eval": run_eval}


def run_pipeline(cfg: RunConfig) -> dict[str, Any]:
    """Run the stages (pipeline.stages) in order, each on the previous stages' exports; print the summary."""
    configs = pipeline_stage_configs(cfg)
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    gate: GateFailed | None = None
    for name in cfg.pipeline.stages:
        print(f"== pipeline: {name} ({configs[name].run_dir}) ==", flush=True)
        start = time.perf_counter()
        try:
            results[name] = STAGES[name](configs[name])
        except GateFailed as failed:  # the last stage; its outputs are written: summarise, then fail
            results[name], gate = failed.metrics, failed
        seconds[name] = time.perf_counter() - start
    rows = summary_rows(results, seconds, pipeline_exports(cfg), configs)
    title = " → ".join(name.upper() if name != "sft" else "SFT" for name in cfg.pipeline.stages)
    print(summary_table(rows, title=f"== Pipeline summary: {title} =="), flush=True)
    if gate is not None:
        raise gate
    return results | {"seconds": seconds}


def summary_rows(results: dict[str, Any], seconds: dict[str, float], exports: dict[str, str],
                 configs: dict[str, RunConfig] | None = None) -> list[tuple[str, Any]]:
    """Key figures per stage: SFT eval NLL, RM held-out accuracy, PPO eval reward and KL, the eval stage's
    win-rates and gate, and the exports."""
    sft, rm, ppo = results["sft"], results.get("rm"), results["ppo"]
    first, final = ppo.get("eval_first", {}), ppo.get("eval_final", {})
    rows = [("SFT  eval NLL per token, before → after", _change(sft["eval_before"], sft["eval_after"], "eval/nll"))]
    if rm is not None:
        rows += [("RM   held-out pairwise accuracy, before → after", _change(rm["eval_before"], rm["eval_after"], "eval/accuracy")),
                 ("RM   held-out mean margin, after", rm["eval_after"].get("eval/margin"))]
    rows += [(f"PPO  eval reward ({'RM' if rm is not None else 'reward sources'}): SFT policy → after PPO",
              _change(first, final, "eval/reward_mean"))]
    rows += [(f"PPO  eval {key[5:-5]} (weight-0 monitor): SFT → after PPO", _change(first, final, key))
             for key in sorted(final) if key.endswith("_mean") and key.startswith("eval/") and
             key not in ("eval/reward_mean", "eval/length_mean", "eval/rm_mean")]
    rows += [("PPO  eval KL to the SFT policy, after", final.get("eval/kl_ref")),
             ("PPO  eval response length, after", final.get("eval/length_mean"))]
    if "eval" in results and configs is not None:
        rows += eval_rows(results["eval"], configs["eval"])
    rows += [(f"exported {'SFT policy' if stage == 'sft' else 'reward model' if stage == 'rm' else 'PPO policy'}", path)
             for stage, path in exports.items()]
    rows += [(f"seconds per stage ({' / '.join(seconds)})", " / ".join(f"{s:.0f}" for s in seconds.values()))]
    return [(k, v) for k, v in rows if v is not None]


def eval_rows(metrics: dict[str, float], cfg: RunConfig) -> list[tuple[str, Any]]:
    """The eval stage: PPO's raw and length-controlled win-rate against SFT with their intervals, the RM
    export's accuracy on eval.preference_data, and the gate (failed checks named)."""
    def interval(key: str) -> str | None:
        if key not in metrics:
            return None
        return f"{metrics[key]:.3f} [{metrics[key + '_low']:.3f}, {metrics[key + '_high']:.3f}]"

    failed = [failure.split(":")[0] for failure in check_gate(metrics, cfg.eval.gate_checks)]
    gate = "none" if not cfg.eval.gate else "passed" if not failed else f"FAILED: {', '.join(failed)}"
    rows = [("EVAL PPO win-rate against SFT [95% interval]", interval("eval/ppo/win_rate")),
            ("EVAL PPO length-controlled win-rate against SFT", interval("eval/ppo/lc_win_rate")),
            ("EVAL response length, SFT / PPO", _pair(metrics, "eval/sft/length_mean", "eval/ppo/length_mean")),
            ("EVAL refusal share, SFT / PPO", _pair(metrics, "eval/sft/refusal_share", "eval/ppo/refusal_share")),
            ("EVAL RM export accuracy on eval.preference_data", metrics.get("eval/rm/accuracy")),
            ("EVAL gate", gate), ("EVAL outputs", str(cfg.run_dir))]
    return rows


def _pair(metrics: dict[str, float], a: str, b: str) -> str | None:
    return f"{metrics[a]:.4g} / {metrics[b]:.4g}" if a in metrics and b in metrics else None


def _change(before: dict, after: dict, key: str) -> str | None:
    if key not in before or key not in after:
        return None
    return f"{before[key]:.4g} → {after[key]:.4g}"
