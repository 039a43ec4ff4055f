"""`token_budget_splits`: micro-batches by token count (trainer.max_tokens_per_micro_batch)."""

from __future__ import annotations

import pytest

from rlhf_ray.batch import token_budget_splits


def _rows(splits):
    return [list(range(s.start, s.stop)) for s in splits]


def test_rows_are_grouped_while_their_tokens_fit_and_a_long_row_goes_alone():
    tokens = [10, 10, 10, 50, 5, 5]
    assert _rows(token_budget_splits(tokens, 25)) == [[0, 1], [2], [3], [4, 5]]
    assert _rows(token_budget_splits(tokens, 1000)) == [[0, 1, 2, 3, 4, 5]]
    assert _rows(token_budget_splits(tokens, 1)) == [[0], [1], [2], [3], [4], [5]]


def test_a_count_from_another_rank_halves_the_heaviest_micro_batches():
    tokens = [10, 10, 10, 50, 5, 5]
    assert _rows(token_budget_splits(tokens, 25, count=5)) == [[0], [1], [2], [3], [4, 5]]
    assert _rows(token_budget_splits(tokens, 25, count=6)) == [[0], [1], [2], [3], [4], [5]]
    for count in range(4, 7):  # every row once, in order, in exactly `count` non-empty micro-batches
        rows = _rows(token_budget_splits(tokens, 25, count=count))
        assert len(rows) == count and sum(rows, []) == list(range(6)) and all(rows)


def test_a_count_outside_what_the_rows_allow_is_an_error():
    with pytest.raises(ValueError, match="need 4 to 6"):
        token_budget_splits([10, 10, 10, 50, 5, 5], 25, count=3)
    with pytest.raises(ValueError, match="need 4 to 6"):
        token_budget_splits([10, 10, 10, 50, 5, 5], 25, count=7)
