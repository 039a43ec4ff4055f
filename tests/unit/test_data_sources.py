"""rlhf_ray.data.sources: how a source string resolves (file, shard directory, missing local path, hub id),
the row number each format gives, and every source-level error with the file and reason it names."""

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_ray.data import DataError, load_rows, sources
from rlhf_ray.data.sources import ORIGIN_FILE, ORIGIN_ROW


def rows_of(dataset):
    return [(row["a"], row[ORIGIN_FILE], row[ORIGIN_ROW]) for row in dataset]


def test_origin_columns_are_named_as_documented():
    assert (ORIGIN_FILE, ORIGIN_ROW) == ("_origin_file", "_origin_row")
    assert sources.BUILDERS == {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def test_json_and_parquet_rows_are_numbered_by_position(tmp_path):
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"a": 1}, {"a": 2}, {"a": 3}]))
    assert rows_of(load_rows(str(array))) == [(1, str(array), 1), (2, str(array), 2), (3, str(array), 3)]
    lines = tmp_path / "lines.json"  # JSON Lines under .json: still the record's position, blank lines not counted
    lines.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert rows_of(load_rows(str(lines))) == [(1, str(lines), 1), (2, str(lines), 2)]
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"a": 5}, {"a": 6}]), parquet)
    assert rows_of(load_rows(str(parquet))) == [(5, str(parquet), 1), (6, str(parquet), 2)]


def test_jsonl_rows_are_numbered_by_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('\n{"a": 1}\n  \n\n{"a": 2}\n{"a": 3}')
    assert rows_of(load_rows(str(path))) == [(1, str(path), 2), (2, str(path), 5), (3, str(path), 6)]


def test_a_home_relative_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "d.jsonl").write_text('{"a": 1}\n')
    assert rows_of(load_rows("~/d.jsonl")) == [(1, str(tmp_path / "d.jsonl"), 1)]


def test_reserved_columns_are_refused(tmp_path):
    for column in (ORIGIN_FILE, ORIGIN_ROW):
        path = tmp_path / f"{column}.jsonl"
        path.write_text(json.dumps({column: 1, "a": 2}) + "\n")
        with pytest.raises(DataError) as caught:
            load_rows(str(path))
        assert str(caught.value) == f"{path}: column {column!r} is reserved [unsupported_file]"


def test_an_unsupported_suffix_names_the_ones_supported(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a\n1\n")
    with pytest.raises(DataError) as caught:
        load_rows(str(path))
    assert str(caught.value) == f"{path}: expected one of ['.json', '.jsonl', '.parquet'] [unsupported_file]"


@pytest.mark.parametrize("source", ["nope.jsonl", "nope.json", "nope.parquet", "/no/such", "./nope", "~/no/such/file"])
def test_a_missing_local_path_is_named(source):
    with pytest.raises(DataError) as caught:
        load_rows(source)
    assert str(caught.value) == f"{source}: no such file or directory [missing_file]"
    assert (caught.value.source, caught.value.reason, caught.value.row) == (source, "missing_file", None)


def test_anything_else_is_a_hub_id_loaded_with_its_split(monkeypatch):
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list([{"a": 1}, {"a": 2}])

    monkeypatch.setattr(sources.datasets, "load_dataset", fake_load_dataset)
    rows = load_rows("org/name")  # the default split is train
    assert calls == [(("org/name",), {"split": "train"})]
    assert rows_of(rows) == [(1, "hub:org/name:train", 1), (2, "hub:org/name:train", 2)]


def test_a_hub_dataset_that_fails_to_load_is_named(monkeypatch):
    def failing(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(sources.datasets, "load_dataset", failing)
    with pytest.raises(DataError) as caught:
        load_rows("org/name", split="test")
    assert str(caught.value) == "hub:org/name:test: could not load hub dataset: offline [unreadable]"
    assert isinstance(caught.value.__cause__, ConnectionError)


def test_directory_rules(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    with pytest.raises(DataError) as caught:
        load_rows(str(shards))
    assert str(caught.value) == f"{shards}: directory holds no data files [unsupported_file]"
    (shards / "b.json").write_text(json.dumps([{"a": 3}]))
    (shards / "a.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n')
    (shards / ".hidden").write_text("not data")  # hidden entries are ignored
    assert rows_of(load_rows(str(shards))) == [
        (1, str(shards / "a.jsonl"), 1), (2, str(shards / "a.jsonl"), 3), (3, str(shards / "b.json"), 1)]
    (shards / "sub.jsonl").mkdir()  # a directory, even with a data suffix, is not a data file
    with pytest.raises(DataError) as caught:
        load_rows(str(shards))
    assert str(caught.value) == (f"{shards}: 'sub.jsonl' is not a .json/.jsonl/.parquet file; a data directory must "
                                 "hold data files only (pass the folder that holds them, or one file) [unsupported_file]")
    (shards / "sub.jsonl").rmdir()
    pq.write_table(pa.Table.from_pylist([{"a": 4}]), shards / "c.parquet")
    with pytest.raises(DataError) as caught:
        load_rows(str(shards))
    assert str(caught.value) == f"{shards}: mixes JSON and Parquet files [unsupported_file]"


def test_shards_with_conflicting_types_are_named(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.jsonl").write_text('{"a": 1}\n')
    (shards / "b.jsonl").write_text('{"a": "x"}\n')
    with pytest.raises(DataError) as caught:
        load_rows(str(shards))
    assert (caught.value.source, caught.value.reason) == (str(shards), "unreadable")
    assert caught.value.detail.startswith("files have different columns/types: ")


def test_the_first_line_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{oops\n{"a": 3}\n')
    with pytest.raises(DataError) as caught:
        load_rows(str(path))
    assert (caught.value.source, caught.value.row, caught.value.reason) == (str(path), 4, "invalid_json")
    assert str(caught.value).startswith(f"{path}, row 4: not JSON: ")


@pytest.mark.parametrize("name, text", [
    ("bad.json", '{"a": 1}\n{oops\n'),
    ("array.jsonl", '{"a": 1}\n[1, 2]\n'),  # every line is JSON (not rows), no line is blank
], ids=["broken-json", "json-that-is-not-rows"])
def test_an_unreadable_file_passes_on_the_loaders_error(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError) as caught:
        load_rows(str(path))
    assert (caught.value.source, caught.value.row, caught.value.reason) == (str(path), None, "unreadable")
    assert caught.value.detail.startswith("DatasetGenerationError: ") and "blank lines" not in caught.value.detail


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"a": 1}\n\xff\xfe\n{"a": 2}\n')
    with pytest.raises(DataError) as caught:
        load_rows(str(path))
    assert (caught.value.source, caught.value.row, caught.value.reason) == (str(path), 2, "invalid_json")


def test_blank_lines_are_blamed_when_every_line_is_json(tmp_path):
    """datasets fails on a column of mixed types when the file has blank lines; every line is valid JSON."""
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"a": 1}\n\n{"a": "x"}\n')
    with pytest.raises(DataError) as caught:
        load_rows(str(path))
    assert (caught.value.source, caught.value.row, caught.value.reason) == (str(path), None, "unreadable")
    assert caught.value.detail.endswith(" (the file has blank lines; removing them may fix this)")
    assert caught.value.detail.startswith("ValueError: ")
