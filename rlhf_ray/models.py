"""Loading HF models and the two token-level forward passes the roles share.

- `load_causal_lm` / `load_sequence_classifier` / `load_tokenizer`: thin `from_pretrained`
  wrappers (policy and reference; reward model and critic; every role's tokenizer).
- `response_logprobs`: log π(response token | prefix) at a temperature, (B, T), for the policy,
  the reference and old log-probs. It must agree with generation: left-padded prompts need
  `position_ids` that skip the padding (STACK-NOTES "HF generate as the CPU rollout engine"),
  and the policy at temperature T is `log_softmax(logits / T)` of the raw logits.
- `response_values`: a critic's V(s) before each response token, (B, T): the scalar `score`
  head of an `AutoModelForSequenceClassification` read at every position rather than pooled.
- `token_scores`: that per-position head, shared with the reward model's last-token score.

Sequence layout (rlhf_ray/batch.py): `input_ids = [pad … prompt | response … pad]`, prompt block
of P tokens. The logits at position P-1+t predict response token t, so both functions read
positions P-1 … P+T-2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

if TYPE_CHECKING:  # importing them loads transformers' modeling stack (~3 s CPU): only roles that hold a model pay it
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_ray.algorithms.logprobs import logprobs_from_logits
from rlhf_ray.batch import position_ids


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """'bfloat16' → torch.bfloat16; 'auto' and torch dtypes pass through."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype '{dtype}'; use e.g. 'float32', 'bfloat16', 'float16' or 'auto'.")
    return resolved


def load_causal_lm(path: str, dtype: str | torch.dtype = "float32", trust_remote_code: bool = False) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)


def load_sequence_classifier(
    path: str, dtype: str | torch.dtype = "float32", trust_remote_code: bool = False, num_labels: int = 1
) -> PreTrainedModel:
    """A scalar-head model (reward model, critic); a causal-LM checkpoint gets a freshly initialised head."""
    return AutoModelForSequenceClassification.from_pretrained(
        path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, num_labels=num_labels
    )


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant activation recomputation in `model`'s layers (trainer.gradient_checkpointing); active in train()
    mode only, so no-grad forwards (old log-probs, values) run once. Non-reentrant: LoRA's frozen inputs need no
    `enable_input_require_grads`, and the gradients equal those without it."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"trainer.gradient_checkpointing=true: {type(model).__name__} does not support gradient "
                         f"checkpointing (supports_gradient_checkpointing is False); set trainer.gradient_checkpointing=false")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # config.use_cache stays as loaded: exports keep it, and every training forward passes use_cache=False


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer at `path`; without a pad token, EOS doubles as pad (responses are cut at EOS, never by pad id)."""
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def response_logprobs(
    model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, prompt_len: int, temperature: float = 1.0
) -> Tensor:
    """log softmax(logits / temperature) of each response token, (B, T) float32, 0 on padding.

    `input_ids`, `attention_mask`: (B, P + T) in the `Samples` layout with P = `prompt_len`.
    Differentiable: call under `torch.no_grad()` where no gradient is wanted.
    """
    response_ids = input_ids[:, prompt_len:]  # (B, T)
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)
    ).logits  # (B, P + T, V)
    logits = logits[:, prompt_len - 1 : -1]  # (B, T, V): position P-1+t predicts response token t
    logprobs = logprobs_from_logits(logits, response_ids, temperature)  # (B, T)
    return _zero_padding(logprobs, attention_mask[:, prompt_len:])


def response_values(value_model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, prompt_len: int,
                    packing: bool = False) -> Tensor:
    """V(state before response token t), (B, T) float32, 0 on padding; same layout as `response_logprobs`."""
    scores = token_scores(value_model, input_ids, attention_mask, position_ids(attention_mask), packing)  # (B, P + T)
    values = scores[:, prompt_len - 1 : -1]  # (B, T)
    return _zero_padding(values, attention_mask[:, prompt_len:])


def token_scores(
    model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None,
    packing: bool = False,
) -> Tensor:
    """The scalar `score` head of a sequence classifier applied at every position, (B, L) float32.

    HF's own forward pools at the last token that is not `pad_token_id`, which goes wrong when the
    pad id also occurs as a real token (pad = EOS is common); callers pick positions by mask instead.
    `packing`: the backbone runs on the real tokens as one row (`rlhf_ray.packing`, positions those of
    `position_ids(attention_mask)`), the head on its hidden states; 0 at padding.
    """
    head = getattr(model, "score", None)
    if head is None or model.config.num_labels != 1:
        raise ValueError(
            f"{type(model).__name__} needs a `score` head with num_labels=1 (has num_labels="
            f"{model.config.num_labels}); load it with load_sequence_classifier(..., num_labels=1)."
        )
    backbone = getattr(model, model.base_model_prefix)
    if packing:
        from rlhf_ray.packing import packed_outputs, unpack

        out, packed = packed_outputs(backbone, input_ids, attention_mask, config=model.config)
        return unpack(head(out.last_hidden_state).squeeze(-1).float(), packed, fill=0.0)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    return head(hidden).squeeze(-1).float()  # (B, L)


def _zero_padding(x: Tensor, mask: Tensor) -> Tensor:
    # `where`, not multiply: logits at padded positions may be non-finite and NaN·0 is NaN.
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
