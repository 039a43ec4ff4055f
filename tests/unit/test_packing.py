"""Padding-free packing (rlhf_ray.packing): the packed forward of a tiny random Llama equals the padded
one on every real token, for sdpa and eager, in logits, loss and gradients (and a scalar-head model's
per-token scores: critic values, reward-model scores); sequences never see each
other; pack/unpack invert each other on any padding layout.

Tolerances (fp32, CPU): logits atol 1e-5, loss atol 1e-6, gradients atol 1e-6 + rtol 1e-4. The two
layouts run the same arithmetic on matrices of different shapes (B·L vs N rows, L vs N keys), so only
the kernels' summation order may differ: measured 1.3e-7 on logits of magnitude 0.6 (sdpa; eager 0),
0 on the loss, 4e-8 on gradients of magnitude 0.13 (one thread). The margins leave room for
multi-threaded reductions, whose order depends on the thread count. Row isolation is checked bit for
bit: with the same shapes, another row's tokens reach a query only through exact zeros of the masked
softmax.

`python tests/unit/test_packing.py` prints forward+backward time and the largest tensor, padded vs
packed, for a mixed-length batch on the benchmark-sized toy policy.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from rlhf_ray.batch import position_ids
from rlhf_ray.models import token_scores
from rlhf_ray.packing import pack, packed_forward, unpack
from rlhf_ray.toy import build_char_tokenizer, build_policy
from rlhf_ray.toy.models import build_critic

TOKENIZER = build_char_tokenizer()
PAD = TOKENIZER.pad_token_id
IMPLEMENTATIONS = ["sdpa", "eager"]


def mixed_batch(prompt_lengths: list[int], response_lengths: list[int], seed: int = 0):
    """`[pad … prompt | response … pad]` rows of random tokens: input_ids, attention_mask (B, P + T),
    response_mask (B, T) and P."""
    generator = torch.Generator().manual_seed(seed)
    p, t = max(prompt_lengths), max(response_lengths)
    prompt_mask = torch.stack([(torch.arange(p) >= p - n).long() for n in prompt_lengths])  # (B, P) left-padded
    response_mask = torch.stack([(torch.arange(t) < n).long() for n in response_lengths])  # (B, T) right-padded
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    tokens = torch.randint(3, len(TOKENIZER), attention_mask.shape, generator=generator)
    input_ids = torch.where(attention_mask.bool(), tokens, PAD)
    return input_ids, attention_mask, response_mask, p


def padded_logits(model, input_ids, attention_mask):
    return model(input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                 use_cache=False).logits


def policy(implementation: str, num_heads: int = 2, **sizes):
    model = build_policy(TOKENIZER, seed=0, num_heads=num_heads, **sizes)
    model.set_attn_implementation(implementation)
    return model


# Very different lengths, padding on both sides: prompts 1…17 tokens, responses 0…23.
PROMPTS, RESPONSES = [1, 9, 4, 17], [23, 1, 0, 6]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_packed_logits_equal_padded_on_real_tokens(implementation):
    model = policy(implementation)
    assert model.config._attn_implementation == implementation
    input_ids, attention_mask, _, _ = mixed_batch(PROMPTS, RESPONSES)
    real = attention_mask.bool()
    with torch.no_grad():
        expected = padded_logits(model, input_ids, attention_mask)
        got = packed_forward(model, input_ids, attention_mask)
    assert got.shape == expected.shape
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
    assert (got[~real] == 0).all()


def token_mean_response_loss(logits, input_ids, response_mask, prompt_len):
    """Cross-entropy of the response tokens, averaged over real response tokens."""
    predicting = logits[:, prompt_len - 1 : -1]  # (B, T, V): position P-1+t predicts response token t
    per_token = F.cross_entropy(predicting.transpose(1, 2), input_ids[:, prompt_len:], reduction="none")  # (B, T)
    mask = response_mask.float()
    return (per_token * mask).sum() / mask.sum()


def loss_and_grads(model, forward, input_ids, attention_mask, response_mask, prompt_len):
    model.zero_grad(set_to_none=True)
    loss = token_mean_response_loss(forward(model, input_ids, attention_mask), input_ids, response_mask, prompt_len)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_loss_and_gradients_equal_padded(implementation):
    model = policy(implementation)
    batch = mixed_batch(PROMPTS, RESPONSES, seed=1)
    loss, grads = loss_and_grads(model, padded_logits, *batch)
    packed_loss, packed_grads = loss_and_grads(model, packed_forward, *batch)
    torch.testing.assert_close(packed_loss, loss, atol=1e-6, rtol=0)
    assert packed_grads.keys() == grads.keys() and len(grads) == len(list(model.parameters()))
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name  # every parameter takes part, so the comparison means something
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_row_never_sees_another(implementation):
    model = policy(implementation)
    input_ids, attention_mask, _, _ = mixed_batch([6, 3], [5, 7])
    changed = input_ids.clone()
    shifted = 3 + (input_ids[0] - 2) % (len(TOKENIZER) - 3)  # every real token of row 0 replaced by the next id
    changed[0] = torch.where(attention_mask[0].bool(), shifted, PAD)
    with torch.no_grad():
        before = packed_forward(model, input_ids, attention_mask)
        after = packed_forward(model, changed, attention_mask)
    assert not torch.equal(after[0], before[0])  # row 0 did change
    assert torch.equal(after[1], before[1])  # row 1, which comes after it in the packed row, is bit-identical


def test_pack_hand_example():
    # Row 0 is padded on both sides, row 1 not at all, row 2 is one token; row 0 has a hole.
    input_ids = torch.tensor([[0, 11, 12, 0, 13, 0], [21, 22, 23, 24, 25, 26], [0, 0, 0, 31, 0, 0]])
    attention_mask = (input_ids != 0).long()
    packed = pack(input_ids, attention_mask)
    assert packed.input_ids.tolist() == [[11, 12, 13, 21, 22, 23, 24, 25, 26, 31]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 5, 0]]  # holes skipped, as position_ids does
    assert packed.cu_seqlens.tolist() == [0, 3, 9, 10] and packed.cu_seqlens.dtype == torch.int32
    assert packed.indices.tolist() == [1, 2, 4, 6, 7, 8, 9, 10, 11, 15]
    assert packed.padded_shape == (3, 6) and packed.num_tokens == 10
    torch.testing.assert_close(unpack(packed.input_ids, packed, fill=0), input_ids)


EDGE_CASES = {
    "single row": ([5], [4]),
    "a row without padding": ([4, 4, 2], [6, 6, 1]),
    "a one-token row": ([1, 7], [0, 9]),
    "only one-token rows": ([1, 1, 1], [0, 0, 0]),
}


@pytest.mark.parametrize("prompts, responses", EDGE_CASES.values(), ids=EDGE_CASES.keys())
def test_round_trip(prompts, responses):
    input_ids, attention_mask, _, _ = mixed_batch(prompts, responses, seed=2)
    packed = pack(input_ids, attention_mask)
    assert packed.num_tokens == attention_mask.sum()
    assert packed.cu_seqlens.diff().tolist() == attention_mask.sum(-1).tolist()
    torch.testing.assert_close(unpack(packed.input_ids, packed, fill=PAD), input_ids)
    features = torch.randn(1, packed.num_tokens, 3)  # trailing dims travel along
    back = unpack(features, packed, fill=-1.0)
    assert back.shape == (*input_ids.shape, 3)
    assert (back[attention_mask == 0] == -1).all()
    torch.testing.assert_close(pack(back[..., 0], attention_mask).input_ids, features[..., 0])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("prompts, responses", EDGE_CASES.values(), ids=EDGE_CASES.keys())
def test_edge_case_forwards_equal_padded(implementation, prompts, responses):
    model = policy(implementation)
    input_ids, attention_mask, _, _ = mixed_batch(prompts, responses, seed=3)
    real = attention_mask.bool()
    with torch.no_grad():
        expected = padded_logits(model, input_ids, attention_mask)
        got = packed_forward(model, input_ids, attention_mask)
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_score_head_values_and_gradients_equal_padded(implementation):
    # The critic's values and the reward model's scores: a sequence classifier's own forward pools one
    # score per packed row, so token_scores runs the backbone packed and the head on its hidden states.
    critic = build_critic(TOKENIZER, seed=0, num_heads=2)
    critic.set_attn_implementation(implementation)
    input_ids, attention_mask, response_mask, p = mixed_batch(PROMPTS, RESPONSES, seed=4)

    def values_and_grads(packing: bool):
        critic.zero_grad()
        values = token_scores(critic, input_ids, attention_mask, position_ids(attention_mask), packing=packing)
        (values[:, p:] * response_mask).square().sum().backward()  # a value loss over the response tokens
        return values.detach(), {name: q.grad.clone() for name, q in critic.named_parameters()}

    expected, grads = values_and_grads(False)
    got, packed_grads = values_and_grads(True)
    real = attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
    assert torch.equal(got[~real], torch.zeros_like(got[~real]))
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="pooled logits"):
        packed = pack(input_ids, attention_mask)
        unpack(critic(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits,
               packed, fill=0.0)


def test_refusals():
    input_ids, attention_mask, _, _ = mixed_batch([2], [2])
    with pytest.raises(ValueError, match="no real tokens"):
        pack(input_ids, torch.zeros_like(attention_mask))
    unverified = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    with pytest.raises(ValueError, match="not verified"):
        packed_forward(unverified, input_ids, attention_mask)
    with pytest.raises(TypeError):  # the caller cannot re-enable the cache that disables packed masking
        packed_forward(policy("sdpa"), input_ids, attention_mask, use_cache=True)


# ---------------------------------------------------------------------------------------------
# Measurement, not a test: python tests/unit/test_packing.py
# ---------------------------------------------------------------------------------------------


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor (in bytes) any op produces while active."""

    def __init__(self):
        super().__init__()
        self.nbytes, self.shape, self.dtype = 0, (), None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() * t.element_size() > self.nbytes:
                self.nbytes, self.shape, self.dtype = t.numel() * t.element_size(), tuple(t.shape), t.dtype
        return out


def measure(forward, model, batch, repeats: int = 3):
    import time

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss_and_grads(model, forward, *batch)
        times.append(time.perf_counter() - start)
    with LargestTensor() as largest:
        loss_and_grads(model, forward, *batch)
    return sorted(times)[len(times) // 2], largest


def main():
    """Lengths 8 … 256 split 1/3 prompt, 2/3 response; B = 4 and 16 (attention grows as N² packed, B·L² padded)."""
    model_sizes = {"num_heads": 4, "hidden_size": 128, "intermediate_size": 512, "num_layers": 4}
    print(f"toy policy {model_sizes}, fp32, torch threads {torch.get_num_threads()}; median of 3")
    for batch_size in (4, 16):
        totals = torch.randint(8, 257, (batch_size,), generator=torch.Generator().manual_seed(batch_size))
        prompts = [int(n) // 3 + 1 for n in totals]
        batch = mixed_batch(prompts, [int(n) - p for n, p in zip(totals, prompts)])
        input_ids, attention_mask = batch[0], batch[1]
        print(f"B={batch_size} lengths {sorted(totals.tolist())}: padded (B, L)={tuple(input_ids.shape)} "
              f"= {input_ids.numel()} slots, packed N={int(attention_mask.sum())}")
        for implementation in IMPLEMENTATIONS:
            model = policy(implementation, **model_sizes)
            for name, forward in [("padded", padded_logits), ("packed", packed_forward)]:
                seconds, largest = measure(forward, model, batch)
                print(f"  {implementation:5s} {name}: forward+backward {seconds * 1000:7.1f} ms; largest tensor "
                      f"{largest.shape} {largest.dtype} = {largest.nbytes / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
