"""Partial rollouts: generation in segments of at most `segment_tokens` new tokens, so new policy weights
can reach an engine between segments while its requests are still unfinished.

Asynchronous RL keeps the engines generating while the policy trains; waiting for the longest response
before syncing weights would stall every engine on its slowest request. Instead each request runs a
segment at a time, and between segments `at_boundary` may load newer weights: an unfinished request then
continues under them (in-flight weight updates, as in PipelineRL, Piché et al. 2025, and AReaL, Fu et al.
2025). Every response token is tagged with the version that produced it (`Samples.token_versions`) and
each row with the oldest of its tokens' versions (`Samples.versions`), so the trainer can measure
staleness and weight off-policy tokens by their own behaviour log-probs.

Continuations are token-in/token-out like the engines: a request continues from its prompt ids plus the
response ids generated so far, never from decoded text, so no re-tokenisation can change a token.
Segment j is seeded from (seed, j): the same inputs and the same boundary behaviour give the same tokens.
Only segment 0 keeps an engine's split-invariance (`RolloutEngine.generate`); later segments seed their
continuations by position among the rows still unfinished.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

from rlhf_ray.batch import Samples, pad_to
from rlhf_ray.rollout.base import RolloutEngine, SamplingParams


@dataclass
class _Row:
    """One sample row's response so far, as token lists (plain Python: rows grow by segments)."""

    prompt: list[int]  # the original prompt ids
    tokens: list[int] = field(default_factory=list)  # response ids so far
    logprobs: list[float] = field(default_factory=list)  # behaviour log-probs of `tokens`, when asked for
    versions: list[int] = field(default_factory=list)  # version that produced each of `tokens`
    stopped: bool = False  # the response ended with EOS


def generate_in_segments(engine: RolloutEngine, prompts: list[list[int]], params: SamplingParams, seed: int,
                         first_index: int, segment_tokens: int, at_boundary: Callable[[], int],
                         version: int) -> Samples:
    """`engine.generate(prompts, params, seed, first_index)` in segments of at most `segment_tokens` new
    tokens: `params.n` rows per prompt, rows [i·n, (i+1)·n) from prompt i. Segment 0's tokens come from
    weights `version`; before each later segment `at_boundary()` may load new weights into the engine and
    returns the version the engine then holds, which tags that segment's tokens. Each unfinished row (no
    EOS, fewer than `params.max_new_tokens` tokens) continues as its own request (n = 1) from its prompt
    ids + response ids so far; one `generate` call per segment. `engine.pad_token_id` pads the responses."""
    if segment_tokens < 1:
        raise ValueError(f"segment_tokens must be at least 1, got {segment_tokens}.")
    first = engine.generate(prompts, replace(params, max_new_tokens=min(segment_tokens, params.max_new_tokens)),
                            segment_seed(seed, 0), first_index)
    rows = [_Row(prompt=prompts[row // params.n]) for row in range(len(prompts) * params.n)]
    _append_segment(rows, first, version)
    segment = 1
    while unfinished := [row for row in rows if not _finished(row, params.max_new_tokens)]:
        current = at_boundary()
        remaining = min(params.max_new_tokens - len(row.tokens) for row in unfinished)
        out = engine.generate([row.prompt + row.tokens for row in unfinished],
                              replace(params, n=1, max_new_tokens=min(segment_tokens, remaining)),
                              segment_seed(seed, segment), first_index * params.n)
        _append_segment(unfinished, out, current)
        segment += 1
    return _to_samples(rows, first, params, engine.pad_token_id)


def segment_seed(seed: int, segment: int) -> int:
    """The seed of segment `segment` of a batch seeded with `seed`: an independent stream per segment."""
    return int(np.random.default_rng([seed, segment]).integers(2**31))


def _finished(row: _Row, max_new_tokens: int) -> bool:
    return row.stopped or len(row.tokens) >= max_new_tokens


def _append_segment(rows: list[_Row], out: Samples, version: int) -> None:
    """Extend each row by its row of `out` (same order), tagging the new tokens with `version`."""
    lengths = out.response_mask.sum(-1).tolist()  # (len(rows),)
    for k, (row, length) in enumerate(zip(rows, lengths)):
        row.tokens += out.response_ids[k, :length].tolist()
        if out.logprobs is not None:
            row.logprobs += out.logprobs[k, :length].tolist()
        row.versions += [version] * length
        row.stopped = bool(out.stopped[k])


def _to_samples(rows: list[_Row], first: Samples, params: SamplingParams, pad_token_id: int) -> Samples:
    """The finished rows as one `Samples`; the prompt block is segment 0's (the original prompts)."""
    lengths = torch.tensor([len(row.tokens) for row in rows])  # (B,)
    response_mask = (torch.arange(int(lengths.max())) < lengths.unsqueeze(-1)).long()  # (B, T)
    return Samples(
        prompt_ids=first.prompt_ids,
        prompt_mask=first.prompt_mask,
        response_ids=_right_pad([row.tokens for row in rows], pad_token_id, torch.long),
        response_mask=response_mask,
        stopped=torch.tensor([row.stopped for row in rows]),
        logprobs=_right_pad([row.logprobs for row in rows], 0.0, torch.float32)
        if params.logprobs and not params.greedy else None,
        versions=torch.tensor([min(row.versions) for row in rows]),  # every row has a segment-0 token
        token_versions=_right_pad([row.versions for row in rows], 0, torch.long),
    )


def _right_pad(rows: list[list], value: float, dtype: torch.dtype) -> Tensor:
    """Non-empty lists → (B, longest) tensor, right-padded with `value`."""
    width = max(len(r) for r in rows)
    return torch.cat([pad_to(torch.tensor([r], dtype=dtype), width, value, left=False) for r in rows])
