"""Build the toy kit, reload it the way the trainer does, run each model once, print a report.

    python -m rlhf_ray.toy.selfcheck [--out DIR] [--seed N]

Exits non-zero if any check fails.
"""

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from rlhf_ray.toy.models import save_toy_models
from rlhf_ray.toy.task import ToyTask, vowel_reward, write_toy_datasets

ROUND_TRIP_TEXT = "Hello, world!\n  {x: [1, 2]} ~ ok?\n"
CHAT = [{"role": "user", "content": "say: hi\n"}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="directory to build into (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0, help="seed for models and data")
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()
    try:
        if args.out:
            run_checks(Path(args.out), args.seed)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                run_checks(Path(tmp), args.seed)
    except Exception as error:  # report any failure as one line and a non-zero exit
        print(f"FAILED: {type(error).__name__}: {error}")
        return 1
    print("OK")
    return 0


@torch.no_grad()
def run_checks(out_dir: Path, seed: int) -> None:
    """Raise on the first failed check; print what was built along the way."""
    model_paths = save_toy_models(out_dir / "models", seed=seed)
    data_paths = write_toy_datasets(out_dir / "data", seed=seed)

    tokenizer = AutoTokenizer.from_pretrained(model_paths.policy)
    ids = tokenizer(ROUND_TRIP_TEXT)["input_ids"]
    _check(tokenizer.decode(ids) == ROUND_TRIP_TEXT, "tokenizer decode(encode(s)) != s")
    _check(len(ids) == len(ROUND_TRIP_TEXT), "tokenizer is not one id per character")
    chat = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    _check(chat == "<|user|>say: hi\n</s><|assistant|>", f"chat template gave {chat!r}")
    print(f"tokenizer  vocab {len(tokenizer)}  pad/bos/eos ids "
          f"{tokenizer.pad_token_id}/{tokenizer.bos_token_id}/{tokenizer.eos_token_id}")

    input_ids, attention_mask = _toy_batch(tokenizer, ToyTask(seed).prompts(4))  # (B, T)
    policy = AutoModelForCausalLM.from_pretrained(model_paths.policy)
    logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits
    expected = (*input_ids.shape, len(tokenizer))  # (B, T, V)
    _check(logits.shape == expected, f"policy logits {tuple(logits.shape)}, expected {expected}")
    _report("policy", policy, model_paths.policy, f"logits {tuple(logits.shape)}")

    for role, path in (("reward", model_paths.reward), ("critic", model_paths.critic)):
        model = AutoModelForSequenceClassification.from_pretrained(path)
        scores = model(input_ids=input_ids, attention_mask=attention_mask).logits
        _check(scores.shape == (input_ids.shape[0], 1), f"{role} scores {tuple(scores.shape)}")
        _check(bool(torch.isfinite(scores).all()), f"{role} scores not finite")
        _report(role, model, path, f"scores {tuple(scores.shape)}")

    for name, path in dataclasses.asdict(data_paths).items():
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        _check(len(rows) > 0, f"{name} is empty")
        print(f"data       {name:<17} {len(rows):>4} rows  {path}")
        if name == "sft_train":
            rewards = vowel_reward([r["prompt"] for r in rows], [r["response"] for r in rows])
            mean_reward = sum(rewards) / len(rows)
            print(f"task       mean vowel reward of the SFT demonstrations {mean_reward:.3f}")


def _toy_batch(
    tokenizer: PreTrainedTokenizerBase, texts: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (B, T) ids and mask, as the rollout engine feeds prompts."""
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def _report(role: str, model: torch.nn.Module, path: str, result: str) -> None:
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{role:<10} {type(model).__name__:<32} {n_params:>9,} params  {result}  {path}")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


if __name__ == "__main__":
    sys.exit(main())
