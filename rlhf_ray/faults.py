"""Fault injection at named points, for reliability tests and drills (off unless the env var is set).

    RLHF_RAY_FAULTS="crash@rollout.generate#3,hang@reward.score,nan@reward.score#2,crash@checkpoint.after_files"

Each spec is `<kind>@<role>[<rank>].<point>[#<n>]`:
- kind: `crash` (the process exits at once, as if killed), `node` (the whole node the process runs
  on is lost: its raylet and every process under it, this one included, are SIGKILLed — a machine
  failure; on the head node that is the whole cluster), `hang` (sleeps until killed: tests
  deadlines), `raise` (an exception), `nan` (the call's floating-point results become NaN),
  `corrupt` (checkpoint files only: a byte of a written file is flipped), or `slow` (every call from
  the n-th on sleeps a random 0–`RLHF_RAY_FAULTS_SLOW_S` seconds, default 0.5, seeded by the call's
  count: uneven engines for asynchronous RL; it never stops firing);
- role: policy, critic, reference, reward, rollout, driver or checkpoint; `[rank]` narrows it to one
  rank (default: every rank);
- point: the worker method (`generate`, `score`, `compute_logprobs`, `compute_values`, `train`,
  `receive_from_object_store`, `send_to_object_store`, …; `rollout.segment`: a partial rollout's segment
  boundary), a driver phase, or a checkpoint commit
  point (`after_files`, `after_manifest`, `after_move_aside`, `after_rename`, `after_latest`,
  `during_retention`);
- n: fire at the n-th call of that point in the process (default 1).

A fault fires once per run: a marker file in `RLHF_RAY_FAULTS_DIR` (default: a directory under the
system temp dir named after the spec string) records it, so a restarted actor or a resumed job does
not hit it again.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ENV = "RLHF_RAY_FAULTS"
DIR_ENV = "RLHF_RAY_FAULTS_DIR"
CRASH_EXIT_CODE = 86
KINDS = ("crash", "node", "hang", "raise", "nan", "corrupt", "slow")
SLOW_ENV = "RLHF_RAY_FAULTS_SLOW_S"
_SPEC = re.compile(r"^(?P<kind>\w+)@(?P<role>\w+)(?:\[(?P<rank>\d+)\])?\.(?P<point>\w+)(?:#(?P<n>\d+))?$")
_calls: dict[tuple[str, str, str, str], int] = {}


class InjectedFault(RuntimeError):
    """Raised by a `raise` fault."""


@dataclass(frozen=True)
class Fault:
    kind: str
    role: str
    point: str
    rank: int | None = None
    n: int = 1

    @property
    def key(self) -> str:
        rank = "" if self.rank is None else f"[{self.rank}]"
        return f"{self.kind}@{self.role}{rank}.{self.point}#{self.n}"


def parse(text: str) -> list[Fault]:
    """The specs of `RLHF_RAY_FAULTS`; a malformed one is an error naming it and the format."""
    faults = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        m = _SPEC.match(item)
        if not m or m["kind"] not in KINDS:
            raise ValueError(f"{ENV}: '{item}' is not <kind>@<role>[<rank>].<point>[#<n>] with kind in {KINDS}")
        faults.append(Fault(m["kind"], m["role"], m["point"], int(m["rank"]) if m["rank"] else None, int(m["n"] or 1)))
    return faults


def active() -> list[Fault]:
    return parse(os.environ.get(ENV, ""))


def fire(role: str, point: str, rank: int = 0) -> str | None:
    """Count a call of `role.point` and act on a matching fault: crash / hang / raise happen here;
    'nan' and 'corrupt' are returned for the caller to apply. None when nothing fires (the common case)."""
    faults = active()
    if not faults:
        return None
    key = (os.environ.get(ENV, ""), os.environ.get(DIR_ENV, ""), role, point)  # a new spec or run counts afresh
    count = _calls[key] = _calls.get(key, 0) + 1
    for fault in faults:
        if fault.kind == "slow" and (fault.role, fault.point) == (role, point) and count >= fault.n and fault.rank in (None, rank):
            time.sleep(float(os.environ.get(SLOW_ENV, "0.5")) * np.random.default_rng([rank, count]).random())
            continue
        if (fault.role, fault.point, fault.n) == (role, point, count) and fault.rank in (None, rank) and _claim(fault, rank):
            print(f"[faults] injecting {fault.key} (rank {rank})", file=sys.stderr, flush=True)
            if fault.kind == "crash":
                os._exit(CRASH_EXIT_CODE)
            if fault.kind == "node":
                kill_node()
            if fault.kind == "hang":
                time.sleep(10**6)
            if fault.kind == "raise":
                raise InjectedFault(f"injected fault {fault.key}")
            return fault.kind
    return None


def kill_node() -> None:
    """SIGKILL this Ray worker's raylet (its parent) and every process under it, then this one."""
    import signal

    import psutil

    raylet = psutil.Process(os.getppid())
    if raylet.name() != "raylet":
        raise InjectedFault(f"a node fault needs a Ray worker process (parent is {raylet.name()!r}, not the raylet)")
    for proc in [raylet, *raylet.children(recursive=True)]:
        if proc.pid != os.getpid():
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
    os.kill(os.getpid(), signal.SIGKILL)


def _claim(fault: Fault, rank: int) -> bool:
    """True the first time this fault fires for this rank in this run (marker file, O_EXCL)."""
    root = Path(os.environ.get(DIR_ENV) or Path(tempfile.gettempdir()) /
                f"rlhf_ray_faults_{hashlib.sha1(os.environ.get(ENV, '').encode()).hexdigest()[:12]}")
    root.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(root / hashlib.sha1(f"{fault.key}/{rank}".encode()).hexdigest(), os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


def poison(result: Any) -> Any:
    """The same structure with every floating-point number replaced by NaN ('nan' faults)."""
    if isinstance(result, np.ndarray) and np.issubdtype(result.dtype, np.floating):
        return np.full_like(result, np.nan)
    if isinstance(result, float):
        return math.nan
    if isinstance(result, tuple):
        return tuple(poison(r) for r in result)
    if isinstance(result, list):
        return [poison(r) for r in result]
    if isinstance(result, dict):
        return {k: poison(v) for k, v in result.items()}
    return result
