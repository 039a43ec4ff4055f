"""How an environment's reply joins an episode as tokens (`rollout.env_turns`).

- `RawTurns`: the reply's text encoded as it is, appended after the policy's turn. For base models
  and formats the prompt itself defines.
- `ChatTurns`: the reply as a turn of the tokenizer's chat template, the way the model saw
  conversations in training: the template's end of the policy's turn (when the policy did not
  sample it: a turn cut at the token limit), the reply in its role's turn, then the opened
  assistant turn. Role: the environment's `observation_role` ("tool" for tool results, "user"
  otherwise); a template that rejects the role (Gemma, Mistral: user/assistant only) gets "user".

The chat tokens are the template's own text around the reply, found by rendering a conversation
whose assistant turn is a marker and cutting the rendering at the marker's end: whatever the
template writes before (a default system prompt, date headers) is cut away, and the prompt and the
policy's sampled ids are never re-rendered. With the policy's turn ended by EOS and the template
closing the turn with the EOS text, the closing is the policy's own token and is not repeated.
"""

from __future__ import annotations

from typing import Any, Protocol

_MARK = "\u2063policy-turn\u2063"  # stands for the policy's turn text; nothing a template writes contains it
_REPLY = "\u2063reply\u2063"  # a probe reply: is it rendered in a given role?


class TurnFormat(Protocol):
    def observation_ids(self, text: str, role: str, closed: bool) -> list[int]:
        """Tokens that put `text` (an environment reply in `role`) after a policy turn, ready for the
        next policy turn; `closed`: the policy's turn ended with EOS."""


class RawTurns:
    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def observation_ids(self, text: str, role: str, closed: bool) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []


class ChatTurns:
    def __init__(self, tokenizer: Any):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("rollout.env_turns=chat needs a tokenizer with a chat template; this one has none. "
                             "Set rollout.env_turns=raw (replies appended as plain text) or use a chat model's tokenizer")
        self.tokenizer = tokenizer
        self.eos_text = tokenizer.eos_token or ""
        self._roles: dict[str, str | None] = {}  # asked role -> the role the template takes

    def observation_ids(self, text: str, role: str, closed: bool) -> list[int]:
        tail = self.around(text, role)
        if closed and self.eos_text and tail.startswith(self.eos_text):
            tail = tail[len(self.eos_text):]  # the policy sampled the turn's end itself
        return self.tokenizer.encode(tail, add_special_tokens=False)

    def around(self, text: str, role: str) -> str:
        """The template's text after the policy's turn content up to the opened next assistant turn."""
        rendered = self._render(text, self.role(role))
        return rendered[rendered.index(_MARK) + len(_MARK):]

    def role(self, role: str) -> str:
        """`role`, or "user" when the template rejects it or drops its content (ValueError when it does
        that to "user" too)."""
        if role not in self._roles:
            self._roles[role] = next((r for r in dict.fromkeys((role, "user")) if self._renders(r)), None)
        if self._roles[role] is None:
            raise ValueError(f"the chat template rejects an environment reply after an assistant turn, as role "
                             f"{role!r} and as 'user'; set rollout.env_turns=raw")
        return self._roles[role]

    def _renders(self, role: str) -> bool:
        try:
            rendered = self._render(_REPLY, role)
        except ValueError:
            return False
        return _REPLY in rendered[rendered.find(_MARK):]

    def _render(self, text: str, role: str) -> str:
        from rlhf_ray.data.conversations import render_conversation

        messages = [{"role": "user", "content": "u"}, {"role": "assistant", "content": _MARK},
                    {"role": role, "content": text}]
        rendered = render_conversation(self.tokenizer, messages, add_generation_prompt=True)
        if _MARK not in rendered:
            raise ValueError("the chat template drops the assistant turn's content; set rollout.env_turns=raw")
        return rendered


def turn_format(tokenizer: Any, env_turns: str) -> TurnFormat:
    """`rollout.env_turns`: 'chat' | 'raw' | 'auto' (chat when the tokenizer has a chat template)."""
    if env_turns == "raw" or (env_turns == "auto" and not getattr(tokenizer, "chat_template", None)):
        return RawTurns(tokenizer)
    return ChatTurns(tokenizer)
