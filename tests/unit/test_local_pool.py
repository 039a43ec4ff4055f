"""LocalPool: a light role run in the driver's process behind a WorkerPool's calls, deadlines and errors."""

import threading
import time

import pytest

from rlhf_ray.placement import LocalPool, PhaseError, RoleSpec


class Scorer:
    def __init__(self, offset: float):
        self.offset, self.calls = offset, []

    def score(self, xs: list[float], *, scale: float = 1.0) -> list[float]:
        self.calls.append(threading.current_thread().name)
        return [scale * x + self.offset for x in xs]

    def fail(self) -> None:
        raise ValueError("bad sample 3\nsecond line")

    def hang(self, event: threading.Event) -> None:
        event.wait(30)


def _group(timeout_s: float = 5.0) -> LocalPool:
    return LocalPool(RoleSpec("reward", 1, 1.0, 0.0), Scorer, lambda rank: (0.5,), timeout_s)


def test_calls_run_off_the_calling_thread_and_return_in_order():
    group = _group()
    refs = group.call(lambda w: w.score.remote([1.0, 2.0], scale=2.0)) + group.call_each(
        lambda w, xs: w.score.remote(xs), [[3.0]])
    assert group.get(refs, "score", 1) == [[2.5, 4.5], [3.5]]
    assert len(group) == 1 and group.role == "reward"
    assert all(name.startswith("rlhf_ray-reward") for name in group.instance.calls)
    group.shutdown()


def test_an_exception_becomes_one_phase_error_line():
    group = _group()
    with pytest.raises(PhaseError) as err:
        group.get(group.call(lambda w: w.fail.remote()), "score", 7)
    assert str(err.value).startswith("FAILED phase=score role=reward step=7 cause=ValueError: ")
    assert "\n" not in str(err.value)
    group.shutdown()


def test_a_hang_fails_at_the_deadline_and_later_calls_queue_behind_it():
    group, release = _group(timeout_s=0.5), threading.Event()
    start = time.monotonic()
    with pytest.raises(PhaseError, match="no answer within 0.5s"):
        group.get(group.call(lambda w: w.hang.remote(release)), "score", 2)
    assert time.monotonic() - start < 30  # the 0.5 s deadline fired (without it the call waits for release)
    queued = group.call(lambda w: w.score.remote([1.0]))
    release.set()  # the hung call returns; the queued one runs after it, as on an actor
    assert group.get(queued, "score", 3) == [[1.5]]
    group.shutdown()
