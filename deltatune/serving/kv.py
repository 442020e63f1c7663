"""The running rows' KV cache: one left-padded ``DynamicCache`` that rows join and leave.

Every row's keys/values end at the right edge, so one decoding step feeds each row one token at
the same cache column::

    row a  [pad pad  a0  a1  a2 ]       mask 0 0 1 1 1     next position 3
    row b  [ b0  b1  b2  b3  b4 ]       mask 1 1 1 1 1     next position 5
    join c (prefilled, 2 long): c is left-padded to the batch's length and stacked under it
    leave b: its row is dropped, then columns that are padding in every row are cut off

Positions come from each row's own count of real tokens, and padding is masked out, so a row
computes what it would alone. Copies happen only when rows join or leave (transformers' own
DynamicLayer.update copies the whole cache at every step anyway).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def check_layers(cache: DynamicCache) -> None:
    """Only plain full-attention layers can be padded and stacked like this."""
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise NotImplementedError(
                f"the server batches full-attention KV caches only; this model's cache has {type(layer).__name__}"
            )


class Batch:
    """The rows that are decoding, their cache and attention mask (rows × cache length)."""

    def __init__(self) -> None:
        self.rows: list = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def add(self, rows: list, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Stack prefilled ``rows`` (their cache and mask, left-padded like ours) under the batch."""
        check_layers(cache)
        if self.cache is None:
            self.rows, self.cache, self.mask = list(rows), cache, mask
            return
        width = max(self.length, mask.shape[1])
        _pad_cache(self.cache, width - self.length)
        self.mask = _pad_mask(self.mask, width)
        _pad_cache(cache, width - mask.shape[1])
        mask = _pad_mask(mask, width)
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])
        self.mask = torch.cat([self.mask, mask])
        self.rows += rows

    def keep(self, indices: list[int]) -> None:
        """Keep only the rows at ``indices``, then cut columns that are padding in every row."""
        if not indices:
            self.rows, self.cache, self.mask = [], None, None
            return
        if len(indices) < len(self.rows):
            index = torch.tensor(indices)
            self.cache.batch_select_indices(index)
            self.mask = self.mask[index]
            self.rows = [self.rows[i] for i in indices]
        used = self.mask.any(0).nonzero()
        cut = int(used[0]) if len(used) else self.length
        if cut:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., cut:, :], layer.values[..., cut:, :]
            self.mask = self.mask[:, cut:]

    def crop(self, length: int) -> None:
        """Undo a step that failed part-way: every layer back to ``length`` columns."""
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]
        self.mask = self.mask[:, :length]

    def row(self, index: int) -> tuple[DynamicCache, torch.Tensor]:
        """A copy of one row's cache and mask, to run it alone."""
        data = [(layer.keys[index : index + 1], layer.values[index : index + 1]) for layer in self.cache.layers]
        return DynamicCache(data), self.mask[index : index + 1].clone()


def _pad_cache(cache: DynamicCache, columns: int) -> None:
    if columns <= 0:
        return
    for layer in cache.layers:
        layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, columns, 0))
        layer.values = torch.nn.functional.pad(layer.values, (0, 0, columns, 0))


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(mask, (width - mask.shape[1], 0))
