"""Feedback records (human or AI) → the datasets the stages train on (seed notes 004 §2.3, 003 §6.4).

The feedback file is JSON Lines, one record per line, every record an object with `kind` and
`prompt` (a string, or a list of chat messages `{"role", "content"}`, as the data loaders accept)
and the fields of its kind; any other field (`id`, `annotator`, …) is ignored:

| kind         | fields                                                          | becomes |
|--------------|-----------------------------------------------------------------|---------|
| `comparison` | `response_a`, `response_b`, `choice`: "a" / "b" / "tie"         | a preference pair (ties dropped) |
| `rating`     | `response`, `rating`: a number in [1, N] (N = `rating_scale`)   | pairs within a prompt, or a ranked list per prompt |
| `binary`     | `response`, `thumbs`: "up" / "down"                             | a KTO row (`label`: up = desirable) |
| `edit`       | `original`, `corrected`                                         | an SFT example (the corrected text) and a pair (corrected ≻ original) |
| `critique`   | `response`, `critique` (free text)                              | kept as a critique record: context for a revision (`cai.critiques`) |

Ratings of one prompt (prompts compared by their exact JSON value) are grouped; the same response
rated more than once (several annotators) becomes one candidate with the mean rating. As pairs:
every two candidates whose ratings differ by at least `min_gap` give (higher ≻ lower); equal
ratings are ties and dropped. As ranked lists: the candidates best first with their ratings as
`scores`. A prompt with a single rated response gives nothing.

Outputs are the loaders' formats (`rlhf_ray.data.records`): `pairs.jsonl` (`prompt`, `chosen`,
`rejected`, plus `source`: the kind it came from), `ranked.jsonl` (`prompt`, `responses`,
`scores`), `kto.jsonl` (`prompt`, `response`, `label`), `sft.jsonl` (`prompt`, `response`),
`critiques.jsonl` (critique records, itself a feedback file). Every conversion reports records
in, rows out and the rows dropped per reason (`ConversionReport`).

A malformed record — not JSON, not an object, an unknown kind, a missing, mistyped or empty
field, a rating outside [1, N] — raises `DataError` naming file, line, key and reason, or with
`on_bad_row="skip"` is dropped and counted per reason (`ReadReport.malformed`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Literal, Union

from rlhf_ray.data.errors import DataError

Prompt = Union[str, list]  # a string or a list of {"role", "content"} messages


@dataclasses.dataclass(frozen=True)
class Comparison:
    line: int  # 1-based line in the feedback file
    prompt: Prompt
    response_a: str
    response_b: str
    choice: Literal["a", "b", "tie"]


@dataclasses.dataclass(frozen=True)
class Rating:
    line: int
    prompt: Prompt
    response: str
    rating: float  # in [1, rating_scale]


@dataclasses.dataclass(frozen=True)
class Binary:
    line: int
    prompt: Prompt
    response: str
    thumbs_up: bool


@dataclasses.dataclass(frozen=True)
class Edit:
    line: int
    prompt: Prompt
    original: str
    corrected: str


@dataclasses.dataclass(frozen=True)
class Critique:
    line: int
    prompt: Prompt
    response: str
    critique: str


Feedback = Union[Comparison, Rating, Binary, Edit, Critique]
KINDS = {"comparison": Comparison, "rating": Rating, "binary": Binary, "edit": Edit, "critique": Critique}
OUTPUTS = ("pairs", "ranked", "kto", "sft", "critiques")


@dataclasses.dataclass(frozen=True)
class ReadReport:
    """What reading a feedback file did: lines = records of each kind + malformed (blank lines not counted)."""

    source: str
    lines: int  # non-blank lines
    records: dict[str, int]  # kind -> well-formed records
    malformed: dict[str, int]  # reason -> records dropped (on_bad_row="skip")

    def __str__(self) -> str:
        kinds = ", ".join(f"{k}={v}" for k, v in self.records.items() if v) or "none"
        text = f"{self.source}: {sum(self.records.values())}/{self.lines} records ({kinds})"
        if self.malformed:
            text += "; malformed " + ", ".join(f"{k}={v}" for k, v in sorted(self.malformed.items()))
        return text


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """One conversion: `records_in` records of `kind` gave `rows_out` rows of `output`.

    `dropped` counts what gave no row, by reason; its unit is in the reason's name where it is not
    a record (rating pairs: `tied_pairs`, `small_gap_pairs`)."""

    kind: str
    output: str  # pairs | ranked | kto | sft | critiques
    records_in: int
    rows_out: int
    dropped: dict[str, int]

    def __str__(self) -> str:
        text = f"{self.kind} → {self.output}: {self.records_in} records in, {self.rows_out} rows out"
        if self.dropped:
            text += "; dropped " + ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items()))
        return text


Rows = list[dict[str, Any]]


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


class _Bad(Exception):
    def __init__(self, reason: str, key: str | None, detail: str):
        super().__init__(detail)
        self.reason, self.key, self.detail = reason, key, detail


def read_feedback(path: str | Path, rating_scale: int = 5,
                  on_bad_row: Literal["error", "skip"] = "error") -> tuple[list[Feedback], ReadReport]:
    """Every well-formed record of a feedback JSONL file, in file order, and what was read."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "missing_file", "no such feedback file (JSON Lines, one record per line)")
    records: list[Feedback] = []
    malformed: Counter[str] = Counter()
    lines = 0
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            lines += 1
            try:
                records.append(parse_record(text, number, rating_scale))
            except _Bad as bad:
                if on_bad_row == "error":
                    raise DataError(str(path), bad.reason, f"{bad.detail} (on_bad_row=skip drops such records)",
                                    row=number, key=bad.key) from None
                malformed[bad.reason] += 1
    counts = Counter(type(r).__name__.lower() for r in records)
    return records, ReadReport(str(path), lines, {k: counts[k] for k in KINDS}, dict(malformed))


def parse_record(text: str, line: int, rating_scale: int) -> Feedback:
    """One JSONL line → its typed record, or `_Bad` with reason and key."""
    try:
        row = json.loads(text)
    except ValueError as err:
        raise _Bad("invalid_json", None, f"not JSON: {err}") from None
    if not isinstance(row, dict):
        raise _Bad("wrong_type", None, f"expected a JSON object, got {type(row).__name__}")
    kind = _get(row, "kind")
    if kind not in KINDS:
        raise _Bad("bad_value", "kind", f"unknown kind {kind!r}; one of {sorted(KINDS)}")
    prompt = _prompt(_get(row, "prompt"))
    if kind == "comparison":
        choice = _text(row, "choice").lower()
        if choice not in ("a", "b", "tie"):
            raise _Bad("bad_value", "choice", f"expected 'a', 'b' or 'tie', got {row['choice']!r}")
        return Comparison(line, prompt, _text(row, "response_a"), _text(row, "response_b"), choice)
    if kind == "rating":
        return Rating(line, prompt, _text(row, "response"), _rating(_get(row, "rating"), rating_scale))
    if kind == "binary":
        thumbs = _text(row, "thumbs").lower()
        if thumbs not in ("up", "down"):
            raise _Bad("bad_value", "thumbs", f"expected 'up' or 'down', got {row['thumbs']!r}")
        return Binary(line, prompt, _text(row, "response"), thumbs == "up")
    if kind == "edit":
        return Edit(line, prompt, _text(row, "original"), _text(row, "corrected"))
    return Critique(line, prompt, _text(row, "response"), _text(row, "critique"))


def _get(row: dict[str, Any], key: str) -> Any:
    if row.get(key) is None:
        raise _Bad("missing_key", key, "missing or null")
    return row[key]


def _text(row: dict[str, Any], key: str) -> str:
    value = _get(row, key)
    if not isinstance(value, str):
        raise _Bad("wrong_type", key, f"expected a string, got {type(value).__name__} {value!r:.60}")
    if not value.strip():
        raise _Bad("empty", key, "empty or whitespace-only string")
    return value


def _prompt(value: Any) -> Prompt:
    if isinstance(value, str):
        if not value.strip():
            raise _Bad("empty", "prompt", "empty or whitespace-only string")
        return value
    if not isinstance(value, list) or not value:
        raise _Bad("wrong_type", "prompt", f"expected a string or a non-empty list of chat messages, got {value!r:.60}")
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise _Bad("wrong_type", "prompt", f"message {i} is not {{'role': str, 'content': str}}: {message!r:.80}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _rating(value: Any, scale: int) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad("wrong_type", "rating", f"expected a number, got {value!r:.60}")
    if not (math.isfinite(value) and 1 <= value <= scale):
        raise _Bad("bad_value", "rating", f"{value} is outside [1, {scale}] (feedback.rating_scale={scale})")
    return float(value)


# ---------------------------------------------------------------------------------------------
# Conversions: records of one kind → rows of one format, and the report
# ---------------------------------------------------------------------------------------------


def comparisons_to_pairs(records: list[Comparison]) -> tuple[Rows, ConversionReport]:
    """(the chosen response ≻ the other); ties and identical responses give no pair."""
    rows, dropped = [], Counter()
    for r in records:
        if r.choice == "tie":
            dropped["tie"] += 1
        elif r.response_a == r.response_b:
            dropped["identical"] += 1
        else:
            chosen, rejected = (r.response_a, r.response_b) if r.choice == "a" else (r.response_b, r.response_a)
            rows.append(_pair(r.prompt, chosen, rejected, "comparison"))
    return rows, ConversionReport("comparison", "pairs", len(records), len(rows), dict(dropped))


def ratings_to_pairs(records: list[Rating], min_gap: float) -> tuple[Rows, ConversionReport]:
    """Within each prompt, every two candidates whose mean ratings differ by >= min_gap: (higher ≻ lower)."""
    rows, dropped = [], Counter()
    for prompt, candidates in _rated_candidates(records, dropped):
        for i, (text_i, rating_i) in enumerate(candidates):
            for text_j, rating_j in candidates[i + 1:]:
                gap = rating_i - rating_j
                if gap == 0:
                    dropped["tied_pairs"] += 1
                elif abs(gap) < min_gap:
                    dropped["small_gap_pairs"] += 1
                else:
                    chosen, rejected = (text_i, text_j) if gap > 0 else (text_j, text_i)
                    rows.append(_pair(prompt, chosen, rejected, "rating"))
    return rows, ConversionReport("rating", "pairs", len(records), len(rows), dict(+dropped))


def ratings_to_ranked(records: list[Rating]) -> tuple[Rows, ConversionReport]:
    """One ranked list per prompt: its candidates best first (stable), mean ratings as `scores`."""
    rows, dropped = [], Counter()
    for prompt, candidates in _rated_candidates(records, dropped):
        ranked = sorted(candidates, key=lambda c: -c[1])
        rows.append({"prompt": prompt, "responses": [t for t, _ in ranked], "scores": [s for _, s in ranked]})
    return rows, ConversionReport("rating", "ranked", len(records), len(rows), dict(+dropped))


def _rated_candidates(records: list[Rating], dropped: Counter) -> list[tuple[Prompt, list[tuple[str, float]]]]:
    """Per prompt (first-seen order): (response, mean rating) per distinct response. Counts in `dropped`
    the records folded into an earlier one (same prompt and response) and those of single-response prompts."""
    groups: dict[str, tuple[Prompt, dict[str, list[float]]]] = {}
    for r in records:
        _, by_text = groups.setdefault(_prompt_key(r.prompt), (r.prompt, {}))
        by_text.setdefault(r.response, []).append(r.rating)
    out = []
    for prompt, by_text in groups.values():
        dropped["duplicate_response_records"] += sum(len(v) - 1 for v in by_text.values())
        if len(by_text) < 2:
            dropped["single_response_records"] += sum(len(v) for v in by_text.values())
            continue
        out.append((prompt, [(text, sum(v) / len(v)) for text, v in by_text.items()]))
    return out


def binary_to_kto(records: list[Binary]) -> tuple[Rows, ConversionReport]:
    """KTO rows: thumbs up = desirable (label true), down = undesirable."""
    rows = [{"prompt": r.prompt, "response": r.response, "label": r.thumbs_up} for r in records]
    return rows, ConversionReport("binary", "kto", len(records), len(rows), {})


def edits_to_sft(records: list[Edit]) -> tuple[Rows, ConversionReport]:
    """The corrected response is a demonstration."""
    rows = [{"prompt": r.prompt, "response": r.corrected} for r in records]
    return rows, ConversionReport("edit", "sft", len(records), len(rows), {})


def edits_to_pairs(records: list[Edit]) -> tuple[Rows, ConversionReport]:
    """(corrected ≻ original); an edit that changed nothing gives no pair."""
    rows = [_pair(r.prompt, r.corrected, r.original, "edit") for r in records if r.corrected != r.original]
    dropped = {"unchanged": len(records) - len(rows)} if len(rows) < len(records) else {}
    return rows, ConversionReport("edit", "pairs", len(records), len(rows), dropped)


def critiques_to_context(records: list[Critique]) -> tuple[Rows, ConversionReport]:
    """Critique records as they are: the context a revision answers (`cai.critiques` reads this file)."""
    rows = [{"kind": "critique", "prompt": r.prompt, "response": r.response, "critique": r.critique} for r in records]
    return rows, ConversionReport("critique", "critiques", len(records), len(rows), {})


def _pair(prompt: Prompt, chosen: str, rejected: str, source: str) -> dict[str, Any]:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "source": source}


def _prompt_key(prompt: Prompt) -> str:
    return json.dumps(prompt, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# The whole file → output files
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FeedbackDatasets:
    """What `convert_feedback` wrote: output name → file (only outputs with rows), and the reports."""

    files: dict[str, str]  # pairs | ranked | kto | sft | critiques -> path
    read: ReadReport
    conversions: list[ConversionReport]


def convert(records: list[Feedback], ratings_as: Literal["pairs", "ranked"],
            min_gap: float) -> tuple[dict[str, Rows], list[ConversionReport]]:
    """Every conversion of the records, grouped by output format (pure)."""
    of = {kind: [r for r in records if isinstance(r, cls)] for kind, cls in KINDS.items()}
    results = [comparisons_to_pairs(of["comparison"]),
               ratings_to_pairs(of["rating"], min_gap) if ratings_as == "pairs" else ratings_to_ranked(of["rating"]),
               binary_to_kto(of["binary"]), edits_to_sft(of["edit"]), edits_to_pairs(of["edit"]),
               critiques_to_context(of["critique"])]
    outputs: dict[str, Rows] = {}
    for rows, report in results:
        outputs.setdefault(report.output, []).extend(rows)
    return outputs, [report for _, report in results]


def convert_feedback(path: str | Path, out_dir: str | Path, *, ratings_as: Literal["pairs", "ranked"] = "pairs",
                     min_gap: float = 1.0, rating_scale: int = 5,
                     on_bad_row: Literal["error", "skip"] = "error") -> FeedbackDatasets:
    """Read a feedback file, convert every kind, write `<output>.jsonl` files (those with rows) and
    `report.json` into `out_dir`."""
    records, read = read_feedback(path, rating_scale, on_bad_row)
    outputs, reports = convert(records, ratings_as, min_gap)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # never leave an earlier run's file behind
        (out_dir / f"{name}.jsonl").unlink(missing_ok=True)
    files = {name: write_jsonl(out_dir / f"{name}.jsonl", rows) for name, rows in outputs.items() if rows}
    report = {"read": dataclasses.asdict(read), "conversions": [dataclasses.asdict(r) for r in reports], "files": files}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return FeedbackDatasets(files, read, reports)


def write_jsonl(path: str | Path, rows: Rows) -> str:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return str(path)
