"""rlhf_ray.data.conversations, function by function: HH transcripts, the open assistant turn, implicit
prompts of messages and of plain strings (each whitespace a cut can fall on), role-line rendering, a
template's rejection, and the turn-by-turn assistant mask with each way a template can break it."""

import pytest

from rlhf_ray.data.conversations import (
    context_with_assistant_mask,
    open_turn_dropped,
    render_conversation,
    split_shared_prompt,
    split_shared_text,
    transcript_messages,
)
from rlhf_ray.toy import build_char_tokenizer
from tests.unit.chat_rows import assistant, system, user


@pytest.fixture
def tok():
    return build_char_tokenizer()


def ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


# ---- HH transcripts ----------------------------------------------------------------------

def test_transcripts_strip_contents_and_keep_inner_newlines():
    assert transcript_messages("\n\n\nHuman:  two\nlines \n\nAssistant:\tok \n\nHuman: again\n\nAssistant:") == [
        user("two\nlines"), assistant("ok"), user("again"), assistant("")]


@pytest.mark.parametrize("text", [
    "  Human: hi\n\nAssistant: yo",  # only newlines may come first
    "XHuman: hi\n\nAssistant: yo",
    "Human: hi\nAssistant: yo",  # turns are separated by a blank line
    "Assistant: yo\n\nHuman: hi",
])
def test_what_is_not_a_transcript(text):
    assert transcript_messages(text) is None


# ---- the open assistant turn -------------------------------------------------------------

def test_open_turn_dropped_only_drops_an_empty_final_assistant_message():
    assert open_turn_dropped([user("hi"), assistant("")]) == [user("hi")]
    assert open_turn_dropped([user("hi"), assistant(" \n")]) == [user("hi")]
    assert open_turn_dropped([system("s"), user("hi"), assistant("")]) == [system("s"), user("hi")]
    assert open_turn_dropped([user("hi"), assistant("x"), assistant("")]) == [user("hi"), assistant("x")]
    for kept in ([user("hi"), assistant("yo")], [user("hi"), user("")], [assistant("")], [system("s")],
                 [user("hi"), assistant(""), assistant("yo")], [user("hi"), assistant(""), user("")]):
        assert open_turn_dropped(kept) == kept


# ---- implicit prompts --------------------------------------------------------------------

def test_split_shared_prompt_returns_the_shared_turns_and_both_replies():
    prompt = [system("s"), user("q")]
    assert split_shared_prompt(prompt + [assistant("good")], prompt + [assistant("bad")]) == (prompt, "good", "bad")


@pytest.mark.parametrize("chosen, rejected, message", [
    ([user("a"), assistant("x")], [user("b"), assistant("y")],
     ("chosen and rejected differ before their last message; the implicit prompt is everything before the last "
     "message and must be the same in both")),
    ([assistant("x")], [assistant("y")],
     "no shared prompt: chosen and rejected are single messages; add a prompt column"),
    ([user("a"), user("x")], [user("a"), assistant("y")], "chosen and rejected must each end with an assistant message"),
    ([user("a"), assistant("x")], [user("a"), user("y")], "chosen and rejected must each end with an assistant message"),
])
def test_split_shared_prompt_errors(chosen, rejected, message):
    with pytest.raises(ValueError) as caught:
        split_shared_prompt(chosen, rejected)
    assert str(caught.value) == message


@pytest.mark.parametrize("chosen, rejected, expected", [
    ("The sky is blue.", "The sky is green.", ("The sky is", " blue.", " green.")),
    ("a b\tc", "a b\td", ("a b", "\tc", "\td")),  # the last whitespace of the prefix, whichever kind
    ("say:\nyes", "say:\nno", ("say:", "\nyes", "\nno")),
    ("  lead x", "  lead y", ("  lead", " x", " y")),
    ("a bXc", "a bXd", ("a", " bXc", " bXd")),  # only whitespace cuts
])
def test_split_shared_text_cuts_at_the_last_whitespace(chosen, rejected, expected):
    assert split_shared_text(chosen, rejected) == expected


@pytest.mark.parametrize("chosen, rejected", [("Yes.", "No."), ("same start", "samex"),
                                              ("   x", "   y"), (" x", " y")])
def test_split_shared_text_without_a_word_before_the_cut(chosen, rejected):
    with pytest.raises(ValueError) as caught:
        split_shared_text(chosen, rejected)
    assert str(caught.value) == ("no shared prompt: chosen and rejected share no words at their start; "
                                 "add a prompt column")


# ---- rendering ---------------------------------------------------------------------------

def test_role_lines_without_a_template(tok):
    tok.chat_template = None
    messages = [system("s"), user("hi")]
    assert render_conversation(tok, messages, add_generation_prompt=False) == "system: s\nuser: hi\n"
    assert render_conversation(tok, messages, add_generation_prompt=True) == "system: s\nuser: hi\nassistant: "


def test_the_template_with_and_without_the_generation_prompt(tok):
    assert render_conversation(tok, [user("hi")], add_generation_prompt=False) == "<|user|>hi</s>"
    assert render_conversation(tok, [user("hi")], add_generation_prompt=True) == "<|user|>hi</s><|assistant|>"


def test_a_template_that_raises_is_a_value_error(tok):
    tok.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}ok"
    assert render_conversation(tok, [user("hi")], add_generation_prompt=True) == "ok"
    with pytest.raises(ValueError) as caught:
        render_conversation(tok, [system("s"), user("hi")], add_generation_prompt=True)
    assert str(caught.value) == "the chat template rejects these messages: no system role"


# ---- assistant masks ---------------------------------------------------------------------

def test_masks_of_a_direct_call(tok):
    messages = [user("hi"), assistant("yo"), user("ok"), assistant("bye")]
    got_ids, mask = context_with_assistant_mask(tok, messages)
    assert got_ids == ids(tok, "<|user|>hi</s><|assistant|>yo</s><|user|>ok</s><|assistant|>")
    # The </s> closing the user turns is context; the one closing the assistant's turn is trained.
    assert mask == [0, 0, 0, 0, 0] + [1, 1, 1] + [0] * 5
    # One message before the reply: no earlier assistant turn, nothing masked.
    got_ids, mask = context_with_assistant_mask(tok, [user("hi"), assistant("yo")])
    assert (got_ids, mask) == (ids(tok, "<|user|>hi</s><|assistant|>"), [0] * 5)


def test_the_eos_closing_a_turn_is_trained_and_what_follows_is_not(tok):
    tok.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}"
                         "{% if m['role'] == 'assistant' %}{{ '</s>ab' }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    got_ids, mask = context_with_assistant_mask(tok, [user("q"), assistant("yo"), user("r"), assistant("z")])
    assert got_ids == ids(tok, "<|user|>q<|assistant|>yo</s>ab<|user|>r<|assistant|>")
    assert mask == [0, 0, 0] + [1, 1, 1] + [0, 0] + [0, 0, 0]


def test_a_template_whose_generation_prompt_is_not_the_turn_opening_cannot_be_masked(tok):
    tok.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
    with pytest.raises(ValueError) as caught:
        context_with_assistant_mask(tok, [user("q"), assistant("yo"), user("r"), assistant("z")])
    assert str(caught.value) == ("the chat template does not render turn 1 as an extension of the turns before it, "
                                 "so its tokens cannot be masked turn by turn; set data.sft_turns=last")


REWRITES_HISTORY = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ '<|assistant|>' }}"
                    "{% else %}{{ '<|' + m['role'] + '|>' + m['content'] }}{% endif %}{% endfor %}"
                    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def test_a_template_that_rewrites_an_earlier_turn_names_the_turn(tok):
    tok.chat_template = REWRITES_HISTORY
    messages = [user("a"), assistant("b"), user("c"), assistant("d"), user("e"), assistant("f")]
    with pytest.raises(ValueError) as caught:
        context_with_assistant_mask(tok, messages)
    assert str(caught.value) == ("the chat template does not render turn 3 as an extension of the turns before it, "
                                 "so its tokens cannot be masked turn by turn; set data.sft_turns=last")


def test_a_template_that_rewrites_the_last_context_is_named(tok):
    tok.chat_template = REWRITES_HISTORY
    with pytest.raises(ValueError) as caught:
        context_with_assistant_mask(tok, [user("a"), assistant("b"), user("c"), assistant("d")])
    assert str(caught.value) == ("the chat template does not render the last turn as an extension of the turns "
                                 "before it; set data.sft_turns=last")
