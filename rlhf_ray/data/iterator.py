"""A seeded, resumable iterator of example indices, one batch at a time, epoch after epoch.

Epoch `e` visits the examples in the order `numpy.random.default_rng([seed, e]).permutation(n)`
(or `0..n-1` without shuffling), so any epoch's order can be rebuilt from `(seed, e)` alone and
the state to save is three integers: resuming from `state_dict()` continues with exactly the
batches an uninterrupted run would have drawn.
"""

from typing import Any

import numpy as np


class BatchIterator:
    """Endless batches of indices into `range(num_examples)`.

    drop_last=True: every batch has `batch_size` indices; an epoch's last `n % batch_size`
    examples are skipped and the next epoch starts. drop_last=False: an epoch's last batch holds
    what is left (smaller).
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int,
                 drop_last: bool = True, shuffle: bool = True):
        if num_examples < 1 or batch_size < 1:
            raise ValueError(f"num_examples={num_examples} and batch_size={batch_size} must be >= 1")
        if drop_last and batch_size > num_examples:
            raise ValueError(f"batch_size={batch_size} > num_examples={num_examples} with drop_last=True "
                             "would never yield a batch; lower the batch size or add data")
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.drop_last, self.shuffle = drop_last, shuffle
        self.epoch, self.position = 0, 0  # next batch starts at order[position] of epoch `epoch`
        self._order = self._epoch_order(0)

    def next_indices(self) -> list[int]:
        """The next batch; moves to the next epoch when the current one has no full batch left."""
        remaining = self.num_examples - self.position
        if remaining == 0 or (self.drop_last and remaining < self.batch_size):
            self._start_epoch(self.epoch + 1, 0)
        batch = self._order[self.position:self.position + self.batch_size]
        self.position += len(batch)
        return batch.tolist()

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> list[int]:
        return self.next_indices()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"state was saved with seed={state['seed']} but this iterator has seed={self.seed}")
        if not 0 <= state["position"] <= self.num_examples:
            raise ValueError(f"state position={state['position']} is outside 0..num_examples={self.num_examples}")
        self._start_epoch(int(state["epoch"]), int(state["position"]))

    def _start_epoch(self, epoch: int, position: int) -> None:
        if epoch != self.epoch:
            self._order = self._epoch_order(epoch)
        self.epoch, self.position = epoch, position

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
