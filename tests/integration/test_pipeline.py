"""The toy pipeline end to end on CPU: SFT → reward model → PPO on one Ray session, each stage on the
previous stages' exports, with fewer steps than the demo (configs/toy_pipeline.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf_ray.config import build_config, pipeline_exports
from rlhf_ray.trainers.pipeline import run_pipeline

pytestmark = pytest.mark.integration
TOY_PIPELINE = Path(__file__).resolve().parents[2] / "configs" / "toy_pipeline.yaml"


def test_toy_pipeline_runs_end_to_end(ray_session, tmp_path, capsys):
    raw = yaml.safe_load(TOY_PIPELINE.read_text())
    raw["trainer"] |= {"output_dir": str(tmp_path)}
    raw["logging"] = {"progress_bar": False}
    raw["pipeline"]["sft"] += ["trainer.total_steps=40"]  # later overrides win
    raw["pipeline"]["rm"] += ["trainer.total_steps=40"]
    raw["pipeline"]["ppo"] += ["trainer.total_steps=6", "trainer.eval_prompts=32"]
    cfg = build_config(raw)
    results = run_pipeline(cfg)
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
    assert set(results["seconds"]) == {"sft", "rm", "ppo"}

    out = capsys.readouterr().out
    summary = out[out.index("== Pipeline summary"):]
    for row in ("SFT  eval NLL per token, before → after", "RM   held-out pairwise accuracy, before → after",
                "PPO  eval reward (RM): SFT policy → after PPO", "PPO  eval KL to the SFT policy, after",
                "PPO  eval vowel (weight-0 monitor)", exports["sft"], exports["rm"], exports["ppo"]):
        assert row in summary, row
