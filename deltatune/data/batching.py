"""Batches of features: deterministic per ``(seed, epoch)`` (so a killed run resumes exactly at
``(epoch, batch index)``), grouped by length, and padded into tensors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from deltatune.config import ConfigError
from deltatune.data.examples import IGNORE_INDEX


class Batcher:
    """Batches of feature indices, deterministic per ``(seed, epoch)``, and their padded tensors.

    With ``group_by_length`` the shuffled order is cut into mega-chunks of 50 batches, each sorted by length, so a
    batch holds examples of similar length (less padding) while the epoch stays random; the batch holding the
    longest example comes first, so running out of memory happens at once rather than hours in.
    """

    MEGA_CHUNK_BATCHES = 50

    def __init__(
        self,
        features: Sequence[dict],
        batch_size: int,
        *,
        pad_token_id: int,
        seed: int,
        shuffle: bool = True,
        group_by_length: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, not {batch_size}.")
        self.features, self.batch_size, self.pad_token_id = features, batch_size, pad_token_id
        self.seed, self.shuffle, self.group_by_length = seed, shuffle, group_by_length
        self.lengths = np.array([len(f["input_ids"]) for f in features])

    def __len__(self) -> int:
        """Batches per epoch."""
        return -(-len(self.features) // self.batch_size)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Feature indices per batch for ``epoch``; the same ``(seed, epoch)`` always gives the same batches."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.features)) if self.shuffle else np.arange(len(self.features))
        if self.group_by_length:
            order = self._sort_chunks(order)
        batches = [order[s : s + self.batch_size].tolist() for s in range(0, len(order), self.batch_size)]
        if self.group_by_length and self.shuffle and batches:
            batches = [batches[i] for i in rng.permutation(len(batches))]
            longest = max(range(len(batches)), key=lambda b: self.lengths[batches[b]].max())
            batches.insert(0, batches.pop(longest))
        return batches

    def _sort_chunks(self, order: np.ndarray) -> np.ndarray:
        """``order`` with each mega-chunk sorted longest first (stable, so ties keep the shuffled order)."""
        chunk = self.MEGA_CHUNK_BATCHES * self.batch_size
        sorted_order = order.copy()
        for start in range(0, len(order), chunk):
            part = order[start : start + chunk]
            sorted_order[start : start + chunk] = part[np.argsort(-self.lengths[part], kind="stable")]
        return sorted_order

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Right-padded tensors: ``input_ids`` with the pad id, ``labels`` with -100, the rest with 0; features
        tagged with a ``task_id`` (see :func:`~deltatune.data.tokenize.tag_tasks`) give ``task_ids`` per row.

        Rows from :func:`pack` get no ``attention_mask``: given ``position_ids`` and no mask, transformers builds a
        block-diagonal causal mask (a new block wherever a position does not follow the previous one), so packed
        examples never see each other; padding, at position 0 each, is then a one-token block no token attends to.
        """
        features = [self.features[i] for i in indices]
        width = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": _pad([f["input_ids"] for f in features], width, self.pad_token_id)}
        if "seq_lens" not in features[0]:
            batch["attention_mask"] = _pad([[1] * len(f["input_ids"]) for f in features], width, 0)
        if isinstance(features[0]["labels"], int):
            batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        else:
            batch["labels"] = _pad([f["labels"] for f in features], width, IGNORE_INDEX)
        for key in ("position_ids", "token_type_ids"):
            if key in features[0]:
                batch[key] = _pad([f[key] for f in features], width, 0)
        if "task_id" in features[0]:  # multi-task training: each row's task, for methods such as HyperFormer
            batch["task_ids"] = torch.tensor([f["task_id"] for f in features], dtype=torch.long)
        return batch


def _pad(rows: list[list[int]], width: int, value: int) -> torch.Tensor:
    return torch.tensor([list(row) + [value] * (width - len(row)) for row in rows], dtype=torch.long)
