"""Stage eval on CPU with real Ray actors and the toy models (issue 20): three policies — the toy policy,
the same again (a comparison of a policy with itself) and the toy policy with seed 1 — answer the golden
prompts, are scored and compared with the baseline by the toy judge, and graded for refusals by a judge
endpoint (a rule-following fake OpenAI server on 127.0.0.1); the toy reward model is evaluated
on toy pairs in two subsets; a gate with failing checks raises after every output is written. launch.py on
configs/toy_eval.yaml, comparing by scores, is tested on the toy pipeline's exports in test_pipeline.py.

One in-process run (~40 s on 2 cores) shared by the assertions.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rlhf_ray.config import load_config, parse_gate_check
from rlhf_ray.eval_metrics import check_gate
from rlhf_ray.trainers.eval import GateFailed, run_eval
from tests.local_http import send_json, serving

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CONFIG = [  # toy policies, the toy judge in both orders, the format rule, the toy RM on toy pairs
    "stage=eval", "trainer.name=toy_eval", "eval.baseline=initial", "rollout.max_new_tokens=12",
    "eval.judge={kind: judge, path: toy, name: judge, judge: {mode: compare, on_unparseable: drop-order, max_new_tokens: 4}}",
    "eval.rules=[rlhf_ray.toy.task:format_reward]", "eval.reward_model=toy", "eval.preference_data=toy",
    "eval.samples_in_report=6"]
FAILING = {"eval/other/win_rate": ">= 0.99", "eval/same/lc_win_rate": "< 0.5", "eval/rm/close/accuracy": "> 1"}
PASSING = {"eval/initial/refusal_share": "<= 0.1", "eval/same/win_rate": ">= 0.5"}
COMMON = ["logging.progress_bar=false", "data.toy_eval_size=16", "trainer.eval_prompts=16"]


def _gate(checks: dict[str, str]) -> str:
    return "eval.gate={" + ", ".join(f"{k}: '{v}'" for k, v in checks.items()) + "}"


class RefusalJudge(ThreadingHTTPServer):
    """An OpenAI-compatible chat endpoint grading refusals by a rule the test can recompute: a response
    holding the letter 'a' "refuses" (grade 1), any other answers (0). Records each graded response."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _RefusalHandler)
        self.graded: list[str] = []
        self.base_url = f"http://127.0.0.1:{self.server_address[1]}/v1"


class _RefusalHandler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        question = body["messages"][-1]["content"]
        assert question.startswith("Does the response refuse")  # eval's refusal question, not the grade template
        response = re.search(r"\nResponse: (.*)\nReply with the number only", question, re.DOTALL).group(1)
        self.server.graded.append(response)
        reply = {"index": 0, "message": {"role": "assistant", "content": "1" if "a" in response else "0"}}
        send_json(self, 200, {"choices": [reply], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})


@pytest.fixture(scope="module")
def eval_run(ray_session, tmp_path_factory):
    with serving(RefusalJudge()) as judge:
        refusal = (f"eval.refusal_judge={{kind: judge, judge: {{min_score: 0, max_score: 1, endpoint: "
                   f"{{base_url: '{judge.base_url}', model: refusals}}}}}}")
        cfg = load_config(None, [*CONFIG, f"trainer.output_dir={tmp_path_factory.mktemp('eval')}", *COMMON,
                                   "eval.policies={initial: toy, same: toy, other: 'toy:1'}", _gate(PASSING | FAILING),
                                   refusal])
        with pytest.raises(GateFailed) as failed:
            run_eval(cfg)
    metrics = json.loads((cfg.run_dir / "eval.json").read_text())
    return cfg, metrics, failed.value, judge.graded


def test_every_policy_gets_its_metrics_in_range(eval_run):
    _, metrics, _, _ = eval_run
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


def test_a_refusal_judge_grades_every_response_and_its_share_is_what_it_said(eval_run):
    cfg, metrics, _, graded = eval_run
    rows = [json.loads(line) for line in (cfg.run_dir / "responses.jsonl").read_text().splitlines()]
    for policy in ("initial", "same", "other"):
        responses = [row[policy]["response"] for row in rows]
        refusing = [("a" in r) for r in responses]
        assert metrics[f"eval/{policy}/refusal_share_judge"] == pytest.approx(sum(refusing) / len(refusing))
        assert metrics[f"eval/{policy}/refusal_judge_mean"] == pytest.approx(sum(refusing) / len(refusing))
        assert metrics[f"eval/{policy}/reward_mean"] == metrics[f"eval/{policy}/vowel_mean"]  # weight 0: not summed
    assert sorted(graded) == sorted(row[p]["response"] for row in rows for p in ("initial", "same", "other"))
    assert 0 < metrics["eval/other/refusal_share_judge"] < 1  # the rule splits these responses: a real check


def test_a_policy_against_itself_wins_half_and_the_baseline_is_not_compared(eval_run):
    _, metrics, _, _ = eval_run
    assert metrics["eval/same/win_rate"] == 0.5 and metrics["eval/same/lc_win_rate"] == 0.5
    assert metrics["eval/same/comparisons"] == metrics["eval/other/comparisons"] == 16
    assert "eval/initial/win_rate" not in metrics
    other = [metrics[f"eval/other/{k}"] for k in ("win_rate_low", "win_rate", "win_rate_high")]
    assert 0 <= other[0] <= other[1] <= other[2] <= 1
    assert 0 <= metrics["eval/other/lc_win_rate_low"] <= metrics["eval/other/lc_win_rate_high"] <= 1


def test_the_judge_saw_both_orders_of_every_differing_pair(eval_run):
    cfg, _, _, _ = eval_run
    rows = [json.loads(line) for line in (cfg.run_dir / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 16
    for row in rows:
        assert row["same"]["response"] == row["initial"]["response"]
        assert row["same_vs_baseline"] == {"preference": 0.5, "verdict": "identical responses: tie"}
        if row["other"]["response"] != row["initial"]["response"]:
            assert "result A/B, B/A:" in row["other_vs_baseline"]["verdict"]


def test_the_reward_model_is_evaluated_per_subset_with_counts(eval_run):
    _, metrics, _, _ = eval_run
    assert metrics["eval/rm/n"] == metrics["eval/rm/clear/n"] + metrics["eval/rm/close/n"] == 16
    assert min(metrics["eval/rm/clear/n"], metrics["eval/rm/close/n"]) > 0
    pooled = (metrics["eval/rm/clear/accuracy"] * metrics["eval/rm/clear/n"] +
              metrics["eval/rm/close/accuracy"] * metrics["eval/rm/close/n"]) / 16
    assert metrics["eval/rm/accuracy"] == pytest.approx(pooled)
    assert 0 <= metrics["eval/rm/ece"] <= 1 and metrics["eval/rm/log_loss"] > 0
    assert sum(metrics[f"eval/rm/{k}_n"] for k in ("chosen_shorter", "chosen_longer", "equal_length")) == 16


def test_metrics_row_and_report_with_samples_and_bars(eval_run):
    cfg, metrics, _, _ = eval_run
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] == 0 and rows[0]["eval/other/win_rate"] == metrics["eval/other/win_rate"]
    page = (cfg.run_dir / "report.html").read_text()
    responses = [json.loads(line) for line in (cfg.run_dir / "responses.jsonl").read_text().splitlines()]
    for row in responses[: cfg.eval.samples_in_report]:
        assert html.escape(row["other"]["response"]) in page
        assert html.escape(row["other_vs_baseline"]["verdict"]) in page
    assert "baseline response" in page and "reward model accuracy by subset" in page and 'data-chart="win-rate' in page


def test_a_failing_gate_names_every_failed_check_and_only_those(eval_run):
    _, metrics, failed, _ = eval_run
    assert [f.split(":")[0] for f in failed.failures] == list(FAILING)
    assert failed.failures[2] == "eval/rm/close/accuracy: " + f"{metrics['eval/rm/close/accuracy']:g} fails > 1"
    assert check_gate(metrics, {k: parse_gate_check(v) for k, v in PASSING.items()}) == []
