"""Padding-free packing: the real tokens of a padded (B, L) batch as one row (1, N), and back.

A padded micro-batch `[pad … prompt | response … pad]` spends every layer's work on padding.
`pack` keeps only the tokens with `attention_mask` 1, row after row, as one sequence of
N = Σ_b len_b tokens; `unpack` puts per-token outputs back in the (B, L) layout;
`packed_forward` is a drop-in for a padded causal-LM forward that returns (B, L, V) logits.

How the model keeps the sequences apart (read in transformers 5.19, `masking_utils.py`, and
checked on CPU by tests/unit/test_packing.py for "sdpa" and "eager"):
- `LlamaModel.forward` calls `create_causal_mask(..., attention_mask, past_key_values, position_ids)`.
  Its `_preprocess_mask_arguments` runs `find_packed_sequence_indices(position_ids)` when, and only
  when, `attention_mask is None` and `past_key_values is None`: a new sequence starts wherever
  consecutive positions do not step by +1. `packed_sequence_mask_function` is then AND-ed with the
  causal mask, `allow_is_causal_skip` is turned off, and `sdpa_mask` materialises a boolean
  (1, 1, N, N) block-diagonal causal mask; `eager_mask` is the same mask cast to 0 / finfo.min.
  So positions that restart at 0 are all it takes, for both implementations.
- `use_cache=False` is not optional: `merge_with_config_defaults` fills `use_cache` from the config
  (True for Llama), the model then builds an empty `DynamicCache`, `past_key_values` is no longer
  None and the detection is silently skipped: every token attends to all earlier sequences
  (measured: logits off by 0.3 on the toy policy).
- We do not pass our own 4D mask: `create_causal_mask` returns a 4D mask as is, so it would have to
  be boolean for sdpa (True = attend) and additive float for eager (a boolean added to the scores
  is a silent 0/1 bias); letting transformers build it gives each implementation its own format.

Positions are `rlhf_ray.batch.position_ids(attention_mask)` at the real tokens (0 … len_b − 1 per
row, holes in the mask skipped), exactly what the padded forward uses, so RoPE sees the same
numbers in both layouts.

Cost on CPU: sdpa and eager have no variable-length kernel, so attention runs over the full
N × N mask; the padded batch pays B × L². Packing saves the token-wise work (embeddings, MLPs,
projections, LM head) but attention grows with N², so long packed rows are slower than padded
ones when B is large. Varlen kernels (flash-attention, which transformers feeds from the same
`position_ids` through `prepare_fa_kwargs_from_position_ids`) avoid the N² term; they are not
verified here, so `packed_forward` accepts only the implementations in `VERIFIED_ATTENTION`.

References: transformers `DataCollatorWithFlattening` ("padding-free" training, position_ids
restart per example); Krell et al. 2021, "Efficient Sequence Packing without Cross-contamination".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf_ray.batch import position_ids as padded_position_ids

# Attention implementations whose packed forward equals the padded one (tests/unit/test_packing.py).
VERIFIED_ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True, eq=False)
class Packed:
    """One padded (B, L) batch as a single packed row, with the map back to the padded layout."""

    input_ids: Tensor  # (1, N) long, the real tokens of rows 0 … B−1, one row after the other
    position_ids: Tensor  # (1, N) long, 0 … len_b − 1 within row b: the padded forward's positions
    cu_seqlens: Tensor  # (B + 1,) int32, row b occupies packed tokens [cu_seqlens[b], cu_seqlens[b + 1])
    indices: Tensor  # (N,) long, flat index b·L + t of each packed token in the (B, L) layout
    padded_shape: tuple[int, int]  # (B, L)

    @property
    def num_tokens(self) -> int:  # N
        return self.input_ids.shape[1]


def pack(input_ids: Tensor, attention_mask: Tensor) -> Packed:
    """Keep the tokens of `input_ids` (B, L) where `attention_mask` (B, L) is 1, as one row.

    Any padding layout works (left, right, both sides, holes): a token's packed position is its
    rank among the real tokens of its row. A batch without real tokens has nothing to run.
    """
    real = attention_mask.bool()  # (B, L)
    indices = real.flatten().nonzero().squeeze(-1)  # (N,)
    if indices.numel() == 0:
        raise ValueError("pack: attention_mask has no real tokens")
    lengths = real.sum(-1)  # (B,)
    return Packed(
        input_ids=input_ids.flatten()[indices].unsqueeze(0),
        position_ids=padded_position_ids(attention_mask).flatten()[indices].unsqueeze(0),
        cu_seqlens=F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32),
        indices=indices,
        padded_shape=tuple(real.shape),
    )


def unpack(values: Tensor, packed: Packed, fill: float) -> Tensor:
    """Per-token `values` (1, N, ...) of a packed forward in the padded layout (B, L, ...), `fill` on padding.

    Differentiable in `values`: the gradient of each padded slot flows back to its packed token.
    """
    if values.shape[:2] != (1, packed.num_tokens):
        raise ValueError(
            f"unpack: values must be per-token (1, {packed.num_tokens}, ...), got {tuple(values.shape)} "
            "(a sequence classifier's pooled logits are one per packed row, not per token)"
        )
    batch, length = packed.padded_shape
    trailing = values.shape[2:]
    out = values.new_full((batch * length, *trailing), fill)
    return out.index_copy(0, packed.indices, values[0]).view(batch, length, *trailing)


def packed_outputs(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, config: Any = None,
                   **kwargs) -> tuple[Any, Packed]:
    """The forward of `model` on the packed batch, with the `Packed` map that unpacks its per-token outputs.

    `model` is a transformers model (a causal LM, or the backbone of a sequence classifier) whose
    forward takes `position_ids`. The call passes `attention_mask=None`, `past_key_values=None` and
    `use_cache=False`, the three conditions for `create_causal_mask` to build the per-sequence mask
    (module docstring); a caller passing any of them, or `position_ids`, in `kwargs` gets a TypeError.
    """
    implementation = (config or model.config)._attn_implementation  # `config`: of a wrapped model (DeepSpeed)
    if implementation not in VERIFIED_ATTENTION:
        raise ValueError(
            f"packed_forward: attention implementation {implementation!r} is not verified for packed rows; "
            f"use one of {VERIFIED_ATTENTION} (model.set_attn_implementation)"
        )
    packed = pack(input_ids, attention_mask)
    out = model(
        input_ids=packed.input_ids,
        position_ids=packed.position_ids,
        attention_mask=None,
        past_key_values=None,
        use_cache=False,
        **kwargs,
    )
    return out, packed


def packed_forward(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, config: Any = None,
                   **kwargs) -> Tensor:
    """Logits (B, L, V) of a causal LM run on the packed batch; 0 at padding, else as the padded forward."""
    out, packed = packed_outputs(model, input_ids, attention_mask, config, **kwargs)
    return unpack(out.logits, packed, fill=0.0)
