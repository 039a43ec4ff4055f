"""Typed, tokenized examples and the loaders that build them from rows (`sources.load_rows`).

One loader per training format: prompts (RL), SFT pairs, preference pairs (reward model, DPO
family), ranked lists (listwise RM/DPO), KTO examples. Each returns `(examples, LoadReport)`.

Text rules:
- A plain string is used as-is. A prompt given as a list of chat messages `{"role", "content"}`
  is rendered with `tokenizer.apply_chat_template(messages, add_generation_prompt=True,
  tokenize=False)`; with no chat template, as `"{role}: {content}\\n"` lines followed by
  `"assistant: "`. Only `role` and `content` of a message are used.
- SFT rows may instead hold a `messages` conversation (used when the prompt is missing/null):
  its last message, which must be the assistant's, is the response; the earlier ones the prompt.
- A response may be a string or a list of messages ending with an assistant message (TRL's
  conversational format); its content is the response.
- Prompts are encoded with the tokenizer's own special tokens (e.g. Llama's BOS) unless a chat
  template rendered them (templates write their specials). Responses are encoded without
  specials and get `tokenizer.eos_token_id` appended.

Limits (in tokens):
- A prompt over `max_prompt_len` follows `overlength`: "error" (DataError), "skip" (dropped and
  counted), "truncate_left" (keep its last `max_prompt_len` tokens: the end of a prompt is what
  the response continues).
- A response over `max_response_len` (EOS included) is always cut to its first
  `max_response_len` tokens, and then has no EOS: the text did not end there, so the model must
  not learn to stop there. Cuts are counted in `LoadReport.truncated`.

Bad rows follow `on_bad_row`: "error" raises `DataError` naming file, row, key and reason;
"skip" drops the row and counts it per reason. Reasons: `missing_key` (absent or null: Arrow
makes a key missing from one row null), `wrong_type`, `empty` (empty/whitespace-only text, empty
list), `identical_pair` (chosen and rejected give the same token ids), `bad_value` (too few
ranked responses, scores of the wrong length or not finite, conversation not ending with the
assistant), `overlength` (prompts; governed by `overlength`, not `on_bad_row`).
A column absent from the whole source, or a source with no usable row, is always an error.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import datasets

from rlhf_ray.data.errors import DataError
from rlhf_ray.data.sources import ORIGIN_FILE, ORIGIN_ROW, load_rows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Overlength = Literal["error", "skip", "truncate_left"]
OnBadRow = Literal["error", "skip"]
Example = TypeVar("Example")


@dataclasses.dataclass(frozen=True)
class Keys:
    """Column names in the source rows."""

    prompt: str = "prompt"  # string or list of chat messages
    response: str = "response"  # SFT / KTO response
    chosen: str = "chosen"  # preferred response
    rejected: str = "rejected"  # dispreferred response
    responses: str = "responses"  # ranked list of responses
    scores: str = "scores"  # one number per ranked response (optional column)
    label: str = "label"  # KTO: true = desirable
    messages: str = "messages"  # SFT conversation (alternative to prompt + response)


@dataclasses.dataclass(frozen=True)
class PromptExample:
    prompt_ids: list[int]  # (P,) prompt tokens, P <= max_prompt_len
    prompt_text: str  # the rendered prompt (chat template applied); if cut, the decoded kept tokens
    metadata: dict[str, Any]  # the row's other columns (e.g. a reference answer for a rule reward)
    prompt: Any = None  # the prompt as the row gives it (a string or chat messages), for rows written from it


@dataclasses.dataclass(frozen=True)
class SFTExample:
    prompt_ids: list[int]  # (P,) prompt tokens
    response_ids: list[int]  # (R,) response tokens ending with EOS (unless cut at max_response_len)


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
    prompt_ids: list[int]  # (P,) prompt tokens
    chosen_ids: list[int]  # (Rc,) preferred response, ends with EOS unless cut
    rejected_ids: list[int]  # (Rr,) dispreferred response, ends with EOS unless cut; != chosen_ids


@dataclasses.dataclass(frozen=True)
class RankedExample:
    prompt_ids: list[int]  # (P,) prompt tokens
    responses_ids: list[list[int]]  # K >= 2 responses, each ending with EOS unless cut
    scores: list[float] | None  # (K,) one score per response; None: responses are best first


@dataclasses.dataclass(frozen=True)
class KTOExample:
    prompt_ids: list[int]  # (P,) prompt tokens
    response_ids: list[int]  # (R,) response tokens, ends with EOS unless cut
    desirable: bool  # the row's label: True = desirable, False = undesirable


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What a loader did with a source: rows_in == kept + sum(dropped.values())."""

    source: str
    rows_in: int  # rows read (after `limit`)
    kept: int  # examples returned
    dropped: dict[str, int]  # reason -> rows dropped (on_bad_row / overlength = "skip")
    truncated: dict[str, int]  # "prompt" / "response" -> texts cut to their length limit

    def __str__(self) -> str:
        text = f"{self.source}: kept {self.kept}/{self.rows_in} rows"
        if self.dropped:
            text += "; dropped " + ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items()))
        if self.truncated:
            text += "; truncated " + ", ".join(f"{k}={v}" for k, v in sorted(self.truncated.items()))
        return text


class _BadRow(Exception):
    def __init__(self, reason: str, key: str, detail: str):
        super().__init__(detail)
        self.reason, self.key, self.detail = reason, key, detail


@dataclasses.dataclass
class _Encoder:
    """Turns row values into checked token ids under one loader's settings."""

    tokenizer: PreTrainedTokenizerBase
    keys: Keys
    max_prompt_len: int
    max_response_len: int | None
    overlength: Overlength
    row_truncations: list[str] = dataclasses.field(default_factory=list)  # cuts in the current row

    def prompt(self, value: Any, key: str) -> tuple[list[int], str]:
        """Prompt ids and rendered text from a string or a list of chat messages."""
        if isinstance(value, list):
            text = self.render(_messages(value, key))
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        else:
            text = _text(value, key)
            ids = self.tokenizer.encode(text, add_special_tokens=True)
        if len(ids) <= self.max_prompt_len:
            return ids, text
        if self.overlength != "truncate_left":
            raise _BadRow("overlength", key, f"prompt has {len(ids)} tokens > max_prompt_len={self.max_prompt_len}")
        self.row_truncations.append("prompt")
        ids = ids[-self.max_prompt_len:]
        return ids, self.tokenizer.decode(ids)

    def render(self, messages: list[dict[str, str]]) -> str:
        return render_messages(self.tokenizer, messages)

    def response(self, value: Any, key: str) -> list[int]:
        """Response ids + EOS, cut to max_response_len, from a string or assistant message list."""
        if isinstance(value, list):
            messages = _messages(value, key)
            if messages[-1]["role"] != "assistant":
                raise _BadRow("bad_value", key, "a response given as messages must end with an assistant message")
            value = messages[-1]["content"]
        ids = self.tokenizer.encode(_text(value, key), add_special_tokens=False)
        ids.append(self.tokenizer.eos_token_id)
        if self.max_response_len is not None and len(ids) > self.max_response_len:
            self.row_truncations.append("response")
            ids = ids[: self.max_response_len]
        return ids


def render_messages(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """Chat messages as the text a model continues (the assistant's turn opened): the tokenizer's chat
    template, or `"{role}: {content}\\n"` lines then `"assistant: "` without one. Encode it without
    adding special tokens (a template writes its own)."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


# ---- value checks -------------------------------------------------------------------------

def _get(row: dict[str, Any], key: str) -> Any:
    value = row.get(key)
    if value is None:
        raise _BadRow("missing_key", key, "missing or null")
    return value


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise _BadRow("wrong_type", key, f"expected a string, got {type(value).__name__} {value!r:.60}")
    if not value.strip():
        raise _BadRow("empty", key, "empty or whitespace-only string")
    return value


def _messages(value: list[Any], key: str) -> list[dict[str, str]]:
    """Check a list of chat messages; keep only role and content."""
    if not value:
        raise _BadRow("empty", key, "empty list of messages")
    messages = []
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise _BadRow("wrong_type", key, f"message {i} is not {{'role': str, 'content': str}}: {message!r:.80}")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _scores(value: Any, key: str, count: int) -> list[float]:
    if not isinstance(value, list) or not all(
            isinstance(s, (int, float)) and not isinstance(s, bool) for s in value):
        raise _BadRow("wrong_type", key, f"expected a list of numbers, got {value!r:.80}")
    if len(value) != count:
        raise _BadRow("bad_value", key, f"{len(value)} scores for {count} responses")
    if not all(math.isfinite(s) for s in value):
        raise _BadRow("bad_value", key, f"scores must be finite, got {value!r:.80}")
    return [float(s) for s in value]


# ---- one parser per format: row -> example, or _BadRow ---------------------------------------

def _parse_prompt(row: dict[str, Any], enc: _Encoder) -> PromptExample:
    k = enc.keys
    key = k.messages if row.get(k.prompt) is None and row.get(k.messages) is not None else k.prompt
    ids, text = enc.prompt(_get(row, key), key)
    skip = {k.prompt, k.messages, ORIGIN_FILE, ORIGIN_ROW}
    return PromptExample(ids, text, {name: v for name, v in row.items() if name not in skip}, row[key])


def _parse_sft(row: dict[str, Any], enc: _Encoder) -> SFTExample:
    k = enc.keys
    if row.get(k.prompt) is None and row.get(k.messages) is not None:
        return _parse_conversation(row[k.messages], k.messages, enc)
    prompt_ids, _ = enc.prompt(_get(row, k.prompt), k.prompt)
    return SFTExample(prompt_ids, enc.response(_get(row, k.response), k.response))


def _parse_conversation(value: Any, key: str, enc: _Encoder) -> SFTExample:
    if not isinstance(value, list):
        raise _BadRow("wrong_type", key, f"expected a list of chat messages, got {type(value).__name__}")
    messages = _messages(value, key)
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise _BadRow("bad_value", key, "a conversation needs prompt messages then a final assistant message")
    prompt_ids, _ = enc.prompt(messages[:-1], key)
    return SFTExample(prompt_ids, enc.response(messages[-1]["content"], key))


def _parse_preference(row: dict[str, Any], enc: _Encoder) -> PreferenceExample:
    k = enc.keys
    prompt_ids, _ = enc.prompt(_get(row, k.prompt), k.prompt)
    chosen_ids = enc.response(_get(row, k.chosen), k.chosen)
    rejected_ids = enc.response(_get(row, k.rejected), k.rejected)
    if chosen_ids == rejected_ids:
        raise _BadRow("identical_pair", k.rejected, f"same token ids as {k.chosen!r} (after any cut)")
    return PreferenceExample(prompt_ids, chosen_ids, rejected_ids)


def _parse_ranked(row: dict[str, Any], enc: _Encoder) -> RankedExample:
    k = enc.keys
    prompt_ids, _ = enc.prompt(_get(row, k.prompt), k.prompt)
    responses = _get(row, k.responses)
    if not isinstance(responses, list):
        raise _BadRow("wrong_type", k.responses, f"expected a list of responses, got {type(responses).__name__}")
    if len(responses) < 2:
        raise _BadRow("bad_value", k.responses, f"needs at least 2 responses, got {len(responses)}")
    responses_ids = [enc.response(r, f"{k.responses}[{i}]") for i, r in enumerate(responses)]
    # The column exists in every row or none (Arrow); without it, responses are best first.
    scores = _scores(_get(row, k.scores), k.scores, len(responses)) if k.scores in row else None
    return RankedExample(prompt_ids, responses_ids, scores)


def _parse_kto(row: dict[str, Any], enc: _Encoder) -> KTOExample:
    k = enc.keys
    prompt_ids, _ = enc.prompt(_get(row, k.prompt), k.prompt)
    response_ids = enc.response(_get(row, k.response), k.response)
    label = _get(row, k.label)
    if not isinstance(label, bool):
        raise _BadRow("wrong_type", k.label, f"expected true or false, got {label!r:.60}")
    return KTOExample(prompt_ids, response_ids, label)


# ---- the shared loop ---------------------------------------------------------------------

def _load(
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    parse: Callable[[dict[str, Any], _Encoder], Example],
    required: list[tuple[str, ...]],
    *,
    keys: Keys,
    max_prompt_len: int,
    max_response_len: int | None,
    overlength: Overlength,
    on_bad_row: OnBadRow,
    split: str,
    limit: int | None,
) -> tuple[list[Example], LoadReport]:
    """Parse every row of `source`; one of the `required` column sets must exist."""
    _check_settings(tokenizer, max_prompt_len, max_response_len, overlength, on_bad_row, limit)
    rows = load_rows(source, split)
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    _check_columns(source, rows.column_names, required)
    enc = _Encoder(tokenizer, keys, max_prompt_len, max_response_len, overlength)
    examples: list[Example] = []
    dropped: Counter[str] = Counter()
    truncated: Counter[str] = Counter()
    for row in _iter_rows(rows):
        enc.row_truncations.clear()
        try:
            examples.append(parse(row, enc))
        except _BadRow as bad:
            policy = overlength if bad.reason == "overlength" else on_bad_row
            if policy == "error":
                raise _row_error(row, bad) from None
            dropped[bad.reason] += 1
        else:
            truncated.update(enc.row_truncations)
    report = LoadReport(source, len(rows), len(examples), dict(dropped), dict(truncated))
    if not examples:
        raise DataError(source, "empty", f"no usable rows ({report})")
    return examples, report


def _check_settings(tokenizer: PreTrainedTokenizerBase, max_prompt_len: int, max_response_len: int | None,
                    overlength: str, on_bad_row: str, limit: int | None) -> None:
    if overlength not in ("error", "skip", "truncate_left"):
        raise ValueError(f"overlength must be 'error', 'skip' or 'truncate_left', got {overlength!r}")
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if max_prompt_len < 1 or (max_response_len is not None and max_response_len < 1):
        raise ValueError(f"max_prompt_len={max_prompt_len} and max_response_len={max_response_len} must be >= 1")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be None or >= 1, got {limit}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id; responses need one")


def _check_columns(source: str, columns: list[str], required: list[tuple[str, ...]]) -> None:
    if not any(all(name in columns for name in names) for names in required):
        wanted = " or ".join(str(list(names)) for names in required)
        present = sorted(c for c in columns if c not in (ORIGIN_FILE, ORIGIN_ROW))
        raise DataError(source, "missing_key",
                        f"needs columns {wanted}, has {present}; set the loader's keys=Keys(...)")


def _iter_rows(rows: datasets.Dataset, batch_size: int = 1024) -> Iterator[dict[str, Any]]:
    for batch in rows.iter(batch_size=batch_size):
        for i in range(len(batch[ORIGIN_ROW])):
            yield {name: values[i] for name, values in batch.items()}


def _row_error(row: dict[str, Any], bad: _BadRow) -> DataError:
    fix = ("overlength='skip' or 'truncate_left'" if bad.reason == "overlength"
           else "on_bad_row='skip' drops such rows")
    return DataError(row[ORIGIN_FILE], bad.reason, f"{bad.detail} ({fix})", row=row[ORIGIN_ROW], key=bad.key)


# ---- public loaders ----------------------------------------------------------------------

DEFAULT_KEYS = Keys()


def load_prompts(
    source: str, tokenizer: PreTrainedTokenizerBase, *, keys: Keys = DEFAULT_KEYS, max_prompt_len: int,
    overlength: Overlength = "error", on_bad_row: OnBadRow = "error", split: str = "train",
    limit: int | None = None,
) -> tuple[list[PromptExample], LoadReport]:
    """RL prompts (`prompt`, or a `messages` list); other columns become `metadata`."""
    return _load(source, tokenizer, _parse_prompt, [(keys.prompt,), (keys.messages,)], keys=keys,
                 max_prompt_len=max_prompt_len, max_response_len=None, overlength=overlength,
                 on_bad_row=on_bad_row, split=split, limit=limit)


def load_sft(
    source: str, tokenizer: PreTrainedTokenizerBase, *, keys: Keys = DEFAULT_KEYS, max_prompt_len: int,
    max_response_len: int | None = None, overlength: Overlength = "error", on_bad_row: OnBadRow = "error",
    split: str = "train", limit: int | None = None,
) -> tuple[list[SFTExample], LoadReport]:
    """SFT pairs: `prompt` + `response`, or a `messages` conversation ending with the assistant."""
    required = [(keys.prompt, keys.response), (keys.messages,)]
    return _load(source, tokenizer, _parse_sft, required, keys=keys, max_prompt_len=max_prompt_len,
                 max_response_len=max_response_len, overlength=overlength, on_bad_row=on_bad_row,
                 split=split, limit=limit)


def load_preferences(
    source: str, tokenizer: PreTrainedTokenizerBase, *, keys: Keys = DEFAULT_KEYS, max_prompt_len: int,
    max_response_len: int | None = None, overlength: Overlength = "error", on_bad_row: OnBadRow = "error",
    split: str = "train", limit: int | None = None,
) -> tuple[list[PreferenceExample], LoadReport]:
    """Preference pairs: `prompt`, `chosen`, `rejected`."""
    required = [(keys.prompt, keys.chosen, keys.rejected)]
    return _load(source, tokenizer, _parse_preference, required, keys=keys, max_prompt_len=max_prompt_len,
                 max_response_len=max_response_len, overlength=overlength, on_bad_row=on_bad_row,
                 split=split, limit=limit)


def load_ranked(
    source: str, tokenizer: PreTrainedTokenizerBase, *, keys: Keys = DEFAULT_KEYS, max_prompt_len: int,
    max_response_len: int | None = None, overlength: Overlength = "error", on_bad_row: OnBadRow = "error",
    split: str = "train", limit: int | None = None,
) -> tuple[list[RankedExample], LoadReport]:
    """Ranked lists: `prompt`, `responses` (>= 2), optional `scores` (else best first)."""
    required = [(keys.prompt, keys.responses)]
    return _load(source, tokenizer, _parse_ranked, required, keys=keys, max_prompt_len=max_prompt_len,
                 max_response_len=max_response_len, overlength=overlength, on_bad_row=on_bad_row,
                 split=split, limit=limit)


def load_kto(
    source: str, tokenizer: PreTrainedTokenizerBase, *, keys: Keys = DEFAULT_KEYS, max_prompt_len: int,
    max_response_len: int | None = None, overlength: Overlength = "error", on_bad_row: OnBadRow = "error",
    split: str = "train", limit: int | None = None,
) -> tuple[list[KTOExample], LoadReport]:
    """KTO examples: `prompt`, `response`, boolean `label` (true = desirable)."""
    required = [(keys.prompt, keys.response, keys.label)]
    return _load(source, tokenizer, _parse_kto, required, keys=keys, max_prompt_len=max_prompt_len,
                 max_response_len=max_response_len, overlength=overlength, on_bad_row=on_bad_row,
                 split=split, limit=limit)
