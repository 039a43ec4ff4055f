"""The over-optimisation watch in a real GRPO run (configs/toy_overopt.yaml): the policy trains on a hackable
proxy (pays 'a' more than other vowels) beside a held-out gold reward (vowels of every kind, weight 0).
Both rise while consonants turn into vowels; then the policy collapses into 'a' and the gold falls while
the proxy still rises. The run stops at the evaluation where the watch fires, with a checkpoint there,
and its summary names the best gold step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.trainers.common import prepare_run
from rlhf_ray.trainers.ppo import PPOTrainer

pytestmark = pytest.mark.integration
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_the_run_stops_when_the_gold_reward_falls_while_the_proxy_rises(ray_session, tmp_path):
    cfg = load_config(CONFIGS / "toy_overopt.yaml", [f"trainer.output_dir={tmp_path}", "logging.progress_bar=false",
                                                     "checkpoint.export_hf=false"])
    trainer = PPOTrainer(cfg, prepare_run(cfg))
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if "eval/gold_mean" in r}
    stop, best = rows[-1]["step"], result["gold_best_step"]
    assert stop < cfg.trainer.total_steps and rows[-1]["overopt/triggered"] == 1.0  # stopped early, by the watch
    assert all(r["overopt/triggered"] == 0.0 for step, r in evals.items() if step < stop)
    w = cfg.trainer.overoptimisation
    last = sorted(evals)[-w.patience:]
    assert last[-1] == stop and last[0] > best
    for step in last:  # the gold stayed below its best for `patience` evaluations ...
        assert evals[step]["eval/gold_mean"] < evals[best]["eval/gold_mean"] - w.min_delta
    assert evals[stop]["eval/reward_mean"] > evals[best]["eval/reward_mean"]  # ... while the proxy rose
    assert evals[best]["eval/gold_mean"] > evals[min(evals)]["eval/gold_mean"] + 0.2  # the gold did rise first
    assert f"below its best {evals[best]['eval/gold_mean']:.4g} at step {best}" in result["overoptimisation"]
    assert (cfg.run_dir / "checkpoints" / f"step_{stop:08d}").is_dir()  # a checkpoint where it stopped
