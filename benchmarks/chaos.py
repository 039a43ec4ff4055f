"""Chaos: faults of every kind at every role's calls, recovered, and compared bit for bit with an
uninterrupted run (docs/reliability.md, "Chaos").

    python benchmarks/chaos.py --matrix                        # every cell: fault kind × point × role (~1.5 h on 2 cores)
    python benchmarks/chaos.py --matrix --cells 'crash@reward*'   # a subset (fnmatch on the cell ids)
    python benchmarks/chaos.py --matrix --resume-results       # continue: skip cells already in runs/chaos_matrix.json
    python benchmarks/chaos.py --long --steps 120 --seed 0     # one seeded schedule of random faults over 120 steps

Each run is `launch.py` in a subprocess (its own local Ray; its whole session is killed when it ends) on
toy PPO (`configs/toy_ppo.yaml`: a critic, so every role exists) with the reference and the reward as
actors of their own, vLLM engines, checkpoint.every=2 (long: 5), checkpoint.resume=auto,
trainer.max_restarts=1 (long: 2) and a short deadline (`--deadline`, trainer.timeout_s). Faults come
from `RLHF_RAY_FAULTS` (rlhf_ray/faults.py) or from this script: SIGTERM / SIGKILL of the driver, or
SIGKILL of an actor's process, once the run has logged a given step; a byte flipped in the latest
checkpoint. A run that exits non-zero is launched again, as a job retry would (at most `--max-restarts`
times); checkpoint.resume=auto picks up from its latest checkpoint.

A matrix cell passes when, as expected for its fault:
- exact: the run finishes (in-run recovery or resume=auto restarts) with exported policy and critic
  weights bit-identical to one uninterrupted run of the same config, every fault fired, and it recovered
  the way docs/reliability.md says (actor restart, engine restart + re-sync, stage restart from the
  checkpoint, external resume);
- skip: a NaN at a value the update reads skips that one update: the run finishes, that step alone is
  skipped (numerics/skipped_step), every earlier step's metrics equal the uninterrupted run's, the weights
  are finite. Exactness cannot hold here: the skipped update changes every later step (the weight
  difference is reported, not bounded);
- stop: NaN in trainer.max_skipped_steps consecutive steps stops the run with exit 1 and the one line
  `FAILED phase=update role=policy step=<n> cause=...`, and the latest checkpoint verifies and is older
  than step n (no restart: the stop is the expected end).

The long run draws a schedule from `--seed` (faults at random steps, one per step, ≥ 3 steps apart),
launches with resume=auto until the run completes, and compares the final weights with an uninterrupted
run of the same config that has the same NaN skips injected (bit-identical expected) and with a plain
one (differs by the skipped updates). An injected fault's call number counts calls in its process, so
each launch arms the faults still to come with call numbers computed from the step it resumes at
(`plan_launch`); a NaN skip sits on a checkpoint step, so no later failure replays it without the NaN.

Not a test: it prints tables; the JSON goes to runs/chaos_matrix.json and runs/chaos_long.json.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = ("crash", "hang", "raise", "nan", "slow", "sigterm", "corrupt")  # the matrix's columns
CRASH_EXIT_CODE = 86  # rlhf_ray.faults.CRASH_EXIT_CODE: a `crash` fault's exit (not imported: this script never imports rlhf_ray)
MICRO = 2  # micro-batches per update (prompts_per_step 8 / micro_batch_size 4): `loss` calls per `train`
EVAL_POINTS = (("rollout", "generate"), ("policy", "compute_logprobs"), ("reference", "compute_logprobs"),
               ("reward", "score"))  # the calls an evaluation makes (before step 1 and after the last)
STEP_CALLS = (("rollout", "generate", 1), ("policy", "compute_logprobs", 1), ("reference", "compute_logprobs", 1),
              ("critic", "compute_values", 1), ("reward", "score", 1), ("policy", "train", 1), ("policy", "loss", MICRO),
              ("critic", "train", 1), ("critic", "loss", MICRO), ("policy", "send_to_object_store", 1),
              ("rollout", "receive_from_object_store", 1))  # one on-policy PPO step's calls, in order
UPDATE_CALLS = {("policy", "train"), ("policy", "loss"), ("critic", "train"), ("critic", "loss"),
                ("policy", "send_to_object_store"), ("rollout", "receive_from_object_store")}  # none in a step whose score is NaN
SAVE_POINTS = ("after_files", "after_manifest", "after_rename", "after_latest")  # every save passes these
ACTORS = ("policy", "critic", "reference", "reward", "rollout")
ACTOR_CLASS = {"policy": "PolicyWorker", "critic": "CriticWorker", "reference": "ReferenceWorker",
               "reward": "RewardWorker", "rollout": "RolloutWorker"}
VOLATILE = ("time/", "perf/")  # wall-clock metrics; every other metric of a recovered run must equal
SKIP_CAUSE = {("policy", "compute_logprobs"): "numerics/nonfinite_old_logprobs",
              ("reference", "compute_logprobs"): "numerics/nonfinite_ref_logprobs",
              ("critic", "compute_values"): "numerics/nonfinite_values",
              ("reward", "score"): "numerics/nonfinite_scores",
              ("policy", "loss"): "policy/skipped", ("critic", "loss"): "critic/skipped"}


def code_version() -> str:
    """A hash of the code a launch runs (rlhf_ray/, launch.py, the config): results and cached baselines
    are only compared within one version."""
    digest = hashlib.sha1()
    for path in sorted([*(ROOT / "rlhf_ray").rglob("*.py"), ROOT / "launch.py", ROOT / "configs" / "toy_ppo.yaml"]):
        digest.update(str(path.relative_to(ROOT)).encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def run_overrides(steps: int, every: int, max_restarts: int, deadline: float) -> list[str]:
    """The smallest toy PPO run that still has every role as an actor of its own."""
    return [f"trainer.total_steps={steps}", f"checkpoint.every={every}", "checkpoint.keep_last=2",
            "checkpoint.resume=auto", "checkpoint.export_hf=true", "placement.reference_in_policy=false",
            "placement.reward_in_driver=false", "rollout.backend=vllm", "logging.progress_bar=false",
            "trainer.eval_every=0", "trainer.eval_prompts=4", "data.toy_train_size=128", "data.toy_eval_size=16",
            "trainer.prompts_per_step=8", "trainer.mini_batch_size=8", f"trainer.micro_batch_size={8 // MICRO}",
            f"trainer.timeout_s={deadline:g}", f"trainer.max_restarts={max_restarts}"]


# ---------------------------------------------------------------------------------------------
# One launch of launch.py, and a run of launches (resume=auto restarts)
# ---------------------------------------------------------------------------------------------


@dataclass
class Action:
    """Something this script does to a running launch once it has logged `step` (0: once its trainer
    has started, before step 1): SIGTERM / SIGKILL the driver, or SIGKILL a role's actor process."""

    what: str  # "sigterm" | "sigkill" | "kill"
    step: int
    role: str = "driver"
    done_at: int | None = None  # the last step logged when it was done


@dataclass
class Launch:
    rc: int | None  # None: killed by this script after --launch-timeout
    wall_s: float
    log: str
    failed: str = ""  # the last `FAILED ...` line
    resumed_from: str = ""
    stage_restarts: int = 0
    engine_restarts: int = 0
    stopped_by_sigterm: str = ""
    last_step: int = 0
    actions: list[dict] = field(default_factory=list)


def launch_env(faults: str = "", faults_dir: Path | None = None, slow_s: float | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RLHF_RAY_FAULTS", "RAY_ADDRESS"))}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    if faults:
        env["RLHF_RAY_FAULTS"] = faults
        env["RLHF_RAY_FAULTS_DIR"] = str(faults_dir)
    if slow_s is not None:
        env["RLHF_RAY_FAULTS_SLOW_S"] = f"{slow_s:g}"
    return env


def launch(run_dir: Path, overrides: list[str], env: dict[str, str], log_path: Path,
           actions: list[Action] = (), timeout_s: float = 900) -> Launch:
    """Run launch.py once in a session of its own; do `actions` as the run reaches their steps; when it
    ends, kill whatever of its session is left (Ray's agents outlive a killed driver)."""
    cmd = [sys.executable, "launch.py", "--config", "configs/toy_ppo.yaml",
           f"trainer.output_dir={run_dir.parent}", f"trainer.name={run_dir.name}", *overrides]
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        todo, done = list(actions), []
        try:
            while proc.poll() is None:
                if time.monotonic() - start > timeout_s:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
                if todo:
                    step = last_step(run_dir, log_path)
                    for action in [a for a in todo if step is not None and step >= a.step]:
                        if do_action(action, proc.pid):
                            action.done_at = step
                            todo.remove(action)
                            done.append(asdict(action))
                time.sleep(0.05)
        finally:
            kill_session(proc.pid)
    timed_out = proc.returncode == -signal.SIGKILL and not any(a["what"] == "sigkill" for a in done)
    return parse_launch(log_path, None if timed_out else proc.returncode, time.monotonic() - start, run_dir, done)


def last_step(run_dir: Path, log_path: Path) -> int | None:
    """The last step this launch logged; 0 once its trainer has started; None before."""
    text = log_path.read_text(errors="replace")
    steps = re.findall(r"^step (\d+):", text, re.M)
    if steps:
        return int(steps[-1])
    return 0 if re.search(r"^rollout: \d+ \w+ engine", text, re.M) else None


def do_action(action: Action, driver_pid: int) -> bool:
    if action.what in ("sigterm", "sigkill"):
        os.kill(driver_pid, signal.SIGTERM if action.what == "sigterm" else signal.SIGKILL)
        return True
    pids = actor_pids(driver_pid, ACTOR_CLASS[action.role])
    if not pids:
        return False  # not started yet (or being restarted): try again at the next poll
    os.kill(pids[0], signal.SIGKILL)
    return True


def session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def actor_pids(sid: int, cls: str) -> list[int]:
    """Processes of this launch whose title is `ray::<cls>` (Ray names an actor's process after its class)."""
    out = []
    for pid in session_pids(sid):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith(f"ray::{cls}"):
            out.append(pid)
    return sorted(out)


def kill_session(sid: int) -> None:
    """SIGKILL every process left in the session this script started (the launch's own local Ray)."""
    for _ in range(3):
        pids = session_pids(sid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def parse_launch(log_path: Path, rc: int | None, wall_s: float, run_dir: Path, actions: list[dict]) -> Launch:
    text = log_path.read_text(errors="replace")
    failed = re.findall(r"^(FAILED .*)$", text, re.M)
    resumed = re.findall(r"^resumed from (\S+)", text, re.M)
    stopped = re.findall(r"stopped by SIGTERM after step (\d+)", text)
    steps = re.findall(r"^step (\d+):", text, re.M)
    return Launch(rc=rc, wall_s=round(wall_s, 1), log=str(log_path.relative_to(ROOT) if log_path.is_relative_to(ROOT)
                                                              else log_path),
                  failed=failed[-1] if failed else "", resumed_from=Path(resumed[0]).name if resumed else "",
                  stage_restarts=text.count("from the latest checkpoint ("),
                  engine_restarts=len(re.findall(r"^rollout engine\(s\) \[[\d, ]+\] restarted", text, re.M)),
                  stopped_by_sigterm=stopped[-1] if stopped else "", last_step=int(steps[-1]) if steps else 0,
                  actions=actions)


def fired(spec: str, faults_dir: Path) -> list[str]:
    """The faults of `spec` whose once-per-run marker exists (every role here has one rank: rank 0)."""
    from rlhf_ray.faults import parse

    return [f.key for f in parse(spec) if f.kind != "slow"
            and (faults_dir / hashlib.sha1(f"{f.key}/0".encode()).hexdigest()).exists()]


# ---------------------------------------------------------------------------------------------
# Comparing runs
# ---------------------------------------------------------------------------------------------


def export_weights(run_dir: Path) -> dict | None:
    from safetensors.numpy import load_file

    out = {}
    for role in ("policy", "critic"):
        path = run_dir / "export" / role / "model.safetensors"
        if not path.exists():
            return None
        out |= {f"{role}/{k}": v for k, v in load_file(str(path)).items()}
    return out


def compare_weights(a: dict, b: dict | None) -> dict:
    """Bit-identical? and the largest absolute difference (NaN where a tensor is not finite)."""
    import numpy as np

    if b is None:
        return {"identical": False, "max_abs_diff": None, "why": "no export"}
    if set(a) != set(b):
        return {"identical": False, "max_abs_diff": None, "why": "different tensors"}
    identical = all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes() for k in a)
    diff = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) for k in a)
    return {"identical": identical, "max_abs_diff": diff,
            "finite": all(bool(np.isfinite(v).all()) for v in b.values())}


def metric_rows(run_dir: Path) -> dict[int, dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


def row_diffs(a: dict, b: dict) -> list[str]:
    """Non-volatile metrics that differ between two rows of the same step."""
    keys = {k for k in set(a) | set(b) if not k.startswith(VOLATILE)}
    return sorted(k for k in keys if a.get(k) != b.get(k))


def metric_diffs(base: dict[int, dict], rows: dict[int, dict], until: int | None = None) -> dict[int, list[str]]:
    steps = [s for s in base if until is None or s < until]
    return {s: d for s in steps if (d := row_diffs(base[s], rows.get(s, {})))}


def latest_checkpoint(run_dir: Path) -> tuple[int | None, list[str]]:
    """(step of the latest valid checkpoint, problems of it); builds the store as a resume would."""
    from rlhf_ray.checkpoint import CheckpointStore, verify

    path = CheckpointStore(run_dir / "checkpoints", keep_last=2).latest_valid()
    if path is None:
        return None, ["no valid checkpoint"]
    return int(path.name.split("_")[-1]), verify(path)


# ---------------------------------------------------------------------------------------------
# Call numbers: which call of a point happens at a step
# ---------------------------------------------------------------------------------------------


def call_number(role: str, point: str, step: int, total: int) -> int:
    """The n of `<role>.<point>#n` that fires at `step` of a fresh launch (0: the evaluation before
    step 1; total + 1: the one after the last step); loss: the step's first micro-batch."""
    evaluated = (role, point) in EVAL_POINTS
    if step == 0:
        assert evaluated, (role, point)
        return 1
    if step == total + 1:
        assert evaluated, (role, point)
        return total + 2
    per_step = dict(((r, p), k) for r, p, k in STEP_CALLS)[(role, point)]
    return int(evaluated) + per_step * (step - 1) + 1


@dataclass
class Event:
    """One fault of the long run's schedule."""

    step: int
    kind: str  # crash hang raise nan slow | sigterm sigkill (driver) | kill (an actor's process) | node
    role: str
    point: str = ""
    status: str = "pending"  # pending | armed | fired | done | skipped | missed
    launches: list[int] = field(default_factory=list)  # the launches it was armed in
    note: str = ""

    @property
    def injected(self) -> bool:
        return self.kind in ("crash", "hang", "raise", "nan", "slow", "node")

    @property
    def skips(self) -> bool:
        """A NaN at a value the update reads: that update is skipped (the trajectory changes)."""
        return self.kind == "nan" and (self.role, self.point) in SKIP_CAUSE

    def label(self) -> str:
        if self.injected:
            return f"{self.kind}@{self.role}.{self.point}"
        return {"sigterm": "SIGTERM driver", "sigkill": "SIGKILL driver", "kill": f"SIGKILL {self.role} actor"}[self.kind]

    def effect(self, restarts_left: int) -> str:
        """What it does to the launch: ends | stage | engine_generate | engine_receive | actor | none | stop."""
        if self.kind in ("sigterm", "sigkill", "node") or self.role == "checkpoint":
            return "ends"  # a node kill on one machine is the head's: the cluster goes, the launch fails
        if self.kind == "kill":
            return "stop"  # its timing is not exact: arm nothing after it in this launch
        if self.kind in ("slow",) or self.skips or (self.kind == "nan" and self.point == "train"):
            return "none"
        if self.kind == "nan":
            return "ends"  # a NaN probe on a weight sync: the sync check fails the run
        if self.role in ("policy", "critic"):
            return "stage" if restarts_left > 0 else "ends"
        if self.kind != "crash":
            return "ends"  # a hung or raising stateless role fails its phase; only a dead one is restarted
        if self.role == "rollout":
            return "engine_generate" if self.point == "generate" else "engine_receive"
        return "actor"


def plan_launch(s0: int, total: int, every: int, events: list[Event],
                max_restarts: int) -> tuple[list[tuple[Event, int]], int | None, int | None]:
    """The injected faults to arm for a launch that starts at step s0, each with its call number in the
    process that will make that call, following the launch through the in-run recoveries of the faults
    armed before it; arming stops at the first fault that ends the launch (or whose timing is inexact).
    A fault's n counts calls in any process of its role: after an in-run restart, a later fault whose n
    the restarted process had already reached would fire early, so arming stops before it and the
    launch is stopped by SIGTERM (exact) at the step returned, to arm it afresh in the next.
    → (armed, the step the launch ends at or None, the step to SIGTERM at or None)."""
    counts: Counter = Counter()
    dead: Counter = Counter()  # (role, point) → the most calls a restarted process of this launch made
    pending = sorted((e for e in events if e.status == "pending" and e.step >= s0), key=lambda e: e.step)
    armed, restarts, last_save = [], max_restarts, s0 - 1
    _start_calls(counts, s0 - 1)
    step = s0
    while step <= total and pending:
        event = pending[0] if pending[0].step == step else None
        if event is not None and not event.injected:
            if event.effect(restarts) in ("ends", "stop"):
                return armed, step, None
        next_step, no_update = step + 1, False
        for role, point, k in STEP_CALLS:
            if no_update and (role, point) in UPDATE_CALLS:
                continue
            n = counts[(role, point)] + 1
            counts[(role, point)] += k
            if event is None or (role, point) != (event.role, event.point):
                continue
            if n <= dead[(role, point)]:
                return armed, step - 1, step - 2
            armed.append((event, n))
            pending.pop(0)
            no_update = event.skips and (role, point) not in UPDATE_CALLS  # a NaN score: no update, no sync
            effect, event = event.effect(restarts), None
            if effect == "ends":
                return armed, step, None
            if effect == "engine_generate":  # re-synced, then its part generated again
                _reset(counts, dead, {"rollout"})
                counts[("rollout", "receive_from_object_store")] += 1
                counts[("rollout", "generate")] += 1
            elif effect == "engine_receive":  # re-synced to the old version, then the sync repeated
                _reset(counts, dead, {"rollout"})
                counts[("rollout", "receive_from_object_store")] += 2
            elif effect == "actor":  # Ray restarts it and retries the call
                _reset(counts, dead, {role})
                counts[(role, point)] += 1
            elif effect == "stage":  # every actor anew, resumed from the last checkpoint
                restarts -= 1
                if (role, point) in UPDATE_CALLS:  # the policy and critic update side by side: the other
                    for other, other_point, other_k in STEP_CALLS[STEP_CALLS.index((role, point, k)) + 1:]:
                        if other in ("policy", "critic") and other_point in ("train", "loss"):
                            counts[(other, other_point)] += other_k  # ... made this step's calls before the restart
                _reset(counts, dead, set(ACTORS))
                _start_calls(counts, last_save)
                next_step = last_save + 1
                break
        else:
            if step % every == 0:
                for point in SAVE_POINTS:
                    n = counts[("checkpoint", point)] = counts[("checkpoint", point)] + 1
                    if event is not None and event.role == "checkpoint" and event.point == point:
                        armed.append((event, n))
                        return armed, step, None
                last_save = step
            if event is not None and pending and pending[0] is event:
                pending.pop(0)  # a point this plan does not model (should not happen): never armed
                event.status, event.note = "skipped", "point not modelled"
        step = next_step
    return armed, None, None


def _start_calls(counts: Counter, resumed_at: int) -> None:
    """The calls before the first step: the evaluation of a fresh start, or the weight sync of a resume."""
    points = EVAL_POINTS if resumed_at == 0 else (("policy", "send_to_object_store"), ("rollout", "receive_from_object_store"))
    for role, point in points:
        counts[(role, point)] += 1


def _reset(counts: Counter, dead: Counter, roles: set[str]) -> None:
    """`roles` restarted: their calls count from 0 again (`dead` keeps how far the old processes got)."""
    for key in [k for k in counts if k[0] in roles]:
        dead[key] = max(dead[key], counts.pop(key))


# ---------------------------------------------------------------------------------------------
# The matrix
# ---------------------------------------------------------------------------------------------

MATRIX_STEPS, MATRIX_EVERY = 6, 2

# (role, point, step, phase): step 0 = the evaluation before step 1, 7 = the one after the last step
ROWS = [
    ("rollout", "generate", 0, "eval"), ("rollout", "generate", 3, "rollout"), ("rollout", "generate", 7, "eval"),
    ("rollout", "receive_from_object_store", 4, "sync"),
    ("policy", "compute_logprobs", 4, "score"), ("policy", "compute_logprobs", 7, "eval"),
    ("policy", "train", 4, "update"), ("policy", "loss", 5, "update"), ("policy", "send_to_object_store", 5, "sync"),
    ("critic", "compute_values", 3, "score"), ("critic", "train", 5, "update"), ("critic", "loss", 4, "update"),
    ("reference", "compute_logprobs", 0, "eval"), ("reference", "compute_logprobs", 5, "score"),
    ("reward", "score", 4, "score"), ("reward", "score", 7, "eval"),
]
SLOW_ROWS = {("rollout", "generate", 3), ("reference", "compute_logprobs", 5), ("reward", "score", 4),
             ("critic", "compute_values", 3), ("policy", "train", 4)}


@dataclass
class Cell:
    id: str
    row: str  # the table row: role · point#n (phase, step)
    kind: str  # the table column
    faults: str = ""  # RLHF_RAY_FAULTS
    expect: str = "exact"  # exact | skip | stop
    recovery: tuple[str, ...] = ("none",)  # acceptable recoveries (any one)
    actions: tuple[tuple[str, int], ...] = ()  # (sigterm|sigkill, step) done by this script
    slow_s: float | None = None
    skip_step: int | None = None
    stop_step: int | None = None
    corrupt_after: int | None = None  # flip a byte in the latest checkpoint after this launch (1-based)
    resumes: tuple[int, ...] | None = None  # the checkpoint step each later launch must resume from
    note: str = ""


def _row_label(role: str, point: str, step: int, phase: str, n: int | str) -> str:
    where = {0: "before step 1", MATRIX_STEPS + 1: "final"}.get(step, f"step {step}")
    return f"{role} · {point}#{n} ({phase}, {where})"


def matrix_cells(deadline: float) -> list[Cell]:
    """Every meaningful cell: a point the role calls in this config, a kind that acts there."""
    cells = [Cell("control", "— (no fault: a second clean run)", "—", expect="exact")]
    total = MATRIX_STEPS
    for role, point, step, phase in ROWS:
        n = call_number(role, point, step, total)
        row = _row_label(role, point, step, phase, n)
        stateless = role in ("rollout", "reference", "reward")
        for kind in ("crash", "hang", "raise"):
            if kind == "crash":
                recovery = {"rollout": "engine restart", "reference": "actor restart", "reward": "actor restart"}.get(
                    role, "stage restart")
            else:
                recovery = "external resume" if stateless else "stage restart"
            cells.append(Cell(f"{kind}@{role}.{point}#{n}", row, kind, f"{kind}@{role}.{point}#{n}",
                              recovery=(recovery,)))
        if phase != "eval":
            spec = f"nan@{role}.{point}#{n}"
            if (role, point) in SKIP_CAUSE:
                cells.append(Cell(spec, row, "nan", spec, expect="skip", recovery=("update skipped",), skip_step=step))
            elif point in ("send_to_object_store", "receive_from_object_store"):
                cells.append(Cell(spec, row, "nan", spec, recovery=("external resume",),
                                  note="NaN probe log-probs: the sync check fails the run"))
            else:  # the update's reported metrics (train), the engine's unused behaviour log-probs (generate)
                cells.append(Cell(spec, row, "nan", spec, note="NaN in values nothing downstream trains on"))
        if (role, point, step) in SLOW_ROWS:
            spec = f"slow@{role}.{point}#{n}"
            cells.append(Cell(spec, row, "slow", spec, slow_s=deadline / 4,
                              note=f"every call from #{n} sleeps 0–{deadline / 4:g} s (deadline {deadline:g} s)"))
    cells += [
        Cell("nan-stop@reward.score#4,5,6", "reward · score#4–6 (score, steps 3–5)", "nan",
             "nan@reward.score#4,nan@reward.score#5,nan@reward.score#6", expect="stop", recovery=("stopped",),
             stop_step=5, note="three NaN steps in a row = trainer.max_skipped_steps"),
        Cell("nan-stop@critic.compute_values#2,3,4", "critic · compute_values#2–4 (score, steps 2–4)", "nan",
             "nan@critic.compute_values#2,nan@critic.compute_values#3,nan@critic.compute_values#4", expect="stop",
             recovery=("stopped",), stop_step=4, note="three NaN steps in a row = trainer.max_skipped_steps"),
        Cell("crash@policy.train#1+#3", "policy · train#1 and #3 (update; past trainer.max_restarts=1)", "crash",
             "crash@policy.train#1,crash@policy.train#3", recovery=("stage restart+external resume",),
             note="the second death exhausts trainer.max_restarts: the job retry resumes"),
        Cell("crash@rollout.generate#2+#3", "rollout · generate#2 and #3 (rollout, steps 1 and 2)", "crash",
             "crash@rollout.generate#2,crash@rollout.generate#3", recovery=("engine restart",),
             note="the restarted engine dies again"),
    ]
    # the step a resume must take after a death at each commit point of step 4's save (step 6's for retention)
    resume_at = {"after_files": 2, "after_manifest": 2, "after_rename": 2, "after_latest": 4, "during_retention": 6}
    for point, n, step in [(p, 2, 4) for p in SAVE_POINTS] + [("during_retention", 1, 6)]:
        row = f"checkpoint · {point}#{n} (save of step {step})"
        for kind in ("crash", "raise"):
            cells.append(Cell(f"{kind}@checkpoint.{point}#{n}", row, kind, f"{kind}@checkpoint.{point}#{n}",
                              recovery=("external resume",), resumes=(resume_at[point],)))
    cells.append(Cell("crash@checkpoint.after_move_aside", "checkpoint · after_move_aside#1 (re-save of step 4)", "crash",
                      "crash@checkpoint.after_rename#2,crash@checkpoint.after_move_aside#1",
                      recovery=("external resume",), resumes=(2, 2), note="after_rename#2 leaves step_4 beside "
                      "latest=step_2; the resumed run saves step 4 again, moving the old one aside, and dies there"))
    cells.append(Cell("corrupt@checkpoint.latest", "checkpoint · latest, corrupted before the resume", "corrupt",
                      "crash@checkpoint.after_files#3", recovery=("external resume",), corrupt_after=1, resumes=(2,),
                      note="dies saving step 6; a byte of step_4's policy state flipped: resume=auto skips it, takes step_2"))
    # signals once a step is logged: they land in that step's checkpoint save (even steps) or the next step
    for label, step in (("start-up (signal once the trainer starts)", 0), ("mid-run (signal once step 3 is logged)", 3),
                        ("end (signal once step 6 is logged: its save, final evaluation, export)", MATRIX_STEPS)):
        row = f"driver · {label}"
        final = step == MATRIX_STEPS
        cells.append(Cell(f"sigterm@driver.{step}", row, "sigterm", actions=(("sigterm", step),),
                          recovery=("none", "external resume") if final else ("external resume",),
                          note="finishes the step, checkpoints it, exits 143; resumed from that checkpoint" + (
                              " (after step 6's save nothing checks the stop flag: the run just ends)" if final else "")))
        cells.append(Cell(f"sigkill@driver.{step}", row, "crash", actions=(("sigkill", step),),
                          recovery=("external resume",), note="resumed from the last complete checkpoint"))
    return cells


def recovery_of(cell: Cell, launches: list[Launch], fired_keys: list[str], skipped: list[int]) -> str:
    """How the run got past its fault, from the launches' logs and metrics."""
    parts = []
    if cell.expect == "stop":
        return "stopped"
    if any(launch.engine_restarts for launch in launches):
        parts.append("engine restart")
    if any(launch.stage_restarts for launch in launches):
        parts.append("stage restart")
    if len(launches) > 1:
        parts.append("external resume")
    if not parts and cell.faults.startswith("crash@") and any(k.split("@")[1].startswith(("reference", "reward"))
                                                              for k in fired_keys):
        parts.append("actor restart")  # the process died and the run went on: Ray restarted it, retried the call
    if skipped:
        parts.append("update skipped")
    return "+".join(parts) or "none"


def run_cell(cell: Cell, base: dict, work: Path, overrides: list[str], max_restarts: int) -> dict:
    import shutil

    cell_dir = work / re.sub(r"[^\w.@#+,-]", "_", cell.id)
    if cell_dir.exists():
        shutil.rmtree(cell_dir)
    cell_dir.mkdir(parents=True)
    run_dir, faults_dir = cell_dir / "run", cell_dir / "faults"
    env = launch_env(cell.faults, faults_dir, cell.slow_s)
    launches: list[Launch] = []
    start = time.monotonic()
    for attempt in range(1 + max_restarts):
        actions = [Action(what, step) for what, step in cell.actions] if attempt == 0 else []
        result = launch(run_dir, overrides, env, cell_dir / f"launch{attempt + 1}.log", actions)
        launches.append(result)
        print(f"  launch {attempt + 1}: rc={result.rc} {result.wall_s:.0f}s"
              f"{' resumed from ' + result.resumed_from if result.resumed_from else ''}"
              f"{' ' + result.failed[:160] if result.failed else ''}", flush=True)
        if result.rc == 0 or cell.expect == "stop" or result.rc is None:
            break
        if cell.corrupt_after == attempt + 1:
            corrupt_latest(run_dir)
    out = {"cell": asdict(cell), "launches": [asdict(x) for x in launches], "wall_s": round(time.monotonic() - start, 1),
           "fired": fired(cell.faults, faults_dir) if cell.faults else []}
    out |= judge(cell, launches, out["fired"], run_dir, base)
    return out


def corrupt_latest(run_dir: Path) -> None:
    """Flip a byte in the middle of the largest policy file of the latest checkpoint (as the tests do)."""
    root = run_dir / "checkpoints"
    latest = root / (root / "latest").read_text().strip()
    victim = max((p for p in (latest / "policy").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    print(f"  corrupted {victim.relative_to(run_dir)}", flush=True)


def judge(cell: Cell, launches: list[Launch], fired_keys: list[str], run_dir: Path, base: dict) -> dict:
    from rlhf_ray.faults import parse

    why = []
    expected_fired = [f.key for f in parse(cell.faults)] if cell.faults else []
    expected_fired = [k for k in expected_fired if not k.startswith("slow@")]
    if sorted(fired_keys) != sorted(expected_fired):
        why.append(f"fired {fired_keys}, expected {expected_fired}")
    rows = metric_rows(run_dir)
    skipped = [s for s, r in sorted(rows.items()) if r.get("numerics/skipped_step") == 1.0]
    recovery = recovery_of(cell, launches, fired_keys, skipped)
    if recovery not in cell.recovery:
        why.append(f"recovered by {recovery}, expected {' or '.join(cell.recovery)}")
    if cell.resumes is not None:
        resumed = [int(la.resumed_from.split("_")[-1]) if la.resumed_from else None for la in launches[1:]]
        if resumed != list(cell.resumes):
            why.append(f"later launches resumed from steps {resumed}, expected {list(cell.resumes)}")
    first = launches[0]
    if first.rc == 128 + signal.SIGTERM:  # a graceful stop: a complete checkpoint of its last step, resumed from
        resumed = launches[1].resumed_from if len(launches) > 1 else ""
        if not first.stopped_by_sigterm or resumed != f"step_{int(first.stopped_by_sigterm):08d}":
            why.append(f"SIGTERM stop after step {first.stopped_by_sigterm or '?'}, next launch resumed from {resumed or '?'}")
    last = launches[-1]
    weights = compare_weights(base["weights"], export_weights(run_dir))
    out = {"recovery": recovery, "weights": {k: v for k, v in weights.items() if k != "why"}}
    if cell.expect == "stop":
        match = re.match(r"FAILED phase=(\S+) role=(\S+) step=(\S+) .*cause=(.*)", last.failed)
        if last.rc != 1 or not match or match.groups()[:3] != ("update", "policy", str(cell.stop_step)):
            why.append(f"rc={last.rc}, last line {last.failed!r}; expected rc=1 and FAILED phase=update role=policy "
                       f"step={cell.stop_step}")
        step, problems = latest_checkpoint(run_dir)
        out["latest_checkpoint"] = step
        if step is None or problems or step >= cell.stop_step:
            why.append(f"latest checkpoint {step} {problems}: expected a valid one before step {cell.stop_step}")
        if (run_dir / "checkpoints" / f"step_{cell.stop_step:08d}").exists():
            why.append(f"a checkpoint was written at the stop step {cell.stop_step}")
    elif last.rc != 0:
        why.append(f"did not finish: last launch rc={last.rc} {last.failed!r}")
    elif cell.expect == "exact":
        if not weights["identical"]:
            why.append(f"weights differ from the uninterrupted run (max |Δ| {weights['max_abs_diff']}) "
                       f"{weights.get('why', '')}".strip())
        out["metric_diffs"] = {str(s): d for s, d in metric_diffs(base["rows"], rows).items()}
    else:  # skip
        cause = SKIP_CAUSE[tuple(cell.faults.split("@")[1].split("#")[0].split("."))]
        row = rows.get(cell.skip_step, {})
        if skipped != [cell.skip_step] or not (isinstance(row.get(cause), (int, float)) and row[cause] > 0):
            why.append(f"skipped steps {skipped}, {cause}={row.get(cause)}; expected step {cell.skip_step} alone")
        before = metric_diffs(base["rows"], rows, until=cell.skip_step)
        if before:
            why.append(f"metrics before the skipped step differ: {before}")
        if not weights.get("finite", False):
            why.append("non-finite weights")
        if sorted(rows) != list(range(1, MATRIX_STEPS + 1)):
            why.append(f"metrics rows for steps {sorted(rows)}")
    out["passed"] = not why
    out["why"] = "; ".join(why)
    return out


def baseline(work: Path, overrides: list[str], name: str = "baseline", faults: str = "") -> dict:
    """One uninterrupted run of the config (cached: reused when its export and overrides are there)."""
    run_dir = work / name / "run"
    stamp = work / name / "overrides.json"
    key = json.dumps({"overrides": overrides, "faults": faults, "code": code_version()})
    if not (stamp.exists() and stamp.read_text() == key and export_weights(run_dir) is not None):
        import shutil

        shutil.rmtree(work / name, ignore_errors=True)
        (work / name).mkdir(parents=True)
        faults_dir = work / name / "faults"
        print(f"{name}: an uninterrupted run{' with ' + faults if faults else ''}", flush=True)
        result = launch(run_dir, overrides, launch_env(faults, faults_dir), work / name / "launch1.log")
        if result.rc != 0:
            raise SystemExit(f"{name} failed (rc={result.rc}): see {result.log}")
        stamp.write_text(key)
        (work / name / "wall_s").write_text(str(result.wall_s))
    return {"weights": export_weights(run_dir), "rows": metric_rows(run_dir), "run_dir": str(run_dir),
            "wall_s": float((work / name / "wall_s").read_text())}


def print_matrix(cells: list[Cell], results: dict[str, dict]) -> str:
    """Rows role · point, columns fault kinds; pass / FAIL / — (not meaningful) / · (not run)."""
    rows: dict[str, dict[str, list[str]]] = {}
    for cell in cells:
        rows.setdefault(cell.row, {}).setdefault(cell.kind, []).append(cell.id)
    lines = ["| role · point#call (phase) | " + " | ".join(KINDS) + " |", "|---" * (len(KINDS) + 1) + "|"]
    for row, by_kind in rows.items():
        marks = []
        for kind in KINDS:
            ids = by_kind.get(kind, [])
            if not ids:
                marks.append("—")
            elif any(i not in results for i in ids):
                marks.append("·")
            else:
                marks.append("pass" if all(results[i]["passed"] for i in ids) else "FAIL")
        if "—" in by_kind:  # the control row
            marks = ["pass" if results.get("control", {}).get("passed") else ("·" if "control" not in results else "FAIL")] \
                + [""] * (len(KINDS) - 1)
        lines.append(f"| {row} | " + " | ".join(marks) + " |")
    return "\n".join(lines)


def print_cells(cells: list[Cell], results: dict[str, dict]) -> str:
    lines = ["| cell | expected | result | recovery | launches (rc) | metrics = uninterrupted | wall s | note |",
             "|---|---|---|---|---|---|---|---|"]
    for cell in cells:
        r = results.get(cell.id)
        if r is None:
            continue
        verdict = "pass" if r["passed"] else f"FAIL: {r['why']}"
        diffs = r.get("metric_diffs")
        same = "—" if diffs is None else "yes" if not diffs else \
            "no: " + ", ".join(sorted({k for keys in diffs.values() for k in keys}))
        rcs = ",".join(str(la["rc"]) for la in r["launches"])
        lines.append(f"| `{cell.id}` | {cell.expect} | {verdict} | {r['recovery']} | {len(r['launches'])} ({rcs}) | "
                     f"{same} | {r['wall_s']:.0f} | {cell.note} |")
    return "\n".join(lines)


def run_matrix(args) -> None:
    work = ROOT / "runs" / "chaos" / "matrix"
    out_path = ROOT / "runs" / "chaos_matrix.json"
    overrides = run_overrides(MATRIX_STEPS, MATRIX_EVERY, 1, args.deadline)
    cells = matrix_cells(args.deadline)
    if args.cells:
        cells = [c for c in cells if any(fnmatch.fnmatch(c.id, p) for p in args.cells.split("|"))]
    saved = json.loads(out_path.read_text()) if args.resume_results and out_path.exists() else {}
    code = code_version()
    results: dict[str, dict] = saved.get("cells", {}) if (saved.get("overrides"), saved.get("code")) == (overrides, code) else {}
    if saved and not results:
        print(f"{out_path.relative_to(ROOT)} holds results of other code or settings: starting afresh", flush=True)
    print(f"{len(cells)} cells; deadline {args.deadline:g} s; config: configs/toy_ppo.yaml {' '.join(overrides)}", flush=True)
    base = baseline(work, overrides)
    for i, cell in enumerate(cells, 1):
        if cell.id in results and not args.rerun:
            continue
        print(f"[{i}/{len(cells)}] {cell.id}  ({cell.row}; expect {cell.expect}, {' or '.join(cell.recovery)})", flush=True)
        results[cell.id] = run_cell(cell, base, work, overrides, args.max_restarts)
        r = results[cell.id]
        if code_version() != code:
            raise SystemExit(f"the code changed while cell {cell.id} ran (rlhf_ray/, launch.py or the config): "
                             f"results so far are in {out_path.relative_to(ROOT)}; start again")
        print(f"  → {'pass' if r['passed'] else 'FAIL: ' + r['why']}  ({r['recovery']}, {r['wall_s']:.0f} s)", flush=True)
        out_path.write_text(json.dumps({"overrides": overrides, "code": code, "deadline_s": args.deadline,
                                        "baseline_wall_s": base["wall_s"], "cells": results}, indent=1))
    everything = matrix_cells(args.deadline)
    results = {c.id: results[c.id] for c in everything if c.id in results}  # drop cells no longer in the matrix
    out_path.write_text(json.dumps({"overrides": overrides, "code": code, "deadline_s": args.deadline,
                                    "baseline_wall_s": base["wall_s"], "cells": results}, indent=1))
    done = [c for c in everything if c.id in results]
    passed = sum(results[c.id]["passed"] for c in done)
    print(f"\n== Chaos matrix: {passed} / {len(done)} cells pass ({len(everything)} cells in all); "
          f"baseline run {base['wall_s']:.0f} s ==\n")
    print(print_matrix(everything, results))
    print()
    print(print_cells(everything, results))
    walls = sorted(results[c.id]["wall_s"] for c in done)
    if walls:
        print(f"\nwall per cell: median {walls[len(walls) // 2]:.0f} s, max {walls[-1]:.0f} s, "
              f"all cells {sum(walls) / 60:.1f} min; JSON: {out_path.relative_to(ROOT)}")


# ---------------------------------------------------------------------------------------------
# The long run
# ---------------------------------------------------------------------------------------------

LONG_EVERY = 5
# (kind, role, point): drawn at random; "ckpt" entries sit on checkpoint steps
IN_STEP = [
    ("crash", "rollout", "generate"), ("crash", "rollout", "receive_from_object_store"),
    ("crash", "reference", "compute_logprobs"), ("crash", "reward", "score"),
    ("crash", "policy", "train"), ("crash", "policy", "compute_logprobs"), ("crash", "critic", "compute_values"),
    ("crash", "critic", "train"), ("hang", "policy", "loss"), ("raise", "critic", "loss"),
    ("hang", "reward", "score"), ("hang", "reward", "score"),  # reward timeouts, twice as likely
    ("raise", "reward", "score"), ("hang", "reference", "compute_logprobs"), ("hang", "rollout", "generate"),
    ("raise", "rollout", "receive_from_object_store"), ("nan", "rollout", "receive_from_object_store"),
    ("nan", "policy", "send_to_object_store"), ("nan", "policy", "train"), ("slow", "reward", "score"),
    ("sigterm", "driver", ""), ("sigkill", "driver", ""), ("kill", "rollout", ""), ("kill", "reference", ""),
    ("kill", "reward", ""), ("kill", "policy", ""), ("kill", "critic", ""), ("node", "reward", "score"),
    ("node", "rollout", "generate"),
]
ON_SAVE = [("nan", "reward", "score"), ("nan", "policy", "compute_logprobs"), ("nan", "reference", "compute_logprobs"),
           ("nan", "critic", "compute_values"), ("nan", "policy", "loss"),
           ("crash", "checkpoint", "after_files"), ("crash", "checkpoint", "after_manifest"),
           ("crash", "checkpoint", "after_rename"), ("crash", "checkpoint", "after_latest"),
           ("raise", "checkpoint", "after_files")]
TIMED = ("sigterm", "sigkill", "kill")


def draw_schedule(steps: int, seed: int, count: int, cluster: str | None) -> list[Event]:
    """`count` faults at distinct steps ≥ 3 apart. A NaN skip or a checkpoint fault sits on a checkpoint
    step; faults this script does by the clock (signals, actor kills) keep ≥ 4 steps from a NaN skip (a
    kill landing between the NaN and its step's checkpoint would replay that step without it); an actor
    kill (inexact timing) is followed 3 steps on by a driver signal, so that no fault after it is armed
    in a launch that would miss it. A node kill (`node@<role>.<point>`: the raylet the call runs under and
    every process of its node SIGKILLed) takes, on this one-machine local Ray, the head node: the whole
    cluster goes and the launch fails; resume=auto continues in the next launch."""
    rng = random.Random(seed)
    events: list[Event] = []
    taken: set[int] = set()
    free = lambda s, gap=3: all(abs(s - t) >= gap for t in taken)  # noqa: E731
    saves = [s for s in range(LONG_EVERY, steps, LONG_EVERY)]
    for kind, role, point in rng.sample(ON_SAVE, k=min(len(ON_SAVE), max(3, count // 4))):
        options = [s for s in saves if free(s, 4)]
        if options:
            step = rng.choice(options)
            taken.add(step)
            events.append(Event(step, kind, role, point))
    # one of each the issue names first (driver signals, a reward timeout, an actor kill, a node kill), then at random
    must = [("sigterm", "driver", ""), ("sigkill", "driver", ""), ("hang", "reward", "score"),
            ("kill", rng.choice(ACTORS), ""), ("node", "reward", "score")]
    tries = 0
    while len(events) < count and tries < 10_000:
        tries += 1
        kind, role, point = must[0] if must else rng.choice(IN_STEP)
        step = rng.randrange(2, steps - 4)
        near_nan = any(e.skips and abs(e.step - step) < 5 for e in events)
        if step % LONG_EVERY == 0 or not free(step) or (kind in TIMED and near_nan):
            continue
        if kind == "kill":
            after = step + 3
            if after % LONG_EVERY == 0 or not free(after, 3) or any(e.skips and abs(e.step - after) < 5 for e in events):
                continue
            taken |= {step, after}
            events += [Event(step, kind, role), Event(after, rng.choice(["sigterm", "sigkill"]), "driver")]
        else:
            taken.add(step)
            events.append(Event(step, kind, role, point))
        if must:
            must.pop(0)
    return sorted(events, key=lambda e: e.step)


def run_long(args) -> None:
    import shutil

    work = ROOT / "runs" / "chaos" / f"long_s{args.seed}_n{args.steps}"
    out_path = ROOT / "runs" / "chaos_long.json"
    overrides = run_overrides(args.steps, LONG_EVERY, 2, args.deadline)
    events = draw_schedule(args.steps, args.seed, args.events or args.steps // 6, args.cluster)
    print(f"== Chaos run: {args.steps} steps, seed {args.seed}, {len(events)} faults; checkpoint.every={LONG_EVERY}, "
          f"trainer.max_restarts=2, deadline {args.deadline:g} s ==")
    for e in events:
        print(f"  step {e.step:>4}  {e.label()}{'  (' + e.note + ')' if e.note else ''}")
    plain = baseline(work.parent / f"long_n{args.steps}", overrides, "plain")
    skips = [e for e in events if e.skips]
    nan_plan, _, _ = plan_launch(1, args.steps, LONG_EVERY, [Event(e.step, e.kind, e.role, e.point) for e in skips], 2)
    nan_spec = ",".join(f"nan@{e.role}.{e.point}#{n}" for e, n in nan_plan)
    reference = baseline(work, overrides, "reference", nan_spec) if nan_spec else plain
    chaos_dir = work / "chaos"
    shutil.rmtree(chaos_dir, ignore_errors=True)
    chaos_dir.mkdir(parents=True)
    run_dir = chaos_dir / "run"
    launches: list[dict] = []
    start = time.monotonic()
    s0 = 1
    for index in range(1, args.max_launches + 1):
        armed, end_step, rearm_at = plan_launch(s0, args.steps, LONG_EVERY, events, 2)
        timed: list[Event] = []  # done by this script: up to the launch's end (an actor kill's signal after it)
        for e in sorted((e for e in events if e.status == "pending" and e.kind in TIMED), key=lambda e: e.step):
            if end_step is not None and e.step > end_step and not (timed and timed[-1].kind == "kill"):
                break
            timed.append(e)
            if e.kind in ("sigterm", "sigkill"):
                break
        spec = ",".join(f"{e.kind}@{e.role}.{e.point}#{n}" for e, n in armed)
        slow = [e for e, _ in armed if e.kind == "slow"]
        faults_dir = chaos_dir / f"faults{index}"
        env = launch_env(spec, faults_dir, args.deadline / 4 if slow else None)
        actions = [Action("sigterm" if e.kind == "sigterm" else "sigkill" if e.kind == "sigkill" else "kill",
                          max(e.step, s0), e.role) for e in timed]
        if rearm_at is not None and not timed:  # not in the schedule: stop the launch to arm the next fault afresh
            actions.append(Action("sigterm", rearm_at))
        for e, _ in armed:
            e.launches.append(index)
        print(f"launch {index}: from step {s0}; armed {spec or 'nothing'}"
              f"{'; then ' + ', '.join(f'{a.what} {a.role} at step {a.step}' for a in actions) if actions else ''}",
              flush=True)
        result = launch(run_dir, overrides, env, chaos_dir / f"launch{index}.log", actions, timeout_s=args.launch_timeout)
        hit = set(fired(spec, faults_dir)) if spec else set()
        for e, n in armed:
            key = f"{e.kind}@{e.role}.{e.point}#{n}"
            if key in hit:
                e.status = "fired"
            elif e.kind == "slow" and result.last_step >= e.step:
                e.status = "fired"
            elif result.rc == 0 or result.last_step > e.step:
                e.status, e.note = "missed", f"armed as #{n} in launch {index}, did not fire"
        for e, action in zip(timed, actions):
            if action.done_at is not None:
                e.status, e.note = "fired", f"at step {action.done_at}"
        step, _ = latest_checkpoint(run_dir)
        for e in skips:  # a NaN skip whose checkpoint was not committed is replayed, so armed again
            if e.status == "fired" and (step or 0) < e.step:
                e.status, e.note = "pending", "its step was replayed"
        recovered = []
        if result.engine_restarts:
            recovered.append(f"{result.engine_restarts} engine restart(s)")
        if result.stage_restarts:
            recovered.append(f"{result.stage_restarts} stage restart(s)")
        if rearm_at is not None and not timed and result.stopped_by_sigterm:
            recovered.append("stopped by this script to re-arm (not a scheduled fault)")
        launches.append(asdict(result) | {"start_step": s0, "armed": spec, "recovered": recovered,
                                          "latest_checkpoint": step})
        print(f"  rc={result.rc} {result.wall_s:.0f}s, last step {result.last_step}"
              f"{', SIGTERM stop after step ' + result.stopped_by_sigterm if result.stopped_by_sigterm else ''}"
              f"{', ' + ', '.join(recovered) if recovered else ''}{'; ' + result.failed[:200] if result.failed else ''}",
              flush=True)
        if result.rc == 0:
            break
        s0 = (step or 0) + 1
    wall = time.monotonic() - start
    chaos_weights = export_weights(run_dir)
    vs_reference = compare_weights(reference["weights"], chaos_weights)
    vs_plain = compare_weights(plain["weights"], chaos_weights)
    rows = metric_rows(run_dir)
    diffs = metric_diffs(reference["rows"], rows)
    finished = bool(launches) and launches[-1]["rc"] == 0
    report = {"steps": args.steps, "seed": args.seed, "code": code_version(), "overrides": overrides,
              "deadline_s": args.deadline, "events": [asdict(e) for e in events], "launches": launches,
              "wall_s": round(wall, 1), "finished": finished, "uninterrupted_wall_s": plain["wall_s"],
              "vs_reference": vs_reference, "vs_plain": vs_plain, "metric_diffs": {str(k): v for k, v in diffs.items()}}
    out_path.write_text(json.dumps(report, indent=1))
    print_long(report)
    print(f"JSON: {out_path.relative_to(ROOT)}")


def how_ended(la: dict) -> str:
    """What ended a launch of the long run, and what it recovered from on the way."""
    parts = list(la["recovered"])
    done = {a["what"]: a for a in la["actions"] if a.get("done_at") is not None}
    if la["failed"] and (la["rc"] not in (0, None, -9) or "sigkill" not in done):
        parts.append(la["failed"][:120])
    if la["stopped_by_sigterm"]:
        parts.append(f"SIGTERM: checkpoint at step {la['stopped_by_sigterm']}, exit 143")
    elif "sigkill" in done:
        parts.append(f"driver SIGKILLed at step {done['sigkill']['done_at']}")
    elif la["rc"] == CRASH_EXIT_CODE:
        parts.append(f"the injected crash (exit {CRASH_EXIT_CODE})")
    elif la["rc"] not in (0, None) and not la["failed"]:
        parts.append(f"exit {la['rc']} with no FAILED line: Ray ended the driver when its node's raylet died")
    elif la["rc"] is None:
        parts.append("killed by this script after --launch-timeout")
    return "; ".join(parts) or "finished"


def print_long(report: dict) -> None:
    events = [Event(**e) for e in report["events"]]
    launches = report["launches"]
    print(f"\n== Chaos run: schedule (seed {report['seed']}) ==\n")
    print("| step | fault | status | launches armed in | note |\n|---|---|---|---|---|")
    for e in events:
        print(f"| {e.step} | `{e.label()}` | {e.status} | {','.join(map(str, e.launches)) or '—'} | {e.note} |")
    print("\n| launch | from step | rc | wall s | last step | how it ended / recovered |\n|---|---|---|---|---|---|")
    for i, la in enumerate(launches, 1):
        print(f"| {i} | {la['start_step']} | {la['rc']} | {la['wall_s']:.0f} | {la['last_step']} | {how_ended(la)} |")
    skips = sum(e.skips for e in events)
    ref, plain = report["vs_reference"], report["vs_plain"]
    print(f"\nfinished: {report['finished']} after {len(launches)} launches, {report['wall_s'] / 60:.1f} min "
          f"(uninterrupted: {report['uninterrupted_wall_s']:.0f} s)")
    print(f"final weights vs the uninterrupted run with the same {skips} NaN skip(s): "
          f"{'bit-identical' if ref['identical'] else 'DIFFER, max |Δ| ' + str(ref['max_abs_diff'])}")
    print(f"final weights vs the plain uninterrupted run: "
          f"{'bit-identical' if plain['identical'] else 'differ by the skipped updates, max |Δ| %.3g' % plain['max_abs_diff']}")
    diffs = report["metric_diffs"]
    print(f"per-step metrics (non-timing) equal to the reference run's: {not diffs}"
          f"{'' if not diffs else ' — differ at steps ' + str(sorted(diffs, key=int)[:10])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--matrix", action="store_true", help="every cell: fault kind × point × role")
    mode.add_argument("--long", action="store_true", help="one seeded schedule of random faults over --steps steps")
    mode.add_argument("--print-long", action="store_true", help="print the last long run's tables (runs/chaos_long.json)")
    parser.add_argument("--cells", help="matrix: only cells whose id matches one of these fnmatch patterns ('a*|b*')")
    parser.add_argument("--resume-results", action="store_true", help="matrix: skip cells already in runs/chaos_matrix.json")
    parser.add_argument("--rerun", action="store_true", help="matrix: with --resume-results, run the --cells again")
    parser.add_argument("--steps", type=int, default=120, help="long: training steps")
    parser.add_argument("--seed", type=int, default=0, help="long: seed of the schedule")
    parser.add_argument("--events", type=int, default=0, help="long: faults in the schedule (default steps / 6)")
    parser.add_argument("--cluster", help="long: a multi-node Ray address, to kill worker nodes rather than the head "
                        "(not implemented: node loss on several nodes is tests/integration/test_multinode.py's)")
    parser.add_argument("--deadline", type=float, default=30.0, help="trainer.timeout_s: how long a hang lasts")
    parser.add_argument("--max-restarts", type=int, default=3, help="matrix: launches after the first (job retries)")
    parser.add_argument("--max-launches", type=int, default=40, help="long: launches at most")
    parser.add_argument("--launch-timeout", type=float, default=900.0, help="seconds before a launch is killed")
    args = parser.parse_args()
    if args.cluster:
        raise SystemExit("--cluster is not implemented: worker-node loss is tested in tests/integration/test_multinode.py; "
                         "this script's node kills take the head of its one-machine cluster")
    if args.print_long:
        print_long(json.loads((ROOT / "runs" / "chaos_long.json").read_text()))
        return
    run_matrix(args) if args.matrix else run_long(args)


if __name__ == "__main__":
    main()
