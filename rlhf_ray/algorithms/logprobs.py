"""Per-token log-probabilities and entropy from logits (ALGORITHMS.md §1).

- `logprobs_from_logits`: log π(label) as the label's logit minus logsumexp over the vocabulary.
- `entropy_from_logits`:  H = logsumexp(z) − Σ softmax(z)·z.

Both compute in float32 (bf16 log-softmax differences are too coarse for PPO ratios) and walk
the (B·T, V) rows in chunks so the float32 copy never exceeds `max_chunk_elements` at once
(in forward-only use, e.g. reference and old log-probs; under autograd each chunk's float32
copy is kept for backward).

References: "The N implementation details of RLHF with PPO" (Huang et al. 2024), §1 of the spec.
"""

from typing import Callable

import torch
from torch import Tensor

MAX_CHUNK_ELEMENTS = 2**25  # 128 MiB of float32 per chunk


def logprobs_from_logits(
    logits: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    *,
    max_chunk_elements: int = MAX_CHUNK_ELEMENTS,
) -> Tensor:
    """log softmax(logits / temperature) gathered at `labels`, in float32 (ALGORITHMS.md §1).

    `logits` (B, T, V) must already be aligned with `labels` (B, T): the caller drops the last
    position (`logits[:, :-1]` predicts `input_ids[:, 1:]`). The full log-softmax is never built.
    """

    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must match logits {tuple(logits.shape)} without the "
            "vocabulary dim; align them first (logits[:, :-1] predict input_ids[:, 1:])"
        )

    def label_logprobs(z: Tensor, y: Tensor) -> Tensor:  # (n, V), (n,) -> (n,)
        z = _to_float32(z, temperature)
        return z.gather(-1, y.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)

    return _map_rows(label_logprobs, logits, labels, max_chunk_elements=max_chunk_elements)


def entropy_from_logits(logits: Tensor, *, max_chunk_elements: int = MAX_CHUNK_ELEMENTS) -> Tensor:
    """Per-token entropy H = logsumexp(z) − Σ softmax(z)·z, in float32 (ALGORITHMS.md §1).

    `logits` (B, T, V) → (B, T).
    """

    def entropy(z: Tensor) -> Tensor:  # (n, V) -> (n,)
        z = z.float()
        return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1)

    return _map_rows(entropy, logits, max_chunk_elements=max_chunk_elements)


def _to_float32(logits: Tensor, temperature: float) -> Tensor:
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def _map_rows(
    fn: Callable[..., Tensor],
    logits: Tensor,
    *token_args: Tensor,
    max_chunk_elements: int,
) -> Tensor:
    """Apply `fn` to row chunks of the flattened (B·T, V) logits and (B·T,) `token_args`.

    Returns `fn`'s per-row outputs reshaped to (B, T).
    """
    vocab = logits.shape[-1]
    rows_per_chunk = max(1, max_chunk_elements // vocab)
    chunked = [logits.reshape(-1, vocab).split(rows_per_chunk)]  # (n, V) chunks
    chunked += [arg.reshape(-1).split(rows_per_chunk) for arg in token_args]  # (n,) chunks
    outputs = [fn(*chunk) for chunk in zip(*chunked, strict=True)]
    return torch.cat(outputs).reshape(logits.shape[:-1])
