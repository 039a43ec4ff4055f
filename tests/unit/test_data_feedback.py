"""rlhf_ray.data.feedback in detail: each record kind parsed field by field, every malformed record's exact
message (file, line, key, reason), the rating bounds, the report strings, rating groups (gap at exactly
min_gap, mean of repeated ratings, prompts compared by value), and the files convert_feedback writes."""

import json

import pytest

from rlhf_ray.data import DataError
from rlhf_ray.data.feedback import (
    OUTPUTS,
    Binary,
    Comparison,
    ConversionReport,
    Critique,
    Edit,
    Rating,
    ReadReport,
    binary_to_kto,
    comparisons_to_pairs,
    convert,
    convert_feedback,
    critiques_to_context,
    edits_to_pairs,
    edits_to_sft,
    parse_record,
    ratings_to_pairs,
    ratings_to_ranked,
    read_feedback,
    write_jsonl,
)


def line(**fields):
    return json.dumps(fields)


def bad(tmp_path, text, rating_scale=5):
    """What the DataError for a feedback file holding `text` at line 3 says after the file and row it names."""
    path = tmp_path / "f.jsonl"
    path.write_text("\n  \n" + text + "\n")
    with pytest.raises(DataError) as caught:
        read_feedback(path, rating_scale)
    assert caught.value.source == str(path) and caught.value.row == 3
    return str(caught.value).removeprefix(f"{path}, row 3")


# ---- parsing -----------------------------------------------------------------------------

def test_each_kind_parses_field_by_field():
    chat = [{"role": "user", "content": "hi", "name": "ann"}]
    assert parse_record(line(kind="comparison", prompt="p", response_a="a", response_b="b", choice="TIE"), 4, 5) == \
        Comparison(4, "p", "a", "b", "tie")
    assert parse_record(line(kind="rating", prompt=chat, response="r", rating=2), 5, 5) == \
        Rating(5, [{"role": "user", "content": "hi"}], "r", 2.0)
    assert parse_record(line(kind="binary", prompt="p", response="r", thumbs="Up"), 6, 5) == Binary(6, "p", "r", True)
    assert parse_record(line(kind="binary", prompt="p", response="r", thumbs="down"), 7, 5) == Binary(7, "p", "r", False)
    assert parse_record(line(kind="edit", prompt="p", original="o", corrected="c", id=3), 8, 5) == Edit(8, "p", "o", "c")
    assert parse_record(line(kind="critique", prompt="p", response="r", critique="c"), 9, 5) == Critique(9, "p", "r", "c")
    assert isinstance(parse_record(line(kind="rating", prompt="p", response="r", rating=2), 1, 5).rating, float)


@pytest.mark.parametrize("text, message", [
    ("{oops", None),
    ("[1, 2]", ": expected a JSON object, got list (on_bad_row=skip drops such records) [wrong_type]"),
    ("3", ": expected a JSON object, got int (on_bad_row=skip drops such records) [wrong_type]"),
    (line(prompt="p"), ", key 'kind': missing or null (on_bad_row=skip drops such records) [missing_key]"),
    (line(kind=None, prompt="p"), ", key 'kind': missing or null (on_bad_row=skip drops such records) [missing_key]"),
    (line(kind="vote", prompt="p"), (", key 'kind': unknown kind 'vote'; one of ['binary', 'comparison', 'critique', "
                                    "'edit', 'rating'] (on_bad_row=skip drops such records) [bad_value]")),
    (line(kind="edit", original="o", corrected="c"),
     ", key 'prompt': missing or null (on_bad_row=skip drops such records) [missing_key]"),
    (line(kind="edit", prompt=" \t", original="o", corrected="c"),
     ", key 'prompt': empty or whitespace-only string (on_bad_row=skip drops such records) [empty]"),
    (line(kind="edit", prompt=[], original="o", corrected="c"),
     (", key 'prompt': expected a string or a non-empty list of chat messages, got [] "
     "(on_bad_row=skip drops such records) [wrong_type]")),
    (line(kind="edit", prompt=5, original="o", corrected="c"),
     (", key 'prompt': expected a string or a non-empty list of chat messages, got 5 "
     "(on_bad_row=skip drops such records) [wrong_type]")),
    (line(kind="edit", prompt=[{"role": "user", "content": "a"}, {"role": "user", "content": 1}], original="o",
          corrected="c"),
     (", key 'prompt': message 1 is not {'role': str, 'content': str}: {'role': 'user', 'content': 1} "
     "(on_bad_row=skip drops such records) [wrong_type]")),
    (line(kind="edit", prompt=[{"content": "a"}], original="o", corrected="c"),
     (", key 'prompt': message 0 is not {'role': str, 'content': str}: {'content': 'a'} "
     "(on_bad_row=skip drops such records) [wrong_type]")),
    (line(kind="edit", prompt=["hi"], original="o", corrected="c"),
     (", key 'prompt': message 0 is not {'role': str, 'content': str}: 'hi' "
     "(on_bad_row=skip drops such records) [wrong_type]")),
    (line(kind="comparison", prompt="p", response_a="a", response_b="b", choice="c"),
     ", key 'choice': expected 'a', 'b' or 'tie', got 'c' (on_bad_row=skip drops such records) [bad_value]"),
    (line(kind="comparison", prompt="p", response_a="a", response_b=3, choice="a"),
     ", key 'response_b': expected a string, got int 3 (on_bad_row=skip drops such records) [wrong_type]"),
    (line(kind="comparison", prompt="p", response_a="", response_b="b", choice="a"),
     ", key 'response_a': empty or whitespace-only string (on_bad_row=skip drops such records) [empty]"),
    (line(kind="binary", prompt="p", response="r", thumbs="yes"),
     ", key 'thumbs': expected 'up' or 'down', got 'yes' (on_bad_row=skip drops such records) [bad_value]"),
    (line(kind="binary", prompt="p", thumbs="up"),
     ", key 'response': missing or null (on_bad_row=skip drops such records) [missing_key]"),
    (line(kind="edit", prompt="p", original="o"),
     ", key 'corrected': missing or null (on_bad_row=skip drops such records) [missing_key]"),
    (line(kind="critique", prompt="p", response="r", critique=["c"]),
     ", key 'critique': expected a string, got list ['c'] (on_bad_row=skip drops such records) [wrong_type]"),
    (line(kind="critique", prompt="p", critique="c"),
     ", key 'response': missing or null (on_bad_row=skip drops such records) [missing_key]"),
    (line(kind="rating", prompt="p", response="r", rating="5"),
     ", key 'rating': expected a number, got '5' (on_bad_row=skip drops such records) [wrong_type]"),
    (line(kind="rating", prompt="p", response="r", rating=False),
     ", key 'rating': expected a number, got False (on_bad_row=skip drops such records) [wrong_type]"),
    (line(kind="rating", prompt="p", response="r", rating=0.5),
     ", key 'rating': 0.5 is outside [1, 5] (feedback.rating_scale=5) (on_bad_row=skip drops such records) [bad_value]"),
    (line(kind="rating", prompt="p", response="r", rating=5.5),
     ", key 'rating': 5.5 is outside [1, 5] (feedback.rating_scale=5) (on_bad_row=skip drops such records) [bad_value]"),
    (line(kind="rating", prompt="p", response="r"),
     ", key 'rating': missing or null (on_bad_row=skip drops such records) [missing_key]"),
    ('{"kind": "rating", "prompt": "p", "response": "r", "rating": NaN}',
     ", key 'rating': nan is outside [1, 5] (feedback.rating_scale=5) (on_bad_row=skip drops such records) [bad_value]"),
    ('{"kind": "rating", "prompt": "p", "response": "r", "rating": Infinity}',
     ", key 'rating': inf is outside [1, 5] (feedback.rating_scale=5) (on_bad_row=skip drops such records) [bad_value]"),
])
def test_malformed_record_messages(tmp_path, text, message):
    got = bad(tmp_path, text)
    if message is None:
        assert got.startswith(": not JSON: ") and got.endswith(" (on_bad_row=skip drops such records) [invalid_json]")
    else:
        assert got == message


def test_ratings_are_inclusive_of_the_scale_and_the_scale_is_a_setting(tmp_path):
    for value in (1, 5, 3.5):
        assert parse_record(line(kind="rating", prompt="p", response="r", rating=value), 1, 5).rating == value
    assert parse_record(line(kind="rating", prompt="p", response="r", rating=10), 1, 10).rating == 10.0
    assert bad(tmp_path, line(kind="rating", prompt="p", response="r", rating=4), rating_scale=3) == (
        ", key 'rating': 4 is outside [1, 3] (feedback.rating_scale=3) (on_bad_row=skip drops such records) [bad_value]")


def test_a_missing_feedback_file(tmp_path):
    with pytest.raises(DataError) as caught:
        read_feedback(tmp_path / "none.jsonl")
    assert str(caught.value) == (f"{tmp_path / 'none.jsonl'}: no such feedback file (JSON Lines, one record per line) "
                                 "[missing_file]")
    with pytest.raises(DataError, match="no such feedback file"):
        read_feedback(tmp_path)  # a directory is not a feedback file


def test_read_report_counts_and_string(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text("\n".join([line(kind="edit", prompt="p", original="o", corrected="c"), "", "{x", "[]",
                               line(kind="binary", prompt="p", response="é", thumbs="up"),
                               line(kind="vote", prompt="p")]) + "\n")
    records, report = read_feedback(str(path), on_bad_row="skip")
    assert [r.line for r in records] == [1, 5] and records[1].response == "é"
    assert report == ReadReport(str(path), 5, {"comparison": 0, "rating": 0, "binary": 1, "edit": 1, "critique": 0},
                                {"invalid_json": 1, "wrong_type": 1, "bad_value": 1})
    assert str(report) == f"{path}: 2/5 records (binary=1, edit=1); malformed bad_value=1, invalid_json=1, wrong_type=1"
    empty = tmp_path / "e.jsonl"
    empty.write_text("{x\n")
    assert str(read_feedback(empty, on_bad_row="skip")[1]) == f"{empty}: 0/1 records (none); malformed invalid_json=1"
    clean = tmp_path / "c.jsonl"
    clean.write_text(line(kind="edit", prompt="p", original="o", corrected="c") + "\n")
    assert str(read_feedback(clean)[1]) == f"{clean}: 1/1 records (edit=1)"


def test_conversion_report_string():
    assert str(ConversionReport("edit", "pairs", 3, 2, {"unchanged": 1, "a": 2})) == \
        "edit → pairs: 3 records in, 2 rows out; dropped a=2, unchanged=1"
    assert str(ConversionReport("binary", "kto", 2, 2, {})) == "binary → kto: 2 records in, 2 rows out"


# ---- conversions -------------------------------------------------------------------------

def test_drop_counts_add_up():
    rows, report = comparisons_to_pairs([Comparison(1, "p", "x", "x", "a"), Comparison(2, "p", "y", "y", "b"),
                                         Comparison(3, "p", "x", "y", "tie"), Comparison(4, "p", "x", "y", "tie")])
    assert rows == [] and report.dropped == {"identical": 2, "tie": 2}
    ratings = [Rating(1, "p", "a", 3.0), Rating(2, "p", "b", 3.0), Rating(3, "p", "c", 3.0),
               Rating(4, "q", "alone", 2.0), Rating(5, "r", "alone", 2.0), Rating(6, "r", "alone", 4.0)]
    rows, report = ratings_to_pairs(ratings, min_gap=1.0)
    assert rows == []
    assert report.dropped == {"tied_pairs": 3, "single_response_records": 3, "duplicate_response_records": 1}


def test_a_higher_first_candidate_within_one_point_is_chosen():
    ratings = [Rating(1, "p", "better", 3.0), Rating(2, "p", "worse", 2.5)]
    rows, _ = ratings_to_pairs(ratings, min_gap=0.5)
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("better", "worse")]


def test_comparison_b_puts_b_first():
    rows, report = comparisons_to_pairs([Comparison(1, "p", "x", "y", "b"), Comparison(2, "p", "x", "y", "a")])
    assert rows == [{"prompt": "p", "chosen": "y", "rejected": "x", "source": "comparison"},
                    {"prompt": "p", "chosen": "x", "rejected": "y", "source": "comparison"}]
    assert report == ConversionReport("comparison", "pairs", 2, 2, {})


def test_a_gap_of_exactly_min_gap_is_a_pair_and_the_lower_first_is_swapped():
    ratings = [Rating(1, "p", "low", 2.0), Rating(2, "p", "high", 3.0), Rating(3, "p", "top", 4.5)]
    rows, report = ratings_to_pairs(ratings, min_gap=1.0)
    assert [(r["chosen"], r["rejected"], r["source"]) for r in rows] == [
        ("high", "low", "rating"), ("top", "low", "rating"), ("top", "high", "rating")]
    assert report == ConversionReport("rating", "pairs", 3, 3, {})  # no zero counts
    rows, report = ratings_to_pairs(ratings, min_gap=1.5)
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("top", "low"), ("top", "high")]
    assert report.dropped == {"small_gap_pairs": 1}


def test_repeated_ratings_are_averaged_and_prompts_compared_by_value():
    a = [{"role": "user", "content": "q"}]
    b = [{"content": "q", "role": "user"}]  # the same prompt, keys in another order
    ratings = [Rating(1, a, "x", 1.0), Rating(2, b, "y", 4.0), Rating(3, a, "x", 4.0), Rating(4, "q", "z", 5.0)]
    rows, report = ratings_to_ranked(ratings)
    assert rows == [{"prompt": a, "responses": ["y", "x"], "scores": [4.0, 2.5]}]
    assert report == ConversionReport("rating", "ranked", 4, 1,
                                      {"duplicate_response_records": 1, "single_response_records": 1})
    rows, report = ratings_to_pairs(ratings, min_gap=1.0)
    assert rows == [{"prompt": a, "chosen": "y", "rejected": "x", "source": "rating"}]


def test_ranked_lists_are_stable_for_equal_scores():
    ratings = [Rating(1, "p", "a", 2.0), Rating(2, "p", "b", 3.0), Rating(3, "p", "c", 2.0), Rating(4, "p", "d", 3.0)]
    rows, report = ratings_to_ranked(ratings)
    assert rows == [{"prompt": "p", "responses": ["b", "d", "a", "c"], "scores": [3.0, 3.0, 2.0, 2.0]}]
    assert report.dropped == {}


def test_simple_conversions_report_nothing_dropped():
    assert binary_to_kto([Binary(1, "p", "r", False)]) == (
        [{"prompt": "p", "response": "r", "label": False}], ConversionReport("binary", "kto", 1, 1, {}))
    assert edits_to_sft([Edit(1, "p", "o", "o")]) == (
        [{"prompt": "p", "response": "o"}], ConversionReport("edit", "sft", 1, 1, {}))
    assert edits_to_pairs([Edit(1, "p", "o", "c")]) == (
        [{"prompt": "p", "chosen": "c", "rejected": "o", "source": "edit"}], ConversionReport("edit", "pairs", 1, 1, {}))
    assert edits_to_pairs([Edit(1, "p", "o", "o"), Edit(2, "p", "o", "o")])[1].dropped == {"unchanged": 2}
    assert critiques_to_context([Critique(1, "p", "r", "c")]) == (
        [{"kind": "critique", "prompt": "p", "response": "r", "critique": "c"}],
        ConversionReport("critique", "critiques", 1, 1, {}))


RECORDS = [Comparison(1, "p", "a", "b", "a"), Rating(2, "q", "x", 1.0), Rating(3, "q", "y", 5.0),
           Binary(4, "p", "r", True), Edit(5, "p", "old", "new"), Critique(6, "p", "r", "c")]


def test_convert_groups_every_kind_by_output():
    outputs, reports = convert(RECORDS, "pairs", 1.0)
    assert [(r["chosen"], r["source"]) for r in outputs["pairs"]] == [("a", "comparison"), ("y", "rating"),
                                                                        ("new", "edit")]
    assert set(outputs) == {"pairs", "kto", "sft", "critiques"}
    assert [(r.kind, r.output, r.rows_out) for r in reports] == [
        ("comparison", "pairs", 1), ("rating", "pairs", 1), ("binary", "kto", 1), ("edit", "sft", 1),
        ("edit", "pairs", 1), ("critique", "critiques", 1)]
    outputs, reports = convert(RECORDS, "ranked", 10.0)
    assert outputs["ranked"] == [{"prompt": "q", "responses": ["y", "x"], "scores": [5.0, 1.0]}]
    assert len(outputs["pairs"]) == 2 and reports[1].output == "ranked"


def test_convert_feedback_writes_the_files_with_rows_and_the_report(tmp_path):
    source = tmp_path / "f.jsonl"
    source.write_text("\n".join([line(kind="comparison", prompt="p", response_a="ä", response_b="b", choice="a"),
                                 line(kind="rating", prompt="q", response="x", rating=1),
                                 line(kind="rating", prompt="q", response="y", rating=2)]) + "\n")
    out = tmp_path / "new" / "out"
    for name in OUTPUTS:  # files of an earlier run
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.jsonl").write_text("stale\n")
    result = convert_feedback(source, out)  # defaults: pairs, min_gap 1, scale 5
    assert result.files == {"pairs": str(out / "pairs.jsonl")}
    assert sorted(p.name for p in out.iterdir()) == ["pairs.jsonl", "report.json"]
    written = (out / "pairs.jsonl").read_text(encoding="utf-8")
    assert written == ('{"prompt": "p", "chosen": "ä", "rejected": "b", "source": "comparison"}\n'
                       '{"prompt": "q", "chosen": "y", "rejected": "x", "source": "rating"}\n')
    report = json.loads((out / "report.json").read_text())
    assert report["files"] == result.files
    assert report["read"] == {"source": str(source), "lines": 3, "malformed": {},
                              "records": {"comparison": 1, "rating": 2, "binary": 0, "edit": 0, "critique": 0}}
    assert report["conversions"][1] == {"kind": "rating", "output": "pairs", "records_in": 2, "rows_out": 1,
                                        "dropped": {}}
    assert (out / "report.json").read_text().endswith("}\n")
    assert result.read.records["rating"] == 2 and len(result.conversions) == 6
    ranked = convert_feedback(source, out, ratings_as="ranked", min_gap=2.0)
    assert set(ranked.files) == {"pairs", "ranked"}


def test_convert_feedback_options_reach_the_reader(tmp_path):
    source = tmp_path / "f.jsonl"
    source.write_text("\n".join([line(kind="rating", prompt="q", response="x", rating=1),
                                 line(kind="rating", prompt="q", response="y", rating=6), "{x"]) + "\n")
    with pytest.raises(DataError, match="row 2, key 'rating': 6 is outside \\[1, 5\\]"):
        convert_feedback(source, tmp_path / "out")  # rating_scale=5 by default
    with pytest.raises(DataError, match="row 3: not JSON"):
        convert_feedback(source, tmp_path / "out", rating_scale=7)
    result = convert_feedback(source, tmp_path / "a" / "b", rating_scale=7, on_bad_row="skip", min_gap=7.0)
    assert result.conversions[1].dropped == {"small_gap_pairs": 1} and result.files == {}
    assert (tmp_path / "a" / "b" / "report.json").read_text().startswith('{\n  "read": {\n    "source": ')


def test_write_jsonl_keeps_unicode_and_returns_the_path(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"a": "ü"}, {"b": [1]}])
    assert path == str(tmp_path / "x.jsonl")
    assert (tmp_path / "x.jsonl").read_bytes() == '{"a": "ü"}\n{"b": [1]}\n'.encode()
