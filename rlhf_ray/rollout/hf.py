"""`HFRolloutEngine`: the always-available rollout engine, HF `model.generate` on CPU or one GPU.

Token ids in, a `Samples` batch out (layout in rlhf_ray/batch.py). Decisions:
- Sampling reproduces π at temperature T with only top-p/top-k on top: the model's own
  `generation_config` (repetition penalty, min-p, … from a checkpoint) is replaced at
  construction so it cannot change the distribution the PPO ratio assumes.
- Each call seeds torch inside `fork_rng`: the same prompts, params, seed and `max_batch`
  give identical samples, and the caller's global RNG is untouched.
- A response ends at its FIRST EOS (kept, mask 1); later positions are pad id with mask 0.
  The mask never comes from `!= pad_token_id`: a random tiny model samples the pad id as
  an ordinary token (STACK-NOTES "HF generate as the CPU rollout engine").
- Behaviour log-probs (`params.logprobs`) are recorded by a logits processor from the model's raw
  float32 logits at temperature T, the trainer's formula, before special tokens are suppressed
  (the processor suppresses them itself, after recording, exactly as HF's own processor would):
  asking for them never changes the samples. Only one step's (B, V) log-softmax is held at a time.
- Weights arrive as numpy arrays by parameter name. numpy has no bfloat16, so an int16
  array is always a bfloat16 payload viewed as int16 (`t.view(torch.int16).numpy()`); no
  model parameter is int16, so this is unambiguous.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from rlhf_ray.batch import Samples, pad_to
from rlhf_ray.rollout.base import SamplingParams, array_to_tensor, cut_at_first_eos, left_pad, probe_logprobs_from_logits


class HFRolloutEngine:
    """`RolloutEngine` over an HF causal LM; `max_batch` caps the rows of one `generate` call."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_batch: int | None = None):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; responses could never stop.")
        self.model = model.eval()
        self.eos_token_id: int = tokenizer.eos_token_id
        self.pad_token_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        self.special_token_ids = sorted({*tokenizer.all_special_ids, self.eos_token_id, self.pad_token_id})
        self.max_batch = max_batch
        self.model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id
        )

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int, first_index: int = 0) -> Samples:
        """`params.n` samples per prompt, rows [i·n, (i+1)·n) from prompt i. One torch generator for the
        call, seeded with seed + 7919·first_index: samples depend on how the batch is split."""
        seed += 7919 * first_index
        prompt_ids, prompt_mask = left_pad([p for p in prompts for _ in range(params.n)], self.pad_token_id)  # (B, P)
        rows = self.max_batch or prompt_ids.shape[0]
        with torch.random.fork_rng(devices=self._rng_devices()):
            torch.manual_seed(seed)
            generated = [
                self._generate_rows(prompt_ids[i : i + rows], prompt_mask[i : i + rows], params)
                for i in range(0, prompt_ids.shape[0], rows)
            ]  # ((rows, L_chunk) tokens, (rows, L_chunk) log-probs or None) each
        width = max(g.shape[1] for g, _ in generated)
        tokens = torch.cat([pad_to(g, width, self.pad_token_id, left=False) for g, _ in generated])  # (B, L)
        response_ids, response_mask, stopped = cut_at_first_eos(tokens, self.eos_token_id, self.pad_token_id)
        logprobs = None
        if params.logprobs and not params.greedy:
            logprobs = torch.cat([pad_to(lp, width, 0.0, left=False) for _, lp in generated])[:, : response_ids.shape[1]]
            logprobs = torch.where(response_mask.bool(), logprobs, 0.0)
        return Samples(prompt_ids, prompt_mask, response_ids, response_mask, stopped, logprobs=logprobs)

    def _generate_rows(self, prompt_ids: Tensor, prompt_mask: Tensor,
                       params: SamplingParams) -> tuple[Tensor, Tensor | None]:
        """New tokens of one chunk, (rows, L) with L <= max_new_tokens (rows that stopped early are
        pad-filled), and their behaviour log-probs (rows, L) when asked for."""
        device = self.model.device
        suppress = self.special_token_ids if params.suppress_special_tokens else None
        recorder = None
        if params.logprobs and not params.greedy:
            recorder, suppress = BehaviourLogprobs(params.temperature, suppress), None
        sequences = self.model.generate(
            input_ids=prompt_ids.to(device),
            attention_mask=prompt_mask.to(device),
            max_new_tokens=params.max_new_tokens,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            use_cache=True,
            suppress_tokens=suppress,
            logits_processor=LogitsProcessorList([recorder]) if recorder else None,
            **_decoding_kwargs(params),
        )
        new = sequences[:, prompt_ids.shape[1] :]
        return new.cpu(), recorder.finish(new).cpu() if recorder else None

    def _rng_devices(self) -> list[torch.device]:
        return [self.model.device] if self.model.device.type == "cuda" else []

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, Tensor | np.ndarray]]) -> None:
        """Copy each (name, tensor or array) into the parameter of that name; every name and shape is
        checked before any is copied, so a mismatched sender leaves the engine as it was."""
        params = dict(self.model.named_parameters())
        named = [(name, array_to_tensor(v) if isinstance(v, np.ndarray) else v) for name, v in weights]
        unknown = sorted({name for name, _ in named} - set(params))
        if unknown:
            more = " …" if len(unknown) > 5 else ""
            raise KeyError(f"load_weights: unknown parameter names {unknown[:5]}{more} (the model has e.g. "
                           f"{sorted(params)[:3]}); sender and engine must hold the same architecture.")
        for name, tensor in named:
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise ValueError(f"load_weights: '{name}' has shape {tuple(tensor.shape)}, "
                                 f"the model's is {tuple(params[name].shape)}.")
        for name, tensor in named:
            params[name].data.copy_(tensor)  # copy_ converts dtype and device

    @torch.inference_mode()
    def probe_logprobs(self, token_ids: list[int]) -> np.ndarray:
        """log π(token_ids[t] | token_ids[:t]), t = 1 … L-1, at temperature 1, float64 (L-1,)."""
        ids = torch.tensor([token_ids], device=self.model.device)
        return probe_logprobs_from_logits(self.model(input_ids=ids, use_cache=False).logits, ids)

    def sleep(self) -> None:
        """Nothing to free: HF generate holds no KV cache between calls."""

    def wake(self) -> None:
        """See `sleep`."""


class BehaviourLogprobs(LogitsProcessor):
    """Records log-softmax(raw logits / T) at each step's sampled token, then suppresses `suppress`
    ids (HF runs custom processors after its own suppression and before temperature/top-k/top-p,
    so suppressing here instead keeps the sampling distribution, and the samples, unchanged).

    Step k's token is only known at step k+1 (the last column of `input_ids`), so the (B, V)
    log-probs of one step are held until then; `finish` gathers the last step's."""

    def __init__(self, temperature: float, suppress: list[int] | None):
        self.temperature, self.suppress = temperature, suppress
        self.taken: list[Tensor] = []  # (B,) per finished step
        self.pending: Tensor | None = None  # (B, V) log-probs of the step in progress

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.pending is not None:
            self.taken.append(self.pending.gather(1, input_ids[:, -1:]).squeeze(1))
        self.pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        if self.suppress:
            scores = scores.index_fill(1, torch.tensor(self.suppress, device=scores.device), float("-inf"))
        return scores

    def finish(self, new_tokens: Tensor) -> Tensor:
        """(B, L) log-probs of the L new tokens."""
        if self.pending is not None and len(self.taken) < new_tokens.shape[1]:
            self.taken.append(self.pending.gather(1, new_tokens[:, len(self.taken) : len(self.taken) + 1]).squeeze(1))
        self.pending = None
        return torch.stack(self.taken, dim=1) if self.taken else new_tokens.new_zeros(new_tokens.shape, dtype=torch.float32)


def _decoding_kwargs(params: SamplingParams) -> dict:
    if params.greedy:
        return {"do_sample": False}
    # top_k must be passed explicitly: HF's default when unset is 50.
    return {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k}
