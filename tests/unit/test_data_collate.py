"""rlhf_ray.data collate / iterator / errors, by hand: exact padded tensors for a non-zero pad id, every
size check with the message that names the sizes, the iterator's epoch boundaries and resume checks,
and DataError's message for each combination of row and key."""

import pickle

import numpy as np
import pytest
import torch

from rlhf_ray.data import (
    BatchIterator,
    DataError,
    concat_prompt_response,
    pad_candidates,
    pad_left,
    pad_right,
)

PAD = 7  # not 0: a pad written as zeros would show


# ---- collate -----------------------------------------------------------------------------

def test_pad_left_and_right_with_a_nonzero_pad_id():
    ids, mask = pad_left([[1], [2, 3, 4], [5, 6]], pad_id=PAD)
    assert ids.tolist() == [[PAD, PAD, 1], [2, 3, 4], [PAD, 5, 6]]
    assert mask.tolist() == [[0, 0, 1], [1, 1, 1], [0, 1, 1]]
    assert ids.dtype == mask.dtype == torch.long
    ids, mask = pad_right([[1], [2, 3, 4], [5, 6]], pad_id=PAD)
    assert ids.tolist() == [[1, PAD, PAD], [2, 3, 4], [5, 6, PAD]]
    assert mask.tolist() == [[1, 0, 0], [1, 1, 1], [1, 1, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_padding_an_empty_batch_is_named():
    for pad in (pad_left, pad_right):
        with pytest.raises(ValueError, match="^cannot pad an empty batch$"):
            pad([], pad_id=PAD)


def test_concat_prompt_response_with_an_empty_prompt_and_a_nonzero_pad():
    ids, mask, response_mask = concat_prompt_response([[], [1, 2]], [[3, 4, 5], [6]], pad_id=PAD)
    assert ids.tolist() == [[3, 4, 5], [1, 2, 6]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 1]]
    assert response_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask, response_mask = concat_prompt_response([[1]], [[2]], pad_id=PAD)
    assert (ids.tolist(), mask.tolist(), response_mask.tolist()) == ([[1, 2]], [[1, 1]], [[0, 1]])
    assert response_mask.dtype == torch.long


def test_concat_prompt_response_counts_must_match():
    with pytest.raises(ValueError, match="^2 prompts but 1 responses$"):
        concat_prompt_response([[1], [2]], [[3]], pad_id=PAD)


def test_pad_candidates_keeps_each_examples_candidates_together():
    prompts = [[1, 2], [3]]
    candidates = [[[10], [11, 12, 13]], [[20, 21], [22]]]
    ids, mask, response_mask = pad_candidates(prompts, candidates, pad_id=PAD)
    assert ids.shape == mask.shape == response_mask.shape == (2, 2, 5)
    assert ids.tolist() == [[[1, 2, 10, PAD, PAD], [1, 2, 11, 12, 13]],
                            [[3, 20, 21, PAD, PAD], [3, 22, PAD, PAD, PAD]]]
    assert mask.tolist() == [[[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]]
    assert response_mask.tolist() == [[[0, 0, 1, 0, 0], [0, 0, 1, 1, 1]], [[0, 1, 1, 0, 0], [0, 1, 0, 0, 0]]]
    # One candidate each (K = 1) is allowed.
    ids, _, response_mask = pad_candidates([[1]], [[[2, 3]]], pad_id=PAD)
    assert ids.tolist() == [[[1, 2, 3]]] and response_mask.tolist() == [[[0, 1, 1]]]


def test_pad_candidates_checks_the_counts():
    with pytest.raises(ValueError, match=r"^1 prompts but 2 candidate lists$"):
        pad_candidates([[1]], [[[2]], [[3]]], pad_id=PAD)
    with pytest.raises(ValueError, match=r"same number \(>= 1\) of candidates, got counts \[1, 2\]$"):
        pad_candidates([[1], [2]], [[[3]], [[4], [5]]], pad_id=PAD)
    with pytest.raises(ValueError, match=r"got counts \[0\]$"):
        pad_candidates([[1]], [[]], pad_id=PAD)


# ---- batch iterator ----------------------------------------------------------------------

def draw(iterator, k):
    return [iterator.next_indices() for _ in range(k)]


def test_defaults_shuffle_and_drop_the_remainder():
    it = BatchIterator(5, 2, seed=3)
    assert (it.drop_last, it.shuffle) == (True, True)
    order0 = np.random.default_rng([3, 0]).permutation(5).tolist()
    order1 = np.random.default_rng([3, 1]).permutation(5).tolist()
    assert draw(it, 3) == [order0[0:2], order0[2:4], order1[0:2]]
    assert it.state_dict() == {"epoch": 1, "position": 2, "seed": 3}


def test_an_epoch_that_divides_exactly_yields_its_last_batch():
    it = BatchIterator(6, 3, seed=0, shuffle=False)
    assert draw(it, 3) == [[0, 1, 2], [3, 4, 5], [0, 1, 2]]
    assert it.state_dict() == {"epoch": 1, "position": 3, "seed": 0}
    one = BatchIterator(1, 1, seed=0)  # the smallest iterator there is
    assert draw(one, 3) == [[0], [0], [0]] and one.epoch == 2
    whole = BatchIterator(4, 4, seed=0, shuffle=False)  # batch_size == num_examples with drop_last
    assert draw(whole, 2) == [[0, 1, 2, 3]] * 2


def test_without_drop_last_the_short_batch_ends_the_epoch():
    it = BatchIterator(5, 2, seed=1, drop_last=False)
    order0 = np.random.default_rng([1, 0]).permutation(5).tolist()
    order1 = np.random.default_rng([1, 1]).permutation(5).tolist()
    assert draw(it, 4) == [order0[0:2], order0[2:4], order0[4:], order1[0:2]]
    assert BatchIterator(2, 5, seed=0, drop_last=False, shuffle=False).next_indices() == [0, 1]


def test_iterating_is_next_indices():
    it = BatchIterator(4, 2, seed=0, shuffle=False)
    assert iter(it) is it
    assert [next(it), next(it), next(it)] == [[0, 1], [2, 3], [0, 1]]


@pytest.mark.parametrize("n, batch_size", [(0, 1), (1, 0), (-1, 1)])
def test_sizes_below_one_are_rejected(n, batch_size):
    with pytest.raises(ValueError, match=f"^num_examples={n} and batch_size={batch_size} must be >= 1$"):
        BatchIterator(n, batch_size, seed=0)


def test_a_batch_larger_than_the_data_is_rejected_only_with_drop_last():
    with pytest.raises(ValueError, match=r"^batch_size=6 > num_examples=5 with drop_last=True would never yield a "
                                         r"batch; lower the batch size or add data$"):
        BatchIterator(5, 6, seed=0)


def test_resume_into_another_epoch_and_at_the_end_of_one():
    reference = draw(BatchIterator(7, 2, seed=4), 10)  # 3 batches per epoch
    resumed = BatchIterator(7, 2, seed=4)
    resumed.load_state_dict({"epoch": 2, "position": 4, "seed": 4})
    assert draw(resumed, 2) == reference[8:10]
    at_end = BatchIterator(7, 2, seed=4, drop_last=False)
    at_end.load_state_dict({"epoch": 0, "position": 7, "seed": 4})  # an epoch fully drawn: the next one starts
    assert at_end.next_indices() == np.random.default_rng([4, 1]).permutation(7).tolist()[:2]
    assert at_end.state_dict() == {"epoch": 1, "position": 2, "seed": 4}


@pytest.mark.parametrize("position", [-1, 8])
def test_resume_position_outside_the_epoch_is_rejected(position):
    it = BatchIterator(7, 2, seed=4)
    with pytest.raises(ValueError, match=f"^state position={position} is outside 0..num_examples=7$"):
        it.load_state_dict({"epoch": 0, "position": position, "seed": 4})
    with pytest.raises(ValueError, match="^state was saved with seed=5 but this iterator has seed=4$"):
        it.load_state_dict({"epoch": 0, "position": 0, "seed": 5})


# ---- DataError -----------------------------------------------------------------------------

@pytest.mark.parametrize("row, key, message", [
    (None, None, "data.jsonl: no such file [missing_file]"),
    (None, "principles", "data.jsonl, key 'principles': no such file [missing_file]"),
    (4, None, "data.jsonl, row 4: no such file [missing_file]"),
    (4, "prompt", "data.jsonl, row 4, key 'prompt': no such file [missing_file]"),
])
def test_data_error_names_what_it_knows(row, key, message):
    error = DataError("data.jsonl", "missing_file", "no such file", row=row, key=key)
    assert str(error) == message and isinstance(error, ValueError)
    assert (error.source, error.reason, error.detail, error.row, error.key) == (
        "data.jsonl", "missing_file", "no such file", row, key)
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == message
    assert (copy.source, copy.reason, copy.detail, copy.row, copy.key) == (
        "data.jsonl", "missing_file", "no such file", row, key)
