"""Tiny random Llama-style models for CPU tests and demos, built from configs (no download).

Three roles share one backbone shape: the policy is `LlamaForCausalLM`; the reward model and
the critic are `LlamaForSequenceClassification` with one label. HF pools that head at the
last non-pad token of each row (left or right padding), which is the reward model's score; the
critic applies the same `score` head to every position to get per-token values. Default sizes
give ~95K parameters; the benchmark uses hidden 128, intermediate 512, 4 layers (~1.08M).
Weights depend only on the seed: each builder seeds torch inside `fork_rng`, so the caller's
global RNG is left as it was.
"""

import dataclasses
from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerBase,
)

from rlhf_ray.toy.tokenizer import build_char_tokenizer


@dataclasses.dataclass(frozen=True)
class ToyModelPaths:
    """Directories written by `save_toy_models`; each model dir also holds the tokenizer."""

    policy: str
    reward: str
    critic: str
    tokenizer: str


def toy_llama_config(
    vocab_size: int,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 256,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> LlamaConfig:
    """Config of a tiny Llama; special-token ids come from `tokenizer` when given."""
    special_ids = {}
    if tokenizer is not None:
        special_ids = {
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        **special_ids,
    )


def build_policy(tokenizer: PreTrainedTokenizerBase, seed: int = 0, **sizes) -> LlamaForCausalLM:
    """Random causal LM; `sizes` are `toy_llama_config` keyword arguments."""
    config = toy_llama_config(len(tokenizer), tokenizer=tokenizer, **sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def build_reward_model(
    tokenizer: PreTrainedTokenizerBase, seed: int = 0, **sizes
) -> LlamaForSequenceClassification:
    """Random scalar-head model: `.logits` is (B, 1), read at each row's last non-pad token."""
    config = toy_llama_config(len(tokenizer), tokenizer=tokenizer, **sizes)
    config.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForSequenceClassification(config)


def build_critic(
    tokenizer: PreTrainedTokenizerBase, seed: int = 0, **sizes
) -> LlamaForSequenceClassification:
    """Random value model: the reward architecture, its `score` head read at every token."""
    return build_reward_model(tokenizer, seed=seed, **sizes)


def save_toy_models(out_dir: str | Path, seed: int = 0, **sizes) -> ToyModelPaths:
    """Build the tokenizer and the three models and `save_pretrained` them under `out_dir`."""
    out_dir = Path(out_dir)
    tokenizer = build_char_tokenizer()
    # Distinct seeds per role, so a test that swaps reward and critic sees different numbers.
    models = {
        "policy": build_policy(tokenizer, seed=seed, **sizes),
        "reward": build_reward_model(tokenizer, seed=seed + 1, **sizes),
        "critic": build_critic(tokenizer, seed=seed + 2, **sizes),
    }
    for role, model in models.items():
        model.save_pretrained(out_dir / role)
        tokenizer.save_pretrained(out_dir / role)
    tokenizer.save_pretrained(out_dir / "tokenizer")
    return ToyModelPaths(
        policy=str(out_dir / "policy"),
        reward=str(out_dir / "reward"),
        critic=str(out_dir / "critic"),
        tokenizer=str(out_dir / "tokenizer"),
    )
