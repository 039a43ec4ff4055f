"""Constitutional AI, the supervised stage's data (stage `cai`; Bai et al. 2022 §3; seed notes 003 §6.3):
the policy drafts, critiques its draft against a principle of the constitution, and revises it.

1. **draft**: for `cai.num_prompts` prompts of data.train (drawn with trainer.seed) the policy
   samples one response on the rollout engines, from the prompt's own token ids (what SFT and DPO
   will train on). Critique records of `cai.critiques` (a feedback file) join as examples whose
   draft is the record's response.
2. **rounds** k = 1 … `cai.rounds`: each example gets a principle sampled afresh (seeded by
   trainer.seed and k); the policy writes a critique of the current response (at most
   `cai.critique_max_new_tokens` tokens), then a revision, which becomes the current response.
   A given critique stands in for the model's in round 1 (the constitution's `feedback` framing).
   Contexts are the conversations of `rlhf_ray.data.constitution`, rendered with the tokenizer's
   chat template; one that would exceed `cai.max_context_len` drops its example (counted), as
   does an empty draft or revision.
   With `cai.endpoint` set, an OpenAI-compatible model writes the critiques and revisions instead
   (RLAIF distillation from a stronger model): each conversation goes to it as chat messages
   (`OpenAIEndpoint.chat`, greedy, the same token limits; its server applies its own chat
   template). `cai.max_context_len` is then not applied (it is the policy's limit): a conversation
   the server refuses as too long fails the run with the endpoint's error (RewardError naming the
   URL, the model and the HTTP 400), as does any request that fails for good.
3. **outputs** in the run directory: `sft.jsonl` (prompt, final revision), `pairs.jsonl` (final
   revision ≻ draft, or with `cai.pairs=judge` the winner by `label.labeler` asked in both
   orders), `trace.jsonl` (every example: draft, and per round the principle, the rendered
   critique and revision prompts — with `cai.endpoint`, the chat messages sent — and the model's
   replies; dropped examples with their reason), `report.json` (with `cai.endpoint`, its requests,
   tokens and estimated cost under `endpoint`).

Every generation is seeded (rollout.seed, trainer.seed, round, phase). With data.eval set the
policy is also evaluated on held-out prompts (`eval/*`), on the same engines.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from rlhf_ray.config import TOY, RunConfig
from rlhf_ray.data import render_messages
from rlhf_ray.data.constitution import (
    Constitution, Principle, critique_messages, load_constitution, revision_messages, sample_principles)
from rlhf_ray.data.feedback import Critique, read_feedback, write_jsonl
from rlhf_ray.metrics import summary_table
from rlhf_ray.models import load_tokenizer
from rlhf_ray.rewards.endpoint import OpenAIEndpoint
from rlhf_ray.rewards.labeling import summarise
from rlhf_ray.trainers.common import prepare_run
from rlhf_ray.trainers.label import label_pairs, pair_row
from rlhf_ray.trainers.sampling import (
    SamplingSession, decode_responses, draw, generation_seed, labeler_path, load_prompt_examples, prompt_text,
    sampling_params)

PHASES = {"draft": 0, "critique": 1, "revision": 2}
Messages = list[dict[str, str]]  # a chat conversation, as rlhf_ray.data.constitution builds it


@dataclasses.dataclass(frozen=True)
class Step:
    """One critique → revision round of one example."""

    principle: str
    # the contexts continued: rendered with the chat template for the policy, the messages sent for cai.endpoint
    critique_prompt: str | Messages | None  # None for a given critique
    critique: str
    revision_prompt: str | Messages
    revision: str


@dataclasses.dataclass
class Example:
    """One prompt on its way from draft to final revision (driver-side state)."""

    prompt: Any  # as the data gives it: a string or chat messages
    prompt_ids: list[int] | None  # the draft's prompt tokens; None when the draft is given
    origin: str  # "policy", or "<feedback file>:<line>"
    draft: str = ""
    given_critique: str | None = None
    steps: list[Step] = dataclasses.field(default_factory=list)
    dropped: str | None = None  # why the example left the run

    @property
    def response(self) -> str:
        return self.steps[-1].revision if self.steps else self.draft


class Reviser:
    """Runs the drafts on a session's engines and the critique → revision rounds with `write`: the policy
    on the same engines, or cai.endpoint when given (chosen once, here)."""

    def __init__(self, cfg: RunConfig, session: SamplingSession, tokenizer: PreTrainedTokenizerBase,
                 constitution: Constitution, endpoint: OpenAIEndpoint | None = None):
        self.cfg, self.session, self.tokenizer, self.constitution = cfg, session, tokenizer, constitution
        self.endpoint = endpoint
        self.write = self._by_policy if endpoint is None else self._by_endpoint

    def draft(self, examples: list[Example]) -> None:
        todo = [e for e in examples if e.prompt_ids is not None]
        if todo:
            for example, text in zip(todo, self._generate([e.prompt_ids for e in todo], "draft", 0)):
                example.draft = text
                example.dropped = None if text.strip() else "empty_draft"

    def round(self, examples: list[Example], k: int) -> None:
        """Critique then revise every live example against a freshly sampled principle."""
        live = [e for e in examples if e.dropped is None]
        drawn = sample_principles(self.constitution, len(live), self.cfg.trainer.seed, k)
        jobs = [(e, self.constitution.feedback if k == 1 and e.given_critique else p) for e, p in zip(live, drawn)]
        critiqued = self._critique(jobs, k)
        replies = self.write([revision_messages(e.prompt, e.response, p, critique) for e, p, _, critique in critiqued],
                             "revision", k, self.cfg.rollout.max_new_tokens)
        for (example, principle, critique_prompt, critique), reply in zip(critiqued, replies):
            if reply is None:
                example.dropped = "overlength"
                continue
            revision_prompt, text = reply
            example.steps.append(Step(principle.name, critique_prompt, critique, revision_prompt, text))
            example.dropped = None if text.strip() else "empty_revision"

    def _critique(self, jobs: list[tuple[Example, Principle]],
                  k: int) -> list[tuple[Example, Principle, str | Messages | None, str]]:
        """(example, principle, critique prompt or None when given, critique) per job, in order; round 1 of a
        critique record uses its critique; a job whose context the policy cannot take is dropped."""
        given = [bool(k == 1 and e.given_critique) for e, _ in jobs]
        asked = [(e, p) for (e, p), g in zip(jobs, given) if not g]
        replies = iter(self.write([critique_messages(e.prompt, e.response, p) for e, p in asked], "critique", k,
                                  self.cfg.cai.critique_max_new_tokens))
        out = []
        for (example, principle), g in zip(jobs, given):
            reply = (None, example.given_critique) if g else next(replies)
            if reply is None:
                example.dropped = "overlength"
            else:
                out.append((example, principle, *reply))
        return out

    def _by_policy(self, conversations: list[Messages], phase: str, k: int,
                   max_new_tokens: int) -> list[tuple[str, str] | None]:
        """(rendered context, reply) per conversation, written by the policy on the engines; None (not sent) when
        the context rendered with the tokenizer's chat template plus max_new_tokens would pass cai.max_context_len."""
        texts = [render_messages(self.tokenizer, m) for m in conversations]
        ids = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        fits = [len(i) + max_new_tokens <= self.cfg.cai.max_context_len for i in ids]
        replies = iter(self._generate([i for i, f in zip(ids, fits) if f], phase, k, max_new_tokens))
        return [(t, next(replies)) if f else None for t, f in zip(texts, fits)]

    def _by_endpoint(self, conversations: list[Messages], phase: str, k: int,
                     max_new_tokens: int) -> list[tuple[Messages, str]]:
        """(conversation, reply) per conversation, written greedily by cai.endpoint from the messages themselves;
        a request that fails for good (one the server refuses as too long included) raises its RewardError."""
        return list(zip(conversations, self.endpoint.chat(conversations, max_new_tokens)))

    def _generate(self, prompts: list[list[int]], phase: str, k: int, max_new_tokens: int | None = None) -> list[str]:
        if not prompts:
            return []
        samples = self.session.generate(prompts, sampling_params(self.cfg, 1, max_new_tokens),
                                        generation_seed(self.cfg, 2, k, PHASES[phase]), f"cai/{phase}@{k}",
                                        self.tokenizer.pad_token_id)
        return decode_responses(self.tokenizer, samples)


def constitution_path(cfg: RunConfig) -> str:
    if cfg.cai.constitution == TOY:
        from rlhf_ray.toy.feedback import write_toy_constitution

        return write_toy_constitution(cfg.run_dir / "toy" / "constitution.yaml")
    return cfg.cai.constitution


def given_critiques(cfg: RunConfig) -> list[Example]:
    """The critique records of `cai.critiques` as examples with their draft and critique given."""
    if cfg.cai.critiques is None:
        return []
    records, read = read_feedback(cfg.cai.critiques, cfg.feedback.rating_scale, cfg.data.on_bad_row)
    print(read, flush=True)
    return [Example(r.prompt, None, f"{cfg.cai.critiques}:{r.line}", draft=r.response, given_critique=r.critique)
            for r in records if isinstance(r, Critique)]


def revision_pairs(examples: list[Example]) -> tuple[list[dict], dict[str, int]]:
    """(final revision ≻ draft) per finished example; an unchanged response gives none."""
    rows = [{"prompt": e.prompt, "chosen": e.response, "rejected": e.draft, "source": "cai"}
            for e in examples if e.response != e.draft]
    return rows, {"dropped": {"unchanged": len(examples) - len(rows)} if len(rows) < len(examples) else {}}


def judged_pairs(session: SamplingSession, cfg: RunConfig, tokenizer, examples: list[Example]) -> tuple[list[dict], dict]:
    """The labeller's choice between draft and final revision, asked in both orders."""
    if not examples:
        return [], {"dropped": {}}
    judgements, decisions = label_pairs(session, cfg, [prompt_text(tokenizer, e.prompt) for e in examples],
                                        [e.draft for e in examples], [e.response for e in examples],
                                        [True] * len(examples), [True] * len(examples))
    rows = [pair_row(e.prompt, e.draft, e.response, d, "cai-judge") for e, d in zip(examples, decisions) if d.choice]
    return rows, summarise(judgements, decisions)


def run_cai(cfg: RunConfig) -> dict[str, Any]:
    """Draft on the rollout engines, critique and revise there or on cai.endpoint; write SFT data, pairs and the trace."""
    start, inputs = time.perf_counter(), prepare_run(cfg)
    tokenizer = load_tokenizer(inputs.models.tokenizer, cfg.model.trust_remote_code)
    constitution = load_constitution(constitution_path(cfg))
    prompts = draw(load_prompt_examples(cfg, tokenizer, inputs.train, cfg.data.split), cfg.cai.num_prompts,
                   cfg.trainer.seed)
    examples = [Example(p.prompt, p.prompt_ids, "policy") for p in prompts] + given_critiques(cfg)
    held_out = load_prompt_examples(cfg, tokenizer, inputs.eval, cfg.data.eval_split)[: cfg.trainer.eval_prompts]
    judge = cfg.cai.pairs == "judge"
    endpoint = OpenAIEndpoint(cfg.cai.endpoint, name="cai") if cfg.cai.endpoint else None
    session = SamplingSession(cfg, inputs.models, labeler=judge, labeler_path=labeler_path(cfg) if judge else None,
                              reward_paths=inputs.reward_paths if held_out else None)
    try:
        evaluation = session.evaluate(held_out, tokenizer.pad_token_id) if held_out else {}
        reviser = Reviser(cfg, session, tokenizer, constitution, endpoint)
        reviser.draft(examples)
        for k in range(1, cfg.cai.rounds + 1):
            reviser.round(examples, k)
        done = [e for e in examples if e.dropped is None]
        rows, pair_report = judged_pairs(session, cfg, tokenizer, done) if judge else revision_pairs(done)
    finally:
        session.close()
    report = {"constitution": constitution.source, "principles": [p.name for p in constitution.principles],
              "rounds": cfg.cai.rounds, "prompts": len(prompts), "given_critiques": len(examples) - len(prompts),
              "finished": len(done), "dropped": dict(Counter(e.dropped for e in examples if e.dropped)),
              "pairs": pair_report, "eval": evaluation, "endpoint": _endpoint_report(endpoint),
              "seconds": time.perf_counter() - start}
    return _write(cfg.run_dir, examples, done, rows, report)


def _endpoint_report(endpoint: OpenAIEndpoint | None) -> dict[str, Any] | None:
    """Who wrote the critiques and revisions when not the policy, and what it cost (OpenAIEndpoint.counters)."""
    if endpoint is None:
        return None
    return {"base_url": endpoint.options.base_url, "model": endpoint.options.model} | endpoint.counters


def _write(run_dir: Path, examples: list[Example], done: list[Example], pairs: list[dict],
           report: dict[str, Any]) -> dict[str, Any]:
    for name in ("sft.jsonl", "pairs.jsonl"):  # never leave an earlier run's outputs behind
        (run_dir / name).unlink(missing_ok=True)
    report["sft_file"] = write_jsonl(run_dir / "sft.jsonl", [{"prompt": e.prompt, "response": e.response} for e in done]) \
        if done else None
    report["pairs_file"] = write_jsonl(run_dir / "pairs.jsonl", pairs) if pairs else None
    report["sft_rows"], report["pair_rows"] = len(done), len(pairs)
    write_jsonl(run_dir / "trace.jsonl", [_trace(e) for e in examples])
    (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    table = [("constitution", f"{report['constitution']} ({len(report['principles'])} principles)"),
             ("prompts drafted + given critiques", f"{report['prompts']} + {report['given_critiques']}"),
             ("critique → revision rounds", report["rounds"]),
             ("critiques and revisions by", _endpoint_line(report["endpoint"])), ("examples finished", report["finished"]),
             ("examples dropped", report["dropped"] or None), ("SFT rows (final revisions)", report["sft_rows"]),
             ("preference pairs", report["pair_rows"]), ("pairs not made", report["pairs"].get("dropped") or None),
             ("judge agreement across orders", report["pairs"].get("agreement")),
             *[(f"eval {k.removeprefix('eval/')} (policy)", v) for k, v in report["eval"].items()],
             ("trace", str(run_dir / "trace.jsonl")), ("run directory", str(run_dir))]
    print(summary_table([(k, v) for k, v in table if v is not None], title="== Constitutional AI summary =="),
          flush=True)
    return report


def _endpoint_line(counts: dict[str, Any] | None) -> str | None:
    if counts is None:
        return None
    return (f"{counts['model']} at {counts['base_url']}: {counts['requests']} requests, {counts['prompt_tokens']} + "
            f"{counts['completion_tokens']} tokens, estimated cost {counts['estimated_cost']:.4g}")


def _trace(example: Example) -> dict[str, Any]:
    return {"prompt": example.prompt, "origin": example.origin, "draft": example.draft,
            "given_critique": example.given_critique, "steps": [dataclasses.asdict(s) for s in example.steps],
            "final": example.response, "dropped": example.dropped}
