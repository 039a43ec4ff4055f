"""rlhf_ray.data.records in detail, with the toy char tokenizer (one id per character): the settings checks,
`limit`, the report string, every bad-row message (key, reason and the fix it names), scores, the BOS and EOS
rules, prompts and metadata, the row parsers' less common paths, and the parse worker plumbing."""

import multiprocessing
import os

import pytest
from tokenizers import processors

from rlhf_ray.data import (
    DataError,
    Keys,
    KTOExample,
    LoadReport,
    PreferenceExample,
    PromptExample,
    RankedExample,
    SFTExample,
    load_kto,
    load_preferences,
    load_prompts,
    load_ranked,
    load_sft,
    records,
    sources,
)
from rlhf_ray.toy import build_char_tokenizer
from tests.unit.chat_rows import assistant, system, user, write

EOS = "</s>"
LIMITS = {"max_prompt_len": 64, "max_response_len": 32}


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def bos_tok():
    """The toy tokenizer adding a BOS `<s>` (id 1) to what it encodes with specials, as Llama's does."""
    tok = build_char_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok


def ids(tok, string):
    return tok.encode(string, add_special_tokens=False)


def row_error(loader, tmp_path, rows, tok, **options):
    """The DataError of loading `rows`, as its message after the file name."""
    source = write(tmp_path / "rows", rows)
    with pytest.raises(DataError) as caught:
        loader(source, tok, **{**LIMITS, **options})
    return str(caught.value).removeprefix(source)


# ---- settings ----------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"overlength": "cut"}, "overlength must be 'error', 'skip' or 'truncate_left', got 'cut'"),
    ({"on_bad_row": "warn"}, "on_bad_row must be 'error' or 'skip', got 'warn'"),
    ({"max_prompt_len": 0}, "max_prompt_len=0 and max_response_len=32 must be >= 1"),
    ({"max_response_len": 0}, "max_prompt_len=64 and max_response_len=0 must be >= 1"),
    ({"limit": 0}, "limit must be None or >= 1, got 0"),
    ({"sft_turns": "first"}, "sft_turns must be 'all' or 'last', got 'first'"),
])
def test_settings_are_checked_before_reading(tok, options, message):
    with pytest.raises(ValueError) as caught:
        load_sft("never/read.jsonl", tok, **{**LIMITS, **options})
    assert str(caught.value) == message


def test_a_tokenizer_without_eos_is_refused(tmp_path):
    tok = build_char_tokenizer()
    tok.eos_token = None
    source = write(tmp_path / "p", [{"prompt": "p"}])
    with pytest.raises(ValueError, match="^the tokenizer has no eos_token_id; responses need one$"):
        load_prompts(source, tok, max_prompt_len=8)


def test_the_smallest_limits_are_allowed(tmp_path, tok):
    source = write(tmp_path / "sft", [{"prompt": "p", "response": "r"}, {"prompt": "q", "response": "s"}])
    [example], report = load_sft(source, tok, max_prompt_len=1, max_response_len=1, limit=1)
    assert (example.prompt_ids, example.response_ids) == (ids(tok, "p"), ids(tok, "r"))  # cut: no EOS
    assert (report.rows_in, report.truncated) == (1, {"response": 1})
    examples, report = load_sft(source, tok, limit=5, **LIMITS)  # a limit above the row count reads them all
    assert len(examples) == report.rows_in == 2


# ---- the report --------------------------------------------------------------------------

def test_report_string_lists_drops_and_cuts_sorted():
    report = LoadReport("f.jsonl", 9, 5, {"wrong_type": 1, "empty": 3}, {"response": 2, "prompt": 1}, "ranked (standard)")
    assert str(report) == ("f.jsonl [ranked (standard)]: kept 5/9 rows; dropped empty=3, wrong_type=1; "
                           "truncated prompt=1, response=2")
    assert str(LoadReport("f.jsonl", 2, 2, {}, {})) == "f.jsonl: kept 2/2 rows"


def test_report_of_a_load_with_drops_and_cuts(tmp_path, tok):
    rows = [{"prompt": "p" * 10, "response": "r" * 10}, {"prompt": "", "response": "r"}, {"prompt": "p", "response": 3},
            {"prompt": "ok", "response": "fine"}]
    source = write(tmp_path / "sft", rows)
    examples, report = load_sft(source, tok, max_prompt_len=4, max_response_len=6, overlength="truncate_left",
                                on_bad_row="skip")
    assert report == LoadReport(source, 4, 2, {"empty": 1, "wrong_type": 1}, {"prompt": 1, "response": 1},
                                "prompt-completion (standard)")
    assert examples[0] == SFTExample(ids(tok, "pppp"), ids(tok, "rrrrrr"))
    assert examples[1] == SFTExample(ids(tok, "ok"), ids(tok, "fine" + EOS))


# ---- bad rows: key, reason, and the fix named --------------------------------------------

@pytest.mark.parametrize("loader, row, message", [
    (load_prompts, {"prompt": 42}, (", row 1, key 'prompt': expected a string, got int 42 "
                                   "(on_bad_row='skip' drops such rows) [wrong_type]")),
    (load_prompts, {"prompt": " "}, (", row 1, key 'prompt': empty or whitespace-only string "
                                    "(on_bad_row='skip' drops such rows) [empty]")),
    (load_prompts, {"prompt": []}, (", row 1, key 'prompt': empty list of messages "
                                   "(on_bad_row='skip' drops such rows) [empty]")),
    (load_prompts, {"prompt": [{"role": "user", "content": "a"}, {"role": "user"}]},
     (", row 1, key 'prompt': message 1 is not {'role': str, 'content': str}: {'role': 'user'} "
     "(on_bad_row='skip' drops such rows) [wrong_type]")),
    (load_prompts, {"prompt": "x" * 70}, (", row 1, key 'prompt': prompt has 70 tokens > max_prompt_len=64 "
                                         "(overlength='skip' or 'truncate_left') [overlength]")),
    (load_sft, {"prompt": "p", "response": [user("not an answer")]},
     (", row 1, key 'response': a response given as messages must end with an assistant message "
     "(on_bad_row='skip' drops such rows) [bad_value]")),
    (load_sft, {"messages": "hello"}, (", row 1, key 'messages': expected a list of chat messages, got str "
                                      "(on_bad_row='skip' drops such rows) [wrong_type]")),
    (load_sft, {"messages": [user("a"), assistant("b"), user("c")]},
     (", row 1, key 'messages': a conversation needs prompt messages then a final assistant message "
     "(on_bad_row='skip' drops such rows) [bad_value]")),
    (load_sft, {"messages": [assistant("b")]},
     (", row 1, key 'messages': a conversation needs prompt messages then a final assistant message "
     "(on_bad_row='skip' drops such rows) [bad_value]")),
    (load_sft, {"messages": [user("a"), assistant(" ")]},
     ", row 1, key 'messages': empty or whitespace-only string (on_bad_row='skip' drops such rows) [empty]"),
    (load_sft, {"messages": [user("a"), assistant("b"), user("c"), assistant("")]},
     ", row 1, key 'messages': empty or whitespace-only string (on_bad_row='skip' drops such rows) [empty]"),
    (load_sft, {"messages": [user("a"), {"role": "assistant", "content": 3}]},
     (", row 1, key 'messages': message 1 is not {'role': str, 'content': str}: {'role': 'assistant', 'content': 3} "
     "(on_bad_row='skip' drops such rows) [wrong_type]")),
    (load_sft, {"text": 5}, (", row 1, key 'text': expected a string, got int 5 (on_bad_row='skip' drops such rows) "
                            "[wrong_type]")),
    (load_sft, {"text": None}, ", row 1, key 'text': missing or null (on_bad_row='skip' drops such rows) [missing_key]"),
    (load_sft, {"prompt": "p", "response": None},
     ", row 1, key 'response': missing or null (on_bad_row='skip' drops such rows) [missing_key]"),
    (load_kto, {"prompt": "p", "response": "r", "label": None},
     ", row 1, key 'label': missing or null (on_bad_row='skip' drops such rows) [missing_key]"),
    (load_ranked, {"prompt": "p", "responses": None},
     ", row 1, key 'responses': missing or null (on_bad_row='skip' drops such rows) [missing_key]"),
    (load_ranked, {"prompt": "p", "responses": ["a", "b"], "scores": None},
     ", row 1, key 'scores': missing or null (on_bad_row='skip' drops such rows) [missing_key]"),
    (load_preferences, {"prompt": "p", "chosen": "a", "rejected": None},
     ", row 1, key 'rejected': missing or null (on_bad_row='skip' drops such rows) [missing_key]"),
    (load_preferences, {"chosen": None, "rejected": "a b"},
     ", row 1, key 'chosen': missing or null (on_bad_row='skip' drops such rows) [missing_key]"),
    (load_preferences, {"prompt": "p", "chosen": "same", "rejected": "same"},
     (", row 1, key 'rejected': same token ids as 'chosen' (after any cut) (on_bad_row='skip' drops such rows) "
     "[identical_pair]")),
    (load_preferences, {"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 1, "score_rejected": 2},
     (", row 1, key 'score_chosen': score_chosen=1.0 < score_rejected=2.0: the scores prefer the rejected response "
     "(on_bad_row='skip' drops such rows) [bad_value]")),
    (load_preferences, {"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 1, "score_rejected": True},
     ", row 1, key 'score_rejected': expected a number, got True (on_bad_row='skip' drops such rows) [wrong_type]"),
    (load_preferences, {"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 1},
     ", row 1, key 'score_rejected': missing or null (on_bad_row='skip' drops such rows) [missing_key]"),
    (load_preferences, {"prompt": "p", "chosen": "a", "rejected": "b", "score_rejected": 1},
     ", row 1, key 'score_chosen': missing or null (on_bad_row='skip' drops such rows) [missing_key]"),
    (load_preferences, {"chosen": [user("q"), assistant("a")], "rejected": "q b"},
     (", row 1, key 'rejected': 'chosen' and 'rejected' must both be strings or both chat messages "
     "(on_bad_row='skip' drops such rows) [wrong_type]")),
    (load_preferences, {"chosen": "q a", "rejected": 5},
     (", row 1, key 'rejected': 'chosen' and 'rejected' must both be strings or both chat messages "
     "(on_bad_row='skip' drops such rows) [wrong_type]")),
    (load_preferences, {"chosen": "q a", "rejected": " "},
     ", row 1, key 'rejected': empty or whitespace-only string (on_bad_row='skip' drops such rows) [empty]"),
    (load_preferences, {"chosen": "", "rejected": "q b"},
     ", row 1, key 'chosen': empty or whitespace-only string (on_bad_row='skip' drops such rows) [empty]"),
    (load_preferences, {"chosen": [user("q"), assistant("a")], "rejected": [user("q"), {"role": 1, "content": "b"}]},
     (", row 1, key 'rejected': message 1 is not {'role': str, 'content': str}: {'role': 1, 'content': 'b'} "
     "(on_bad_row='skip' drops such rows) [wrong_type]")),
    (load_preferences, {"chosen": [], "rejected": [user("q"), assistant("b")]},
     ", row 1, key 'chosen': empty list of messages (on_bad_row='skip' drops such rows) [empty]"),
    (load_ranked, {"prompt": "p", "responses": "a"},
     ", row 1, key 'responses': expected a list of responses, got str (on_bad_row='skip' drops such rows) [wrong_type]"),
    (load_ranked, {"prompt": "p", "responses": ["a"]},
     ", row 1, key 'responses': needs at least 2 responses, got 1 (on_bad_row='skip' drops such rows) [bad_value]"),
    (load_ranked, {"prompt": "p", "responses": ["a", "b", ""]},
     ", row 1, key 'responses[2]': empty or whitespace-only string (on_bad_row='skip' drops such rows) [empty]"),
    (load_ranked, {"prompt": "p", "responses": ["a", "b"], "scores": [1, True]},
     (", row 1, key 'scores': expected a list of numbers, got [1, True] (on_bad_row='skip' drops such rows) "
     "[wrong_type]")),
    (load_ranked, {"prompt": "p", "responses": ["a", "b"], "scores": 1},
     ", row 1, key 'scores': expected a list of numbers, got 1 (on_bad_row='skip' drops such rows) [wrong_type]"),
    (load_ranked, {"prompt": "p", "responses": ["a", "b"], "scores": [1, 2, 3]},
     ", row 1, key 'scores': 3 scores for 2 responses (on_bad_row='skip' drops such rows) [bad_value]"),
    (load_kto, {"prompt": "p", "response": "r", "label": 1},
     ", row 1, key 'label': expected true or false, got 1 (on_bad_row='skip' drops such rows) [wrong_type]"),
])
def test_bad_row_messages(tmp_path, tok, loader, row, message):
    options = {"max_prompt_len": 64} if loader is load_prompts else LIMITS
    source = write(tmp_path / "rows", [row])
    with pytest.raises(DataError) as caught:
        loader(source, tok, **options)
    assert str(caught.value) == source + message


def test_infinite_scores_are_bad_values(tmp_path, tok):
    path = tmp_path / "inf.jsonl"
    path.write_text('{"prompt": "p", "responses": ["a", "b"], "scores": [1, Infinity]}\n'
                    '{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": Infinity, "score_rejected": 1}\n')
    with pytest.raises(DataError) as caught:
        load_ranked(str(path), tok, **LIMITS)
    assert str(caught.value) == (f"{path}, row 1, key 'scores': scores must be finite, got [1.0, inf] "
                                 "(on_bad_row='skip' drops such rows) [bad_value]")
    pair = tmp_path / "pair.jsonl"
    pair.write_text('{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": Infinity, "score_rejected": 1}\n')
    with pytest.raises(DataError) as caught:
        load_preferences(str(pair), tok, **LIMITS)
    assert str(caught.value) == (f"{pair}, row 1, key 'score_chosen': must be finite, got inf "
                                 "(on_bad_row='skip' drops such rows) [bad_value]")


def test_equal_pair_scores_and_integer_ranked_scores_are_kept_as_floats(tmp_path, tok):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 3, "score_rejected": 3}]
    [pair], _ = load_preferences(write(tmp_path / "pairs", rows), tok, **LIMITS)
    assert pair == PreferenceExample(ids(tok, "p"), ids(tok, "a" + EOS), ids(tok, "b" + EOS), [3.0, 3.0])
    assert all(isinstance(s, float) for s in pair.scores)
    [ranked], _ = load_ranked(write(tmp_path / "ranked", [{"prompt": "p", "responses": ["a", "b"], "scores": [2, 5]}]),
                              tok, **LIMITS)
    assert ranked == RankedExample(ids(tok, "p"), [ids(tok, "a" + EOS), ids(tok, "b" + EOS)], [2.0, 5.0])
    assert all(isinstance(s, float) for s in ranked.scores)


def test_pairs_as_ranked_lists_keep_their_scores(tmp_path, tok):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 5, "score_rejected": 1}]
    [ranked], report = load_ranked(write(tmp_path / "pairs", rows), tok, **LIMITS)
    assert ranked == RankedExample(ids(tok, "p"), [ids(tok, "a" + EOS), ids(tok, "b" + EOS)], [5.0, 1.0])
    assert report.format == "preference (standard)"
    [unscored], _ = load_ranked(write(tmp_path / "plain", [{"prompt": "p", "chosen": "a", "rejected": "b"}]), tok,
                                **LIMITS)
    assert unscored.scores is None


# ---- prompts -----------------------------------------------------------------------------

def test_prompt_examples_keep_the_row_and_its_other_columns(tmp_path, tok):
    rows = [{"prompt": "What?", "messages": [user("x")], "answer": "42", "id": 3}]
    [example], _ = load_prompts(write(tmp_path / "p", rows), tok, max_prompt_len=64)
    assert example == PromptExample(ids(tok, "What?"), "What?", {"answer": "42", "id": 3}, "What?")


def test_a_null_prompt_falls_back_to_the_messages_without_the_final_reply(tmp_path, tok):
    rows = [{"prompt": None, "messages": [system("s"), user("q"), assistant("a")], "id": 1},
            {"prompt": "plain", "messages": [user("ignored")], "id": 2},
            {"prompt": None, "messages": [user("q"), assistant("")], "id": 3}]
    examples, report = load_prompts(write(tmp_path / "p", rows), tok, max_prompt_len=64)
    assert [e.prompt_text for e in examples] == ["<|system|>s</s><|user|>q</s><|assistant|>", "plain",
                                                 "<|user|>q</s><|assistant|>"]
    assert examples[0].prompt == [system("s"), user("q")]
    assert [e.metadata for e in examples] == [{"id": 1}, {"id": 2}, {"id": 3}]
    assert report.format == "prompt-only (conversational)"


def test_messages_column_prompts(tmp_path, tok):
    rows = [{"messages": [user("q"), assistant("a")]}, {"messages": [user("only")]},
            {"messages": [user("q"), assistant("a"), user("more"), assistant("b")]}]
    examples, report = load_prompts(write(tmp_path / "m", rows), tok, max_prompt_len=64)
    assert [e.prompt_text for e in examples] == [
        "<|user|>q</s><|assistant|>", "<|user|>only</s><|assistant|>",
        "<|user|>q</s><|assistant|>a</s><|user|>more</s><|assistant|>"]
    assert report.format == "language modeling (conversational)"
    [greeting], _ = load_prompts(write(tmp_path / "g", [{"messages": [assistant("welcome")]}]), tok, max_prompt_len=64)
    assert greeting.prompt_text == "<|assistant|>welcome</s><|assistant|>"  # a single message is never dropped


def test_a_cut_prompt_text_is_the_decoded_kept_tokens(tmp_path, tok):
    rows = [{"prompt": [user("abcdefgh")]}]
    [example], report = load_prompts(write(tmp_path / "p", rows), tok, max_prompt_len=6, overlength="truncate_left")
    assert example.prompt_ids == ids(tok, "<|user|>abcdefgh</s><|assistant|>")[-6:]
    assert example.prompt_text == "efgh</s><|assistant|>" and report.truncated == {"prompt": 1}
    [fits], report = load_prompts(write(tmp_path / "q", [{"prompt": "abcdef"}]), tok, max_prompt_len=6)
    assert fits.prompt_text == "abcdef" and report.truncated == {}


def test_implicit_prompts_for_rl_keep_only_the_shared_start(tmp_path, tok):
    rows = [{"chosen": "The sky is blue.", "rejected": "The sky is green.", "id": 1}]
    [example], report = load_prompts(write(tmp_path / "p", rows), tok, max_prompt_len=64)
    assert example == PromptExample(ids(tok, "The sky is"), "The sky is",
                                    {"chosen": "The sky is blue.", "rejected": "The sky is green.", "id": 1},
                                    "The sky is")
    assert report.format == "preference, implicit prompt (standard)"


def test_a_template_that_rejects_a_prompt_is_a_bad_value(tmp_path):
    tok = build_char_tokenizer()
    tok.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}x"
    source = write(tmp_path / "p", [{"prompt": [system("s"), user("q")]}])
    with pytest.raises(DataError) as caught:
        load_prompts(source, tok, max_prompt_len=64)
    assert str(caught.value) == (f"{source}, row 1, key 'prompt': the chat template rejects these messages: no system "
                                 "(on_bad_row='skip' drops such rows) [bad_value]")


# ---- BOS and EOS -------------------------------------------------------------------------

def test_prompt_strings_get_the_tokenizers_bos_once(tmp_path, bos_tok):
    rows = [{"prompt": "ab", "response": "c"}, {"prompt": "<s>ab", "response": "c"}, {"prompt": "<s> b", "response": "c"}]
    examples, _ = load_sft(write(tmp_path / "s", rows), bos_tok, **LIMITS)
    assert [e.prompt_ids for e in examples] == [[1] + ids(bos_tok, "ab"), [1] + ids(bos_tok, "ab"),
                                                [1] + ids(bos_tok, " b")]
    assert [e.response_ids for e in examples] == [ids(bos_tok, "c") + [2]] * 3  # responses: no BOS
    [chat], _ = load_sft(write(tmp_path / "c", [{"prompt": [user("q")], "response": "c"}]), bos_tok, **LIMITS)
    assert chat.prompt_ids == ids(bos_tok, "<|user|>q</s><|assistant|>")  # the template's own specials only


def test_a_text_that_is_only_a_bos_keeps_one(tmp_path, bos_tok):
    [example], _ = load_prompts(write(tmp_path / "p", [{"prompt": "<s>"}]), bos_tok, max_prompt_len=8)
    assert example.prompt_ids == [1]


def test_text_rows_train_after_the_tokenizers_leading_specials(tmp_path, tok, bos_tok):
    [plain], report = load_sft(write(tmp_path / "t", [{"text": "abc"}]), tok, **LIMITS)
    assert plain == SFTExample(ids(tok, "a"), ids(tok, "bc" + EOS))
    assert report.format == "language modeling (standard)"
    rows = [{"text": "abc"}, {"text": "<s>abc"}]
    examples, _ = load_sft(write(tmp_path / "b", rows), bos_tok, **LIMITS)
    assert examples == [SFTExample([1], ids(bos_tok, "abc" + EOS))] * 2
    [single], _ = load_sft(write(tmp_path / "one", [{"text": "a"}]), tok, **LIMITS)
    assert single == SFTExample(ids(tok, "a"), [2])


def test_text_rows_follow_the_length_limits(tmp_path, tok):
    source = write(tmp_path / "t", [{"text": "abcdefgh"}])
    [example], report = load_sft(source, tok, max_prompt_len=4, max_response_len=3)
    assert example == SFTExample(ids(tok, "a"), ids(tok, "bcd")) and report.truncated == {"response": 1}


def test_a_response_written_with_its_eos_gets_no_second_one(tmp_path, tok):
    rows = [{"prompt": "p", "response": "done</s>"}, {"prompt": "p", "response": "</s>x"}]
    examples, _ = load_sft(write(tmp_path / "s", rows), tok, max_prompt_len=8)  # no response limit
    assert [e.response_ids for e in examples] == [ids(tok, "done") + [2], [2] + ids(tok, "x") + [2]]


def test_a_response_exactly_at_the_limit_keeps_its_eos(tmp_path, tok):
    [example], report = load_sft(write(tmp_path / "s", [{"prompt": "p", "response": "ab"}]), tok, max_prompt_len=8,
                                 max_response_len=3)
    assert example.response_ids == ids(tok, "ab") + [2] and report.truncated == {}


def test_a_prompt_exactly_at_the_limit_is_kept_whole(tmp_path, tok):
    [example], report = load_prompts(write(tmp_path / "p", [{"prompt": "abcd"}]), tok, max_prompt_len=4)
    assert example.prompt_ids == ids(tok, "abcd") and report.truncated == {}


# ---- conversations -----------------------------------------------------------------------

def test_sft_prompt_completion_rows_fall_back_to_messages(tmp_path, tok):
    rows = [{"prompt": "p", "response": "r", "messages": None},
            {"prompt": None, "response": None, "messages": [user("q"), assistant("a"), user("q2"), assistant("b")]}]
    examples, report = load_sft(write(tmp_path / "s", rows), tok, **LIMITS)
    assert examples[0] == SFTExample(ids(tok, "p"), ids(tok, "r" + EOS))
    assert examples[1] == SFTExample(ids(tok, "<|user|>q</s><|assistant|>a</s><|user|>q2</s><|assistant|>"),
                                     ids(tok, "b" + EOS), [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0])
    assert report.format == "prompt-completion (conversational)"
    [last], _ = load_sft(write(tmp_path / "l", rows[1:]), tok, sft_turns="last", **LIMITS)
    assert last.assistant_mask is None and last.prompt_ids == examples[1].prompt_ids


def test_a_mask_conversation_that_is_too_long_follows_overlength(tmp_path, tok):
    rows = [{"messages": [user("q" * 10), assistant("a"), user("r"), assistant("b")]}]
    source = write(tmp_path / "s", rows)
    with pytest.raises(DataError, match=r"row 1, key 'messages': prompt has 19 tokens > max_prompt_len=8"):
        load_sft(source, tok, max_prompt_len=8)
    [cut], _ = load_sft(source, tok, max_prompt_len=8, overlength="truncate_left")
    assert cut.prompt_ids == ids(tok, "</s><|assistant|>a</s><|user|>r</s><|assistant|>")
    assert cut.assistant_mask == [0, 0, 1, 1, 0, 0, 0, 0]  # the user turn's </s> is context, the assistant's trained


def test_hh_transcript_in_a_messages_column(tmp_path, tok):
    rows = [{"messages": "\n\nHuman: hi\n\nAssistant: yo"}]
    [example], report = load_sft(write(tmp_path / "s", rows), tok, **LIMITS)
    assert example == SFTExample(ids(tok, "<|user|>hi</s><|assistant|>"), ids(tok, "yo" + EOS))
    assert report.format == "language modeling (HH-RLHF transcripts)"


def test_hh_transcripts_win_the_reported_form_over_messages(tmp_path, tok):
    rows = [{"prompt": [user("q")], "response": "a"}, {"prompt": "\n\nHuman: hi\n\nAssistant:", "response": "b"}]
    _, report = load_sft(write(tmp_path / "s", rows), tok, **LIMITS)
    assert report.format == "prompt-completion (HH-RLHF transcripts)"


def test_explicit_prompt_with_single_message_replies_uses_the_prompt(tmp_path, tok):
    rows = [{"prompt": "ignored?", "chosen": [user("q"), assistant("a")], "rejected": [assistant("b")]}]
    [pair], _ = load_preferences(write(tmp_path / "p", rows), tok, **LIMITS)
    assert pair.prompt_ids == ids(tok, "ignored?")  # only whole conversations on both sides replace the prompt
    assert (pair.chosen_ids, pair.rejected_ids) == (ids(tok, "a" + EOS), ids(tok, "b" + EOS))


def test_kto_examples(tmp_path, tok):
    rows = [{"prompt": "p", "response": "r", "label": False}]
    [example], report = load_kto(write(tmp_path / "k", rows), tok, **LIMITS)
    assert example == KTOExample(ids(tok, "p"), ids(tok, "r" + EOS), False)
    assert report.format == "unpaired preference (standard)"


# ---- column detection --------------------------------------------------------------------

def test_aliases_apply_only_to_absent_default_columns(tmp_path, tok):
    rows = [{"question": "q", "prompt": "p"}]
    [example], report = load_prompts(write(tmp_path / "p", rows), tok, max_prompt_len=8)
    assert example.prompt_text == "p" and report.format == "prompt-only (standard)"
    assert example.metadata == {"question": "q"}
    rows = [{"question": "q", "answer": "a"}]
    with pytest.raises(DataError) as caught:
        load_sft(write(tmp_path / "s", rows), tok, **LIMITS)  # `question` is an alias for RL prompts only
    assert str(caught.value).endswith("needs columns ['prompt', 'response'] or ['messages'] or ['text'], has "
                                      "['answer', 'question']; set data.<name>_key (the loader's keys=Keys(...)) "
                                      "[missing_key]")


def test_custom_keys_name_the_bad_rows(tmp_path, tok):
    keys = Keys(prompt="q", responses="outs", scores="s")
    rows = [{"q": "p", "outs": ["a", "b"], "s": [1, 2, 3]}]
    with pytest.raises(DataError, match=r"row 1, key 's': 3 scores for 2 responses"):
        load_ranked(write(tmp_path / "r", rows), tok, keys=keys, **LIMITS)
    keys = Keys(chosen="good", rejected="bad", score_chosen="sg", score_rejected="sb")
    rows = [{"prompt": "p", "good": "a", "bad": "a", "sg": 1, "sb": 0}]
    with pytest.raises(DataError, match=r"row 1, key 'bad': same token ids as 'good'"):
        load_preferences(write(tmp_path / "p", rows), tok, keys=keys, **LIMITS)
    rows = [{"prompt": "p", "good": "a", "bad": "b", "sg": 0, "sb": 1}]
    with pytest.raises(DataError, match=r"key 'sg': sg=0.0 < sb=1.0"):
        load_preferences(write(tmp_path / "p2", rows), tok, keys=keys, **LIMITS)
    keys = Keys(response="out", label="ok")
    rows = [{"prompt": "p", "out": "r", "ok": "yes"}]
    with pytest.raises(DataError, match=r"row 1, key 'ok': expected true or false"):
        load_kto(write(tmp_path / "k", rows), tok, keys=keys, **LIMITS)
    rows = [{"conv": [user("a"), user("b")]}]
    with pytest.raises(DataError, match=r"row 1, key 'conv': a conversation needs"):
        load_sft(write(tmp_path / "c", rows), tok, keys=Keys(messages="conv"), **LIMITS)
    with pytest.raises(DataError, match=r"row 1, key 'body': empty"):
        load_sft(write(tmp_path / "t", [{"body": " "}]), tok, keys=Keys(text="body"), **LIMITS)


# ---- parse workers -----------------------------------------------------------------------

def test_parse_chunk_runs_only_in_a_worker():
    with pytest.raises(RuntimeError, match="^_parse_chunk runs only in a worker forked by _parse_rows_parallel$"):
        records._parse_chunk(0, 1)


def test_worker_count_from_the_cpus(monkeypatch):
    assert (records.PARALLEL_MIN_ROWS, records.PARALLEL_CHUNK, records.WORKERS_ENV) == (
        8192, 1024, "RLHF_RAY_DATA_WORKERS")
    monkeypatch.delenv(records.WORKERS_ENV, raising=False)
    monkeypatch.setattr(records.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert records._workers(10**6) == 3
    monkeypatch.setattr(records.os, "sched_getaffinity", lambda pid: set(range(20)), raising=False)
    assert records._workers(10**6) == records.MAX_WORKERS == 8
    assert records._workers(records.PARALLEL_MIN_ROWS) == 8  # the threshold itself goes parallel
    assert records._workers(records.PARALLEL_MIN_ROWS - 1) == 1
    monkeypatch.setenv(records.WORKERS_ENV, " 5 ")
    assert records._workers(10**6) == 5
    monkeypatch.setattr(records, "PARALLEL_MIN_ROWS", 1)
    assert records._workers(3 * records.PARALLEL_CHUNK + 1) == 4  # tasks round up
    assert records._workers(3 * records.PARALLEL_CHUNK) == 3
    monkeypatch.setattr(records.sys, "platform", "darwin")
    assert records._workers(10**6) == 1


def test_worker_count_setting_message(monkeypatch):
    monkeypatch.setenv(records.WORKERS_ENV, "0")
    with pytest.raises(ValueError) as caught:
        records._workers(10)
    assert str(caught.value) == "RLHF_RAY_DATA_WORKERS must be a whole number >= 1, got '0'"


def test_iter_rows_reads_a_range_across_batches(tmp_path):
    from rlhf_ray.data import load_rows
    rows = load_rows(write(tmp_path / "r", [{"a": i} for i in range(7)]))
    assert [r["a"] for r in records._iter_rows(rows, 2, 6, batch_size=3)] == [2, 3, 4, 5]
    assert [r["a"] for r in records._iter_rows(rows, batch_size=2)] == list(range(7))
    assert [r["a"] for r in records._iter_rows(rows, 5)] == [5, 6]
    assert next(records._iter_rows(rows, 6)) == {"a": 6, "_origin_file": str(tmp_path / "r.jsonl"), "_origin_row": 7}


def test_worker_count_off_linux_and_in_a_daemon(monkeypatch):
    monkeypatch.delenv(records.WORKERS_ENV, raising=False)
    monkeypatch.delattr(records.os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(records.os, "cpu_count", lambda: 6)
    assert records._workers(10**6) == 6
    monkeypatch.setattr(records.os, "cpu_count", lambda: None)
    assert records._workers(10**6) == 1
    monkeypatch.setattr(records.os, "cpu_count", lambda: 6)

    class Daemon:
        daemon = True

    monkeypatch.setattr(records.multiprocessing, "current_process", lambda: Daemon())
    assert records._workers(10**6) == 1


def _die_in_worker(start, stop):
    os._exit(3)


def test_a_worker_that_dies_is_named_with_the_fix(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(records, "PARALLEL_MIN_ROWS", 1)
    monkeypatch.setattr(records, "PARALLEL_CHUNK", 2)
    monkeypatch.setenv(records.WORKERS_ENV, "2")
    monkeypatch.setattr(records, "_parse_chunk", _die_in_worker)
    source = write(tmp_path / "p", [{"prompt": f"p{i}"} for i in range(5)])
    with pytest.raises(RuntimeError, match=r"^a data-loading worker process died \(.*\); out of memory\? "
                                           r"RLHF_RAY_DATA_WORKERS=1 parses in one process$"):
        load_prompts(source, tok, max_prompt_len=8)
    assert not multiprocessing.active_children()


def test_no_usable_rows_names_the_report(tmp_path, tok):
    source = write(tmp_path / "p", [{"prompt": " "}, {"prompt": "x" * 9}])
    with pytest.raises(DataError) as caught:
        load_prompts(source, tok, max_prompt_len=8, on_bad_row="skip", overlength="skip")
    assert str(caught.value) == (f"{source}: no usable rows ({source} [prompt-only (standard)]: kept 0/2 rows; "
                                 "dropped empty=1, overlength=1) [empty]")


def test_only_the_aliases_of_the_detected_format_are_noted(tmp_path, tok):
    source = write(tmp_path / "p", [{"question": "q", "completion": "c"}])
    [example], report = load_prompts(source, tok, max_prompt_len=8)
    assert report.format == "prompt-only (standard), prompt column 'question'"
    assert example.metadata == {"completion": "c"}


def test_a_literal_bos_in_a_prompt_for_a_tokenizer_that_adds_none_is_kept(tmp_path, tok):
    [example], _ = load_prompts(write(tmp_path / "p", [{"prompt": "<s>ab"}]), tok, max_prompt_len=8)
    assert example.prompt_ids == [1] + ids(tok, "ab")


# ---- every loader passes its options on (a hub source, so that `split` matters) ----------------

LOADER_ROWS = {  # a row whose response (or prompt) is long, for each loader
    load_prompts: {"prompt": "abcdef"},
    load_sft: {"prompt": "p", "response": "abcdef"},
    load_preferences: {"prompt": "p", "chosen": "abcdef", "rejected": "xyz"},
    load_ranked: {"prompt": "p", "responses": ["abcdef", "xyz"]},
    load_kto: {"prompt": "p", "response": "abcdef", "label": True},
}


@pytest.mark.parametrize("loader", list(LOADER_ROWS), ids=lambda f: f.__name__)
def test_every_loader_passes_its_options_on(monkeypatch, tok, loader):
    good = LOADER_ROWS[loader]
    rows = [good, good, {**good, "prompt": "x" * 20}, {**good, "prompt": " "}]
    splits = []

    def fake_load_dataset(name, split):
        splits.append(split)
        return sources.datasets.Dataset.from_list(rows)

    monkeypatch.setattr(sources.datasets, "load_dataset", fake_load_dataset)
    limits = {"max_prompt_len": 8} if loader is load_prompts else {"max_prompt_len": 8, "max_response_len": 4}
    with pytest.raises(DataError) as caught:  # overlength="error" by default
        loader("org/name", tok, **limits)
    assert (caught.value.source, caught.value.row, caught.value.reason) == ("hub:org/name:train", 3, "overlength")
    with pytest.raises(DataError) as caught:  # on_bad_row="error" by default
        loader("org/name", tok, overlength="skip", **limits)
    assert (caught.value.row, caught.value.key, caught.value.reason) == (4, "prompt", "empty")
    examples, report = loader("org/name", tok, split="test", limit=2, **limits)
    assert splits == ["train", "train", "test"]
    assert (report.source, report.rows_in, report.kept) == ("org/name", 2, 2)
    assert report.truncated == ({} if loader is load_prompts else {"response": 2})
    if loader is not load_prompts:
        cut = examples[0].responses_ids[0] if loader is load_ranked else getattr(
            examples[0], "chosen_ids" if loader is load_preferences else "response_ids")
        assert cut == ids(tok, "abcd")
    _, report = loader("org/name", tok, on_bad_row="skip", overlength="skip", **limits)
    assert (report.kept, report.dropped) == (2, {"overlength": 1, "empty": 1})
    _, report = loader("org/name", tok, keys=Keys(), on_bad_row="skip", overlength="truncate_left", **limits)
    assert (report.kept, report.dropped, report.truncated.get("prompt")) == (3, {"empty": 1}, 1)


def test_a_null_prompt_column_beside_whole_conversations_is_not_needed(tmp_path, tok):
    """UltraFeedback-style rows whose chosen/rejected repeat the user turn: the prompt comes from the shared
    turns, so a null `prompt` column must not reject the row (it did: the column was read first)."""
    chosen, rejected = [user("q"), assistant("yes")], [user("q"), assistant("no")]
    rows = [{"prompt": None, "chosen": chosen, "rejected": rejected},
            {"prompt": "q", "chosen": chosen, "rejected": rejected}]
    pairs, report = load_preferences(write(tmp_path / "p", rows), tok, **LIMITS)
    assert len(pairs) == 2 and report.dropped == {}
    assert pairs[0] == pairs[1]
