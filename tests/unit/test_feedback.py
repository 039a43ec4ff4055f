"""Feedback ingestion (rlhf_ray.data.feedback): every kind of record converts to the rows and counts
worked out by hand from a fixture file that also holds malformed records (each named by file,
line, key and reason, or skipped and counted); the files it writes load with the stages' loaders;
the `feedback` stage end to end on the toy feedback (no Ray)."""

import json
import signal
from pathlib import Path

import pytest
import ray

import launch
from rlhf_ray.config import load_config
from rlhf_ray.data import DataError, load_kto, load_preferences, load_ranked, load_sft
from rlhf_ray.data.feedback import (
    Comparison, Critique, Edit, Rating, binary_to_kto, comparisons_to_pairs, convert_feedback, critiques_to_context,
    edits_to_pairs, edits_to_sft, ratings_to_pairs, ratings_to_ranked, read_feedback)
from rlhf_ray.toy import build_char_tokenizer, toy_score
from rlhf_ray.toy.feedback import more_vowels, toy_feedback_records
from rlhf_ray.trainers.feedback import run_feedback

TOY_FEEDBACK = Path(__file__).resolve().parents[2] / "configs" / "toy_feedback.yaml"
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
# One record per line; the comments give the line numbers the tests name.
LINES = [
    {"kind": "comparison", "prompt": "p1", "response_a": "aaa", "response_b": "bbb", "choice": "a"},   # 1
    {"kind": "comparison", "prompt": "p1", "response_a": "ccc", "response_b": "ddd", "choice": "B"},   # 2 (case)
    {"kind": "comparison", "prompt": "p2", "response_a": "eee", "response_b": "fff", "choice": "tie"},  # 3 tie
    {"kind": "comparison", "prompt": "p2", "response_a": "ggg", "response_b": "ggg", "choice": "a"},   # 4 identical
    {"kind": "rating", "prompt": "p3", "response": "r5", "rating": 5},                                  # 5
    {"kind": "rating", "prompt": "p3", "response": "r3", "rating": 3},                                  # 6
    {"kind": "rating", "prompt": "p3", "response": "r2", "rating": 2.5},                                # 7 gap 0.5 to r3
    {"kind": "rating", "prompt": "p3", "response": "r3b", "rating": 3},                                 # 8 ties r3
    {"kind": "rating", "prompt": "p4", "response": "alone", "rating": 4},                               # 9 single
    {"kind": "rating", "prompt": CHAT, "response": "x", "rating": 1},                                   # 10
    {"kind": "rating", "prompt": CHAT, "response": "y", "rating": 5},                                   # 11
    {"kind": "rating", "prompt": CHAT, "response": "x", "rating": 3},                                   # 12 x again: mean 2
    {"kind": "binary", "prompt": "p5", "response": "good", "thumbs": "up"},                             # 13
    {"kind": "binary", "prompt": "p5", "response": "bad", "thumbs": "DOWN"},                            # 14
    {"kind": "edit", "prompt": "p6", "original": "old", "corrected": "new"},                            # 15
    {"kind": "edit", "prompt": "p6", "original": "same", "corrected": "same"},                          # 16 unchanged
    {"kind": "critique", "prompt": "p7", "response": "meh", "critique": "too vague", "annotator": "ann3"},  # 17
]
MALFORMED = [  # (text, reason, key), appended after line 17 with a blank line between (lines 19…)
    ("{not json", "invalid_json", None),                                                                # 19
    ('["a list"]', "wrong_type", None),                                                                 # 20
    ('{"kind": "vote", "prompt": "p"}', "bad_value", "kind"),                                           # 21
    ('{"kind": "rating", "prompt": "p", "response": "r", "rating": 6}', "bad_value", "rating"),          # 22
    ('{"kind": "rating", "prompt": "p", "response": "r", "rating": true}', "wrong_type", "rating"),      # 23
    ('{"kind": "comparison", "prompt": "p", "response_a": "a", "response_b": "b", "choice": "c"}', "bad_value", "choice"),  # 24
    ('{"kind": "binary", "prompt": "p", "response": "r"}', "missing_key", "thumbs"),                    # 25
    ('{"kind": "edit", "prompt": "p", "original": "o", "corrected": "  "}', "empty", "corrected"),      # 26
    ('{"kind": "critique", "prompt": [{"role": "user"}], "response": "r", "critique": "c"}', "wrong_type", "prompt"),  # 27
    ('{"kind": "comparison", "prompt": "", "response_a": "a", "response_b": "b", "choice": "a"}', "empty", "prompt"),  # 28
]


@pytest.fixture
def feedback_file(tmp_path):
    path = tmp_path / "feedback.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in LINES) + "\n" + "".join(t + "\n" for t, _, _ in MALFORMED)
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def test_malformed_records_are_named_by_file_line_key_and_reason(feedback_file, tmp_path):
    with pytest.raises(DataError) as err:
        read_feedback(feedback_file)
    assert (err.value.source, err.value.row, err.value.reason) == (str(feedback_file), 19, "invalid_json")
    assert f"{feedback_file}, row 19: not JSON" in str(err.value) and "on_bad_row=skip" in str(err.value)
    for line, (text, reason, key) in enumerate(MALFORMED, start=19):  # each one alone, at its own line
        single = tmp_path / f"bad{line}.jsonl"
        single.write_text("\n" * (line - 1) + text + "\n")
        with pytest.raises(DataError) as err:
            read_feedback(single)
        assert (err.value.row, err.value.reason, err.value.key) == (line, reason, key), text


def test_skip_mode_reads_the_good_records_and_counts_the_rest(feedback_file):
    records, report = read_feedback(feedback_file, on_bad_row="skip")
    assert [r.line for r in records] == list(range(1, 18))
    assert report.lines == 17 + len(MALFORMED)  # the blank line 18 is not a record
    assert report.records == {"comparison": 4, "rating": 8, "binary": 2, "edit": 2, "critique": 1}
    assert report.malformed == {"invalid_json": 1, "wrong_type": 3, "bad_value": 3, "missing_key": 1, "empty": 2}
    assert records[1] == Comparison(2, "p1", "ccc", "ddd", "b") and records[9].prompt == CHAT
    assert "28 records" not in str(report) and "17/27 records" in str(report)


def test_comparisons_become_pairs_ties_and_identical_dropped(feedback_file):
    records, _ = read_feedback(feedback_file, on_bad_row="skip")
    rows, report = comparisons_to_pairs([r for r in records if isinstance(r, Comparison)])
    assert rows == [{"prompt": "p1", "chosen": "aaa", "rejected": "bbb", "source": "comparison"},
                    {"prompt": "p1", "chosen": "ddd", "rejected": "ccc", "source": "comparison"}]
    assert (report.records_in, report.rows_out, report.dropped) == (4, 2, {"tie": 1, "identical": 1})


def test_ratings_become_pairs_within_a_prompt(feedback_file):
    ratings = [r for r in read_feedback(feedback_file, on_bad_row="skip")[0] if isinstance(r, Rating)]
    rows, report = ratings_to_pairs(ratings, min_gap=1.0)
    pairs = [(r["prompt"] if isinstance(r["prompt"], str) else "chat", r["chosen"], r["rejected"]) for r in rows]
    # p3: r5(5) r3(3) r2(2.5) r3b(3): 6 candidate pairs; r3~r3b tie; r3 vs r2, r3b vs r2 gap 0.5 < 1
    # chat: x rated 1 and 3 (mean 2) vs y 5: one pair; p4: a single response
    assert pairs == [("p3", "r5", "r3"), ("p3", "r5", "r2"), ("p3", "r5", "r3b"), ("chat", "y", "x")]
    assert (report.records_in, report.rows_out) == (8, 4)
    assert report.dropped == {"tied_pairs": 1, "small_gap_pairs": 2, "single_response_records": 1,
                              "duplicate_response_records": 1}
    loose, _ = ratings_to_pairs(ratings, min_gap=0.5)
    assert len(loose) == 6  # r3 ≻ r2 and r3b ≻ r2 now count


def test_ratings_become_ranked_lists(feedback_file):
    ratings = [r for r in read_feedback(feedback_file, on_bad_row="skip")[0] if isinstance(r, Rating)]
    rows, report = ratings_to_ranked(ratings)
    assert rows == [{"prompt": "p3", "responses": ["r5", "r3", "r3b", "r2"], "scores": [5.0, 3.0, 3.0, 2.5]},
                    {"prompt": CHAT, "responses": ["y", "x"], "scores": [5.0, 2.0]}]
    assert (report.rows_out, report.dropped) == (2, {"single_response_records": 1, "duplicate_response_records": 1})


def test_binary_edits_and_critiques(feedback_file):
    records, _ = read_feedback(feedback_file, on_bad_row="skip")
    kto, report = binary_to_kto([r for r in records if r.__class__.__name__ == "Binary"])
    assert kto == [{"prompt": "p5", "response": "good", "label": True}, {"prompt": "p5", "response": "bad", "label": False}]
    assert report.rows_out == 2
    edits = [r for r in records if isinstance(r, Edit)]
    sft, sft_report = edits_to_sft(edits)
    pairs, pair_report = edits_to_pairs(edits)
    assert sft == [{"prompt": "p6", "response": "new"}, {"prompt": "p6", "response": "same"}] and sft_report.rows_out == 2
    assert pairs == [{"prompt": "p6", "chosen": "new", "rejected": "old", "source": "edit"}]
    assert pair_report.dropped == {"unchanged": 1}
    context, _ = critiques_to_context([r for r in records if isinstance(r, Critique)])
    assert context == [{"kind": "critique", "prompt": "p7", "response": "meh", "critique": "too vague"}]


@pytest.mark.parametrize("ratings_as", ["pairs", "ranked"])
def test_written_files_load_with_the_stage_loaders(feedback_file, tmp_path, tok, ratings_as):
    out = convert_feedback(feedback_file, tmp_path / "out", ratings_as=ratings_as, on_bad_row="skip")
    assert set(out.files) == {"pairs", "kto", "sft", "critiques"} | ({"ranked"} if ratings_as == "ranked" else set())
    options = {"max_prompt_len": 64, "max_response_len": 32}
    assert len(load_preferences(out.files["pairs"], tok, **options)[0]) == 3 + (4 if ratings_as == "pairs" else 0)
    assert len(load_kto(out.files["kto"], tok, **options)[0]) == 2
    assert len(load_sft(out.files["sft"], tok, **options)[0]) == 2
    if ratings_as == "ranked":
        assert [len(e.responses_ids) for e in load_ranked(out.files["ranked"], tok, **options)[0]] == [4, 2]
    assert read_feedback(out.files["critiques"])[1].records["critique"] == 1  # itself a feedback file
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["read"]["malformed"]["empty"] == 2 and len(report["conversions"]) == 6


def test_toy_feedback_is_consistent_with_the_task_rule():
    records = toy_feedback_records(seed=0, n=8)
    assert len(records) == 8 * 7
    comparisons = [r for r in records if r["kind"] == "comparison"]
    assert [r["choice"] for r in comparisons].count("tie") == 1
    for r in comparisons:  # the chosen response has the larger share of vowels
        if r["choice"] != "tie":
            chosen, other = (r["response_a"], r["response_b"]) if r["choice"] == "a" else (r["response_b"], r["response_a"])
            assert toy_score("", chosen) > toy_score("", other)
    assert all(r["rating"] == 1 + round(4 * toy_score("", r["response"])) for r in records if r["kind"] == "rating")
    assert more_vowels("bcdfg") == "acafa"


def test_feedback_stage_runs_on_the_driver(tmp_path, capsys, tok):
    previous = signal.getsignal(signal.SIGTERM)  # launch.main installs its graceful-stop handler
    try:
        assert launch.main(["--config", str(TOY_FEEDBACK), f"trainer.output_dir={tmp_path}"]) == 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not ray.is_initialized()  # the driver alone: no Ray started
    run_dir = tmp_path / "toy_feedback"
    out = capsys.readouterr().out
    assert "== Feedback summary ==" in out and "comparison → pairs" in out and "rating → pairs" in out
    report = json.loads((run_dir / "report.json").read_text())
    assert report["read"]["records"] == {"comparison": 32, "rating": 96, "binary": 32, "edit": 32, "critique": 32}
    conversions = {(c["kind"], c["output"]): c for c in report["conversions"]}
    assert conversions[("comparison", "pairs")]["dropped"] == {"tie": 4}
    pairs, _ = load_preferences(report["files"]["pairs"], tok, max_prompt_len=64, max_response_len=32)
    expected = sum(conversions[k]["rows_out"] for k in [("comparison", "pairs"), ("rating", "pairs"), ("edit", "pairs")])
    assert len(pairs) == expected and (run_dir / "config.yaml").exists()
    assert launch.required_cpus(load_config(TOY_FEEDBACK)) == 0


def test_feedback_stage_stops_at_a_malformed_record(feedback_file, tmp_path):
    cfg = load_config(None, ["stage=feedback", f"feedback.input={feedback_file}", f"trainer.output_dir={tmp_path}"])
    with pytest.raises(DataError, match=r"feedback.jsonl, row 19: not JSON"):
        run_feedback(cfg)
    cfg = load_config(None, ["stage=feedback", f"feedback.input={feedback_file}", f"trainer.output_dir={tmp_path}",
                             "data.on_bad_row=skip", "feedback.ratings_as=ranked"])
    assert set(run_feedback(cfg)["files"]) == {"pairs", "ranked", "kto", "sft", "critiques"}
