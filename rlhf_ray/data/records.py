"""Typed, tokenized examples and the loaders that build them from rows (`sources.load_rows`).

One loader per training format: prompts (RL), SFT pairs, preference pairs (reward model, DPO
family), ranked lists (listwise RM/DPO), KTO examples. Each returns `(examples, LoadReport)`.

Dataset types (TRL's, https://huggingface.co/docs/trl/dataset_formats) are detected from the
columns, first match in this order; `LoadReport.format` names the one found and its form
(standard strings, conversational messages, or HH-RLHF transcripts):

- `load_prompts`: `prompt` (prompt-only) · `messages` (a final assistant turn dropped) ·
  `chosen` + `rejected` (their implicit prompt)
- `load_sft`: `prompt` + `response` (prompt-completion) · `messages` · `text` (language modeling)
- `load_preferences`: `prompt` + `chosen` + `rejected` · `chosen` + `rejected` (implicit prompt);
  chosen and rejected given as whole conversations (UltraFeedback's repeat the user turn) give
  the prompt from their shared turns even with a prompt column
- `load_ranked`: `prompt` + `responses` (+ `scores`) · either preference type (K = 2, chosen first)
- `load_kto`: `prompt` + `response` + `label` (unpaired preference)

A key left at its default falls back to an alias when its column is absent: `response` →
`completion` (TRL's name), and for RL prompts `prompt` → `question` (GSM8K). A key set
explicitly is used as given. Preference rows may carry `score_chosen` / `score_rejected`
(UltraFeedback): finite numbers with score_chosen >= score_rejected, kept in the example.
The implicit prompt of a pair is the prefix its two texts share, cut at a turn boundary
(`conversations.split_shared_prompt` / `split_shared_text`).

Text rules:
- A plain string is used as-is. A prompt given as a list of chat messages `{"role", "content"}`
  is rendered with `tokenizer.apply_chat_template(messages, add_generation_prompt=True,
  tokenize=False)`; with no chat template, as `"{role}: {content}\\n"` lines followed by
  `"assistant: "`. Only `role` and `content` of a message are used.
- A string that is an HH-RLHF transcript (`"\\n\\nHuman: …\\n\\nAssistant: …"`) is parsed into
  messages (`conversations.transcript_messages`) and used as those messages.
- SFT rows may instead hold a `messages` conversation (used when the prompt is missing/null):
  its last message, which must be the assistant's, is the response; the earlier ones the prompt.
  With `sft_turns="all"` (the default) every earlier assistant turn (not a first message) is
  trained too: `SFTExample.assistant_mask` marks its tokens inside the prompt
  (`conversations.context_with_assistant_mask`). Prompt-completion rows train the completion only.
- A `text` row (language modeling) is trained on every token after its first one (or after the
  tokenizer's own leading specials, e.g. BOS), plus EOS.
- A response may be a string or a list of messages ending with an assistant message (TRL's
  conversational format); its content is the response.
- Prompts are encoded with the tokenizer's own special tokens (e.g. Llama's BOS) unless a chat
  template rendered them (templates write their specials); a prompt string (or `text`) that already
  starts with the BOS, rendered with the template before loading, does not get a second one.
  Responses are encoded without specials and get `tokenizer.eos_token_id` appended (not a second
  time when their text already ends with the EOS token).

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
ranked responses, scores of the wrong length or not finite, score_chosen < score_rejected,
conversation not ending with the assistant, no implicit prompt, a chat template that cannot be
masked turn by turn or that rejects the messages, e.g. Gemma's on a system turn), `overlength`
(prompts; governed by `overlength`, not `on_bad_row`).
A column absent from the whole source, or a source with no usable row, is always an error.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import gc
import math
import multiprocessing
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import datasets

from rlhf_ray.data.conversations import (
    context_with_assistant_mask, open_turn_dropped, render_conversation, split_shared_prompt, split_shared_text,
    transcript_messages)
from rlhf_ray.data.errors import DataError
from rlhf_ray.data.sources import ORIGIN_FILE, ORIGIN_ROW, load_rows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Overlength = Literal["error", "skip", "truncate_left"]
OnBadRow = Literal["error", "skip"]
SFTTurns = Literal["all", "last"]
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
    text: str = "text"  # language modeling: one string, trained whole (SFT)
    score_chosen: str = "score_chosen"  # a preference pair's score of chosen (optional column)
    score_rejected: str = "score_rejected"  # and of rejected


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
    assistant_mask: list[int] | None = None  # (P,) 1 on earlier assistant turns inside the prompt, trained too; None: none


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
    prompt_ids: list[int]  # (P,) prompt tokens
    chosen_ids: list[int]  # (Rc,) preferred response, ends with EOS unless cut
    rejected_ids: list[int]  # (Rr,) dispreferred response, ends with EOS unless cut; != chosen_ids
    scores: list[float] | None = None  # (2,) [score_chosen, score_rejected], non-increasing; None: no score columns


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
    format: str = ""  # the dataset type detected from the columns and its form, e.g. "preference (conversational)"

    def __str__(self) -> str:
        text = f"{self.source}{f' [{self.format}]' if self.format else ''}: kept {self.kept}/{self.rows_in} rows"
        if self.dropped:
            text += "; dropped " + ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items()))
        if self.truncated:
            text += "; truncated " + ", ".join(f"{k}={v}" for k, v in sorted(self.truncated.items()))
        return text


class _BadRow(Exception):
    def __init__(self, reason: str, key: str, detail: str):
        super().__init__(detail)
        self.reason, self.key, self.detail = reason, key, detail

    def __reduce__(self):  # picklable: a worker process sends it back
        return _BadRow, (self.reason, self.key, self.detail)


@dataclasses.dataclass
class _Encoder:
    """Turns row values into checked token ids under one loader's settings."""

    tokenizer: PreTrainedTokenizerBase
    keys: Keys
    max_prompt_len: int
    max_response_len: int | None
    overlength: Overlength
    row_truncations: list[str] = dataclasses.field(default_factory=list)  # cuts in the current row
    forms: set[str] = dataclasses.field(default_factory=set)  # "conversational" / "HH-RLHF transcripts" seen

    def parsed(self, value: Any) -> Any:
        """`value`, an HH-RLHF transcript string parsed into messages; notes the form seen."""
        if isinstance(value, str) and (messages := transcript_messages(value)) is not None:
            self.forms.add("HH-RLHF transcripts")
            return messages
        if isinstance(value, list):
            self.forms.add("conversational")
        return value

    def form(self) -> str:
        return next((f for f in ("HH-RLHF transcripts", "conversational") if f in self.forms), "standard")

    def prompt(self, value: Any, key: str) -> tuple[list[int], str]:
        """Prompt ids and rendered text from a string, an HH transcript or a list of chat messages."""
        value = self.parsed(value)
        if isinstance(value, list):
            try:
                text = self.render(open_turn_dropped(_messages(value, key)))
            except ValueError as error:  # the chat template rejects the messages (e.g. Gemma: no system role)
                raise _BadRow("bad_value", key, str(error)) from None
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        else:
            text = _text(value, key)
            ids = _without_doubled_bos(self.tokenizer, text, self.tokenizer.encode(text, add_special_tokens=True))
        kept = self.fit_prompt(ids, key)
        return kept, text if len(kept) == len(ids) else self.tokenizer.decode(kept)

    def fit_prompt(self, ids: list[int], key: str) -> list[int]:
        """`ids` within max_prompt_len, as `overlength` says."""
        if len(ids) <= self.max_prompt_len:
            return ids
        if self.overlength != "truncate_left":
            raise _BadRow("overlength", key, f"prompt has {len(ids)} tokens > max_prompt_len={self.max_prompt_len}")
        self.row_truncations.append("prompt")
        return ids[-self.max_prompt_len:]

    def conversation_context(self, messages: list[dict[str, str]], key: str) -> tuple[list[int], list[int]]:
        """The prompt of a conversation's last turn and the mask of the earlier assistant turns in it, (P,) each."""
        try:
            ids, mask = context_with_assistant_mask(self.tokenizer, messages)
        except ValueError as error:
            raise _BadRow("bad_value", key, str(error)) from None
        kept = self.fit_prompt(ids, key)
        return kept, mask[len(mask) - len(kept):]

    def render(self, messages: list[dict[str, str]]) -> str:
        return render_messages(self.tokenizer, messages)

    def response(self, value: Any, key: str) -> list[int]:
        """Response ids + EOS, cut to max_response_len, from a string, an HH transcript or assistant message list."""
        value = self.parsed(value)
        if isinstance(value, list):
            messages = _messages(value, key)
            if messages[-1]["role"] != "assistant":
                raise _BadRow("bad_value", key, "a response given as messages must end with an assistant message")
            value = messages[-1]["content"]
        return self.with_eos(self.tokenizer.encode(_text(value, key), add_special_tokens=False))

    def with_eos(self, ids: list[int]) -> list[int]:
        """Response ids + EOS (unless they already end with it: a text written with its EOS), cut to their
        first max_response_len (then without EOS)."""
        eos = self.tokenizer.eos_token_id
        ids = ids if ids[-1:] == [eos] else ids + [eos]
        if self.max_response_len is not None and len(ids) > self.max_response_len:
            self.row_truncations.append("response")
            ids = ids[: self.max_response_len]
        return ids


def _without_doubled_bos(tokenizer: PreTrainedTokenizerBase, text: str, ids: list[int]) -> list[int]:
    """`ids` (`text` encoded with the tokenizer's specials) without the BOS the tokenizer added when `text`
    already starts with its own (a prompt rendered with the chat template before it reached the loader)."""
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    if bos and bos_id is not None and text.startswith(bos) and ids[:2] == [bos_id, bos_id]:
        return ids[1:]
    return ids


def render_messages(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """Chat messages as the text a model continues (the assistant's turn opened): the tokenizer's chat
    template, or `"{role}: {content}\\n"` lines then `"assistant: "` without one. Encode it without
    adding special tokens (a template writes its own)."""
    return render_conversation(tokenizer, messages, add_generation_prompt=True)


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


def _number(value: Any, key: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _BadRow("wrong_type", key, f"expected a number, got {value!r:.60}")
    if not math.isfinite(value):
        raise _BadRow("bad_value", key, f"must be finite, got {value}")
    return float(value)


# ---- one parser per format: row -> example, or _BadRow ---------------------------------------

def _parse_prompt(row: dict[str, Any], enc: _Encoder) -> PromptExample:
    """prompt-only; a row with a null prompt uses its `messages`, a final assistant reply dropped."""
    k = enc.keys
    key = k.messages if row.get(k.prompt) is None and row.get(k.messages) is not None else k.prompt
    value = enc.parsed(_get(row, key))
    if isinstance(value, list):
        value = open_turn_dropped(_messages(value, key))
        if key == k.messages and len(value) > 1 and value[-1]["role"] == "assistant":
            value = value[:-1]
    return _prompt_example(row, enc, value, key)


def _parse_implicit_prompt(row: dict[str, Any], enc: _Encoder) -> PromptExample:
    """The shared start of a preference pair as an RL prompt."""
    prompt, _, _ = _implicit_pair(row, enc)
    return _prompt_example(row, enc, prompt, enc.keys.chosen)


def _prompt_example(row: dict[str, Any], enc: _Encoder, prompt: Any, key: str) -> PromptExample:
    ids, text = enc.prompt(prompt, key)
    skip = {enc.keys.prompt, enc.keys.messages, ORIGIN_FILE, ORIGIN_ROW}
    return PromptExample(ids, text, {name: v for name, v in row.items() if name not in skip}, prompt)


def _parse_sft(turns: SFTTurns, row: dict[str, Any], enc: _Encoder) -> SFTExample:
    """prompt-completion; a row with a null prompt uses its `messages`."""
    k = enc.keys
    if row.get(k.prompt) is None and row.get(k.messages) is not None:
        return _parse_conversation(turns, row, enc)
    prompt_ids, _ = enc.prompt(_get(row, k.prompt), k.prompt)
    return SFTExample(prompt_ids, enc.response(_get(row, k.response), k.response))


def _parse_conversation(turns: SFTTurns, row: dict[str, Any], enc: _Encoder) -> SFTExample:
    """Conversational language modeling: the last assistant message is the response; with turns="all"
    the earlier assistant turns are marked in `assistant_mask`."""
    key = enc.keys.messages
    value = enc.parsed(_get(row, key))
    if not isinstance(value, list):
        raise _BadRow("wrong_type", key, f"expected a list of chat messages, got {type(value).__name__}")
    messages = _messages(value, key)
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise _BadRow("bad_value", key, "a conversation needs prompt messages then a final assistant message")
    if turns == "all" and any(m["role"] == "assistant" for m in messages[1:-1]):
        prompt_ids, mask = enc.conversation_context(messages, key)
        return SFTExample(prompt_ids, enc.response(messages[-1]["content"], key), mask)
    prompt_ids, _ = enc.prompt(messages[:-1], key)
    return SFTExample(prompt_ids, enc.response(messages[-1]["content"], key))


def _parse_text(row: dict[str, Any], enc: _Encoder) -> SFTExample:
    """Standard language modeling: the prompt is the tokenizer's leading specials (e.g. BOS), else the
    first token; everything after it is trained."""
    k = enc.keys
    ids = enc.tokenizer.encode(_text(_get(row, k.text), k.text), add_special_tokens=False)
    specials = enc.tokenizer.encode("", add_special_tokens=True)
    if specials and ids[: len(specials)] == specials:  # text that starts with them (chat template applied): not twice
        ids = ids[len(specials):]
    prompt_ids, rest = (specials, ids) if specials else (ids[:1], ids[1:])
    return SFTExample(enc.fit_prompt(prompt_ids, k.text), enc.with_eos(rest))


def _parse_preference(row: dict[str, Any], enc: _Encoder) -> PreferenceExample:
    """Preference with an explicit prompt. When chosen and rejected are whole conversations (UltraFeedback
    repeats the user turn in both), the prompt is their shared turns, rendered with the chat template:
    they keep the roles, and any system or earlier turn, that a prompt string loses."""
    k = enc.keys
    if all(isinstance(v, list) and len(v) > 1 for v in (row.get(k.chosen), row.get(k.rejected))):
        return _parse_implicit_preference(row, enc)  # the prompt column is not read (it may be null)
    prompt_ids, _ = enc.prompt(_get(row, k.prompt), k.prompt)
    return _pair(row, enc, prompt_ids, _get(row, k.chosen), _get(row, k.rejected))


def _parse_implicit_preference(row: dict[str, Any], enc: _Encoder) -> PreferenceExample:
    """Preference with an implicit prompt: the shared start of chosen and rejected."""
    prompt, chosen, rejected = _implicit_pair(row, enc)
    prompt_ids, _ = enc.prompt(prompt, enc.keys.chosen)
    return _pair(row, enc, prompt_ids, chosen, rejected)


def _pair(row: dict[str, Any], enc: _Encoder, prompt_ids: list[int], chosen: Any, rejected: Any) -> PreferenceExample:
    k = enc.keys
    chosen_ids = enc.response(chosen, k.chosen)
    rejected_ids = enc.response(rejected, k.rejected)
    if chosen_ids == rejected_ids:
        raise _BadRow("identical_pair", k.rejected, f"same token ids as {k.chosen!r} (after any cut)")
    return PreferenceExample(prompt_ids, chosen_ids, rejected_ids, _pair_scores(row, k))


def _implicit_pair(row: dict[str, Any], enc: _Encoder) -> tuple[Any, str, str]:
    """(prompt, chosen reply, rejected reply) of a row without a prompt column (HH transcripts as messages)."""
    k = enc.keys
    chosen, rejected = enc.parsed(_get(row, k.chosen)), enc.parsed(_get(row, k.rejected))
    try:
        if isinstance(chosen, str) and isinstance(rejected, str):
            return split_shared_text(_text(chosen, k.chosen), _text(rejected, k.rejected))
        if isinstance(chosen, list) and isinstance(rejected, list):
            return split_shared_prompt(_messages(chosen, k.chosen), _messages(rejected, k.rejected))
    except ValueError as error:
        raise _BadRow("bad_value", k.rejected, str(error)) from None
    raise _BadRow("wrong_type", k.rejected, f"{k.chosen!r} and {k.rejected!r} must both be strings or both chat messages")


def _pair_scores(row: dict[str, Any], k: Keys) -> list[float] | None:
    """[score_chosen, score_rejected] when the source has those columns (Arrow: in every row or none)."""
    if k.score_chosen not in row and k.score_rejected not in row:
        return None
    scores = [_number(_get(row, key), key) for key in (k.score_chosen, k.score_rejected)]
    if scores[0] < scores[1]:
        raise _BadRow("bad_value", k.score_chosen, f"{k.score_chosen}={scores[0]} < {k.score_rejected}={scores[1]}: "
                      "the scores prefer the rejected response")
    return scores


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


def _parse_pair_as_ranked(parse_pair: Callable[[dict[str, Any], _Encoder], PreferenceExample],
                          row: dict[str, Any], enc: _Encoder) -> RankedExample:
    """A preference pair as a ranked list of 2, chosen first, with the pair's scores when it has them."""
    pair = parse_pair(row, enc)
    return RankedExample(pair.prompt_ids, [pair.chosen_ids, pair.rejected_ids], pair.scores)


def _parse_kto(row: dict[str, Any], enc: _Encoder) -> KTOExample:
    k = enc.keys
    prompt_ids, _ = enc.prompt(_get(row, k.prompt), k.prompt)
    response_ids = enc.response(_get(row, k.response), k.response)
    label = _get(row, k.label)
    if not isinstance(label, bool):
        raise _BadRow("wrong_type", k.label, f"expected true or false, got {label!r:.60}")
    return KTOExample(prompt_ids, response_ids, label)


# ---- dataset types, detected from the columns ---------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Format:
    name: str  # the dataset type, in TRL's words
    fields: tuple[str, ...]  # `Keys` fields whose columns must all exist
    parse: Callable[[dict[str, Any], _Encoder], Any]


ALIASES = {"response": "completion"}  # Keys field -> column used when its default column is absent
PROMPT_ALIASES = ALIASES | {"prompt": "question"}  # GSM8K's prompt column, for RL prompts
PREFERENCE = _Format("preference", ("prompt", "chosen", "rejected"), _parse_preference)
IMPLICIT_PREFERENCE = _Format("preference, implicit prompt", ("chosen", "rejected"), _parse_implicit_preference)


def _detect(source: str, columns: list[str], keys: Keys, formats: list[_Format],
            aliases: dict[str, str]) -> tuple[_Format, Keys, str]:
    """The first format whose columns all exist, the keys it reads (aliases applied to keys left at their
    default whose column is absent) and a note naming the aliases it uses."""
    renamed = {field: alias for field, alias in aliases.items()
               if getattr(keys, field) == getattr(DEFAULT_KEYS, field) and getattr(keys, field) not in columns
               and alias in columns}
    resolved = dataclasses.replace(keys, **renamed)
    for fmt in formats:
        if all(getattr(resolved, field) in columns for field in fmt.fields):
            note = "".join(f", {field} column {alias!r}" for field, alias in renamed.items() if field in fmt.fields)
            return fmt, resolved, note
    wanted = " or ".join(dict.fromkeys(str([getattr(keys, field) for field in fmt.fields]) for fmt in formats))
    present = sorted(c for c in columns if c not in (ORIGIN_FILE, ORIGIN_ROW))
    raise DataError(source, "missing_key", f"needs columns {wanted}, has {present}; set data.<name>_key "
                    "(the loader's keys=Keys(...))")


# ---- the shared loop ---------------------------------------------------------------------

def _load(
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    formats: list[_Format],
    *,
    aliases: dict[str, str] = ALIASES,
    keys: Keys,
    max_prompt_len: int,
    max_response_len: int | None,
    overlength: Overlength,
    on_bad_row: OnBadRow,
    split: str,
    limit: int | None,
) -> tuple[list[Example], LoadReport]:
    """Parse every row of `source` with the first of `formats` whose columns it has."""
    _check_settings(tokenizer, max_prompt_len, max_response_len, overlength, on_bad_row, limit)
    rows = load_rows(source, split)
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    fmt, keys, note = _detect(source, rows.column_names, keys, formats, aliases)
    enc = _Encoder(tokenizer, keys, max_prompt_len, max_response_len, overlength)
    examples: list[Example] = []
    dropped: Counter[str] = Counter()
    truncated: Counter[str] = Counter()
    workers = _workers(len(rows))
    outcomes = _parse_rows(rows, fmt, enc) if workers == 1 else _parse_rows_parallel(rows, fmt, enc, workers)
    try:
        for outcome in outcomes:  # in row order, whichever process parsed the row
            if outcome[0]:
                examples.append(outcome[1])
                truncated.update(outcome[2])
                continue
            _, bad, origin, number = outcome
            policy = overlength if bad.reason == "overlength" else on_bad_row
            if policy == "error":
                raise _row_error(origin, number, bad)
            dropped[bad.reason] += 1
    finally:
        outcomes.close()  # stops the worker processes when a bad row ends the load early
    report = LoadReport(source, len(rows), len(examples), dict(dropped), dict(truncated),
                        f"{fmt.name} ({enc.form()}){note}")
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


def _iter_rows(rows: datasets.Dataset, start: int = 0, stop: int | None = None,
               batch_size: int = 1024) -> Iterator[dict[str, Any]]:
    """Rows `start` to `stop` (default: the end) as dicts, read from Arrow a batch at a time."""
    stop = len(rows) if stop is None else stop
    for first in range(start, stop, batch_size):
        batch = rows[first:min(first + batch_size, stop)]
        for i in range(len(batch[ORIGIN_ROW])):
            yield {name: values[i] for name, values in batch.items()}


def _row_error(origin: str, number: int, bad: _BadRow) -> DataError:
    fix = ("overlength='skip' or 'truncate_left'" if bad.reason == "overlength"
           else "on_bad_row='skip' drops such rows")
    return DataError(origin, bad.reason, f"{bad.detail} ({fix})", row=number, key=bad.key)


# ---- parsing rows, in this process or in worker processes ----------------------------------
#
# A row's outcome: (True, example, truncations) or (False, _BadRow, origin file, origin row). A source of
# PARALLEL_MIN_ROWS rows or more is parsed by forked worker processes (Linux), PARALLEL_CHUNK rows per task
# and at most 2 tasks per worker in flight, so memory stays bounded; the parent takes the outcomes in row
# order, so examples, counts and the first bad row reported are exactly those of one process. A row that
# raises anything but a bad row in a worker is parsed again here, to raise with its own traceback.

PARALLEL_MIN_ROWS = 8192  # below this, forking costs more than it saves
PARALLEL_CHUNK = 1024  # rows per worker task
MAX_WORKERS = 8
WORKERS_ENV = "RLHF_RAY_DATA_WORKERS"  # worker processes; 1 parses in this process. Default: usable CPUs, <= 8
Outcome = tuple[Any, ...]


def _workers(rows: int) -> int:
    """Processes to parse `rows` rows with: 1 (this one) for small sources, off Linux, inside a daemonic process
    (which may have no children) or with RLHF_RAY_DATA_WORKERS=1."""
    setting = os.environ.get(WORKERS_ENV, "").strip()
    if setting:
        if not setting.isdigit() or int(setting) < 1:
            raise ValueError(f"{WORKERS_ENV} must be a whole number >= 1, got {setting!r}")
        workers = int(setting)
    else:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = min(cpus, MAX_WORKERS)
    if rows < PARALLEL_MIN_ROWS or not sys.platform.startswith("linux") or multiprocessing.current_process().daemon:
        return 1
    return max(1, min(workers, -(-rows // PARALLEL_CHUNK)))


def _parse_row(row: dict[str, Any], fmt: _Format, enc: _Encoder) -> Outcome:
    enc.row_truncations.clear()
    try:
        example = fmt.parse(row, enc)
    except _BadRow as bad:
        return False, bad, row[ORIGIN_FILE], row[ORIGIN_ROW]
    return True, example, tuple(enc.row_truncations)


def _parse_rows(rows: datasets.Dataset, fmt: _Format, enc: _Encoder) -> Iterator[Outcome]:
    for row in _iter_rows(rows):
        yield _parse_row(row, fmt, enc)


_worker_state: tuple[datasets.Dataset, _Format, _Encoder] | None = None  # set in each worker process


def _start_worker(rows: datasets.Dataset, fmt: _Format, enc: _Encoder) -> None:
    global _worker_state
    _worker_state = rows, fmt, enc  # forked: inherited, not pickled


def _parse_chunk(start: int, stop: int) -> tuple[int, list[Outcome | None], set[str]]:
    """In a worker: the outcomes of rows start..stop (None: the row raised; the parent parses it again) and
    the forms seen."""
    if _worker_state is None:
        raise RuntimeError("_parse_chunk runs only in a worker forked by _parse_rows_parallel")
    rows, fmt, enc = _worker_state
    enc.forms.clear()
    outcomes: list[Outcome | None] = []
    for row in _iter_rows(rows, start, stop):
        try:
            outcomes.append(_parse_row(row, fmt, enc))
        except Exception:  # noqa: BLE001 - the parent parses the row again and raises it
            outcomes.append(None)
    return start, outcomes, set(enc.forms)


def _parse_rows_parallel(rows: datasets.Dataset, fmt: _Format, enc: _Encoder, workers: int) -> Iterator[Outcome]:
    starts = iter(range(0, len(rows), PARALLEL_CHUNK))
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_start_worker, initargs=(rows, fmt, enc))

    def submit(start: int) -> Any:
        return pool.submit(_parse_chunk, start, min(start + PARALLEL_CHUNK, len(rows)))

    try:
        # Frozen while forking, so the workers' own collections leave the objects they share with this process
        # unwritten (not copied into each worker); left alone when the application froze objects itself.
        freeze = gc.get_freeze_count() == 0
        if freeze:
            gc.freeze()
        try:
            pending = collections.deque(submit(start) for _, start in zip(range(2 * workers), starts))  # forks
        finally:
            if freeze:
                gc.unfreeze()
        while pending:
            try:
                start, outcomes, forms = pending.popleft().result()
            except BrokenProcessPool as error:
                raise RuntimeError(f"a data-loading worker process died ({error}); out of memory? "
                                   f"{WORKERS_ENV}=1 parses in one process") from error
            if (following := next(starts, None)) is not None:
                pending.append(submit(following))
            enc.forms.update(forms)
            for offset, outcome in enumerate(outcomes):
                if outcome is None:
                    outcome = _parse_row(next(_iter_rows(rows, start + offset, start + offset + 1)), fmt, enc)
                yield outcome
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---- public loaders ----------------------------------------------------------------------

DEFAULT_KEYS = Keys()


def load_prompts(
    source: str, tokenizer: PreTrainedTokenizerBase, *, keys: Keys = DEFAULT_KEYS, max_prompt_len: int,
    overlength: Overlength = "error", on_bad_row: OnBadRow = "error", split: str = "train",
    limit: int | None = None,
) -> tuple[list[PromptExample], LoadReport]:
    """RL prompts: `prompt` (or `question`), a `messages` list, or the shared start of `chosen` and
    `rejected`; other columns become `metadata`."""
    formats = [_Format("prompt-only", ("prompt",), _parse_prompt),
               _Format("language modeling", ("messages",), _parse_prompt),
               _Format("preference, implicit prompt", ("chosen", "rejected"), _parse_implicit_prompt)]
    return _load(source, tokenizer, formats, aliases=PROMPT_ALIASES, keys=keys, max_prompt_len=max_prompt_len,
                 max_response_len=None, overlength=overlength, on_bad_row=on_bad_row, split=split, limit=limit)


def load_sft(
    source: str, tokenizer: PreTrainedTokenizerBase, *, keys: Keys = DEFAULT_KEYS, max_prompt_len: int,
    max_response_len: int | None = None, overlength: Overlength = "error", on_bad_row: OnBadRow = "error",
    split: str = "train", limit: int | None = None, sft_turns: SFTTurns = "all",
) -> tuple[list[SFTExample], LoadReport]:
    """SFT pairs: `prompt` + `response` (or `completion`), a `messages` conversation ending with the
    assistant (every assistant turn trained with sft_turns="all", the last only with "last"), or a `text`."""
    if sft_turns not in ("all", "last"):
        raise ValueError(f"sft_turns must be 'all' or 'last', got {sft_turns!r}")
    formats = [_Format("prompt-completion", ("prompt", "response"), functools.partial(_parse_sft, sft_turns)),
               _Format("language modeling", ("messages",), functools.partial(_parse_conversation, sft_turns)),
               _Format("language modeling", ("text",), _parse_text)]
    return _load(source, tokenizer, formats, keys=keys, max_prompt_len=max_prompt_len,
                 max_response_len=max_response_len, overlength=overlength, on_bad_row=on_bad_row,
                 split=split, limit=limit)


def load_preferences(
    source: str, tokenizer: PreTrainedTokenizerBase, *, keys: Keys = DEFAULT_KEYS, max_prompt_len: int,
    max_response_len: int | None = None, overlength: Overlength = "error", on_bad_row: OnBadRow = "error",
    split: str = "train", limit: int | None = None,
) -> tuple[list[PreferenceExample], LoadReport]:
    """Preference pairs: `prompt`, `chosen`, `rejected`, or only `chosen` and `rejected` (implicit prompt);
    optional `score_chosen`, `score_rejected`."""
    return _load(source, tokenizer, [PREFERENCE, IMPLICIT_PREFERENCE], keys=keys, max_prompt_len=max_prompt_len,
                 max_response_len=max_response_len, overlength=overlength, on_bad_row=on_bad_row,
                 split=split, limit=limit)


def load_ranked(
    source: str, tokenizer: PreTrainedTokenizerBase, *, keys: Keys = DEFAULT_KEYS, max_prompt_len: int,
    max_response_len: int | None = None, overlength: Overlength = "error", on_bad_row: OnBadRow = "error",
    split: str = "train", limit: int | None = None,
) -> tuple[list[RankedExample], LoadReport]:
    """Ranked lists: `prompt`, `responses` (>= 2), optional `scores` (else best first); or preference pairs
    as lists of 2, chosen first, scored by their `score_chosen` / `score_rejected` when they have them."""
    formats = [_Format("ranked", ("prompt", "responses"), _parse_ranked)] + [
        dataclasses.replace(pair, parse=functools.partial(_parse_pair_as_ranked, pair.parse))
        for pair in (PREFERENCE, IMPLICIT_PREFERENCE)]
    return _load(source, tokenizer, formats, keys=keys, max_prompt_len=max_prompt_len,
                 max_response_len=max_response_len, overlength=overlength, on_bad_row=on_bad_row,
                 split=split, limit=limit)


def load_kto(
    source: str, tokenizer: PreTrainedTokenizerBase, *, keys: Keys = DEFAULT_KEYS, max_prompt_len: int,
    max_response_len: int | None = None, overlength: Overlength = "error", on_bad_row: OnBadRow = "error",
    split: str = "train", limit: int | None = None,
) -> tuple[list[KTOExample], LoadReport]:
    """KTO examples (unpaired preference): `prompt`, `response` (or `completion`), boolean `label` (true = desirable)."""
    formats = [_Format("unpaired preference", ("prompt", "response", "label"), _parse_kto)]
    return _load(source, tokenizer, formats, keys=keys, max_prompt_len=max_prompt_len,
                 max_response_len=max_response_len, overlength=overlength, on_bad_row=on_bad_row,
                 split=split, limit=limit)
