"""launch.py as a new user runs it, with inputs that do not exist: one line per problem on stderr, exit code 2,
no traceback, and Ray never started (before pre-flight: a traceback 10–16 s after Ray started)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CASES = {  # override → the field=value its line starts with
    "model": ("model.policy=/nonexistent", "model.policy='/nonexistent': "),
    "data": ("data.train=/nope.jsonl", "data.train='/nope.jsonl': "),
    "function": ("reward.sources.0.path=nomod:nofn", "reward.sources.0.path='nomod:nofn': "),
}


def _launch(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch.py", "--config", "configs/toy_grpo.yaml", *overrides], cwd=ROOT,
                          env=os.environ | {"RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("cases", [["model"], ["data"], ["function"], ["model", "data", "function"]],
                         ids=["model", "data", "function", "all"])
def test_missing_inputs_fail_in_one_line_each_before_ray(cases):
    done = _launch(*(CASES[case][0] for case in cases))
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    lines = done.stderr.splitlines()
    assert len(lines) == len(cases), output
    assert all(line.startswith(f"preflight: {CASES[case][1]}") for line, case in zip(lines, cases)), output
    assert all("looked for" in line for line in lines)
    assert "Traceback" not in output
    assert done.stdout == "" and "Ray" not in done.stderr  # e.g. "Started a local Ray instance"
