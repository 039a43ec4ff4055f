"""`ModelReward`: an HF sequence classifier (num_labels=1) as a reward source, scored at the last
real token of prompt ⊕ response (ARCHITECTURE.md §5).

Input convention (the one the reward model is trained on, prompt ⊕ response ⊕ EOS): the text
`prompt + response` is tokenised with the reward model's own tokenizer (its default special
tokens, e.g. a BOS, included) and its EOS is appended when `metadata[i].get("stopped", True)`,
i.e. when the policy ended the response with EOS; a response cut at the length limit is scored
without one. Prompts arrive as text, chat template already applied. Rows are right-padded so
every real token keeps its unpadded position, and the score is read at the last
attention-mask position (not HF's pad-id pooling, which breaks when pad = EOS).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rlhf_ray.models import load_sequence_classifier, load_tokenizer, token_scores
from rlhf_ray.rewards.base import check_scores

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class ModelReward:
    def __init__(
        self,
        path: str,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        batch_size: int = 32,
        trust_remote_code: bool = False,
        name: str | None = None,
        dtype: str | torch.dtype = "float32",
    ):
        """`tokenizer`: a tokenizer or its path; default: the one saved with the reward model."""
        self.name = name or path.rstrip("/").rpartition("/")[2]
        self.model = load_sequence_classifier(path, dtype, trust_remote_code, num_labels=1).eval()
        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer or path, trust_remote_code)
        self.tokenizer = tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.batch_size = batch_size

    @torch.inference_mode()
    def score(self, prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
        sequences = [self._encode(p + r, m.get("stopped", True)) for p, r, m in zip(prompts, responses, metadata)]
        scores: list[float] = []
        for start in range(0, len(sequences), self.batch_size):
            scores += self._score_batch(sequences[start : start + self.batch_size])
        return check_scores(self.name, scores, len(prompts))

    def _encode(self, text: str, stopped: bool) -> list[int]:
        ids = self.tokenizer(text)["input_ids"]
        eos = self.tokenizer.eos_token_id
        if stopped and eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        return ids

    def _score_batch(self, sequences: list[list[int]]) -> list[float]:
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, s in enumerate(sequences):
            input_ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
            attention_mask[row, : len(s)] = 1
        device = self.model.device
        per_token = token_scores(self.model, input_ids.to(device), attention_mask.to(device)).cpu()  # (B, L)
        last = attention_mask.sum(-1) - 1  # (B,) right padding: last real token
        return per_token.gather(1, last.unsqueeze(1)).squeeze(1).tolist()
