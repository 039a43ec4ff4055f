"""Entry point: load YAML + `a.b.c=value` overrides → validate → pre-flight (every path, hub id and reward
function resolved; `rlhf_ray.preflight`) → join or start Ray → run the stage.

    python launch.py                                     # the toy SFT → RM → PPO pipeline on local Ray (CPU)
    python launch.py --config configs/toy_ppo.yaml trainer.total_steps=5
    python launch.py --config configs/toy_sft.yaml       # one stage alone: toy_{sft,rm,dpo,ppo}.yaml
    python launch.py --config configs/toy_iterate.yaml   # data stages: toy_{feedback,cai,label}.yaml; rounds: toy_iterate.yaml
    python launch.py --config configs/toy_eval.yaml      # judge finished policies and a reward model; gate
    python launch.py --config configs/toy_ppo.yaml --print-config
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python launch.py --config ...

With `RAY_ADDRESS` set (as under `ray job submit`) it joins that cluster; otherwise it starts a
local Ray bound to 127.0.0.1 (Ray's job API has no authentication by default).

Exit codes: 0 done; 1 a phase failed (one line naming phase, role, step and cause); 2 a config or
pre-flight error (before any actor starts); 3 stage eval ran and wrote its outputs, but checks of
eval.gate failed (each printed as `gate: <message>`); 128 + SIGTERM (143) stopped by a signal.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import signal
import sys
import threading
import time

from pathlib import Path

from rlhf_ray.config import (
    OFFLINE_ROLE, ConfigError, RunConfig, dump_config, iterate_stage_configs, load_config, pipeline_stage_configs)
from rlhf_ray.preflight import preflight_problems

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "toy_pipeline.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="rlhf_ray: distributed RLHF on Ray + DeepSpeed")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="YAML file of overrides (see configs/); default: configs/toy_pipeline.yaml, the toy SFT → RM → PPO demo")
    parser.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides, applied last")
    return parser.parse_args(argv)


def required_cpus(cfg: RunConfig) -> float:
    """Ray CPUs the stage needs at once: its actors, and the Ray Serve replicas of the reward sources it starts."""
    served = sum(s.serve.replica_cpus * s.serve.num_replicas for s in cfg.reward.sources
                 if s.kind == "serve" and not s.serve.connect)
    return served + _actor_cpus(cfg)


def _actor_cpus(cfg: RunConfig) -> float:
    if cfg.stage == "pipeline":
        return max(required_cpus(stage_cfg) for stage_cfg in pipeline_stage_configs(cfg).values())
    if cfg.stage == "iterate":  # the final evaluation (engines + scorer) needs no more than a round's label stage
        return max(required_cpus(stage_cfg) for stage_cfg in iterate_stage_configs(cfg, 1, cfg.model.policy).values())
    if cfg.stage == "feedback":  # the driver alone
        return 0.0
    if cfg.stage == "eval":  # one policy's engines at a time, and the reward-side actor scoring (and judging)
        return cfg.placement.rollout.cpus * cfg.rollout.num_engines + cfg.placement.reward.cpus
    if cfg.stage in ("cai", "label"):  # engines, and one reward-side actor to label and/or evaluate
        p = cfg.placement
        reward_side = cfg.stage == "label" or cfg.cai.pairs == "judge" or cfg.data.eval is not None
        return p.rollout.cpus * cfg.rollout.num_engines + p.reward.cpus * reward_side
    if cfg.stage in OFFLINE_ROLE:  # one group of data-parallel ranks
        ranks = getattr(cfg.placement, OFFLINE_ROLE[cfg.stage])
        return ranks.cpus * ranks.num_workers
    p = cfg.placement
    roles = ([p.policy] + ([p.reference] if cfg.reference_host == "reference" else []) + ([] if cfg.reward_in_driver else [p.reward])
             + ([p.critic] if cfg.uses_critic else []))  # hosted roles take no Ray CPUs
    return sum(r.cpus * r.num_workers for r in roles) + p.rollout.cpus * cfg.rollout.num_engines


LOOPBACK = ("127.", "localhost", "::1", "[::1]")


def check_ray_address(address: str) -> None:
    """Refuse a remote cluster over an unauthenticated client channel (`ray://` or `http://`): Ray's
    APIs have no authentication by default. Token auth (RAY_AUTH_MODE=token) or ALLOW_INSECURE_RAY=1
    lifts it. Addresses without a scheme (as set inside `ray job submit` jobs) are the cluster's own."""
    scheme, sep, rest = address.partition("://")
    host = rest.split("/")[0].rsplit(":", 1)[0] if sep else ""
    if scheme in ("ray", "http") and not host.startswith(LOOPBACK) and os.environ.get("RAY_AUTH_MODE") != "token" \
            and os.environ.get("ALLOW_INSECURE_RAY") != "1":
        raise SystemExit(f"refusing RAY_ADDRESS={address}: plain {scheme}:// to a non-loopback host without Ray token "
                         f"auth. Use an SSH tunnel to 127.0.0.1, set RAY_AUTH_MODE=token, or ALLOW_INSECURE_RAY=1.")


# Ray prestarts idle Python workers at init; our actors start their own anyway, so on a small
# machine the prestarted ones only take CPU from the start-up path (measured: docs/performance.md).
NO_PRESTART = {"enable_worker_prestart": False, "prestart_worker_first_driver": False}


def init_ray(cfg: RunConfig) -> None:
    """Join RAY_ADDRESS when set; else a local Ray on 127.0.0.1, sized so the config's actors fit.

    Locally the actors time-share the machine's cores: logical CPUs = max(cores, what the roles ask).
    """
    import ray

    from rlhf_ray.placement import QUIET_ENV, RoleSpec, export_worker_env

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if os.environ.get("RAY_ADDRESS"):
        check_ray_address(os.environ["RAY_ADDRESS"])
        ray.init(log_to_driver=True)
        return
    cpus = max(os.cpu_count() or 1, math.ceil(required_cpus(cfg)))
    export_worker_env(RoleSpec("worker", 1, 1.0, 0.0, cfg.placement.torch_threads))  # what CPU actors need
    resources, labels = local_node_placement(cfg)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True,
             _system_config=NO_PRESTART, resources=resources or None, labels=labels or None)


def local_node_placement(cfg: RunConfig) -> tuple[dict[str, float], dict[str, str]]:
    """The custom resources and node labels `placement.<role>` asks for, which a local one-node Ray gets
    so a multi-node config runs on one machine (resources: as much as every actor asks together;
    labels: each key's value, when the roles agree on it)."""
    from rlhf_ray.config import ROLES

    resources: dict[str, float] = {}
    labels: dict[str, set[str]] = {}
    for role in ROLES:
        res = getattr(cfg.placement, role)
        count = cfg.rollout.num_engines if role == "rollout" else res.num_workers
        for name, amount in res.resources.items():
            resources[name] = resources.get(name, 0.0) + amount * count
        for key, value in res.labels.items():
            labels.setdefault(key, set()).add(value)
    return resources, {key: values.pop() for key, values in labels.items() if len(values) == 1}


def preload(stage: str) -> threading.Thread:
    """Import the stage's modules (torch, transformers, datasets: seconds of CPU) on a thread while
    Ray starts: both are on the path to the first step, and ray.init mostly waits on its daemons.
    A failing import is left for `run` to raise."""
    module = f"rlhf_ray.trainers.{stage}"
    thread = threading.Thread(target=lambda: _try_import(module), name="preload", daemon=True)
    thread.start()
    return thread


def _try_import(module: str) -> None:
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - run() imports it again and reports the error
        pass


def run(cfg: RunConfig) -> dict:
    from rlhf_ray.trainers.cai import run_cai
    from rlhf_ray.trainers.dpo import run_dpo
    from rlhf_ray.trainers.eval import run_eval
    from rlhf_ray.trainers.feedback import run_feedback
    from rlhf_ray.trainers.iterate import run_iterate
    from rlhf_ray.trainers.label import run_label
    from rlhf_ray.trainers.pipeline import run_pipeline
    from rlhf_ray.trainers.ppo import run_ppo
    from rlhf_ray.trainers.rm import run_rm
    from rlhf_ray.trainers.sft import run_sft

    stages = {"ppo": run_ppo, "sft": run_sft, "rm": run_rm, "dpo": run_dpo, "pipeline": run_pipeline,
              "feedback": run_feedback, "cai": run_cai, "label": run_label, "iterate": run_iterate,
              "eval": run_eval}
    return stages[cfg.stage](cfg)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    problems = preflight_problems(cfg)  # every model, dataset and reward function resolved before Ray starts
    if problems:
        print("\n".join(f"preflight: {problem}" for problem in problems), file=sys.stderr)
        return 2
    loading = preload(cfg.stage)
    from rlhf_ray.placement import PhaseError
    from rlhf_ray.trainers.checkpointing import StopRequested, install_stop_handler

    if os.environ.get("RLHF_RAY_FAULTS"):  # injected faults fire once per run: markers live with the run
        os.environ.setdefault("RLHF_RAY_FAULTS_DIR", str(cfg.run_dir / ".faults"))
    start = time.perf_counter()
    if cfg.stage != "feedback":  # feedback ingestion runs on the driver alone
        init_ray(cfg)
    loading.join()
    from rlhf_ray.trainers.eval import GATE_EXIT_CODE, GateFailed  # after the preload: the stack is imported by now
    install_stop_handler()  # after ray.init, which installs a SIGTERM handler of its own
    try:
        run(cfg)
    except StopRequested as stop:
        print(stop, file=sys.stderr, flush=True)
        return 128 + signal.SIGTERM
    except PhaseError as err:  # the one line naming phase, role, step and cause
        print(err, file=sys.stderr, flush=True)
        return 1
    except GateFailed as failed:  # the outputs are written; the `gate: …` lines are printed
        print(failed, file=sys.stderr, flush=True)
        return GATE_EXIT_CODE
    except ConfigError as err:  # found while preparing inputs (e.g. a model's head size), before any actor
        print(f"config error: {err}", file=sys.stderr, flush=True)
        return 2
    except Exception as err:
        print(f"FAILED {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        raise
    write_report(cfg)
    print(f"done in {time.perf_counter() - start:.1f}s", flush=True)
    return 0


def write_report(cfg: RunConfig) -> None:
    """The run's self-contained HTML report (`rlhf_ray.report`) beside its metrics; a stage without
    metrics.jsonl (pipeline, iterate: their stages have their own) gets none; stage eval writes its own
    (with samples and bars)."""
    if cfg.stage == "eval" or not (cfg.run_dir / "metrics.jsonl").exists():
        return
    from rlhf_ray.report import write_report as write

    print(f"report: {write(cfg.run_dir)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
