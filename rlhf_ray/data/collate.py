"""Token-id lists → padded LongTensors and masks.

Prompts for generation are left-padded (`pad_left`), so every prompt ends at the same column
and generation appends after it. Training sequences are right-padded (`pad_right`,
`concat_prompt_response`).
"""

import torch


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, L) long, L = longest sequence; pads on the left."""
    input_ids, attention_mask = _empty(seqs, pad_id)
    length = input_ids.shape[1]
    for b, seq in enumerate(seqs):
        input_ids[b, length - len(seq):] = torch.tensor(seq, dtype=torch.long)
        attention_mask[b, length - len(seq):] = 1
    return input_ids, attention_mask


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, L) long, L = longest sequence; pads on the right."""
    input_ids, attention_mask = _empty(seqs, pad_id)
    for b, seq in enumerate(seqs):
        input_ids[b, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[b, :len(seq)] = 1
    return input_ids, attention_mask


def concat_prompt_response(
    prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt+response sequences: (input_ids, attention_mask, response_mask), (B, L) long.

    response_mask[b, t] = 1 exactly when input_ids[b, t] is a response token. The logits at
    t - 1 predict token t, so for next-token log-probs use `response_mask[:, 1:]` against
    `logits[:, :-1]` (the first response token is predicted by the last prompt position).
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    input_ids, attention_mask = pad_right([p + r for p, r in zip(prompt_ids, response_ids)], pad_id)
    response_mask = torch.zeros_like(attention_mask)
    for b, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        response_mask[b, len(prompt):len(prompt) + len(response)] = 1
    return input_ids, attention_mask, response_mask


def _empty(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not seqs:
        raise ValueError("cannot pad an empty batch")
    shape = (len(seqs), max(len(seq) for seq in seqs))
    return torch.full(shape, pad_id, dtype=torch.long), torch.zeros(shape, dtype=torch.long)


def pad_candidates(
    prompt_ids: list[list[int]], candidates: list[list[list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each prompt ⊕ each of its K candidate responses: (input_ids, attention_mask, response_mask), (N, K, L) long.

    Offline stages keep an example's sequences together (a pair, a ranked list) so that selecting
    rows of dim 0 never splits one. Every example must have the same K. Right-padded, as in
    `concat_prompt_response`; an empty prompt makes the whole sequence the "response".
    """
    if len(prompt_ids) != len(candidates):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(candidates)} candidate lists")
    counts = sorted({len(c) for c in candidates})
    if len(counts) != 1 or counts[0] == 0:
        raise ValueError(f"every example needs the same number (>= 1) of candidates, got counts {counts}")
    flat_prompts = [p for p, cands in zip(prompt_ids, candidates) for _ in cands]
    flat = [c for cands in candidates for c in cands]
    tensors = concat_prompt_response(flat_prompts, flat, pad_id)
    return tuple(t.view(len(candidates), counts[0], -1) for t in tensors)
