"""`DataError`: a data problem reported with where it is (file, row, key) and why."""


class DataError(ValueError):
    """A data source or one of its rows cannot be used.

    Row-level errors name the file, the 1-based row (the line number for JSONL), the offending
    key and a reason code (`missing_key`, `wrong_type`, `empty`, `overlength`, `identical_pair`,
    `bad_value`); source-level errors (missing file, unreadable file, absent column) have no row.
    """

    def __init__(
        self, source: str, reason: str, detail: str, row: int | None = None, key: str | None = None
    ):
        self.source, self.reason, self.detail, self.row, self.key = source, reason, detail, row, key
        where = source if row is None else f"{source}, row {row}"
        if key is not None:
            where += f", key {key!r}"
        super().__init__(f"{where}: {detail} [{reason}]")

    def __reduce__(self):
        # Keeps the exception picklable (it may cross a Ray process boundary).
        return (DataError, (self.source, self.reason, self.detail, self.row, self.key))
