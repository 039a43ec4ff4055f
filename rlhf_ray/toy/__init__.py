"""Offline toy kit: a char-level tokenizer, tiny random Llama models and the synthetic vowel task.

Everything is built locally from code (no model hub), deterministically from a seed, so CPU
tests and demos run the real HF/DeepSpeed/Ray code paths in seconds.
`python -m rlhf_ray.toy.selfcheck` builds, saves, reloads and runs all of it once.
"""

from rlhf_ray.toy.task import (
    KTOExample,
    PreferencePair,
    RankedList,
    SFTExample,
    ToyDataPaths,
    ToyTask,
    toy_score,
    vowel_reward,
    write_toy_datasets,
)
from rlhf_ray.toy.tokenizer import build_char_tokenizer

_MODELS = ("ToyModelPaths", "build_critic", "build_policy", "build_reward_model", "save_toy_models", "toy_llama_config")


def __getattr__(name: str):
    """The model builders load on first use: they import transformers' modeling stack (~2 s of CPU),
    which a process that only scores with `rlhf_ray.toy.task:vowel_reward` (the driver) never needs."""
    if name in _MODELS:
        from rlhf_ray.toy import models

        return getattr(models, name)
    raise AttributeError(f"module 'rlhf_ray.toy' has no attribute '{name}'")

__all__ = [
    "KTOExample",
    "PreferencePair",
    "RankedList",
    "SFTExample",
    "ToyDataPaths",
    "ToyModelPaths",
    "ToyTask",
    "build_char_tokenizer",
    "build_critic",
    "build_policy",
    "build_reward_model",
    "save_toy_models",
    "toy_llama_config",
    "toy_score",
    "vowel_reward",
    "write_toy_datasets",
]
