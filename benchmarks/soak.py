"""Soak: a long toy RL run with evaluation and checkpoints every N steps, watched from outside for leaks.

    python benchmarks/soak.py                          # 1,000 steps of toy PPO, eval + checkpoint every 50 steps
    python benchmarks/soak.py --steps 60 --every 20    # a quick look

The run is the production path (`run_ppo` on a local Ray of its own) with every role in its own actor:
policy, critic (GAE), reference (`placement.reference_in_policy=false`), reward
(`placement.reward_in_driver=false`) and a vLLM rollout engine (HF where vLLM is not installed). The
trainer is not touched: a thread of this driver reads the step from the run's metrics.jsonl and, once
every `--sample-every` steps (half-way between multiples, so away from the evaluations and checkpoints
at multiples of `--every`), records for the driver, every live actor (found in Ray's GCS actor table by
class and pid, children included), the raylet and the GCS server: RSS, PSS, USS, open file
descriptors and threads; and the number of live placement groups and of checkpoint directories on disk.

Per process it fits RSS against the step by least squares, over the samples after the warm-up (the
first `--warmup` share of steps) and over the second half of the run, and reports the slopes in MiB
per 100 steps with their standard errors. A process "grows" when its second-half slope is above
1 MiB per 100 steps (10 MiB over 1,000 steps: about one toy batch's tensors, ~10 KiB, kept per step)
and its growth over that half is above 1% of its RSS: a leak grows at the same rate all along, while
allocator pools and caches that fill up flatten out. After the run (and a garbage collection) it counts
the placement groups, actors, fds and threads left. Not a test: it reports and asserts nothing; the
table is printed, the samples and fits go to runs/soak.json (exit 1 when the run itself failed).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 1 << 20
ROLE_OF_CLASS = {"PolicyWorker": "policy", "CriticWorker": "critic", "ReferenceWorker": "reference",
                 "RewardWorker": "reward", "RolloutWorker": "rollout"}
RAY_DAEMONS = ("raylet", "gcs_server")
GROWTH_MIB_PER_100 = 1.0  # a process "grows" above this slope …
GROWTH_SHARE = 0.01  # … and when the growth over the fitted span exceeds this share of its RSS


def run_overrides(args, out_dir: str) -> list[str]:
    """The soak run: every role its own actor, evaluation and checkpoints every `--every` steps."""
    return [f"trainer.output_dir={out_dir}", "trainer.name=soak", f"trainer.total_steps={args.steps}",
            f"trainer.eval_every={args.every}", f"checkpoint.every={args.every}", f"checkpoint.keep_last={args.keep_last}",
            "placement.reference_in_policy=false", "placement.reward_in_driver=false",
            "logging.progress_bar=false", f"logging.log_every={args.every}", *args.overrides]


# ---------------------------------------------------------------------------------------------
# What one sample reads: processes, placement groups, checkpoints
# ---------------------------------------------------------------------------------------------


def process_stats(proc) -> dict[str, float]:
    """RSS, PSS, USS (MiB), open fds and threads of one process; its peak RSS (VmHWM) too."""
    mem = proc.memory_full_info()
    with open(f"/proc/{proc.pid}/status") as f:
        hwm = next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:")), float("nan"))
    return {"pid": proc.pid, "rss": mem.rss / MIB, "pss": getattr(mem, "pss", float("nan")) / MIB,
            "uss": mem.uss / MIB, "peak_rss": hwm, "fds": proc.num_fds(), "threads": proc.num_threads()}


def live_actors() -> list[dict]:
    """The run's live actors from the GCS actor table (no dashboard needed): class name, pid, id."""
    import ray

    table = ray._private.state.actors()
    return [{"id": actor_id, "cls": a["ActorClassName"], "pid": a["Pid"]}
            for actor_id, a in sorted(table.items()) if a["State"] != "DEAD"]


def live_placement_groups() -> int:
    import ray

    return sum(pg["state"] != "REMOVED" for pg in ray.util.placement_group_table().values())


def watched_processes() -> dict[str, object]:
    """{label: psutil.Process}: the driver, each live actor (role, rank by actor id; its children as
    `<role>/<child name>`), the raylet and the GCS server."""
    import psutil

    me = psutil.Process()
    procs: dict[str, object] = {"driver": me}
    seen: dict[str, int] = {}
    for actor in live_actors():
        if not actor["pid"]:
            continue  # not started yet
        role = ROLE_OF_CLASS.get(actor["cls"], actor["cls"])
        rank = seen[role] = seen.get(role, -1) + 1
        label = role if rank == 0 else f"{role}[{rank}]"
        try:
            proc = psutil.Process(actor["pid"])
            procs[label] = proc
            for child in proc.children(recursive=True):
                procs[f"{label}/{child.name()}"] = child
        except psutil.NoSuchProcess:
            continue
    for child in me.children(recursive=True):
        if child.name() in RAY_DAEMONS:
            procs[f"ray:{child.name()}"] = child
    return procs


def checkpoint_dirs(run_dir: Path) -> tuple[int, int]:
    """(committed step_N directories, in-progress or left-over temporary ones) under the run's checkpoints."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return 0, 0
    names = [p.name for p in root.iterdir() if p.is_dir()]
    return sum(n.startswith("step_") for n in names), sum(n.startswith(".") for n in names)


def take_sample(step: int, run_dir: Path, t0: float) -> dict:
    import psutil

    procs = {}
    for label, proc in watched_processes().items():
        try:
            procs[label] = process_stats(proc)
        except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
            pass
    steps_dirs, tmp_dirs = checkpoint_dirs(run_dir)
    return {"step": step, "t": time.perf_counter() - t0, "placement_groups": live_placement_groups(),
            "checkpoints": steps_dirs, "checkpoint_tmp": tmp_dirs, "procs": procs}


class Sampler(threading.Thread):
    """Reads the latest step from metrics.jsonl every `poll_s`; samples at steps every/2, every/2 + every, …"""

    def __init__(self, run_dir: Path, every: int, poll_s: float, t0: float):
        super().__init__(name="soak-sampler", daemon=True)
        self.run_dir, self.every, self.poll_s, self.t0 = run_dir, every, poll_s, t0
        self.samples: list[dict] = []
        self.errors: list[str] = []
        self.done = threading.Event()
        self._offset, self._step = 0, 0

    def latest_step(self) -> int:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return self._step
        with path.open("rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1  # complete lines only
        lines = chunk[:end].splitlines()
        self._offset += end
        if lines:
            self._step = json.loads(lines[-1])["step"]
        return self._step

    def run(self) -> None:
        target = max(1, self.every // 2)
        while not self.done.wait(self.poll_s):
            try:
                step = self.latest_step()
                if step >= target:
                    self.samples.append(take_sample(step, self.run_dir, self.t0))
                    target = (step // self.every) * self.every + max(1, self.every // 2)
                    target += self.every if target <= step else 0
            except Exception as err:  # noqa: BLE001 - a failed sample is reported, the soak goes on
                self.errors.append(f"{type(err).__name__}: {err}")


# ---------------------------------------------------------------------------------------------
# Fits and the report
# ---------------------------------------------------------------------------------------------


def slope_per_100(steps: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of values against step, per 100 steps, and its standard error."""
    if len(steps) < 3 or np.ptp(steps) == 0:
        return float("nan"), float("nan")
    slope, intercept = np.polyfit(steps, values, 1)
    residuals = values - (slope * steps + intercept)
    se = np.sqrt(residuals @ residuals / (len(steps) - 2) / ((steps - steps.mean()) ** 2).sum())
    return float(slope * 100), float(se * 100)


def fit(seen: list[tuple[int, dict]], first_step: float, key: str = "rss") -> tuple[float, float, float]:
    """(slope MiB per 100 steps, its standard error, growth over the window in MiB) of `key` from `first_step` on."""
    window = [(step, p[key]) for step, p in seen if step >= first_step]
    steps, values = np.array([s for s, _ in window], dtype=float), np.array([v for _, v in window])
    slope, se = slope_per_100(steps, values)
    return slope, se, slope / 100 * (np.ptp(steps) if len(steps) else float("nan"))


def summarise(samples: list[dict], warmup_step: float, half_step: float) -> list[dict]:
    """Per watched process: RSS slopes after the warm-up and over the second half, USS slope, first/last
    RSS, peak RSS, fds and threads. It "grows" when it still grows over the second half: a leak grows
    at the same rate all along, while caches and allocator pools that fill up flatten out."""
    labels = list(dict.fromkeys(label for s in samples for label in s["procs"]))
    rows = []
    for label in labels:
        seen = [(s["step"], s["procs"][label]) for s in samples if label in s["procs"]]
        slope, se, _ = fit(seen, warmup_step)
        late, late_se, late_growth = fit(seen, half_step)
        first, last = seen[0][1], seen[-1][1]
        grows = bool(late > GROWTH_MIB_PER_100 and late_growth > GROWTH_SHARE * last["rss"])
        rows.append({"process": label, "pids": sorted({p["pid"] for _, p in seen}), "samples": len(seen),
                     "rss_slope_mib_per_100": slope, "rss_slope_se": se,
                     "rss_slope_second_half": late, "rss_slope_second_half_se": late_se,
                     "uss_slope_mib_per_100": fit(seen, warmup_step, "uss")[0],
                     "pss_slope_mib_per_100": fit(seen, warmup_step, "pss")[0],
                     "rss_first": first["rss"], "rss_last": last["rss"], "rss_max_sampled": max(p["rss"] for _, p in seen),
                     "peak_rss": last["peak_rss"], "uss_last": last["uss"], "fds_first": first["fds"],
                     "fds_last": last["fds"], "fds_max": max(p["fds"] for _, p in seen), "threads_first": first["threads"],
                     "threads_last": last["threads"], "grows": grows})
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = ("| process | RSS slope after warm-up, MiB/100 steps | RSS slope, 2nd half | USS slope after warm-up "
            "| RSS first → last, MiB | peak RSS | fds first → last (max) | threads first → last | grows |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['process']} | {r['rss_slope_mib_per_100']:+.2f} ± {r['rss_slope_se']:.2f} "
                     f"| {r['rss_slope_second_half']:+.2f} ± {r['rss_slope_second_half_se']:.2f} "
                     f"| {r['uss_slope_mib_per_100']:+.2f} | {r['rss_first']:.0f} → {r['rss_last']:.0f} "
                     f"| {r['peak_rss']:.0f} | {r['fds_first']} → {r['fds_last']} ({r['fds_max']}) "
                     f"| {r['threads_first']} → {r['threads_last']} | {'**yes**' if r['grows'] else 'no'} |")
    return "\n".join(lines)


def driver_handles() -> dict[str, list[str]]:
    """The driver's open fds (by target) and Python threads (by name): what a run leaves open shows as the
    difference between before and after."""
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass  # the listing's own fd, closed by now
    return {"fds": sorted(fds), "threads": sorted(t.name for t in threading.enumerate())}


def left_open(before: list[str], after: list[str]) -> list[str]:
    """Entries of `after` not in `before`, counted (a multiset difference)."""
    rest = list(before)
    out = []
    for item in after:
        if item in rest:
            rest.remove(item)
        else:
            out.append(item)
    return out


def wait_until(check, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "toy_ppo.yaml"))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=50, help="trainer.eval_every and checkpoint.every")
    parser.add_argument("--keep-last", type=int, default=2, help="checkpoint.keep_last")
    parser.add_argument("--sample-every", type=int, default=10, help="steps between samples")
    parser.add_argument("--warmup", type=float, default=0.1, help="share of the steps left out of the fits")
    parser.add_argument("--poll-s", type=float, default=0.5, help="how often the sampler reads the step")
    parser.add_argument("--out", default=str(ROOT / "runs" / "soak.json"))
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides of the run")
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.pop("RAY_ADDRESS", None)  # a Ray session of its own: its actors and groups are the run's alone
    import psutil
    import ray

    from launch import init_ray
    from rlhf_ray.config import load_config
    from rlhf_ray.trainers.ppo import run_ppo

    out_dir = tempfile.mkdtemp(prefix="rlhf_ray_soak_")
    cfg = load_config(args.config, run_overrides(args, out_dir))
    t0 = time.perf_counter()
    init_ray(cfg)
    before = {"placement_groups": live_placement_groups(), "actors": len(live_actors()),
              "driver_fds": psutil.Process().num_fds(), "driver_threads": psutil.Process().num_threads()}
    handles_before = driver_handles()
    sampler = Sampler(cfg.run_dir, args.sample_every, args.poll_s, t0)
    sampler.start()
    failure = None
    try:
        run_ppo(cfg)
    except Exception as err:  # noqa: BLE001 - a failed run still reports what was sampled up to the failure
        failure = f"{type(err).__name__}: {err}"
    finally:
        wall = time.perf_counter() - t0
        sampler.done.set()
        sampler.join()
    # what the run left behind, once Ray has had a moment to reap it and Python to collect it
    gc.collect()
    wait_until(lambda: live_placement_groups() <= before["placement_groups"] and len(live_actors()) <= before["actors"], 30)
    after = {"placement_groups": live_placement_groups(), "actors": len(live_actors()),
             "driver_fds": psutil.Process().num_fds(), "driver_threads": psutil.Process().num_threads()}
    handles_after = driver_handles()
    new_handles = {kind: left_open(handles_before[kind], handles_after[kind]) for kind in handles_after}
    checkpoints, tmp_dirs = checkpoint_dirs(cfg.run_dir)
    ray.shutdown()

    samples = sampler.samples
    rows = summarise(samples, args.warmup * args.steps, args.steps / 2)
    metrics = (cfg.run_dir / "metrics.jsonl").read_bytes()
    bytes_per_row = len(metrics) / max(1, metrics.count(b"\n"))
    pgs = [s["placement_groups"] for s in samples]
    result = {
        "args": vars(args), "run_dir": str(cfg.run_dir), "rollout_backend": cfg.rollout_backend, "failure": failure,
        "steps_done": samples[-1]["step"] if samples else 0, "wall_s": wall,
        "seconds_per_step": wall / args.steps, "before": before, "after": after,
        "driver_left_open": new_handles,
        "placement_groups_during": {"min": min(pgs, default=None), "max": max(pgs, default=None)},
        "checkpoints_on_disk_during_max": max((s["checkpoints"] for s in samples), default=None),
        "checkpoints_on_disk_end": checkpoints, "checkpoint_tmp_dirs_end": tmp_dirs,
        "metrics_jsonl_bytes_per_step": bytes_per_row,
        "thresholds": {"mib_per_100_steps": GROWTH_MIB_PER_100, "share_of_rss": GROWTH_SHARE},
        "sampler_errors": sampler.errors, "processes": rows, "samples": samples,
    }
    print(f"\n== soak: {args.steps} steps of {Path(args.config).name} ({cfg.rollout_backend} engine), eval every "
          f"{cfg.trainer.eval_every}, checkpoint every {cfg.checkpoint.every}, keep_last={cfg.checkpoint.keep_last}; "
          f"{len(samples)} samples, fits from step {args.warmup * args.steps:g} and {args.steps / 2:g} ==")
    print(markdown_table(rows))
    if failure:
        print(f"\nTHE RUN FAILED (figures up to the failure): {failure}")
    print(f"\nwall time {wall:.0f} s ({wall / args.steps:.2f} s/step)")
    print(f"placement groups: before {before['placement_groups']}, during {result['placement_groups_during']['min']}"
          f"–{result['placement_groups_during']['max']}, after {after['placement_groups']}")
    print(f"live actors: before {before['actors']}, after {after['actors']}")
    print(f"driver fds: before {before['driver_fds']}, after {after['driver_fds']}; "
          f"threads: before {before['driver_threads']}, after {after['driver_threads']}")
    print(f"left open in the driver after the run: fds {new_handles['fds']}, Python threads {new_handles['threads']}")
    print(f"checkpoints on disk: at most {result['checkpoints_on_disk_during_max']} during, {checkpoints} at the end "
          f"(keep_last={cfg.checkpoint.keep_last}), {tmp_dirs} temporary left")
    print(f"metrics.jsonl: {bytes_per_row:.0f} bytes per step (the driver keeps each row in memory too)")
    if sampler.errors:
        print(f"sampler errors ({len(sampler.errors)}): {sampler.errors[:3]}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
