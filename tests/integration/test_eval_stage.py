"""Stage eval on CPU with real Ray actors and the toy models (issue 20): three policies — the toy policy,
the same again (a comparison of a policy with itself) and the toy policy with seed 1 — answer the golden
prompts, are scored and compared with the baseline by the toy judge; the toy reward model is evaluated
on toy pairs in two subsets; a gate with failing checks raises after every output is written. Then
launch.py, comparing by reward scores (no judge), exits 3 on a failing gate.

One in-process run (~40 s on 2 cores) shared by the assertions, and one launch.py subprocess (~50 s).
"""

from __future__ import annotations

import html
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.eval_metrics import check_gate
from rlhf_ray.trainers.eval import GATE_EXIT_CODE, GateFailed, run_eval

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "toy_eval.yaml"
FAILING = {"eval/other/win_rate": ">= 0.99", "eval/same/lc_win_rate": "< 0.5", "eval/rm/close/accuracy": "> 1"}
PASSING = {"eval/initial/refusal_share": "<= 0.1", "eval/same/win_rate": ">= 0.5"}
COMMON = ["logging.progress_bar=false", "data.toy_eval_size=16", "trainer.eval_prompts=16"]


def _gate(checks: dict[str, str]) -> str:
    return "eval.gate={" + ", ".join(f"{k}: '{v}'" for k, v in checks.items()) + "}"


@pytest.fixture(scope="module")
def eval_run(ray_session, tmp_path_factory):
    cfg = load_config(CONFIG, [f"trainer.output_dir={tmp_path_factory.mktemp('eval')}", *COMMON,
                               "eval.policies={initial: toy, same: toy, other: 'toy:1'}", _gate(PASSING | FAILING)])
    with pytest.raises(GateFailed) as failed:
        run_eval(cfg)
    metrics = json.loads((cfg.run_dir / "eval.json").read_text())
    return cfg, metrics, failed.value


def test_every_policy_gets_its_metrics_in_range(eval_run):
    _, metrics, _ = eval_run
    for policy in ("initial", "same", "other"):
        key = f"eval/{policy}"
        assert metrics[f"{key}/n"] == 16
        assert 0 <= metrics[f"{key}/reward_mean"] <= 1 and metrics[f"{key}/vowel_mean"] == metrics[f"{key}/reward_mean"]
        assert 1 <= metrics[f"{key}/length_mean"] <= metrics[f"{key}/length_max"] <= 12  # rollout.max_new_tokens
        assert metrics[f"{key}/length_median"] <= metrics[f"{key}/length_p90"] <= metrics[f"{key}/length_max"]
        for share in ("truncated_share", "refusal_share", "rule/format_reward"):
            assert 0 <= metrics[f"{key}/{share}"] <= 1
    # greedy answers of one policy do not depend on the session: the same metrics twice
    same = {k.removeprefix("eval/same/"): v for k, v in metrics.items() if k.startswith("eval/same/")}
    initial = {k.removeprefix("eval/initial/"): v for k, v in metrics.items() if k.startswith("eval/initial/")}
    assert {k: v for k, v in same.items() if k in initial} == initial


def test_a_policy_against_itself_wins_half_and_the_baseline_is_not_compared(eval_run):
    _, metrics, _ = eval_run
    assert metrics["eval/same/win_rate"] == 0.5 and metrics["eval/same/lc_win_rate"] == 0.5
    assert metrics["eval/same/comparisons"] == metrics["eval/other/comparisons"] == 16
    assert "eval/initial/win_rate" not in metrics
    other = [metrics[f"eval/other/{k}"] for k in ("win_rate_low", "win_rate", "win_rate_high")]
    assert 0 <= other[0] <= other[1] <= other[2] <= 1
    assert 0 <= metrics["eval/other/lc_win_rate_low"] <= metrics["eval/other/lc_win_rate_high"] <= 1


def test_the_judge_saw_both_orders_of_every_differing_pair(eval_run):
    cfg, _, _ = eval_run
    rows = [json.loads(line) for line in (cfg.run_dir / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 16
    for row in rows:
        assert row["same"]["response"] == row["initial"]["response"]
        assert row["same_vs_baseline"] == {"preference": 0.5, "verdict": "identical responses: tie"}
        if row["other"]["response"] != row["initial"]["response"]:
            assert "result A/B, B/A:" in row["other_vs_baseline"]["verdict"]


def test_the_reward_model_is_evaluated_per_subset_with_counts(eval_run):
    _, metrics, _ = eval_run
    assert metrics["eval/rm/n"] == metrics["eval/rm/clear/n"] + metrics["eval/rm/close/n"] == 16
    assert min(metrics["eval/rm/clear/n"], metrics["eval/rm/close/n"]) > 0
    pooled = (metrics["eval/rm/clear/accuracy"] * metrics["eval/rm/clear/n"] +
              metrics["eval/rm/close/accuracy"] * metrics["eval/rm/close/n"]) / 16
    assert metrics["eval/rm/accuracy"] == pytest.approx(pooled)
    assert 0 <= metrics["eval/rm/ece"] <= 1 and metrics["eval/rm/log_loss"] > 0
    assert sum(metrics[f"eval/rm/{k}_n"] for k in ("chosen_shorter", "chosen_longer", "equal_length")) == 16


def test_metrics_row_and_report_with_samples_and_bars(eval_run):
    cfg, metrics, _ = eval_run
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] == 0 and rows[0]["eval/other/win_rate"] == metrics["eval/other/win_rate"]
    page = (cfg.run_dir / "report.html").read_text()
    responses = [json.loads(line) for line in (cfg.run_dir / "responses.jsonl").read_text().splitlines()]
    for row in responses[: cfg.eval.samples_in_report]:
        assert html.escape(row["other"]["response"]) in page
        assert html.escape(row["other_vs_baseline"]["verdict"]) in page
    assert "baseline response" in page and "reward model accuracy by subset" in page and 'data-chart="win-rate' in page


def test_a_failing_gate_names_every_failed_check_and_only_those(eval_run):
    _, metrics, failed = eval_run
    assert [f.split(":")[0] for f in failed.failures] == list(FAILING)
    assert failed.failures[2] == "eval/rm/close/accuracy: " + f"{metrics['eval/rm/close/accuracy']:g} fails > 1"
    # the toy config's own gate passes on these metrics (its policy 'other' is the same toy:1 policy)
    assert check_gate(metrics, load_config(CONFIG).eval.gate_checks) == []


def test_launch_exits_3_on_a_failing_gate(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    gate = {"eval/other/win_rate": ">= 0.99", "eval/initial/refusal_share": "<= 0.1", "eval/rm/accuracy": "> 1"}
    result = subprocess.run([sys.executable, "launch.py", "--config", str(CONFIG), f"trainer.output_dir={tmp_path}",
                             *COMMON, "eval.judge=null", _gate(gate)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == GATE_EXIT_CODE == 3, result.stderr[-3000:]
    gate_lines = [line for line in result.stdout.splitlines() if line.startswith("gate: ")]
    assert [line.split(":")[1].strip() for line in gate_lines] == ["eval/other/win_rate", "eval/rm/accuracy"]
    metrics = json.loads((tmp_path / "toy_eval" / "eval.json").read_text())
    # compared by the summed reward: the share of prompts where 'other' scores higher, ties ½
    responses = [json.loads(line) for line in (tmp_path / "toy_eval" / "responses.jsonl").read_text().splitlines()]
    expected = [0.5 if a["score"] == b["score"] else float(a["score"] > b["score"])
                for a, b in ((r["other"], r["initial"]) for r in responses)]
    assert metrics["eval/other/win_rate"] == pytest.approx(sum(expected) / len(expected))
    assert not math.isnan(metrics["eval/other/lc_win_rate"])
