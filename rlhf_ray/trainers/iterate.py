"""Iterative rounds (stage `iterate`): sample from the current policy → label → train → evaluate, R
times — iterative ("online") DPO, or RM + PPO per round (seed notes 003 §6.4; Xiong et al. 2024,
Bai et al. 2022 "iterated online RLHF").

Round r runs in <run_dir>/round_<r>, each stage in its own directory with the config that
`config.iterate_stage_configs` builds (this config's sections, `iterate.<stage>` overrides, then
the wiring), on the same Ray session:
1. **sample + label**: stage `label` (the policy's samples labelled by a judge or a scorer) or
   `cai` (revision ≻ draft) → round_<r>/<label|cai>/pairs.jsonl. On the same engines, the policy
   the round starts from is evaluated on held-out prompts with reward.sources (data.eval).
2. **train**: DPO on the pairs from that policy (its reference: model.reference, default the round's
   starting policy), or a reward model on the pairs (from the previous round's RM; round 1 from
   rm.init) and PPO against it → round_<r>/dpo/export/policy or round_<r>/ppo/export/policy.
3. **record**: round_<r>/round.json, written atomically last, marks the round finished. The next
   round starts from this round's exported policy.
After the last round the final policy is evaluated the same way (evaluation.json), so every
policy of the chain is evaluated once, with the same prompts and seed.

Resume: rerunning the same command skips every finished round (its round.json names the policy it
started from; a mismatch is refused) and reruns an unfinished one from its start.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from rlhf_ray.config import RunConfig, iterate_paths, iterate_stage_configs
from rlhf_ray.metrics import summary_table
from rlhf_ray.models import load_tokenizer
from rlhf_ray.trainers.common import RunInputs, prepare_run
from rlhf_ray.trainers.sampling import SamplingSession, load_prompt_examples, with_policy


@dataclasses.dataclass(frozen=True)
class RoundRecord:
    """A finished round (round.json)."""

    round: int
    policy_in: str  # the policy it sampled from and trained
    policy_out: str  # its exported policy: the next round's start
    reward_model: str | None  # rm_ppo: its exported reward model
    pairs: str  # the preference pairs it trained on
    pairs_kept: int
    agreement: float | None  # the judge's agreement across orders (stage label with a judge)
    eval_policy_in: dict[str, float]  # evaluation of policy_in
    policy_in_sha256: str  # of policy_in's weights file(s): which weights the round started from
    train: dict[str, Any]  # the trainer's first/last loss (dpo) or RM accuracy and PPO reward (rm_ppo)
    seconds: float


def run_iterate(cfg: RunConfig) -> dict[str, Any]:
    inputs = prepare_run(cfg)  # 'toy' models and data built once, shared by every round
    policy, reward_model, records = inputs.models.policy, None, []
    for r in range(1, cfg.iterate.rounds + 1):
        record = finished_round(cfg, r, policy)
        if record is None:
            print(f"== iterate: round {r}/{cfg.iterate.rounds} from {policy} ==", flush=True)
            record = run_round(cfg, inputs, r, policy, reward_model)
        else:
            print(f"== iterate: round {r} finished before ({iterate_paths(cfg, r)['dir']}/round.json); skipped ==",
                  flush=True)
        records.append(record)
        policy, reward_model = record.policy_out, record.reward_model
    final = evaluate_policy(cfg, inputs, policy)
    (cfg.run_dir / "evaluation.json").write_text(json.dumps({"policy": policy, "eval": final}, indent=2) + "\n")
    print(summary_table(summary_rows(records, final, policy), title=_title(cfg)), flush=True)
    return {"rounds": records, "final_policy": policy, "final_eval": final}


def run_round(cfg: RunConfig, inputs: RunInputs, r: int, policy: str, reward_model: str | None) -> RoundRecord:
    from rlhf_ray.trainers.cai import run_cai
    from rlhf_ray.trainers.dpo import run_dpo
    from rlhf_ray.trainers.label import run_label
    from rlhf_ray.trainers.ppo import run_ppo
    from rlhf_ray.trainers.rm import run_rm

    start, paths = time.perf_counter(), iterate_paths(cfg, r)
    stages = iterate_stage_configs(cfg, r, policy, reward_model, (inputs.train, inputs.eval))
    made = run_label(stages["label"]) if "label" in stages else run_cai(stages["cai"])
    if made["pairs_file"] != paths["pairs"]:
        raise RuntimeError(f"round {r}: the {cfg.iterate.feedback} stage kept no preference pair (see "
                           f"{stages[cfg.iterate.feedback].run_dir}/report.json); nothing to train on")
    if cfg.iterate.train == "dpo":
        dpo = run_dpo(stages["dpo"])
        train = {"dpo/first_loss": dpo["first_loss"], "dpo/last_loss": dpo["last_loss"]}
    else:
        rm, ppo = run_rm(stages["rm"]), run_ppo(stages["ppo"])
        train = {"rm/last_loss": rm["last_loss"], "ppo/first_reward": ppo["first_reward"],
                 "ppo/last_reward": ppo["last_reward"]}
    record = RoundRecord(r, policy, paths["policy"], paths["reward"], paths["pairs"],
                         made.get("kept", made.get("pair_rows", 0)), made.get("agreement"), made["eval"],
                         weights_sha256(policy), train, time.perf_counter() - start)
    _write_atomically(Path(paths["dir"]) / "round.json", json.dumps(dataclasses.asdict(record), indent=2) + "\n")
    return record


def finished_round(cfg: RunConfig, r: int, policy: str) -> RoundRecord | None:
    """Round r's record when it finished from `policy`; None when it has not finished."""
    path = Path(iterate_paths(cfg, r)["dir"]) / "round.json"
    if not path.exists():
        return None
    record = RoundRecord(**json.loads(path.read_text()))
    if record.policy_in != policy:
        raise RuntimeError(f"{path} records round {r} as started from {record.policy_in}, but this run's round {r} "
                           f"starts from {policy}; use another trainer.name (or delete {path.parent}) to start over")
    return record


def evaluate_policy(cfg: RunConfig, inputs: RunInputs, policy: str) -> dict[str, float]:
    """The policy on the held-out prompts with reward.sources: its own engines and scorer, then released."""
    if inputs.eval is None:
        return {}
    tokenizer = load_tokenizer(inputs.models.tokenizer, cfg.model.trust_remote_code)
    held_out = load_prompt_examples(cfg, tokenizer, inputs.eval, cfg.data.eval_split)[: cfg.trainer.eval_prompts]
    session = SamplingSession(cfg, with_policy(inputs.models, policy), reward_paths=inputs.reward_paths)
    try:
        return session.evaluate(held_out, tokenizer.pad_token_id)
    finally:
        session.close()


def weights_sha256(model_dir: str) -> str:
    """sha256 over the model's *.safetensors files, in name order (which weights a round started from)."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _title(cfg: RunConfig) -> str:
    train = "DPO" if cfg.iterate.train == "dpo" else "RM + PPO"
    rounds = f"{cfg.iterate.rounds} round{'s' if cfg.iterate.rounds > 1 else ''}"
    return f"== Iterate summary: {rounds} of {cfg.iterate.feedback} → {train} =="


def summary_rows(records: list[RoundRecord], final: dict[str, float], policy: str) -> list[tuple[str, Any]]:
    """Per round: pairs, judge agreement, the starting policy's evaluation; then the final policy's."""
    rows: list[tuple[str, Any]] = []
    for rec in records:
        rows += [(f"round {rec.round}: pairs trained on", rec.pairs_kept),
                 (f"round {rec.round}: judge agreement across orders", rec.agreement),
                 *[(f"round {rec.round}: eval {k.removeprefix('eval/')} of its start policy", v)
                   for k, v in rec.eval_policy_in.items() if k != "eval/length_mean"],
                 (f"round {rec.round}: seconds", rec.seconds)]
    rows += [(f"final policy: eval {k.removeprefix('eval/')}", v) for k, v in final.items() if k != "eval/length_mean"]
    rows.append(("final policy", policy))
    return [(k, v) for k, v in rows if v is not None]
