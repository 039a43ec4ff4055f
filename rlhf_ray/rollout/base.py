"""The `RolloutEngine` interface: what every generation backend (vLLM, HF generate) provides.

Engines are token-in/token-out: prompt token ids in, a `Samples` batch out, so no text is
re-tokenised between generation and training. With `SamplingParams.logprobs` an engine also
returns its behaviour log-probs μ (the distribution the tokens were sampled from, at temperature
T): π_old of the off-policy modes, the importance weights of ALGORITHMS.md §10 and the
engine-vs-trainer mismatch metric. After a weight sync an engine proves what it holds by
`probe_logprobs` of a fixed sequence, compared with the policy's own (a checksum cannot work for
vLLM, whose fused and repacked layers differ from the trainer's).

Both engines share the layout helpers below: prompts left-padded, responses cut at the first EOS.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from rlhf_ray.batch import Samples, pad_to

PROBE_LENGTH = 32  # tokens in the sync probe sequence


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings for one `generate` call (mapped from `RolloutConfig`)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    n: int = 1  # samples per prompt, contiguous in the output
    greedy: bool = False  # evaluation decoding; ignores temperature/top-p/top-k
    suppress_special_tokens: bool = False  # never sample special tokens (EOS included)
    logprobs: bool = False  # also return the behaviour log-probs of the sampled tokens (Samples.logprobs)


@dataclass(frozen=True)
class Completion:
    """One finished request of an engine that takes requests one at a time (`submit` / `poll`)."""

    request_id: str
    token_ids: list[int]  # the sampled ids, up to and including the first EOS
    logprobs: list[float] | None  # behaviour log-probs of `token_ids` when asked for
    stopped: bool  # ended with EOS (else at the token limit)


def item_seeds(seed: int, first_index: int, count: int) -> list[int]:
    """Seeds of batch items first_index … first_index + count − 1: independent streams, one per item
    (seed + i repeated streams across steps and stopped learning), drawn from the batch's seed."""
    return np.random.default_rng(seed).integers(2**31, size=first_index + count)[first_index:].tolist()


class RolloutEngine(Protocol):
    pad_token_id: int  # pads responses (and left-pads prompts)

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int, first_index: int = 0) -> Samples:
        """Sample `params.n` responses per prompt; rows [i·n, (i+1)·n) belong to prompt i. `prompts` are
        items first_index, first_index + 1, … of a batch seeded with `seed` that several engines share:
        an engine that seeds each prompt on its own (vLLM) gives every prompt the same samples however
        the batch is split; one that seeds the whole call (HF generate) seeds it with
        seed + 7919·first_index, so its samples depend on the split."""

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Take the policy's full set of weights, by the trainer's (HF) parameter names."""

    def probe_logprobs(self, token_ids: list[int]) -> np.ndarray:
        """log π(token_ids[t] | token_ids[:t]) for t = 1 … L-1 at temperature 1, float64 (L-1,)."""

    def sleep(self) -> None:
        """Free memory while training runs (GPU engines); a no-op where there is nothing to free."""

    def wake(self) -> None:
        """Undo `sleep` before the next generation."""


class StreamingEngine(RolloutEngine, Protocol):
    """An engine that also takes requests one at a time and batches whatever is running at each step
    (continuous batching), for multi-turn episodes (`rlhf_ray.rollout.multiturn`)."""

    def submit(self, request_id: str, prompt: list[int], params: SamplingParams, seed: int) -> None:
        """Start one request (params.n = 1) seeded with `seed` alone; returns at once."""

    def poll(self) -> list[Completion]:
        """Run one engine step; the requests it finished."""

    def abort(self, request_ids: list[str]) -> None:
        """Drop unfinished requests (after an error elsewhere), leaving the engine empty for the next call."""


def probe_logprobs_from_logits(logits: Tensor, token_ids: Tensor) -> np.ndarray:
    """(1, L, V) logits of the probe sequence (1, L) → log π(token_ids[t] | token_ids[:t]), t = 1 … L-1,
    at temperature 1, float64 (L-1,): what the policy and an HF engine report after a sync."""
    from rlhf_ray.algorithms.logprobs import logprobs_from_logits

    return logprobs_from_logits(logits[:, :-1], token_ids[:, 1:])[0].double().cpu().numpy()


def probe_tokens(vocab_size: int, length: int = PROBE_LENGTH) -> list[int]:
    """The fixed probe sequence: seeded random ids over the whole vocabulary, the same on every process."""
    return np.random.default_rng(20_241_203).integers(0, vocab_size, size=length).tolist()


def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Prompt id lists → (B, P) ids and attention mask, padded on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs a non-empty list of non-empty prompts (token id lists).")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids, mask


def cut_at_first_eos(tokens: Tensor, eos_token_id: int, pad_token_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, L) generated tokens → response ids and mask right-padded to the longest response, stopped (B,).

    A response ends at its FIRST EOS (kept, mask 1); the mask never comes from `!= pad_token_id`:
    a random tiny model samples the pad id as an ordinary token (STACK-NOTES)."""
    is_eos = tokens == eos_token_id  # (B, L)
    stopped = is_eos.any(-1)  # (B,)
    first_eos = is_eos.long().argmax(-1)  # (B,) 0 where no EOS, masked by `stopped`
    lengths = torch.where(stopped, first_eos + 1, tokens.shape[1])  # (B,)
    width = max(int(lengths.max()), 1)
    response_mask = (torch.arange(width) < lengths.unsqueeze(-1)).long()  # (B, T)
    response_ids = torch.where(response_mask.bool(), pad_to(tokens, width, pad_token_id, left=False)[:, :width],
                               pad_token_id)
    return response_ids, response_mask, stopped


def array_to_tensor(array: np.ndarray) -> Tensor:
    """Inverse of `to_numpy`: an int16 array is always a bfloat16 payload (no model parameter is int16)."""
    with warnings.catch_warnings():  # Ray's zero-copy arrays are read-only; the tensor is only read
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if tensor.dtype == torch.int16 else tensor
