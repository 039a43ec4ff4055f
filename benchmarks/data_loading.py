"""Data loading benchmark: rows/s, wall time and peak memory of the real loaders on big generated files.

    python benchmarks/data_loading.py                        # 100k rows per variant
    python benchmarks/data_loading.py --rows 20000 --variants pref-ultrafeedback
    python benchmarks/data_loading.py --rows 20000 --profile pref-hh   # + cProfile's top functions (parent only)

Writes `--rows` rows per variant into a temporary JSONL file in a published schema, then loads it
through the project's own loader (`rlhf_ray.data.load_preferences` / `load_sft` / `load_prompts`)
with the offline char tokenizer (`rlhf_ray.toy.build_char_tokenizer`, a real `tokenizers` fast
tokenizer with a chat template), `on_bad_row="skip"`; about 0.5% of the rows are bad on purpose.

- `pref-ultrafeedback`: UltraFeedback-binarized: `prompt` string, `chosen` / `rejected` as 2-message
  lists repeating the user turn, `score_chosen` / `score_rejected`, `prompt_id`, `messages`.
- `pref-hh`: Anthropic HH-RLHF: `chosen` / `rejected` whole transcripts, a quarter of them multi-turn.
- `sft-messages`: no_robots: `prompt`, `prompt_id`, `messages` (a system turn in some, a fifth
  multi-turn: every assistant turn trained), `category`.
- `prompts-gsm8k`: GSM8K: `question`, `answer` (worked solution ending in `#### n`) as metadata.

Each variant runs in a fresh process, so its peak RSS (`resource.getrusage`) is its own: "peak" is the
process's maximum RSS, "+load" that minus the RSS just before the load call (imports, tokenizer),
i.e. what loading and the returned examples cost; "examples MiB" is what the returned examples
themselves hold (their lists and objects), so "+load" minus it is the loader's own overhead;
"worker MiB" is the peak private memory (USS) of one worker process the loader forked (0: parsed in
one process). The `datasets` cache goes to the temporary directory, so each run includes the JSON → Arrow
conversion a first load pays. "digest" hashes every returned example and the load report: two code
versions (or worker settings) give identical outputs iff their digests match.

    RLHF_RAY_DATA_WORKERS=1 python benchmarks/data_loading.py    # parse in one process, for comparison
    python benchmarks/data_loading.py --tokenizer bpe             # a byte-level BPE with a ChatML template

Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("pref-ultrafeedback", "pref-hh", "sft-messages", "prompts-gsm8k")
MAX_PROMPT_LEN = 2048  # char tokenizer: one token per character
MAX_RESPONSE_LEN = 1024
BAD_EVERY = 200  # one bad row in this many

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have "
         "an had they you were their one all we can her has there been if more when will would who so no "
         "model answer reward policy value gradient sample token prompt response chosen rejected human "
         "assistant number apples train loss step batch learning rate people time year way day thing man "
         "world life hand part child eye woman place work week case point government company").split()


def _words(rng: random.Random, low: int, high: int) -> str:
    text = " ".join(rng.choices(WORDS, k=rng.randint(low, high)))
    return text[0].upper() + text[1:] + rng.choice(".?!")


def _row(variant: str, i: int, rng: random.Random) -> dict:
    bad = i % BAD_EVERY == BAD_EVERY - 1
    if variant == "pref-ultrafeedback":
        prompt, chosen, rejected = _words(rng, 10, 50), _words(rng, 20, 120), _words(rng, 20, 120)
        if bad:
            rejected = chosen  # identical_pair
        return {"prompt": prompt, "prompt_id": f"{i:064x}",
                "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}],
                "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": rejected}],
                "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}],
                "score_chosen": float(rng.randint(6, 10)), "score_rejected": float(rng.randint(1, 5))}
    if variant == "pref-hh":
        turns = 2 if i % 4 == 0 else 0
        context = "".join(f"\n\nHuman: {_words(rng, 5, 25)}\n\nAssistant: {_words(rng, 10, 40)}" for _ in range(turns))
        context += f"\n\nHuman: {_words(rng, 10, 50)}\n\nAssistant:"
        chosen, rejected = f"{context} {_words(rng, 20, 100)}", f"{context} {_words(rng, 20, 100)}"
        return {"chosen": chosen, "rejected": chosen if bad else rejected}  # bad: identical_pair
    if variant == "sft-messages":
        prompt = _words(rng, 10, 50)
        messages = [{"role": "system", "content": _words(rng, 5, 15)}] if i % 3 == 0 else []
        if i % 5 == 0:
            messages += [{"role": "user", "content": _words(rng, 5, 20)},
                         {"role": "assistant", "content": _words(rng, 10, 40)}]
        messages += [{"role": "user", "content": prompt},
                     {"role": "assistant", "content": "" if bad else _words(rng, 20, 120)}]  # bad: empty
        return {"prompt": prompt, "prompt_id": f"{i:064x}", "messages": messages, "category": "Chat"}
    if variant == "prompts-gsm8k":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        question = f"{_words(rng, 15, 60)} {a} plus {b}?"
        return {"question": "   " if bad else question,  # bad: empty
                "answer": f"{_words(rng, 10, 40)} {a}+{b}=<<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"}
    raise ValueError(variant)


def write_rows(variant: str, rows: int, path: Path) -> None:
    rng = random.Random(f"{variant}:{rows}")
    with open(path, "w") as f:
        f.writelines(json.dumps(_row(variant, i, rng)) + "\n" for i in range(rows))


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _digest(examples: list, report) -> str:
    import dataclasses
    import hashlib
    import pickle

    digest = hashlib.sha256(repr(dataclasses.replace(report, source="")).encode())
    for example in examples:
        digest.update(pickle.dumps(example, protocol=4))
    return digest.hexdigest()[:16]


def _examples_mib(examples: list) -> float:
    """What the returned examples hold: list and dict containers, plus int objects above CPython's small-int cache."""
    total = sys.getsizeof(examples)
    for example in examples:
        total += sys.getsizeof(example) + sys.getsizeof(example.__dict__)
        for value in example.__dict__.values():
            lists = value if isinstance(value, list) and value and isinstance(value[0], list) else [value]
            for item in lists:
                if isinstance(item, list):
                    total += sys.getsizeof(item) + 28 * len([i for i in item if isinstance(i, int) and i > 256])
    return total / 2**20


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def build_bpe_tokenizer():
    """A byte-level BPE (2,000 ids) trained offline on generated text, with a ChatML template (Qwen 2.5 style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    rng = random.Random(0)
    backend.train_from_iterator((_words(rng, 20, 100) for _ in range(2000)), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=specials[1:])
    tokenizer.chat_template = CHATML
    return tokenizer


class _WorkerMemory:
    """Samples the loader's worker processes every 0.2 s: the peak USS (memory private to one worker; pages it
    still shares with the parent since the fork are not counted). 0 when there were none or psutil is missing."""

    def __init__(self):
        import threading

        self.peak_uss_mib = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        try:
            import psutil
        except ImportError:
            return
        me = psutil.Process()
        while not self._done.wait(0.2):
            for child in me.children(recursive=True):
                try:
                    self.peak_uss_mib = max(self.peak_uss_mib, child.memory_full_info().uss / 2**20)
                except psutil.Error:
                    pass

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def run_child(variant: str, path: str, tokenizer_name: str, profile: bool) -> dict:
    """Load `path` once in this process; the figures as a dict."""
    import resource

    from rlhf_ray.data import load_preferences, load_prompts, load_sft
    from rlhf_ray.toy import build_char_tokenizer

    tokenizer = build_char_tokenizer() if tokenizer_name == "char" else build_bpe_tokenizer()
    loader = {"pref": load_preferences, "sft": load_sft, "prompts": load_prompts}[variant.split("-")[0]]
    options = {"max_prompt_len": MAX_PROMPT_LEN, "on_bad_row": "skip"}
    if loader is not load_prompts:
        options["max_response_len"] = MAX_RESPONSE_LEN
    before = _rss_mib()
    workers = _WorkerMemory()
    profiler = None
    if profile:
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
    start = time.perf_counter()
    examples, report = loader(path, tokenizer, **options)
    seconds = time.perf_counter() - start
    workers.stop()
    if profiler is not None:
        import io
        import pstats
        profiler.disable()
        out = io.StringIO()
        for order in ("cumulative", "tottime"):
            pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(25)
        print(out.getvalue(), file=sys.stderr)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "rows": report.rows_in, "kept": report.kept, "dropped": report.dropped,
            "seconds": seconds, "rows_per_s": report.rows_in / seconds, "peak_mib": peak, "load_mib": peak - before,
            "worker_mib": workers.peak_uss_mib,
            "format": report.format, "digest": _digest(examples, report), "examples_mib": _examples_mib(examples)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows per variant")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--profile", choices=VARIANTS, help="print cProfile's top functions for this variant")
    parser.add_argument("--tokenizer", choices=("char", "bpe"), default="char",
                        help="char: rlhf_ray.toy's char tokenizer; bpe: a byte-level BPE trained offline "
                        "with a ChatML template")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(*args.child, args.tokenizer, profile=args.profile is not None)))
        return 0

    print(f"tokenizer: {args.tokenizer}; {args.rows} rows per variant")
    print(f"{'variant':<20} {'rows':>7} {'kept':>7} {'seconds':>8} {'rows/s':>8} {'peak MiB':>9} {'+load MiB':>9} "
          f"{'examples MiB':>12} {'worker MiB':>10}  {'digest':<16}  format")
    with tempfile.TemporaryDirectory(prefix="rlhf_data_bench_") as tmp:
        env = os.environ | {"HF_DATASETS_CACHE": str(Path(tmp) / "hf_cache"),
                            "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
        for variant in args.variants:
            path = Path(tmp) / f"{variant}.jsonl"
            write_rows(variant, args.rows, path)
            command = [sys.executable, __file__, "--child", variant, str(path), "--tokenizer", args.tokenizer]
            if args.profile == variant:
                command += ["--profile", variant]
            done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{variant:<20} {r['rows']:>7} {r['kept']:>7} {r['seconds']:>8.2f} {r['rows_per_s']:>8.0f} "
                  f"{r['peak_mib']:>9.0f} {r['load_mib']:>9.0f} {r['examples_mib']:>12.0f} {r['worker_mib']:>10.0f}  "
                  f"{r['digest']:<16}  {r['format']}; dropped {r['dropped']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
