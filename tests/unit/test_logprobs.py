"""logprobs_from_logits / entropy_from_logits against hand values and torch references (§1)."""

import math

import pytest
import torch

from rlhf_ray.algorithms.logprobs import _map_rows, entropy_from_logits, logprobs_from_logits


def test_logprobs_hand_example():
    # logits (0, ln 3) → softmax (1/4, 3/4): log p(1) = ln(3/4), log p(0) = ln(1/4)
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])  # (1, 2, 2)
    labels = torch.tensor([[1, 0]])
    expected = torch.tensor([[math.log(0.75), math.log(0.25)]])
    torch.testing.assert_close(logprobs_from_logits(logits, labels), expected)


def test_temperature_divides_logits():
    # (0, 2 ln 3) / 2 = (0, ln 3) → log p(1) = ln(3/4)
    logits = torch.tensor([[[0.0, 2.0 * math.log(3.0)]]])
    out = logprobs_from_logits(logits, torch.tensor([[1]]), temperature=2.0)
    torch.testing.assert_close(out, torch.tensor([[math.log(0.75)]]))


def test_matches_log_softmax_gather():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50) * 4
    labels = torch.randint(0, 50, (3, 7))
    reference = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    out = logprobs_from_logits(logits, labels)
    assert out.shape == (3, 7) and out.dtype == torch.float32
    # rtol too: one float32 ulp at |logp| ≈ 17 is already 1.9e-6
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=1e-6)


def test_bf16_logits_computed_in_float32():
    torch.manual_seed(1)
    logits = (torch.randn(2, 5, 64) * 3).bfloat16()
    labels = torch.randint(0, 64, (2, 5))
    reference = (
        torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    )
    out = logprobs_from_logits(logits, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=1e-6)


def test_entropy_hand_examples():
    uniform = torch.zeros(1, 1, 4)  # H = ln 4
    torch.testing.assert_close(entropy_from_logits(uniform), torch.tensor([[math.log(4.0)]]))
    two_way = torch.tensor([[[0.0, math.log(3.0)]]])  # p = (1/4, 3/4): H = −(¼ ln ¼ + ¾ ln ¾)
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(entropy_from_logits(two_way), torch.tensor([[expected]]))


def test_entropy_matches_reference_formula():
    torch.manual_seed(2)
    logits = (torch.randn(2, 6, 40) * 3).bfloat16()
    z = logits.float()
    reference = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    out = entropy_from_logits(logits)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("max_chunk_elements", [1, 30, 3 * 30 + 7])
def test_chunking_gives_same_values_and_gradients(max_chunk_elements):
    torch.manual_seed(3)
    logits = torch.randn(3, 4, 30, requires_grad=True)
    labels = torch.randint(0, 30, (3, 4))

    whole = logprobs_from_logits(logits, labels, temperature=0.7) + entropy_from_logits(logits)
    (grad_whole,) = torch.autograd.grad(whole.sum(), logits)
    chunked = logprobs_from_logits(
        logits, labels, temperature=0.7, max_chunk_elements=max_chunk_elements
    ) + entropy_from_logits(logits, max_chunk_elements=max_chunk_elements)
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), logits)

    torch.testing.assert_close(chunked, whole, atol=0, rtol=0)
    torch.testing.assert_close(grad_chunked, grad_whole, atol=1e-7, rtol=0)


def test_misaligned_labels_rejected():
    with pytest.raises(ValueError, match=r"^labels \(2, 4\) must match logits \(2, 5, 10\) without the vocabulary dim; align"):
        logprobs_from_logits(torch.zeros(2, 5, 10), torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("max_chunk_elements, rows", [(1, [1] * 6), (25, [2, 2, 2]), (40, [4, 2]), (10**6, [6])])
def test_chunks_never_exceed_the_element_budget(max_chunk_elements, rows):
    # V = 10: max(1, budget // V) rows per chunk, so a chunk holds ≤ budget elements (or 1 row if V > budget)
    seen = []

    def record(z: torch.Tensor) -> torch.Tensor:
        seen.append(z.shape[0])
        return z.sum(-1)

    logits = torch.arange(60.0).reshape(2, 3, 10)
    out = _map_rows(record, logits, max_chunk_elements=max_chunk_elements)
    assert seen == rows
    torch.testing.assert_close(out, logits.sum(-1))
