"""rlhf_ray.data: loaders on real files (JSONL / JSON / Parquet via `datasets`) with the toy
char tokenizer, bad-row reporting, the resumable batch iterator, and padding/masks."""

import json
import pickle

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rlhf_ray.data import (
    BatchIterator,
    DataError,
    Keys,
    concat_prompt_response,
    load_kto,
    load_preferences,
    load_prompts,
    load_ranked,
    load_rows,
    load_sft,
    pad_left,
    pad_right,
)
from rlhf_ray.data import sources
from rlhf_ray.toy import build_char_tokenizer

EOS = "</s>"
LOADERS = {
    "prompts": load_prompts, "sft": load_sft, "preferences": load_preferences,
    "ranked": load_ranked, "kto": load_kto,
}


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def write(path, rows, fmt="jsonl"):
    """Write rows as JSONL (one per line), a JSON array, or Parquet; return the path."""
    path = path.with_suffix(f".{fmt}")
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


def load(kind, source, tok, **kw):
    if kind != "prompts":
        kw.setdefault("max_response_len", 64)
    return LOADERS[kind](source, tok, max_prompt_len=kw.pop("max_prompt_len", 20), **kw)


# ---- good files --------------------------------------------------------------------------

GOOD = {
    "prompts": [{"prompt": "say: abc\n", "answer": "a"}, {"prompt": "hi there", "answer": "b"}],
    "sft": [{"prompt": "say: abc\n", "response": "aei"}, {"prompt": "q?", "response": "yes!"}],
    "preferences": [{"prompt": "say: abc\n", "chosen": "aaa", "rejected": "bbb"},
                    {"prompt": "x", "chosen": "ok", "rejected": "no"}],
    "ranked": [{"prompt": "say: abc\n", "responses": ["aa", "ab", "bb"], "scores": [1.0, 0.5, 0.0]},
               {"prompt": "y", "responses": ["u", "v"], "scores": [2, 1]}],
    "kto": [{"prompt": "say: abc\n", "response": "aei", "label": True},
            {"prompt": "z", "response": "xyz", "label": False}],
}


def texts(kind, example, tok):
    """The example decoded back to the row's fields."""
    out = {"prompt": decode(tok, example.prompt_ids)}
    if kind == "prompts":
        out["text"] = example.prompt_text
        out["metadata"] = example.metadata
    elif kind in ("sft", "kto"):
        out["response"] = decode(tok, example.response_ids)
    elif kind == "preferences":
        out["chosen"], out["rejected"] = decode(tok, example.chosen_ids), decode(tok, example.rejected_ids)
    else:
        out["responses"] = [decode(tok, ids) for ids in example.responses_ids]
    return out


def expected_texts(kind, row):
    out = {"prompt": row["prompt"]}
    if kind == "prompts":
        out["text"], out["metadata"] = row["prompt"], {"answer": row["answer"]}
    elif kind in ("sft", "kto"):
        out["response"] = row["response"] + EOS
    elif kind == "preferences":
        out["chosen"], out["rejected"] = row["chosen"] + EOS, row["rejected"] + EOS
    else:
        out["responses"] = [r + EOS for r in row["responses"]]
    return out


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
@pytest.mark.parametrize("kind", list(GOOD))
def test_good_files_load_exact_tokens(tmp_path, tok, kind, fmt):
    source = write(tmp_path / kind, GOOD[kind], fmt)
    examples, report = load(kind, source, tok)
    assert (report.rows_in, report.kept, report.dropped, report.truncated) == (2, 2, {}, {})
    for example, row in zip(examples, GOOD[kind]):
        assert texts(kind, example, tok) == expected_texts(kind, row)
    # One id per char, no specials added to plain prompts: the ids are the chars.
    assert examples[0].prompt_ids == [tok.convert_tokens_to_ids(c) for c in "say: abc\n"]
    if kind == "ranked":
        assert examples[1].scores == [2.0, 1.0]
    if kind == "kto":
        assert [e.desirable for e in examples] == [True, False]


def test_ranked_without_scores_column_is_best_first(tmp_path, tok):
    source = write(tmp_path / "r", [{"prompt": "p", "responses": ["a", "b"]}])
    [example], _ = load_ranked(source, tok, max_prompt_len=8)
    assert example.scores is None


def test_chat_messages_use_the_chat_template(tmp_path, tok):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    source = write(tmp_path / "chat", [{"prompt": messages, "id": 7}])
    [example], _ = load_prompts(source, tok, max_prompt_len=64)
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "<|system|>be brief</s><|user|>hi</s><|assistant|>"
    assert example.prompt_text == rendered
    assert decode(tok, example.prompt_ids) == rendered
    assert example.prompt_ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")  # one token
    assert example.metadata == {"id": 7}


def test_sft_conversation_splits_off_the_last_assistant_turn(tmp_path, tok):
    conversation = [{"role": "user", "content": "say: ab\n"}, {"role": "assistant", "content": "aa"},
                    {"role": "user", "content": "more"}, {"role": "assistant", "content": "eee"}]
    source = write(tmp_path / "sft", [{"messages": conversation}])
    [example], _ = load_sft(source, tok, max_prompt_len=64)
    assert decode(tok, example.prompt_ids) == (
        "<|user|>say: ab\n</s><|assistant|>aa</s><|user|>more</s><|assistant|>")
    assert decode(tok, example.response_ids) == "eee" + EOS


def test_without_chat_template_messages_are_role_lines(tmp_path):
    tok = build_char_tokenizer()
    tok.chat_template = None
    source = write(tmp_path / "chat", [{"prompt": [{"role": "user", "content": "hi"}]}])
    [example], _ = load_prompts(source, tok, max_prompt_len=64)
    assert decode(tok, example.prompt_ids) == "user: hi\nassistant: "


def test_configurable_keys(tmp_path, tok):
    rows = [{"question": "q1", "good": "yes", "bad": "no"}]
    source = write(tmp_path / "pref", rows)
    keys = Keys(prompt="question", chosen="good", rejected="bad")
    [example], _ = load_preferences(source, tok, keys=keys, max_prompt_len=8)
    assert decode(tok, example.chosen_ids) == "yes" + EOS
    with pytest.raises(DataError, match=r"needs columns \['prompt', 'chosen', 'rejected'\].*'question'"):
        load_preferences(source, tok, max_prompt_len=8)


# ---- bad rows ----------------------------------------------------------------------------

BASE = {"prompt": "p ok", "response": "r", "chosen": "good", "rejected": "bad",
        "responses": ["a", "b"], "scores": [1.0, 0.0], "label": True}
# (line, field overrides); None in overrides deletes the key. Each line has one defect.
DEFECTS = {
    2: {"prompt": None},  # key missing
    3: {"prompt": "NULL"},  # replaced by JSON null below
    4: {"prompt": ""},
    5: {"prompt": "  \n\t"},
    6: {"prompt": 42},
    7: {"prompt": {"text": "dict"}},
    8: {"chosen": "same", "rejected": "same"},
    9: {"prompt": "x" * 30},  # over max_prompt_len=20
    10: {"scores": ["high", 0.0]},
    11: {"scores": [1.0]},
    12: {"label": "yes"},
    13: {"chosen": 7},
    14: {"response": ""},
    15: {"responses": ["only one"]},
}
N_LINES = 16
PROMPT_DEFECTS = {2: "missing_key", 3: "missing_key", 4: "empty", 5: "empty", 6: "wrong_type",
                  7: "wrong_type", 9: "overlength"}
# line -> (key, reason) each loader must report.
EXPECTED = {
    "prompts": {},
    "sft": {14: ("response", "empty")},
    "preferences": {8: ("rejected", "identical_pair"), 13: ("chosen", "wrong_type")},
    "ranked": {10: ("scores", "wrong_type"), 11: ("scores", "bad_value"), 15: ("responses", "bad_value")},
    "kto": {12: ("label", "wrong_type"), 14: ("response", "empty")},
}
for _expected in EXPECTED.values():
    _expected.update({line: ("prompt", reason) for line, reason in PROMPT_DEFECTS.items()})


def bad_row(line):
    row = dict(BASE)
    for key, value in DEFECTS.get(line, {}).items():
        if value is None:
            del row[key]
        else:
            row[key] = None if value == "NULL" else value
    return row


def write_bad_file(tmp_path, lines_with_defects):
    rows = [bad_row(n) if n in lines_with_defects else dict(BASE) for n in range(1, N_LINES + 1)]
    return write(tmp_path / "bad", rows)


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_skip_counts_every_reason(tmp_path, tok, kind):
    source = write_bad_file(tmp_path, DEFECTS)
    examples, report = load(kind, source, tok, on_bad_row="skip", overlength="skip")
    counts = {}
    for _, reason in EXPECTED[kind].values():
        counts[reason] = counts.get(reason, 0) + 1
    assert report.dropped == counts
    assert report.kept == len(examples) == N_LINES - len(EXPECTED[kind])
    assert report.rows_in == N_LINES


@pytest.mark.parametrize("kind,line", [
    ("prompts", 2), ("prompts", 3), ("sft", 4), ("kto", 5), ("preferences", 6), ("ranked", 7),
    ("preferences", 8), ("prompts", 9), ("ranked", 10), ("ranked", 11), ("kto", 12),
    ("preferences", 13), ("sft", 14), ("ranked", 15),
])
def test_error_names_file_row_key_and_reason(tmp_path, tok, kind, line):
    source = write_bad_file(tmp_path, {line})  # only this line is bad
    with pytest.raises(DataError) as caught:
        load(kind, source, tok)
    key, reason = EXPECTED[kind][line]
    error = caught.value
    assert (error.source, error.row, error.key, error.reason) == (source, line, key, reason)
    assert f"{source}, row {line}, key '{key}'" in str(error) and reason in str(error)


def test_first_bad_row_stops_the_load(tmp_path, tok):
    source = write_bad_file(tmp_path, DEFECTS)
    with pytest.raises(DataError, match=r"row 2, key 'prompt': missing or null"):
        load_preferences(source, tok, max_prompt_len=20)
    # Skipping bad rows does not skip over-long ones: `overlength` decides those.
    with pytest.raises(DataError, match=r"row 9, key 'prompt': prompt has 30 tokens > max_prompt_len=20"):
        load_preferences(source, tok, max_prompt_len=20, on_bad_row="skip")


def test_row_numbers_are_jsonl_line_numbers_across_blank_lines(tmp_path, tok):
    path = tmp_path / "blank.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": ""}\n')
    with pytest.raises(DataError) as caught:
        load_prompts(str(path), tok, max_prompt_len=8)
    assert (caught.value.row, caught.value.reason) == (4, "empty")


def test_invalid_json_line_is_named(tmp_path, tok):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": oops}\n')
    with pytest.raises(DataError) as caught:
        load_prompts(str(path), tok, max_prompt_len=8)
    assert (caught.value.source, caught.value.row, caught.value.reason) == (str(path), 2, "invalid_json")


def test_no_usable_rows_is_an_error(tmp_path, tok):
    source = write(tmp_path / "empty", [{"prompt": ""}, {"prompt": " "}])
    with pytest.raises(DataError, match="no usable rows.*empty=2"):
        load_prompts(source, tok, max_prompt_len=8, on_bad_row="skip")


def test_data_error_pickles():
    error = pickle.loads(pickle.dumps(DataError("f.jsonl", "empty", "empty string", row=3, key="prompt")))
    assert (error.source, error.row, error.key, error.reason) == ("f.jsonl", 3, "prompt", "empty")
    assert str(error) == "f.jsonl, row 3, key 'prompt': empty string [empty]"


# ---- length limits -----------------------------------------------------------------------

def test_overlength_error_skip_truncate_left(tmp_path, tok):
    long_prompt = "0123456789" * 3  # 30 tokens
    source = write(tmp_path / "long", [{"prompt": "short"}, {"prompt": long_prompt}])
    with pytest.raises(DataError) as caught:
        load_prompts(source, tok, max_prompt_len=20)
    assert (caught.value.row, caught.value.key, caught.value.reason) == (2, "prompt", "overlength")

    examples, report = load_prompts(source, tok, max_prompt_len=20, overlength="skip")
    assert [e.prompt_text for e in examples] == ["short"] and report.dropped == {"overlength": 1}

    examples, report = load_prompts(source, tok, max_prompt_len=20, overlength="truncate_left")
    assert decode(tok, examples[1].prompt_ids) == long_prompt[-20:] == examples[1].prompt_text
    assert report.truncated == {"prompt": 1} and report.dropped == {}


def test_long_responses_are_cut_from_the_right_without_eos(tmp_path, tok):
    source = write(tmp_path / "sft", [{"prompt": "p", "response": "abcdef"}, {"prompt": "p", "response": "ab"}])
    examples, report = load_sft(source, tok, max_prompt_len=8, max_response_len=3)
    assert decode(tok, examples[0].response_ids) == "abc"  # cut: no EOS
    assert decode(tok, examples[1].response_ids) == "ab" + EOS  # fits with its EOS
    assert report.truncated == {"response": 1}


# ---- sources -----------------------------------------------------------------------------

def test_missing_local_file_is_named(tmp_path, tok):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=f"{missing}: no such file"):
        load_prompts(missing, tok, max_prompt_len=8)
    with pytest.raises(DataError, match="missing_file"):
        load_rows("./no/such/dir")


def test_directory_of_shards_keeps_each_rows_origin(tmp_path):
    (tmp_path / "shards").mkdir()
    a = write(tmp_path / "shards" / "a", [{"prompt": "1"}, {"prompt": "2"}])
    b = write(tmp_path / "shards" / "b", [{"prompt": "3"}])
    rows = load_rows(str(tmp_path / "shards"))
    assert rows["prompt"] == ["1", "2", "3"]
    assert list(zip(rows[sources.ORIGIN_FILE], rows[sources.ORIGIN_ROW])) == [(a, 1), (a, 2), (b, 1)]
    (tmp_path / "shards" / "README.md").write_text("hi")
    with pytest.raises(DataError, match="'README.md' is not a"):
        load_rows(str(tmp_path / "shards"))


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt\nhi\n")
    with pytest.raises(DataError, match="unsupported_file"):
        load_rows(str(path))


def test_hub_ids_go_to_load_dataset_without_remote_code(monkeypatch):
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list([{"prompt": "a"}, {"prompt": "b"}])

    monkeypatch.setattr(sources.datasets, "load_dataset", fake_load_dataset)
    rows = load_rows("some-org/some-data", split="test")
    assert calls == [(("some-org/some-data",), {"split": "test"})]
    assert rows[sources.ORIGIN_FILE] == ["hub:some-org/some-data:test"] * 2
    assert rows[sources.ORIGIN_ROW] == [1, 2]


# ---- batch iterator ----------------------------------------------------------------------

def draw(iterator, k):
    return [iterator.next_indices() for _ in range(k)]


def test_iterator_is_seeded():
    assert draw(BatchIterator(10, 3, seed=1), 8) == draw(BatchIterator(10, 3, seed=1), 8)
    assert draw(BatchIterator(10, 3, seed=1), 8) != draw(BatchIterator(10, 3, seed=2), 8)


def test_each_epoch_is_the_documented_permutation():
    n, batch_size, seed = 12, 4, 5
    batches = draw(BatchIterator(n, batch_size, seed), 3 * 3)
    for epoch in range(3):
        order = sum(batches[3 * epoch:3 * epoch + 3], [])
        assert sorted(order) == list(range(n))
        assert order == np.random.default_rng([seed, epoch]).permutation(n).tolist()
    assert batches[:3] != batches[3:6]


def test_drop_last_and_partial_batches():
    it = BatchIterator(10, 3, seed=0)  # drop_last: 3 batches per epoch, one example left out
    epoch0 = draw(it, 3)
    assert all(len(b) == 3 for b in epoch0) and len(set(sum(epoch0, []))) == 9
    assert it.next_indices() and it.epoch == 1
    it = BatchIterator(10, 3, seed=0, drop_last=False, shuffle=False)
    assert draw(it, 5) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9], [0, 1, 2]]


@pytest.mark.parametrize("k", [0, 1, 3, 4, 7])  # 3 batches per epoch: 3 and 7 cross boundaries
def test_resume_mid_epoch_continues_exactly(k):
    reference = draw(BatchIterator(10, 3, seed=9), 12)
    first = BatchIterator(10, 3, seed=9)
    head = draw(first, k)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = BatchIterator(10, 3, seed=9)
    resumed.load_state_dict(state)
    assert head + draw(resumed, 12 - k) == reference


def test_iterator_errors_name_the_sizes():
    with pytest.raises(ValueError, match="batch_size=8 > num_examples=5"):
        BatchIterator(5, 8, seed=0)
    it = BatchIterator(5, 2, seed=0)
    with pytest.raises(ValueError, match="seed=3"):
        it.load_state_dict({"epoch": 0, "position": 0, "seed": 3})


# ---- collate -----------------------------------------------------------------------------

def test_padding_by_hand():
    ids, mask = pad_left([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_right([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long
    with pytest.raises(ValueError):
        pad_left([], pad_id=0)


def test_concat_prompt_response_masks_by_hand():
    ids, mask, response_mask = concat_prompt_response([[5, 6, 7], [8]], [[9, 2], [10, 2]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 9, 2], [8, 10, 2, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert response_mask.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 0, 0]]
    assert ids.shape == mask.shape == response_mask.shape == (2, 5)


# ---- detected formats (more in test_formats.py) --------------------------------------------------

def test_bad_rows_name_the_column_a_default_key_fell_back_to(tmp_path, tok):
    rows = [{"prompt": "p", "completion": "ok", "label": True}, {"prompt": "p", "completion": " ", "label": False}]
    source = write(tmp_path / "kto", rows)
    with pytest.raises(DataError) as caught:
        load_kto(source, tok, max_prompt_len=8)
    assert (caught.value.row, caught.value.key, caught.value.reason) == (2, "completion", "empty")
    _, report = load_kto(source, tok, max_prompt_len=8, on_bad_row="skip")
    assert str(report) == (f"{source} [unpaired preference (standard), response column 'completion']: "
                           "kept 1/2 rows; dropped empty=1")
