"""The synthetic "vowel" task: seeded prompts, demonstrations, preferences and a rule reward.

Prompts are `"say: " + 4..8 random lowercase letters + "\\n"` (10..14 characters), e.g.
`"say: qzkpd\\n"`. The hidden rule ignores the prompt: a response is better the larger its share
of vowels, `toy_score = #chars in "aeiou" / max(1, len(response))`, in [0, 1]. A policy trained
with SFT, a reward model, DPO or PPO on this data should raise its mean `toy_score`, which makes
every stage checkable on CPU in seconds.

Responses are 4..12 lowercase letters, each a vowel with probability `p_vowel`:
- SFT demonstrations use p_vowel = 0.6 (the "good format");
- preference pairs, ranked lists and KTO examples draw p_vowel ~ U[0.05, 0.95] per response;
  pairs and lists never tie (tied draws are resampled); KTO marks score >= 0.5 desirable.

`ToyTask(seed)` holds one `random.Random`, so outputs depend on the seed and the call order;
`write_toy_datasets` calls in a fixed order and gives byte-identical files for a seed.
"""

import dataclasses
import json
import random
import string
from pathlib import Path

VOWELS = "aeiou"
CONSONANTS = "".join(c for c in string.ascii_lowercase if c not in VOWELS)
PROMPT_PREFIX = "say: "
SFT_P_VOWEL = 0.6


@dataclasses.dataclass(frozen=True)
class SFTExample:
    prompt: str
    response: str


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str  # toy_score(chosen) > toy_score(rejected), strictly
    rejected: str


@dataclasses.dataclass(frozen=True)
class RankedList:
    prompt: str
    responses: list[str]  # best first
    scores: list[float]  # toy_score of each response, strictly decreasing


@dataclasses.dataclass(frozen=True)
class KTOExample:
    prompt: str
    response: str
    label: bool  # desirable: toy_score >= 0.5


@dataclasses.dataclass(frozen=True)
class ToyDataPaths:
    """JSONL files written by `write_toy_datasets`."""

    prompts_train: str
    prompts_eval: str
    sft_train: str
    sft_eval: str
    sft_chat_train: str
    preference_train: str
    preference_eval: str
    ranked_train: str
    ranked_eval: str
    kto_train: str
    kto_eval: str


def toy_score(prompt: str, response: str) -> float:
    """Share of vowels in `response`, in [0, 1]; the prompt is ignored."""
    return sum(c in VOWELS for c in response) / max(1, len(response))


def vowel_reward(
    prompts: list[str], responses: list[str], metadata: list[dict] | None = None
) -> list[float]:
    """Rule reward for the trainer (`rlhf_ray.toy.task:vowel_reward`): `toy_score` per sample."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [toy_score(p, r) for p, r in zip(prompts, responses)]


def a_heavy_vowel_reward(
    prompts: list[str], responses: list[str], metadata: list[dict] | None = None
) -> list[float]:
    """A hackable proxy (`configs/toy_overopt.yaml`): per character, 'a' scores 1, any other vowel 0.6, the
    rest 0, averaged. It agrees with the gold while consonants turn into vowels, then pays for
    collapsing every vowel into 'a'."""
    return [sum(1.0 if c == "a" else 0.6 if c in VOWELS else 0.0 for c in r) / max(1, len(r)) for r in responses]


def vowel_variety_reward(
    prompts: list[str], responses: list[str], metadata: list[dict] | None = None
) -> list[float]:
    """The gold beside `a_heavy_vowel_reward`: the vowel share times the share of the five vowels used,
    so a response of only 'a' scores 1/5 of one that uses every vowel."""
    return [toy_score(p, r) * len(set(r) & set(VOWELS)) / len(VOWELS) for p, r in zip(prompts, responses)]


def format_reward(
    prompts: list[str], responses: list[str], metadata: list[dict] | None = None
) -> list[float]:
    """The toy format, 1 or 0 per sample (`rlhf_ray.toy.task:format_reward`): 1..16 lowercase letters,
    ended with EOS (`metadata[i]["stopped"]`, set by the reward worker; True when absent)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    metadata = metadata or [{} for _ in responses]
    return [float(0 < len(r) <= 16 and all(c in string.ascii_lowercase for c in r) and m.get("stopped", True))
            for r, m in zip(responses, metadata)]


class ToyTask:
    """Seeded generator of the task's prompts and training examples."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def prompts(self, n: int) -> list[str]:
        return [self._prompt() for _ in range(n)]

    def sft_examples(self, n: int) -> list[SFTExample]:
        return [SFTExample(self._prompt(), self._response(SFT_P_VOWEL)) for _ in range(n)]

    def preference_pairs(self, n: int) -> list[PreferencePair]:
        pairs = []
        for _ in range(n):
            prompt = self._prompt()
            (chosen, rejected), _ = self._ranked_responses(2)
            pairs.append(PreferencePair(prompt, chosen, rejected))
        return pairs

    def ranked_lists(self, n: int, k: int = 4) -> list[RankedList]:
        lists = []
        for _ in range(n):
            prompt = self._prompt()
            responses, scores = self._ranked_responses(k)
            lists.append(RankedList(prompt, responses, scores))
        return lists

    def kto_examples(self, n: int) -> list[KTOExample]:
        examples = []
        for _ in range(n):
            prompt = self._prompt()
            response = self._response(self.rng.uniform(0.05, 0.95))
            examples.append(KTOExample(prompt, response, toy_score(prompt, response) >= 0.5))
        return examples

    def _prompt(self) -> str:
        word = "".join(self.rng.choices(string.ascii_lowercase, k=self.rng.randint(4, 8)))
        return f"{PROMPT_PREFIX}{word}\n"

    def _response(self, p_vowel: float) -> str:
        length = self.rng.randint(4, 12)
        return "".join(
            self.rng.choice(VOWELS if self.rng.random() < p_vowel else CONSONANTS)
            for _ in range(length)
        )

    def _ranked_responses(self, k: int) -> tuple[list[str], list[float]]:
        """k responses with distinct scores, best first; draws with a tie are redrawn."""
        while True:
            responses = [self._response(self.rng.uniform(0.05, 0.95)) for _ in range(k)]
            scores = [toy_score("", r) for r in responses]
            if len(set(scores)) == k:
                break
        ranked = sorted(zip(scores, responses), reverse=True)
        return [r for _, r in ranked], [s for s, _ in ranked]


def write_toy_datasets(
    out_dir: str | Path, seed: int = 0, n_train: int = 512, n_eval: int = 64
) -> ToyDataPaths:
    """Write `<kind>_{train,eval}.jsonl` for every kind, plus `sft_chat_train.jsonl`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task = ToyTask(seed)
    n = n_train + n_eval
    rows = {
        "prompts": [{"prompt": p} for p in task.prompts(n)],
        "sft": [dataclasses.asdict(e) for e in task.sft_examples(n)],
        "preference": [dataclasses.asdict(e) for e in task.preference_pairs(n)],
        "ranked": [dataclasses.asdict(e) for e in task.ranked_lists(n)],
        "kto": [dataclasses.asdict(e) for e in task.kto_examples(n)],
    }
    paths = {}
    for kind, kind_rows in rows.items():
        paths[f"{kind}_train"] = _write_jsonl(out_dir / f"{kind}_train.jsonl", kind_rows[:n_train])
        paths[f"{kind}_eval"] = _write_jsonl(out_dir / f"{kind}_eval.jsonl", kind_rows[n_train:])
    chat_rows = [_as_messages(row) for row in rows["sft"][:n_train]]
    paths["sft_chat_train"] = _write_jsonl(out_dir / "sft_chat_train.jsonl", chat_rows)
    return ToyDataPaths(**paths)


def _as_messages(sft_row: dict) -> dict:
    """The same SFT pair as a two-turn chat, for chat-template tests."""
    return {
        "messages": [
            {"role": "user", "content": sft_row["prompt"]},
            {"role": "assistant", "content": sft_row["response"]},
        ]
    }


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


CLEAR_GAP = 0.4  # toy RM-evaluation pairs whose vowel shares differ by at least this are in subset "clear"


def toy_reward_bench_rows(seed: int = 0, n: int = 64) -> list[dict]:
    """RewardBench-style rows (prompt, chosen, rejected, subset) of toy preference pairs: subset "clear"
    when toy_score(chosen) − toy_score(rejected) >= CLEAR_GAP, else "close" (the harder pairs)."""
    return [{**dataclasses.asdict(p),
             "subset": "clear" if toy_score("", p.chosen) - toy_score("", p.rejected) >= CLEAR_GAP else "close"}
            for p in ToyTask(seed).preference_pairs(n)]


def write_toy_reward_bench(path: str | Path, seed: int = 0, n: int = 64) -> str:
    """`toy_reward_bench_rows` as a JSONL file (the eval stage's eval.preference_data='toy')."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_jsonl(path, toy_reward_bench_rows(seed, n))
