"""launch.py as a user runs it (a subprocess with its own local Ray): graceful stop on SIGTERM with a
complete checkpoint and a resume that continues; secrets never reach logs or run files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rlhf_ray.checkpoint import CheckpointStore, read_manifest
from rlhf_ray.toy import vowel_reward
from tests.local_http import send_json, serving

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--config", "configs/toy_ppo.yaml", "logging.progress_bar=false", "trainer.eval_every=0",
         "trainer.eval_prompts=8", "data.toy_train_size=128", "data.toy_eval_size=8", "trainer.prompts_per_step=8",
         "trainer.mini_batch_size=8", "trainer.micro_batch_size=8"]


def _launch(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "launch.py", *SMALL, *args], cwd=ROOT, text=True,
                            env=os.environ | {"RAY_AUTH_MODE": "disabled"} | (env or {}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _steps(metrics: Path) -> list[int]:
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.exists() else []


def test_sigterm_writes_a_complete_checkpoint_and_resume_continues(tmp_path):
    out = f"trainer.output_dir={tmp_path}"
    proc = _launch(out, "trainer.total_steps=500", "checkpoint.export_hf=false")
    metrics = tmp_path / "toy_ppo" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while len(_steps(metrics)) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "stopped by SIGTERM after step" in stderr
    ckpt = CheckpointStore(tmp_path / "toy_ppo" / "checkpoints", keep_last=2).latest_valid()
    stopped_at = read_manifest(ckpt)["step"]
    assert _steps(metrics)[-1] == stopped_at

    resumed = _launch(out, f"trainer.total_steps={stopped_at + 2}", "checkpoint.resume=auto")
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-3000:]
    assert f"resumed from {ckpt}" in stdout
    assert _steps(metrics) == list(range(1, stopped_at + 3))


@contextmanager
def vowel_server(token: str):
    """vowel_reward served at http://127.0.0.1:<free port>/score in the reward server's contract, answering
    only requests with `Authorization: Bearer <token>` (401 otherwise); yields the URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.headers.get("Authorization") != f"Bearer {token}":
                status, answer = 401, {"error": "missing or wrong bearer token"}
            else:
                status, answer = 200, {"scores": vowel_reward(body["prompts"], body["responses"])}
            send_json(self, status, answer)

        def log_message(self, *args):
            pass

    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as httpd:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/score"


def test_secrets_never_reach_logs_or_run_files(tmp_path):
    canary = "canary-7f3a9c1e-do-not-log"
    with vowel_server(token=canary) as url:  # the run fails unless its reward requests carry the token
        sources = (f"reward.sources=[{{kind: http, name: remote, http: {{url: '{url}', "
                   f"token_env: RLHF_TEST_REWARD_TOKEN}}}}]")
        proc = _launch(f"trainer.output_dir={tmp_path}", "trainer.total_steps=2", sources, "logging.tensorboard=true",
                       env={"RLHF_TEST_REWARD_TOKEN": canary, "WANDB_API_KEY": canary})
        stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert canary not in stdout + stderr
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(p.name == "metrics.jsonl" for p in files)
    for path in files:
        assert canary.encode() not in path.read_bytes(), path
