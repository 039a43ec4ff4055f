"""Large sources are parsed by worker processes (`records._parse_rows_parallel`): the examples, load report
and first bad row reported are exactly those of parsing in one process. Forced here on small mixed files
(PARALLEL_MIN_ROWS=1, 3 rows per task, 2 workers) holding bad rows of every kind."""

import gc
import json
import multiprocessing

import pytest

from rlhf_ray.data import (
    DataError,
    Keys,
    load_kto,
    load_preferences,
    load_prompts,
    load_ranked,
    load_rows,
    load_sft,
    records,
)
from rlhf_ray.toy import build_char_tokenizer
from tests.unit.test_data import DEFECTS, EXPECTED, write_bad_file


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture
def go_parallel(monkeypatch):
    """A function that switches the loaders to worker processes; it returns the list of worker counts used."""
    used = []
    real = records._parse_rows_parallel

    def spy(rows, fmt, enc, workers):
        used.append(workers)
        return real(rows, fmt, enc, workers)

    def switch():
        monkeypatch.setattr(records, "PARALLEL_MIN_ROWS", 1)
        monkeypatch.setattr(records, "PARALLEL_CHUNK", 3)
        monkeypatch.setenv(records.WORKERS_ENV, "2")
        monkeypatch.setattr(records, "_parse_rows_parallel", spy)
        return used

    return switch


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def hh(*turns):
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def ultrafeedback(prompt, chosen, rejected, sc=8.0, sr=3.0):
    return {"prompt": prompt, "chosen": [user(prompt), assistant(chosen)],
            "rejected": [user(prompt), assistant(rejected)], "score_chosen": sc, "score_rejected": sr}


# (loader, rows, options): each file mixes good rows, cut prompts / responses and bad rows of several reasons.
MIXED = {
    "ultrafeedback": (load_preferences, [
        ultrafeedback("What is 2+2?", "4", "5"),
        ultrafeedback("Name a colour.", "Blue.", "Blue."),  # identical_pair
        ultrafeedback("Long " * 12 + "prompt?", "yes", "no"),  # prompt cut from the left
        ultrafeedback("Hi", "x" * 40, "y"),  # chosen cut to max_response_len
        ultrafeedback("Scores?", "a", "b", 1.0, 9.0),  # bad_value: score_chosen < score_rejected
        {"prompt": "Null?", "chosen": None, "rejected": [user("Null?"), assistant("b")], "score_chosen": 1.0,
         "score_rejected": 0.0},  # missing_key
        ultrafeedback("Empty?", "", "b"),  # empty
        ultrafeedback("Last one", "good", "bad"),
    ], {"overlength": "truncate_left"}),
    "hh": (load_preferences, [
        {"chosen": hh("Hi", "Hello!"), "rejected": hh("Hi", "Go away.")},
        {"chosen": hh("Hi", "Yo", "More?", "Sure."), "rejected": hh("Hi", "Yo", "More?", "No.")},
        {"chosen": hh("Same", "same"), "rejected": hh("Same", "same")},  # identical_pair
        {"chosen": "alpha beta", "rejected": "gamma delta"},  # bad_value: no shared prompt
        {"chosen": hh("Differ", "a"), "rejected": hh("Other", "a")},  # bad_value: prompts differ
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"chosen": hh("Q" * 70, "a"), "rejected": hh("Q" * 70, "b")},  # overlength, skipped
    ], {"overlength": "skip"}),
    "sft-messages": (load_sft, [
        {"messages": [user("Hi"), assistant("Hello")]},
        {"messages": [{"role": "system", "content": "Be brief."}, user("a"), assistant("b"), user("c"),
                      assistant("d")]},
        {"messages": [user("Hi"), assistant("")]},  # empty
        {"messages": [user("Hi")]},  # bad_value: no assistant answer
        {"messages": [user("Hi"), assistant("z" * 50)]},  # response cut
        {"messages": []},  # empty
        {"messages": [user("Bye"), assistant("Bye!")]},
    ], {}),
    "prompts": (load_prompts, [
        {"question": "What is 1+1?", "answer": "#### 2"},
        {"question": "   ", "answer": "#### 0"},  # empty
        {"question": None, "answer": "#### 0"},  # missing_key
        {"question": "W" * 70, "answer": "#### 3"},  # cut from the left
        {"question": "Last?", "answer": "#### 4"},
    ], {"overlength": "truncate_left"}),
    "kto": (load_kto, [
        {"prompt": "p", "completion": [assistant("good")], "label": True},
        {"prompt": "q", "completion": [assistant("bad")], "label": False},
        {"prompt": "r", "completion": [user("not an answer")], "label": True},  # bad_value
        {"prompt": "s", "completion": [assistant("ok")], "label": None},  # missing_key
    ], {}),
    "ranked": (load_ranked, [
        {"prompt": "p", "responses": ["a", "b", "c"], "scores": [3, 2, 1]},
        {"prompt": "q", "responses": ["a"], "scores": [1]},  # bad_value
        {"prompt": "r", "responses": ["a", "b"], "scores": [1.0, float("nan")]},  # bad_value (NaN)
        {"prompt": "s", "responses": ["x", "y"], "scores": [0, 1]},
    ], {}),
}


def write(tmp_path, name, rows):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def run(loader, source, tok, **options):
    """(examples, report) or the DataError's (str, source, row, key, reason)."""
    options = {"max_prompt_len": 48, **options}
    if loader is not load_prompts:
        options.setdefault("max_response_len", 24)
    try:
        return loader(source, tok, **options)
    except DataError as error:
        return str(error), error.source, error.row, error.key, error.reason


@pytest.mark.parametrize("name", list(MIXED))
@pytest.mark.parametrize("on_bad_row", ["skip", "error"])
def test_workers_give_exactly_what_one_process_gives(tmp_path, tok, go_parallel, name, on_bad_row):
    loader, rows, options = MIXED[name]
    source = write(tmp_path, name, rows * 3)  # several tasks of 3 rows, bad rows in each
    one = run(loader, source, tok, on_bad_row=on_bad_row, **options)
    used = go_parallel()
    assert run(loader, source, tok, on_bad_row=on_bad_row, **options) == one
    assert used == [2]
    if on_bad_row == "skip":
        examples, report = one
        assert report.dropped and report.kept == len(examples)
        assert report.kept + sum(report.dropped.values()) == len(rows) * 3
    else:
        assert isinstance(one[0], str)  # the first bad row, named by file and row
    assert not multiprocessing.active_children()  # the workers are gone, also after a bad row ended the load


@pytest.mark.parametrize("kind", list(EXPECTED))
@pytest.mark.parametrize("on_bad_row", ["skip", "error"])
def test_every_bad_row_reason_in_workers(tmp_path, tok, go_parallel, kind, on_bad_row):
    loader = {"prompts": load_prompts, "sft": load_sft, "preferences": load_preferences,
              "ranked": load_ranked, "kto": load_kto}[kind]
    source = write_bad_file(tmp_path, DEFECTS)
    options = {"max_prompt_len": 20, "on_bad_row": on_bad_row, "overlength": on_bad_row}
    one, first_seven = run(loader, source, tok, **options), run(loader, source, tok, limit=7, **options)
    used = go_parallel()
    assert run(loader, source, tok, **options) == one
    assert run(loader, source, tok, limit=7, **options) == first_seven
    assert used == [2, 2]


def test_a_row_that_raises_in_a_worker_raises_here_with_its_own_error(tmp_path, tok, go_parallel, monkeypatch):
    real = records._parse_text

    def parse(row, enc):
        if row["text"] == "boom":
            raise RuntimeError(f"boom at row {row[records.ORIGIN_ROW]}")
        return real(row, enc)

    monkeypatch.setattr(records, "_parse_text", parse)
    source = write(tmp_path, "text", [{"text": t} for t in ["one", "two", "", "four", "boom", "six", "boom"]])
    go_parallel()
    with pytest.raises(RuntimeError, match="^boom at row 5$"):
        load_sft(source, tok, max_prompt_len=8, on_bad_row="skip")
    assert not multiprocessing.active_children()


def test_the_gc_freeze_around_the_fork_is_undone(tmp_path, tok, go_parallel):
    loader, rows, options = MIXED["prompts"]
    source = write(tmp_path, "prompts", rows * 3)
    go_parallel()
    assert gc.get_freeze_count() == 0
    run(loader, source, tok, on_bad_row="skip", **options)
    assert gc.get_freeze_count() == 0
    gc.freeze()  # the application's own freeze is left as it is
    try:
        frozen = gc.get_freeze_count()
        run(loader, source, tok, on_bad_row="skip", **options)
        assert gc.get_freeze_count() > frozen // 2  # still frozen (objects freed since leave the count)
    finally:
        gc.unfreeze()


def test_worker_count(monkeypatch):
    monkeypatch.delenv(records.WORKERS_ENV, raising=False)
    assert records._workers(records.PARALLEL_MIN_ROWS - 1) == 1  # small: this process
    assert 1 <= records._workers(10**6) <= records.MAX_WORKERS
    monkeypatch.setenv(records.WORKERS_ENV, "3")
    assert records._workers(10**6) == 3
    monkeypatch.setattr(records, "PARALLEL_MIN_ROWS", 1)
    assert records._workers(2 * records.PARALLEL_CHUNK) == 2  # never more workers than tasks
    monkeypatch.setenv(records.WORKERS_ENV, "1")
    assert records._workers(10**6) == 1
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(records.WORKERS_ENV, bad)
        with pytest.raises(ValueError, match=records.WORKERS_ENV):
            records._workers(10**6)


def test_the_workers_parse_every_row_and_this_process_none(tmp_path, tok, go_parallel, monkeypatch):
    """Only a row that raised in a worker is parsed again here; otherwise the parent just collects outcomes."""
    loader, rows, options = MIXED["hh"]
    source = write(tmp_path, "hh", rows * 2)
    one = run(loader, source, tok, on_bad_row="skip", **options)
    parent = multiprocessing.current_process().pid
    parsed_here = []
    real = records._parse_row

    def spy(row, fmt, enc):
        if multiprocessing.current_process().pid == parent:
            parsed_here.append(row[records.ORIGIN_ROW])
        return real(row, fmt, enc)

    monkeypatch.setattr(records, "_parse_row", spy)
    used = go_parallel()
    assert run(loader, source, tok, on_bad_row="skip", **options) == one
    assert used == [2] and parsed_here == []


def test_a_worker_parses_its_chunk_in_row_order(tmp_path, tok, monkeypatch):
    """`_parse_chunk` in this process, as a forked worker runs it: outcomes of rows start..stop, None for a row
    that raised (the parent parses it again), and only the forms seen in this chunk."""
    source = write(tmp_path, "p", [{"prompt": "a"}, {"prompt": ""}, {"prompt": [user("q")]}, {"prompt": "boom"}])
    rows = load_rows(source)
    real = records._parse_prompt

    def parse(row, enc):
        if row["prompt"] == "boom":
            raise RuntimeError("boom")
        return real(row, enc)

    fmt = records._Format("prompt-only", ("prompt",), parse)
    enc = records._Encoder(tok, Keys(), max_prompt_len=8, max_response_len=None, overlength="error")
    enc.forms.add("HH-RLHF transcripts")  # seen by an earlier chunk of this worker
    monkeypatch.setattr(records, "_worker_state", None)
    records._start_worker(rows, fmt, enc)
    assert records._worker_state == (rows, fmt, enc)
    start, outcomes, forms = records._parse_chunk(1, 4)
    assert start == 1 and len(outcomes) == 3 and forms == {"conversational"}
    ok, bad, origin, number = outcomes[0]
    assert (ok, bad.reason, bad.key, origin, number) == (False, "empty", "prompt", source, 2)
    assert outcomes[1][0] is True and outcomes[1][1].prompt_text == "<|user|>q</s><|assistant|>" and outcomes[1][2] == ()
    assert outcomes[2] is None
