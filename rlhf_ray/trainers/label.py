"""AI preference labelling, RLAIF (stage `label`; Lee et al. 2023, Bai et al. 2022 §4; seed notes
003 §6.1–6.2): pairs of the policy's own samples, labelled by an LLM judge or a scorer.

1. **prompts**: `label.num_prompts` prompts of data.train, drawn with trainer.seed.
2. **sample**: 2 × `label.pairs_per_prompt` responses per prompt from the policy on the rollout
   engines (rollout sampling settings, seeded); samples 1 and 2 form a pair, 3 and 4, ….
   A pair with an empty response or two identical responses is dropped before labelling.
3. **label**: `label.labeler` in a `LabelWorker`: a judge is asked in both orders, A/B and B/A;
   a scorer scores both (`rlhf_ray.rewards.labeling`: unparseable replies, disagreeing orders,
   ties — each dropped pair counted by reason; agreement and first-position rates).
4. **write** into the run directory: `pairs.jsonl` (`prompt`, `chosen`, `rejected`, `score`:
   the chosen response's share of the verdicts, or its score margin), the loaders' preference
   format; `judgements.jsonl` (every pair: responses, per-order verdicts, the rendered judge
   prompts and replies, or the two scores; the decision); `report.json`.

With data.eval set, the policy is also evaluated on held-out prompts with reward.sources
(`eval/*`), on the same engines. A sample that hit rollout.max_new_tokens without EOS is kept:
the pair format has no "truncated" flag, so it is trained on as if it ended there.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from rlhf_ray.config import RunConfig
from rlhf_ray.data import PromptExample
from rlhf_ray.data.feedback import write_jsonl
from rlhf_ray.metrics import summary_table
from rlhf_ray.models import load_tokenizer
from rlhf_ray.rollout.base import probe_tokens
from rlhf_ray.rewards.labeling import Decision, LabelRules, PairJudgement, decide, summarise
from rlhf_ray.trainers.common import prepare_run
from rlhf_ray.trainers.sampling import (
    SamplingSession, decode_responses, draw, generation_seed, labeler_path, load_prompt_examples, sampling_params)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """Two samples of one prompt, to be labelled."""

    prompt: PromptExample
    response_a: str
    response_b: str
    stopped_a: bool  # the response ended with EOS (a scorer reads it, as the RM reads `stopped`)
    stopped_b: bool


def candidate_pairs(prompts: list[PromptExample], texts: list[str], stopped: list[bool],
                    per_prompt: int) -> tuple[list[Candidate], dict[str, int]]:
    """Samples (per_prompt contiguous per prompt) → pairs (1st, 2nd), (3rd, 4th), …; empty or identical dropped."""
    pairs, dropped = [], {"empty_response": 0, "identical": 0}
    for i, prompt in enumerate(prompts):
        for j in range(i * per_prompt, (i + 1) * per_prompt, 2):
            a, b = texts[j], texts[j + 1]
            if not a.strip() or not b.strip():
                dropped["empty_response"] += 1
            elif a == b:
                dropped["identical"] += 1
            else:
                pairs.append(Candidate(prompt, a, b, stopped[j], stopped[j + 1]))
    return pairs, {k: v for k, v in dropped.items() if v}


def label_rules(cfg: RunConfig) -> LabelRules:
    judge = cfg.label.labeler.judge
    return LabelRules(judge.on_unparseable if judge else "error", cfg.label.on_disagreement, cfg.label.min_score_gap)


def label_pairs(session: SamplingSession, cfg: RunConfig, prompts: list[str], responses_a: list[str],
                responses_b: list[str], stopped_a: list[bool], stopped_b: list[bool]) -> tuple[list[PairJudgement], list[Decision]]:
    """Ask the labeller about every pair; → (judgements, decisions)."""
    if not prompts:
        return [], []
    judgements = session.label(prompts, responses_a, responses_b, [{"stopped": s} for s in stopped_a],
                               [{"stopped": s} for s in stopped_b])
    rules, name = label_rules(cfg), cfg.label.labeler.name or cfg.label.labeler.kind
    return judgements, [decide(j, rules, i, name) for i, j in enumerate(judgements)]


def pair_row(prompt: Any, a: str, b: str, decision: Decision, source: str) -> dict[str, Any]:
    """A preference row: the winner chosen; `score`: its share of the verdicts (judge) or score margin (scorer)."""
    chosen, rejected = (a, b) if decision.choice == "A" else (b, a)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "score": decision.strength, "source": source}


def judgement_row(candidate: Candidate, judgement: PairJudgement, decision: Decision) -> dict[str, Any]:
    return {"prompt": candidate.prompt.prompt, "response_a": candidate.response_a, "response_b": candidate.response_b,
            **{k: v for k, v in dataclasses.asdict(judgement).items() if v not in ((), None)},
            "choice": decision.choice, "decision": decision.reason}


def run_label(cfg: RunConfig) -> dict[str, Any]:
    """Sample pairs from the policy, label them, write the preference pairs; always release the actors."""
    start, inputs = time.perf_counter(), prepare_run(cfg)
    tokenizer = load_tokenizer(inputs.models.tokenizer, cfg.model.trust_remote_code)
    prompts = draw(load_prompt_examples(cfg, tokenizer, inputs.train, cfg.data.split), cfg.label.num_prompts,
                   cfg.trainer.seed)
    held_out = load_prompt_examples(cfg, tokenizer, inputs.eval, cfg.data.eval_split)[: cfg.trainer.eval_prompts]
    session = SamplingSession(cfg, inputs.models, labeler=True, labeler_path=labeler_path(cfg),
                              reward_paths=inputs.reward_paths if held_out else None)
    try:
        evaluation = session.evaluate(held_out, tokenizer.pad_token_id) if held_out else {}
        n = 2 * cfg.label.pairs_per_prompt
        samples = session.generate([p.prompt_ids for p in prompts], sampling_params(cfg, n), generation_seed(cfg, 1),
                                   "sample", tokenizer.pad_token_id)
        candidates, skipped = candidate_pairs(prompts, decode_responses(tokenizer, samples), samples.stopped.tolist(), n)
        judgements, decisions = label_pairs(session, cfg, [c.prompt.prompt_text for c in candidates],
                                            [c.response_a for c in candidates], [c.response_b for c in candidates],
                                            [c.stopped_a for c in candidates], [c.stopped_b for c in candidates])
        probe = session.probe_logprobs(probe_tokens(len(tokenizer)))
    finally:
        session.close()
    rows = [pair_row(c.prompt.prompt, c.response_a, c.response_b, d, "label")
            for c, d in zip(candidates, decisions) if d.choice is not None]
    report = {"prompts": len(prompts), "samples": samples.batch_size, "skipped_before_labelling": skipped,
              **summarise(judgements, decisions), "eval": evaluation,
              "policy": inputs.models.policy, "policy_probe_logprob": probe[0], "seconds": time.perf_counter() - start}
    return _write(cfg, rows, [judgement_row(c, j, d) for c, j, d in zip(candidates, judgements, decisions)], report)


def _write(cfg: RunConfig, rows: list[dict], judged: list[dict], report: dict[str, Any]) -> dict[str, Any]:
    run_dir = cfg.run_dir
    (run_dir / "pairs.jsonl").unlink(missing_ok=True)  # never leave an earlier run's pairs behind
    report["pairs_file"] = write_jsonl(run_dir / "pairs.jsonl", rows) if rows else None
    write_jsonl(run_dir / "judgements.jsonl", judged)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if not rows:
        print(f"label: no pair kept (see {run_dir / 'judgements.jsonl'}); no pairs.jsonl written", flush=True)
    table = [("prompts / samples", f"{report['prompts']} / {report['samples']}"),
             ("pairs labelled / kept", f"{report['pairs']} / {report['kept']}"),
             ("dropped before labelling", report["skipped_before_labelling"] or None),
             ("dropped after labelling", report["dropped"] or None),
             ("judge agreement across orders", report["agreement"]),
             ("judge first-position rate", report["first_position_rate"]),
             *[(f"eval {k.removeprefix('eval/')} (policy)", v) for k, v in report["eval"].items()],
             ("pairs", report["pairs_file"]), ("run directory", str(run_dir))]
    print(summary_table([(k, v) for k, v in table if v is not None], title="== Label summary (RLAIF) =="), flush=True)
    return report
