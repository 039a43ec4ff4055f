"""trainer.overoptimisation: the config rules (named fields and fixes before any actor starts), and what
`action` decides, through the driver's own `_watch` on a hand-made sequence of evaluations."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_ray.config import ConfigError, OverOptimisationConfig, load_config
from rlhf_ray.trainers.ppo import PPOTrainer

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "toy_overopt.yaml"


def test_rules_name_the_field_and_the_fix():
    assert load_config(CONFIG).trainer.overoptimisation.gold == "gold"
    with pytest.raises(ConfigError, match=r"overoptimisation.gold='truth' names no reward source \(named: \['gold', 'proxy'\]\)"):
        load_config(CONFIG, ["trainer.overoptimisation.gold=truth"])
    with pytest.raises(ConfigError, match=r"gold='gold' has weight 0.5: .*set its weight to 0"):
        load_config(CONFIG, ["reward.sources.1.weight=0.5"])
    with pytest.raises(ConfigError, match=r"overoptimisation.proxy='nope' is neither 'reward' nor"):
        load_config(CONFIG, ["trainer.overoptimisation.proxy=nope"])
    with pytest.raises(ConfigError, match=r"the watch reads evaluations: set trainer.eval_every > 0"):
        load_config(CONFIG, ["trainer.eval_every=0"])


# (step, proxy, gold) evaluations: both rise to step 8, then the gold falls while the proxy rises
EVALS = [(0, 0.1, 0.1), (4, 0.3, 0.4), (8, 0.5, 0.6), (12, 0.7, 0.5), (16, 0.9, 0.3), (20, 0.95, 0.2)]


def _driver(**watch) -> PPOTrainer:
    """The driver's watch alone: `_watch` reads only the config and the watch it builds."""
    driver = object.__new__(PPOTrainer)
    driver.cfg = load_config(CONFIG).model_copy(deep=True)
    driver.cfg.trainer.overoptimisation = OverOptimisationConfig(**watch)
    driver.watch = driver._new_watch()
    return driver


@pytest.mark.parametrize("action, stops_at", [("stop", 20), ("warn", None)])
def test_action_decides_whether_the_run_stops(action, stops_at):
    driver = _driver(gold="gold", proxy="proxy", patience=3, min_delta=0.05, action=action)
    stops = []
    for step, proxy, gold in EVALS:
        metrics = {"eval/reward_mean": 0.0, "eval/proxy_mean": proxy, "eval/gold_mean": gold}
        if driver._watch(step, metrics):
            stops.append(step)
        assert metrics["overopt/gold_best_step"] == (step if step <= 8 else 8)
    assert (stops[0] if stops else None) == stops_at
    assert driver.watch.triggered and "best 0.6 at step 8" in driver.watch.reason  # warned or stopped, it fired
    assert driver.watched == EVALS  # what a checkpoint keeps, to replay on resume
