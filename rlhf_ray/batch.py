"""Typed batch records passed between roles.

Layout of a sequence: the prompt block, left-padded to P tokens, then the response block,
right-padded to T tokens: `input_ids = [pad … prompt | response … pad]`, shape (B, P + T).
Token-level tensors that describe the response (`response_mask`, log-probs, values, advantages)
are (B, T) and aligned with the response tokens, so `logprobs[b, t]` is log π(response[b, t] | …).
A response ends at its first EOS (the EOS is a real token, `response_mask` 1); tokens after it are
padding. Samples of one prompt are contiguous: rows [i·n, (i+1)·n) share prompt i.

Across process boundaries records travel as dicts of numpy arrays (`to_numpy` / `from_numpy`):
numpy payloads are zero-copy in Ray's object store, torch tensors are pickled.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

B = TypeVar("B", bound="TensorRecord")


class TensorRecord:
    """Dataclass mixin: row selection, concatenation and numpy transport over every tensor field."""

    def tensor_fields(self) -> dict[str, Tensor]:
        return {f.name: v for f in dataclasses.fields(self) if isinstance(v := getattr(self, f.name), Tensor)}

    def select(self: B, rows: Tensor | list[int] | slice) -> B:
        return dataclasses.replace(self, **{k: v[rows] for k, v in self.tensor_fields().items()})

    def to(self: B, device: torch.device | str) -> B:
        return dataclasses.replace(self, **{k: v.to(device) for k, v in self.tensor_fields().items()})

    @property
    def batch_size(self) -> int:
        return next(iter(self.tensor_fields().values())).shape[0]

    def to_numpy(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.numpy() if isinstance(v, Tensor) else v
        return out

    @classmethod
    def from_numpy(cls: type[B], payload: dict[str, Any]) -> B:
        return cls(**{k: torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v for k, v in payload.items()})


@dataclass
class Samples(TensorRecord):
    """What a rollout engine returns for one batch of prompts."""

    prompt_ids: Tensor  # (B, P) long, left-padded with pad_token_id
    prompt_mask: Tensor  # (B, P) long, 1 on real prompt tokens
    response_ids: Tensor  # (B, T) long, right-padded; ends at the first EOS
    response_mask: Tensor  # (B, T) long, 1 on real response tokens incl. the EOS
    stopped: Tensor  # (B,) bool, True when the response ended with EOS (finish reason "stop" vs "length")
    logprobs: Tensor | None = None  # (B, T) float32 behaviour log-probs from the engine's own logits, 0 on padding
    versions: Tensor | None = None  # (B,) long: the oldest policy version that produced any of the row's tokens
    token_versions: Tensor | None = None  # (B, T) long: the version that produced each response token (partial rollouts)
    observation_mask: Tensor | None = None  # (B, T) long, 1 on environment tokens between turns (attended, never trained)
    env_rewards: Tensor | None = None  # (B, T) float: an environment's reward for each turn, at the turn's last policy token
    tool_counts: Tensor | None = None  # (B, 1 + K) long: an episode's tool calls, then its failed calls per kind (rlhf_ray.envs.tools.FAILURE_KINDS)

    @property
    def input_ids(self) -> Tensor:  # (B, P + T)
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:  # (B, P + T): prompt, policy and (multi-turn) environment tokens
        response = self.response_mask if self.observation_mask is None else self.response_mask | self.observation_mask
        return torch.cat([self.prompt_mask, response], dim=1)

    @property
    def response_lengths(self) -> Tensor:  # (B,)
        return self.response_mask.sum(-1)


@dataclass
class Experience(Samples):
    """Samples plus everything the update needs; built by the driver after scoring."""

    old_logprobs: Tensor = field(default=None)  # (B, T) log π_old of response tokens (behaviour policy)
    ref_logprobs: Tensor = field(default=None)  # (B, T) log π_ref of response tokens
    advantages: Tensor = field(default=None)  # (B, T) per-token advantages, 0 on padding
    returns: Tensor | None = None  # (B, T) critic targets (GAE only)
    values: Tensor | None = None  # (B, T) critic values at generation time (GAE only)


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding: generation and recomputation must agree (STACK-NOTES)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def token_budget_splits(tokens: list[int], budget: int, count: int | None = None) -> list[slice]:
    """Contiguous micro-batches of rows whose token counts add up to at most `budget` each (a row longer
    than the budget alone). With `count` (at least the budget's own number, at most the rows): exactly
    `count` micro-batches, the one with the most tokens halved until there are that many, so that
    every data-parallel rank runs the same number of forwards (ZeRO-3 forwards are collectives)."""
    groups: list[list[int]] = []
    for row, n in enumerate(tokens):
        if groups and sum(tokens[r] for r in groups[-1]) + n <= budget:
            groups[-1].append(row)
        else:
            groups.append([row])
    if count is not None:
        if not len(groups) <= count <= len(tokens):
            raise ValueError(f"{count} micro-batches of {len(tokens)} rows: need {len(groups)} to {len(tokens)}")
        while len(groups) < count:
            i = max((g for g in range(len(groups)) if len(groups[g]) > 1), key=lambda g: sum(tokens[r] for r in groups[g]))
            half = len(groups[i]) // 2
            groups[i: i + 1] = [groups[i][:half], groups[i][half:]]
    return [slice(g[0], g[-1] + 1) for g in groups]


def pad_to(x: Tensor, width: int, value: int | float, left: bool) -> Tensor:
    """Pad the last dim of (B, L) `x` to `width`."""
    extra = width - x.shape[1]
    if extra <= 0:
        return x
    pad = torch.full((x.shape[0], extra), value, dtype=x.dtype)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


def concat_samples(parts: list[Samples], pad_token_id: int) -> Samples:
    """Stack engines' outputs: prompts re-left-padded to a common P, responses right-padded to a common T."""
    p = max(s.prompt_ids.shape[1] for s in parts)
    t = max(s.response_ids.shape[1] for s in parts)
    return Samples(
        prompt_ids=torch.cat([pad_to(s.prompt_ids, p, pad_token_id, left=True) for s in parts]),
        prompt_mask=torch.cat([pad_to(s.prompt_mask, p, 0, left=True) for s in parts]),
        response_ids=torch.cat([pad_to(s.response_ids, t, pad_token_id, left=False) for s in parts]),
        response_mask=torch.cat([pad_to(s.response_mask, t, 0, left=False) for s in parts]),
        stopped=torch.cat([s.stopped for s in parts]),
        logprobs=(torch.cat([pad_to(s.logprobs, t, 0.0, left=False) for s in parts])
                  if all(s.logprobs is not None for s in parts) else None),
        versions=torch.cat([s.versions for s in parts]) if all(s.versions is not None for s in parts) else None,
        token_versions=_cat_optional([s.token_versions for s in parts], t, 0),
        observation_mask=_cat_optional([s.observation_mask for s in parts], t, 0),
        env_rewards=_cat_optional([s.env_rewards for s in parts], t, 0.0),
        tool_counts=torch.cat([s.tool_counts for s in parts]) if all(s.tool_counts is not None for s in parts) else None,
    )


def _cat_optional(parts: list[Tensor | None], width: int, value: int | float) -> Tensor | None:
    """(B_i, T_i) parts right-padded to `width` and stacked; None unless every part has one."""
    if any(p is None for p in parts):
        return None
    return torch.cat([pad_to(p, width, value, left=False) for p in parts])


# ---------------------------------------------------------------------------------------------
# Offline stages (sft, rm, dpo): examples of K sequences, no generation
# ---------------------------------------------------------------------------------------------


@dataclass
class OfflineBatch(TensorRecord):
    """N examples of an offline stage, K sequences each, every row right-padded to L tokens.

    K = 1 (SFT, KTO), 2 (a preference pair: chosen, then rejected) or the list length (ranked
    candidates, best first). Selecting rows selects whole examples, so a micro-batch never splits
    a pair or a list. For the reward model the whole sequence is its input (prompt ⊕ response ⊕
    EOS, tokenised as `rlhf_ray.rewards.model` does) and `response_mask` equals `attention_mask`.
    """

    input_ids: Tensor  # (N, K, L) long, prompt ⊕ response, right-padded with pad_token_id
    attention_mask: Tensor  # (N, K, L) long, 1 on real tokens
    response_mask: Tensor  # (N, K, L) long, 1 on response tokens (EOS included); logits at t-1 predict token t
    scores: Tensor | None = None  # (N, K) float, candidate scores, non-increasing (ranked data: RRHF)
    desirable: Tensor | None = None  # (N,) bool, KTO label: True = desirable
    ref_logprobs: Tensor | None = None  # (N, K) float32, ℓ_ref(y) = Σ_t log π_ref(y_t | …) over response tokens
    kl_ref: float = 0.0  # KTO z_0: the mini-batch's estimate of KL(π_θ‖π_ref) before this step

    @property
    def response_lengths(self) -> Tensor:  # (N, K) float, |y|, at least 1
        return self.response_mask.sum(-1).clamp(min=1).float()
