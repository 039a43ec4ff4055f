"""Chat conversations in the shapes datasets write them, turned into what the loaders encode.

- `transcript_messages`: Anthropic HH-RLHF (Bai et al. 2022, https://huggingface.co/datasets/Anthropic/hh-rlhf)
  writes a whole conversation as one string, `"\\n\\nHuman: …\\n\\nAssistant: …"`. It becomes `user` /
  `assistant` messages, so it renders with the model's own chat template like any conversation.
- `split_shared_prompt` / `split_shared_text`: a preference pair with no prompt column (TRL's
  "implicit prompt", https://huggingface.co/docs/trl/dataset_formats) holds two whole texts; the
  prompt is their shared prefix cut at a turn boundary: every message before the last (messages),
  or the last whitespace of the common prefix (plain strings, as TRL's `extract_prompt` cuts).
- `context_with_assistant_mask`: the context of a conversation's last assistant turn, rendered turn
  by turn, with a mask on the earlier assistant turns (multi-turn SFT trains on them too).
- `render_conversation`: the chat template, or `"{role}: {content}\\n"` lines without one.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Messages = list[dict[str, str]]

_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def transcript_messages(text: str) -> Messages | None:
    """An HH-RLHF transcript as messages (contents stripped); None when `text` is not one: it must start
    with `Human:` (after newlines) and have a `\\n\\nAssistant:` turn. A transcript ending in an empty
    `Assistant:` (a prompt) keeps that empty assistant message; `open_turn_dropped` removes it."""
    text = text.lstrip("\n")
    if not text.startswith("Human:") or "\n\nAssistant:" not in text:
        return None
    pieces = _HH_TURN.split(text)  # ['', 'Human', ' hi', 'Assistant', ' hello', ...]
    return [{"role": _HH_ROLES[role], "content": content.strip()} for role, content in zip(pieces[1::2], pieces[2::2])]


def open_turn_dropped(messages: Messages) -> Messages:
    """A prompt's messages without a final empty assistant message (the turn the model is to write)."""
    if len(messages) > 1 and messages[-1]["role"] == "assistant" and not messages[-1]["content"].strip():
        return messages[:-1]
    return messages


def split_shared_prompt(chosen: Messages, rejected: Messages) -> tuple[Messages, str, str]:
    """(prompt messages, chosen reply, rejected reply) of two conversations that differ only in their
    final assistant message. Raises ValueError otherwise."""
    if chosen[:-1] != rejected[:-1]:
        raise ValueError("chosen and rejected differ before their last message; the implicit prompt is "
                         "everything before the last message and must be the same in both")
    if not chosen[:-1]:
        raise ValueError("no shared prompt: chosen and rejected are single messages; add a prompt column")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise ValueError("chosen and rejected must each end with an assistant message")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def split_shared_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen rest, rejected rest): the common prefix cut at its last whitespace, which starts the
    rests ("The sky is blue." / "The sky is green." → "The sky is", " blue.", " green."). Raises ValueError
    when the prefix holds no whitespace or only whitespace."""
    common = os.path.commonprefix([chosen, rejected])
    cut = max(common.rfind(c) for c in " \t\n")
    if cut < 0 or not common[:cut].strip():
        raise ValueError("no shared prompt: chosen and rejected share no words at their start; add a prompt column")
    return chosen[:cut], chosen[cut:], rejected[cut:]


def render_conversation(tokenizer: PreTrainedTokenizerBase, messages: Messages, add_generation_prompt: bool) -> str:
    """The tokenizer's chat template, or `"{role}: {content}\\n"` lines (then `"assistant: "` when the
    generation prompt is asked for) when it has none. A template that rejects the messages (Gemma's and
    Mistral's `raise_exception` on a system turn or roles that do not alternate) raises ValueError."""
    if tokenizer.chat_template:
        # What a template's raise_exception raises (imported here: only templates need jinja2).
        from jinja2 import TemplateError

        try:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        except TemplateError as error:
            raise ValueError(f"the chat template rejects these messages: {error}") from None
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + ("assistant: " if add_generation_prompt else "")


def context_with_assistant_mask(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> tuple[list[int], list[int]]:
    """(ids, mask), both (P,): `messages[:-1]` rendered with the generation prompt, encoded piece by piece
    at turn boundaries; mask 1 on each earlier assistant turn (not a first message) as the template
    writes it: its content and end-of-turn marker, up to and including the first EOS when it has one
    (what follows, e.g. a newline, is context). The pieces come from rendering growing prefixes of
    the conversation, each of which must start with the previous one; a template that rewrites
    earlier turns (e.g. drops reasoning from history) raises ValueError."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    mask: list[int] = []
    done = ""  # text encoded so far

    def add(text: str, trained: bool) -> None:
        piece = tokenizer.encode(text, add_special_tokens=False)
        k = 0
        if trained:
            k = piece.index(eos) + 1 if eos in piece else len(piece)
        ids.extend(piece)
        mask.extend([1] * k + [0] * (len(piece) - k))

    for i, message in enumerate(messages[:-1]):
        if message["role"] != "assistant" or i == 0:
            continue
        opened = render_conversation(tokenizer, messages[:i], add_generation_prompt=True)
        closed = render_conversation(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (opened.startswith(done) and closed.startswith(opened)):
            raise ValueError(f"the chat template does not render turn {i} as an extension of the turns before "
                             "it, so its tokens cannot be masked turn by turn; set data.sft_turns=last")
        add(opened[len(done):], trained=False)
        add(closed[len(opened):], trained=True)
        done = closed
    context = render_conversation(tokenizer, messages[:-1], add_generation_prompt=True)
    if not context.startswith(done):
        raise ValueError("the chat template does not render the last turn as an extension of the turns "
                         "before it; set data.sft_turns=last")
    add(context[len(done):], trained=False)
    return ids, mask
