"""Adapter slots, as vLLM's and S-LoRA's servers keep them: per wrapped LoRA layer, Aᵀ and scaled
Bᵀ of every loaded adapter in preallocated stacked tensors, padded to ``max_rank``.

    A: (slots + 1) × in × max_rank      B: (slots + 1) × max_rank × out      (slot 0: zeros, the base)

Loading an adapter writes its slot (zeros in layers it does not adapt), evicting it resets the
slot; a decoding step is one gather by slot id per layer and two batched matmuls, where the
general mixed path (``routing.RowAdapters``) pads and stacks each adapter's factors per call.
A layer the table can hold says so by defining ``slot_factors(name) -> (A, s·B) | None`` (a plain
LoRA linear); layers whose factors the table cannot hold (DoRA, other LoRA forms, embeddings) take
that general path, row for row the same.
"""

from __future__ import annotations

from typing import Any

import torch

from deltatune import routing
from deltatune.constants import BASE_ADAPTER


def plain(layer: Any) -> bool:
    """A layer whose rows the table can hold (its factors are exactly Aᵀ and s·Bᵀ: it has ``slot_factors``)."""
    return callable(getattr(type(layer), "slot_factors", None))


class SlotTable:
    """The stacked factors of every plain LoRA layer of a served model, by slot."""

    def __init__(self, slots: int, max_rank: int) -> None:
        if slots < 1 or max_rank < 1:
            raise ValueError(f"slots and max_rank must be at least 1, got {slots} and {max_rank}")
        self.slots, self.max_rank = slots, max_rank
        self.slot_of: dict[str, int] = {}  # adapter -> slot (1..slots)
        self.tables: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}  # id(layer) -> (layer, A, B)

    def write(self, model: Any, name: str) -> int:
        """Give ``name`` (loaded in ``model``) a free slot and copy its factors there."""
        if name in self.slot_of:
            return self.slot_of[name]
        free = sorted(set(range(1, self.slots + 1)) - set(self.slot_of.values()))
        if not free:
            raise RuntimeError(f"all {self.slots} adapter slots are taken; evict one first")
        self.slot_of[name] = slot = free[0]
        try:
            self.sync(model)
            for layer, a, b in self.tables.values():
                self._fill((layer, a, b), layer, name, slot)
        except Exception:
            self.reset(name)
            raise
        return slot

    def sync(self, model: Any) -> None:
        """Tables for the model's plain LoRA layers now: layers gone (unwrapped when their last
        adapter left) drop theirs; new ones get one holding the slotted adapters they have."""
        layers = {id(layer): layer for _, layer in model.delta_layers() if plain(layer)} if model is not None else {}
        for key in [k for k in self.tables if k not in layers]:
            del self.tables[key]
        for key, layer in layers.items():
            if key not in self.tables:
                self.tables[key] = self._new_table(layer)

    def reset(self, name: str) -> None:
        """Free ``name``'s slot: zeros in every layer."""
        slot = self.slot_of.pop(name, None)
        if slot is None:
            return
        for _, a, b in self.tables.values():
            a[slot].zero_()
            b[slot].zero_()

    def _new_table(self, layer: Any) -> tuple[Any, torch.Tensor, torch.Tensor]:
        weight = layer.adapter_parameters(layer.adapter_names[0])[0]  # the first adapter's A: the factors' dtype
        size = (self.slots + 1, layer.in_features, self.max_rank)
        a = torch.zeros(size, dtype=weight.dtype, device=weight.device)
        b = torch.zeros(self.slots + 1, self.max_rank, layer.out_features, dtype=weight.dtype, device=weight.device)
        table = (layer, a, b)
        for other, slot in self.slot_of.items():
            self._fill(table, layer, other, slot)
        return table

    def _fill(self, table: tuple[Any, torch.Tensor, torch.Tensor], layer: Any, name: str, slot: int) -> None:
        _, a, b = table
        a[slot].zero_()
        b[slot].zero_()
        factors = layer.slot_factors(name)
        if factors is None:
            return
        factor_a, scaled_b = factors
        rank = factor_a.shape[0]
        if rank > self.max_rank:
            raise ValueError(f"adapter {name!r} has rank {rank}, more than --max-lora-rank {self.max_rank}")
        with torch.no_grad():
            a[slot, :, :rank] = factor_a.T.to(a.dtype)
            b[slot, :rank] = scaled_b.T.to(b.dtype)

    def rows(self, names: list[str]) -> routing.RowAdapters:
        """The routing of one forward whose rows run ``names``: plain layers gather from the table."""
        return SlotRows(names, self)


class SlotRows(routing.RowAdapters):
    """Each row's adapter; plain LoRA layers read their factors from the slot table by slot id."""

    def __init__(self, names: list[str], table: SlotTable) -> None:
        super().__init__(names)
        self.table = table
        self.ids = [0 if n == BASE_ADAPTER else table.slot_of.get(n, -1) for n in names]

    def per_row(self, layer: Any, store: Any, batch: int, device: torch.device, build: Any) -> tuple | None:
        entry = self.table.tables.get(id(layer))  # the table holds the layer: its id is not reused
        if entry is None or -1 in self.ids or batch != len(self.ids):
            return super().per_row(layer, store, batch, device, build)
        key = (id(layer), batch)
        if key not in self._stacks:
            index = torch.tensor(self.ids, device=device)
            _, a, b = entry
            self._stacks[key] = (a[index], b[index], torch.zeros(batch, device=device), None)
        return self._stacks[key]
