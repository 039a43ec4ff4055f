"""The toy pipeline end to end on CPU: SFT → reward model → PPO → eval on one Ray session, each stage on
the previous stages' exports, with fewer steps than the demo (configs/toy_pipeline.yaml); then
`launch.py --config configs/toy_eval.yaml` on those exports, as a user runs it after the pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf_ray.config import build_config, load_config, pipeline_exports, pipeline_stage_configs
from rlhf_ray.eval_metrics import check_gate
from rlhf_ray.metrics import summary_table
from rlhf_ray.trainers.eval import GATE_EXIT_CODE
from rlhf_ray.trainers.pipeline import eval_rows, run_pipeline, summary_rows

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TOY_PIPELINE = ROOT / "configs" / "toy_pipeline.yaml"
# the eval stage answers as PPO's own evaluation does (same prompts, seed, temperature, length)
EVAL = ["eval.temperature=1.0", "rollout.max_new_tokens=16", "trainer.eval_prompts=32"]


@pytest.fixture(scope="module")
def pipeline(ray_session, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("pipeline")
    raw = yaml.safe_load(TOY_PIPELINE.read_text())
    raw["trainer"] |= {"output_dir": str(tmp_path)}
    raw["logging"] = {"progress_bar": False}
    raw["pipeline"]["stages"] = ["sft", "rm", "ppo", "eval"]
    raw["pipeline"]["sft"] += ["trainer.total_steps=40"]  # later overrides win
    raw["pipeline"]["rm"] += ["trainer.total_steps=40"]
    raw["pipeline"]["ppo"] += ["trainer.total_steps=6", "trainer.eval_prompts=32"]
    raw["pipeline"]["eval"] = EVAL
    raw["eval"] = {"preference_data": "toy", "rules": ["rlhf_ray.toy.task:format_reward"],
                   "gate": {"eval/rm/accuracy": ">= 0.7", "eval/ppo/refusal_share": "<= 0.05"}}
    cfg = build_config(raw)
    return cfg, run_pipeline(cfg)


def test_toy_pipeline_runs_end_to_end(pipeline):
    cfg, results = pipeline
    exports = pipeline_exports(cfg)

    sft, rm, ppo = results["sft"], results["rm"], results["ppo"]
    assert sft["eval_after"]["eval/nll"] < sft["eval_before"]["eval/nll"] - 1.0
    assert rm["eval_after"]["eval/accuracy"] > 0.7  # the RM starts from the SFT export
    first, final = ppo["eval_first"], ppo["eval_final"]
    # PPO starts from the SFT export (a random policy never writes lowercase letters then EOS)...
    assert first["eval/format_mean"] >= 0.7
    # ...and is scored by the RM export (source 'rm', weight 1) plus the two weight-0 monitors
    assert first["eval/reward_mean"] == pytest.approx(first["eval/rm_mean"], abs=1e-5)
    assert {"eval/vowel_mean", "eval/kl_ref"} <= set(final)
    assert first["eval/kl_ref"] == pytest.approx(0.0, abs=1e-4)  # reference = the SFT export = the start
    # ...and PPO raised the RM's score of its eval responses, with the KL to the SFT policy now above zero
    assert final["eval/rm_mean"] > first["eval/rm_mean"] + 0.2, (first, final)
    assert final["eval/kl_ref"] > 0.0

    assert exports["sft"] == sft["export"] and exports["rm"] == rm["export"] and exports["ppo"] == ppo["export_policy"]
    for path in (exports["sft"], exports["ppo"]):
        assert AutoModelForCausalLM.from_pretrained(path).config.vocab_size == 103
    assert AutoModelForSequenceClassification.from_pretrained(exports["rm"]).config.num_labels == 1
    assert set(results["seconds"]) == {"sft", "rm", "ppo", "eval"}


def test_the_eval_stage_judges_the_exports_as_ppo_evaluated_them(pipeline):
    cfg, results = pipeline
    ppo, metrics = results["ppo"], results["eval"]
    # the exported SFT and PPO policies answer exactly as PPO's first and last evaluations sampled them
    for policy, evaluation in (("sft", ppo["eval_first"]), ("ppo", ppo["eval_final"])):
        for source in ("rm", "vowel", "format"):
            assert metrics[f"eval/{policy}/{source}_mean"] == pytest.approx(evaluation[f"eval/{source}_mean"], abs=1e-4)
    assert metrics["eval/ppo/rm_mean"] > metrics["eval/sft/rm_mean"] + 0.2  # PPO raised the RM's score...
    assert metrics["eval/ppo/win_rate"] > 0.5  # ...so it beats SFT by that score prompt by prompt
    assert metrics["eval/ppo/comparisons"] == metrics["eval/sft/n"] == 32
    assert metrics["eval/rm/accuracy"] >= 0.7 and metrics["eval/rm/clear/n"] > 0  # the RM export on toy pairs
    assert json.loads((cfg.run_dir / "eval" / "eval.json").read_text())["eval/ppo/win_rate"] == metrics["eval/ppo/win_rate"]


def test_the_summary_names_every_stage_and_the_gate(pipeline):
    cfg, results = pipeline
    exports = pipeline_exports(cfg)
    rows = summary_rows(results, results["seconds"], exports, pipeline_stage_configs(cfg))
    summary = summary_table(rows, title="summary")
    for row in ("SFT  eval NLL per token, before → after", "RM   held-out pairwise accuracy, before → after",
                "PPO  eval reward (RM): SFT policy → after PPO", "PPO  eval KL to the SFT policy, after",
                "PPO  eval vowel (weight-0 monitor)", "EVAL PPO win-rate against SFT [95% interval]",
                "EVAL PPO length-controlled win-rate against SFT", "EVAL gate", exports["sft"], exports["rm"], exports["ppo"]):
        assert row in summary, row
    assert dict(rows)["EVAL gate"] == "passed"
    failing = {"eval/ppo/win_rate": "> 1.5", "eval/rm/accuracy": ">= 0.7"}
    gated = pipeline_stage_configs(cfg)["eval"].model_copy(deep=True)
    gated.eval.gate = failing
    assert dict(eval_rows(results["eval"], gated))["EVAL gate"] == "FAILED: eval/ppo/win_rate"


def test_toy_eval_config_evaluates_the_pipelines_exports(pipeline, tmp_path):
    """configs/toy_eval.yaml as shipped, only its paths pointed at this pipeline's exports: the same answers
    as the pipeline's eval stage (same prompts, seed, temperature), and the exit code its gate implies."""
    cfg, results = pipeline
    exports = pipeline_exports(cfg)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    paths = [f"eval.policies={{sft: {exports['sft']}, ppo: {exports['ppo']}}}", f"eval.reward_model={exports['rm']}",
             f"reward.sources.1.path={exports['rm']}"]
    failing = "eval.gate.eval/rm/close/accuracy='> 1'"  # one check added that cannot pass: exit code 3
    result = subprocess.run([sys.executable, "launch.py", "--config", "configs/toy_eval.yaml", f"trainer.output_dir={tmp_path}",
                             "logging.progress_bar=false", "trainer.eval_prompts=32", *paths, failing],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    metrics = json.loads((tmp_path / "toy_eval" / "eval.json").read_text())
    failures = check_gate(metrics, load_config(ROOT / "configs" / "toy_eval.yaml", [failing]).eval.gate_checks)
    assert result.returncode == GATE_EXIT_CODE == 3, result.stderr[-3000:]
    assert failures[-1].startswith("eval/rm/close/accuracy: ")  # the toy gate's own checks may pass or fail...
    assert [line[6:] for line in result.stdout.splitlines() if line.startswith("gate: ")] == failures  # ...each named
    # compared by the summed score (the vowel rule): the share of prompts where PPO scores higher, ties ½
    rows = [json.loads(line) for line in (tmp_path / "toy_eval" / "responses.jsonl").read_text().splitlines()]
    wins = [0.5 if r["ppo"]["score"] == r["sft"]["score"] else float(r["ppo"]["score"] > r["sft"]["score"]) for r in rows]
    assert metrics["eval/ppo/win_rate"] == pytest.approx(sum(wins) / len(wins))
    for policy in ("sft", "ppo"):
        for source in ("rm", "vowel"):
            assert metrics[f"eval/{policy}/{source}_mean"] == pytest.approx(
                results["eval"][f"eval/{policy}/{source}_mean"], abs=1e-4)
    assert metrics["eval/ppo/vowel_mean"] > metrics["eval/sft/vowel_mean"]  # judged by the true rule here
    assert 0 <= metrics["eval/ppo/refusal_share_judge"] <= 1 and metrics["eval/rm/n"] == 64  # data.toy_eval_size toy pairs
    assert (tmp_path / "toy_eval" / "report.html").stat().st_size > 10_000
