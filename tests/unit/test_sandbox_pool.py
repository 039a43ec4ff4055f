"""`SandboxPool`: tool calls of concurrent episodes run side by side, each in its own worker process,
with workers started only as concurrency needs them and failures confined to the sandbox they hit."""

from __future__ import annotations

import textwrap
import threading

import pytest

from rlhf_ray.envs.tools import SandboxPool

TOOLS = '''
import os, time

def pid_after(seconds: float) -> str:
    time.sleep(seconds)
    return str(os.getpid())

def crash() -> str:
    os._exit(3)
'''


@pytest.fixture(scope="module")
def tools_module(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool_tools")
    (root / "pool_tools_for_tests.py").write_text(textwrap.dedent(TOOLS))
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))  # the worker inherits the caller's sys.path
        yield [f"pool_tools_for_tests:{name}" for name in ("pid_after", "crash")]


def test_concurrent_calls_run_in_separate_workers(tools_module):
    """Three threads call at once (each call holds its sandbox for 0.5 s): three workers, three processes."""
    with_pool = SandboxPool(tools_module, size=3, timeout_s=30.0)
    results, start = [], threading.Barrier(3)

    def call():
        start.wait()
        results.append(with_pool.call("pid_after", {"seconds": 0.5}))

    threads = [threading.Thread(target=call) for _ in range(3)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert all(r.ok for r in results) and len({r.output for r in results}) == 3
        assert with_pool.counters["calls"] == 3 and with_pool.counters["worker_starts"] == 3
    finally:
        with_pool.close()


def test_a_sequential_caller_starts_one_worker_and_a_crash_stays_in_its_sandbox(tools_module):
    pool = SandboxPool(tools_module, size=4, timeout_s=30.0)
    try:
        first = pool.call("pid_after", {"seconds": 0})
        crashed = pool.call("crash", {})
        after = pool.call("pid_after", {"seconds": 0})
        assert first.ok and after.ok and (crashed.ok, crashed.kind) == (False, "crash")
        assert after.output != first.output  # the crashed worker was replaced
        assert pool.counters["crash"] == 1 and pool.counters["calls"] == 3
        assert pool.counters["worker_starts"] == 2  # one at a time reuses one sandbox: the first worker, its replacement
    finally:
        pool.close()
    with pytest.raises(ValueError, match="size >= 1"):
        SandboxPool(tools_module, size=0)
