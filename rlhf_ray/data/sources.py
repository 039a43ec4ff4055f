"""Rows from a local file, a local directory of shards, or a Hugging Face hub dataset.

`load_rows(source)` returns a `datasets.Dataset` with two extra columns, `ORIGIN_FILE` and
`ORIGIN_ROW`, so that every later error can name the file and the 1-based row it comes from.
How `source` is resolved:

- an existing file: `.jsonl` / `.json` (a JSON array of objects, or JSON Lines) through
  `datasets.load_dataset("json")`, `.parquet` through `"parquet"`; any other suffix is an error.
  For `.jsonl` the row number is the line number (blank lines are counted, not loaded);
  for `.json` and `.parquet` it is the record's 1-based position in the file.
- an existing directory: every non-hidden entry must be a data file, all JSON-family or all
  Parquet; they are loaded in name order and concatenated (one split). Anything else in it
  (a README, a subdirectory) is an error naming it: point at the data files' own folder.
- a path that does not exist but looks local (ends in a data suffix, or starts with `/`, `.`
  or `~`): `DataError` naming it.
- anything else: a hub id, `datasets.load_dataset(id, split=split)`; origin `hub:<id>:<split>`.
  `trust_remote_code` is never passed, so dataset scripts are never executed.

`split` only selects the split of a hub dataset; a local file or directory is one split.
"""

import json
from pathlib import Path

import datasets

from rlhf_ray.data.errors import DataError

ORIGIN_FILE = "_origin_file"  # column: the file (or hub:<id>:<split>) a row comes from
ORIGIN_ROW = "_origin_row"  # column: its 1-based row number there (line number for JSONL)
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_rows(source: str, split: str = "train") -> datasets.Dataset:
    """Load `source` as rows with origin columns; see the module docstring for the rules."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_directory(path)
    if path.is_file():
        return _load_file(path)
    if path.suffix in BUILDERS or source.startswith(("/", ".", "~")):
        raise DataError(source, "missing_file", "no such file or directory")
    return _load_hub(source, split)


def _load_file(path: Path) -> datasets.Dataset:
    builder = BUILDERS.get(path.suffix)
    if builder is None:
        raise DataError(str(path), "unsupported_file", f"expected one of {sorted(BUILDERS)}")
    try:
        rows = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:
        raise _unreadable(path, error) from error
    numbers = _jsonl_line_numbers(path) if path.suffix == ".jsonl" else []
    if len(numbers) != len(rows):  # not JSONL: the record's position is its row number
        numbers = list(range(1, len(rows) + 1))
    return _with_origin(rows, str(path), numbers)


def _load_directory(directory: Path) -> datasets.Dataset:
    entries = sorted(p for p in directory.iterdir() if not p.name.startswith("."))
    if not entries:
        raise DataError(str(directory), "unsupported_file", "directory holds no data files")
    for entry in entries:
        if not entry.is_file() or entry.suffix not in BUILDERS:
            raise DataError(
                str(directory), "unsupported_file",
                f"{entry.name!r} is not a {'/'.join(sorted(BUILDERS))} file; a data directory "
                "must hold data files only (pass the folder that holds them, or one file)")
    if len({BUILDERS[entry.suffix] for entry in entries}) > 1:
        raise DataError(str(directory), "unsupported_file", "mixes JSON and Parquet files")
    shards = [_load_file(entry) for entry in entries]
    try:
        return datasets.concatenate_datasets(shards)
    except ValueError as error:
        raise DataError(str(directory), "unreadable", f"files have different columns/types: {error}") from error


def _load_hub(name: str, split: str) -> datasets.Dataset:
    origin = f"hub:{name}:{split}"
    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as error:
        raise DataError(origin, "unreadable", f"could not load hub dataset: {error}") from error
    return _with_origin(rows, origin, list(range(1, len(rows) + 1)))


def _with_origin(rows: datasets.Dataset, origin: str, numbers: list[int]) -> datasets.Dataset:
    for column in (ORIGIN_FILE, ORIGIN_ROW):
        if column in rows.column_names:
            raise DataError(origin, "unsupported_file", f"column {column!r} is reserved")
    rows = rows.add_column(ORIGIN_FILE, [origin] * len(rows))
    return rows.add_column(ORIGIN_ROW, numbers)


def _jsonl_line_numbers(path: Path) -> list[int]:
    """1-based numbers of the non-blank lines: the JSON loader skips blank lines."""
    with open(path, "rb") as f:
        return [number for number, line in enumerate(f, start=1) if line.strip()]


def _unreadable(path: Path, error: Exception) -> DataError:
    """Name the first line that is not JSON when there is one; else pass on the loader's error."""
    detail = f"{type(error).__name__}: {error}"
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            lines = f.read().splitlines()
        for number, line in enumerate(lines, start=1):
            try:
                if line.strip():
                    json.loads(line)
            except ValueError as bad:
                return DataError(str(path), "invalid_json", f"not JSON: {bad}", row=number)
        if any(not line.strip() for line in lines):
            # datasets 5.x fails this way when a column mixes types and the file has blank lines.
            detail += " (the file has blank lines; removing them may fix this)"
    return DataError(str(path), "unreadable", detail)
