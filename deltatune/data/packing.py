"""Packing several causal-lm features into one row, first-fit, kept apart by restarting positions."""

from __future__ import annotations

from collections.abc import Sequence

from deltatune.config import ConfigError
from deltatune.data.examples import IGNORE_INDEX


class _FirstFit:
    """Rows of fixed capacity; finds the first row with enough room in O(log rows) with a max segment tree."""

    def __init__(self, capacity: int, max_rows: int) -> None:
        self.capacity, self.size, self.rows = capacity, 1 << max(max_rows - 1, 0).bit_length(), 0
        self.tree = [0] * (2 * self.size)  # free room per row; rows not yet opened have none

    def place(self, length: int) -> int:
        """Index of the first row with ``length`` free (a new row if none), with ``length`` taken from it."""
        if self.tree[1] >= length:
            node = 1
            while node < self.size:
                node = 2 * node if self.tree[2 * node] >= length else 2 * node + 1
            row = node - self.size
        else:
            row, self.rows = self.rows, self.rows + 1
            self._set(row, self.capacity)
        self._set(row, self.tree[self.size + row] - length)
        return row

    def _set(self, row: int, free: int) -> None:
        node = self.size + row
        self.tree[node] = free
        while node > 1:
            node //= 2
            self.tree[node] = max(self.tree[2 * node], self.tree[2 * node + 1])


def pack(features: Sequence[dict], max_length: int) -> list[dict]:
    """Pack causal-lm features into rows of at most ``max_length`` tokens, first-fit in order, never splitting one.

    Each row has ``input_ids``, ``labels``, ``position_ids`` restarting at 0 per example, and ``seq_lens``. The first
    label of each packed example is set to -100: it would otherwise be predicted from the previous example's end
    (unpacked, a sequence's first token is never a target either, so the loss covers the same tokens). The restarting
    positions are what keeps examples apart: :meth:`Batcher.collate` sends them without an attention mask.
    """
    fit = _FirstFit(max_length, len(features))
    rows: list[dict] = []
    for i, feature in enumerate(features):
        length = len(feature["input_ids"])
        if length > max_length:
            raise ConfigError(f"feature {i} has {length} tokens, more than the packing length {max_length}.")
        row = fit.place(length)
        if row == len(rows):
            rows.append({"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []})
        rows[row]["input_ids"] += feature["input_ids"]
        rows[row]["labels"] += [IGNORE_INDEX, *feature["labels"][1:]]
        rows[row]["position_ids"] += range(length)
        rows[row]["seq_lens"].append(length)
    return rows
