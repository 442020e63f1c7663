"""Adapter slots, as vLLM's and S-LoRA's servers keep them: per wrapped LoRA layer, A and scaled
Bᵀ of every loaded adapter in preallocated tensors, padded to ``max_rank`` R:

    A: (slots + 1) × R × in      B: (slots + 1) × R × out      (slot 0: zeros, the base)

Loading an adapter writes its slot (zeros in layers it does not adapt), evicting it resets the
slot; nothing is re-stacked per step. A step (:class:`SlotRows`, made once per forward) works out
its rows' slot ids once, and every layer then runs one of two forms, both without Python loops:

* a slice: when the slots the rows use lie close together (LRU fills the lowest free slot, so
  they mostly do), the layer multiplies the rows by those slots' A, all at once (a view of the
  table, no copy), keeps each row's own R columns (a 0/1 mask made once per step) and multiplies
  by the same slots' B;
* a gather: rows gather their own A and B by slot id (the index made once per step), then two
  batched matmuls; for long prompts over slots far apart, where the slice would do many times the work.

A layer the table can hold says so by defining ``slot_factors(name) -> (A, s·B) | None`` (a plain
LoRA linear) and asks the call's routing for its delta (``RowAdapters.held_delta``); layers whose
factors the table cannot hold (DoRA, other LoRA forms, embeddings) take the general mixed path
(``routing.RowAdapters``), row for row the same.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from deltatune import routing
from deltatune.constants import BASE_ADAPTER


def plain(layer: Any) -> bool:
    """A layer whose rows the table can hold (its factors are exactly A and s·B: it has ``slot_factors``)."""
    return callable(getattr(type(layer), "slot_factors", None))


class LayerSlots(NamedTuple):
    """One layer's factors by slot, and views of runs of slots (made once each)."""

    layer: Any
    a: torch.Tensor  # (slots + 1) × R × in: a[s] is slot s's A (rows past its rank: zeros)
    b: torch.Tensor  # (slots + 1) × R × out: b[s] is slot s's s·Bᵀ
    spans: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]

    def span(self, first: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A and s·Bᵀ of slots first … end - 1 stacked, (end - first)·R × in and × out (views: later writes show)."""
        views = self.spans.get((first, end))
        if views is None:
            views = self.spans[first, end] = (self.a[first:end].flatten(0, 1), self.b[first:end].flatten(0, 1))
        return views


class SlotTable:
    """The stacked factors of every plain LoRA layer of a served model, by slot."""

    def __init__(self, slots: int, max_rank: int) -> None:
        if slots < 1 or max_rank < 1:
            raise ValueError(f"slots and max_rank must be at least 1, got {slots} and {max_rank}")
        self.slots, self.max_rank = slots, max_rank
        self.slot_of: dict[str, int] = {}  # adapter -> slot (1..slots)
        self.tables: dict[int, LayerSlots] = {}  # id(layer) -> its slots

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
            for table in self.tables.values():
                self._fill(table, name, slot)
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
        for table in self.tables.values():
            table.a[slot].zero_()
            table.b[slot].zero_()

    def _new_table(self, layer: Any) -> LayerSlots:
        weight = layer.adapter_parameters(layer.adapter_names[0])[0]  # the first adapter's A: the factors' dtype
        like = {"dtype": weight.dtype, "device": weight.device}
        size = (self.slots + 1, self.max_rank)
        table = LayerSlots(
            layer, torch.zeros(*size, layer.in_features, **like), torch.zeros(*size, layer.out_features, **like), {}
        )
        for other, slot in self.slot_of.items():
            self._fill(table, other, slot)
        return table

    def _fill(self, table: LayerSlots, name: str, slot: int) -> None:
        table.a[slot].zero_()
        table.b[slot].zero_()
        factors = table.layer.slot_factors(name)
        if factors is None:
            return
        factor_a, scaled_b = factors
        rank = factor_a.shape[0]
        if rank > self.max_rank:
            raise ValueError(f"adapter {name!r} has rank {rank}, more than --max-lora-rank {self.max_rank}")
        with torch.no_grad():
            table.a[slot, :rank] = factor_a.to(table.a.dtype)
            table.b[slot, :rank] = scaled_b.T.to(table.b.dtype)

    def rows(self, names: list[str]) -> routing.RowAdapters:
        """The routing of one forward whose rows run ``names``: plain layers read the table."""
        return SlotRows(names, self)


class SlotRows(routing.RowAdapters):
    """Each row's adapter; plain LoRA layers compute their rows from the slot table. What every
    layer shares (slot ids, the slice of slots used, its mask, the gather index) is made once."""

    def __init__(self, names: list[str], table: SlotTable) -> None:
        super().__init__(names)
        self.table = table
        self.ids = [0 if n == BASE_ADAPTER else table.slot_of.get(n, -1) for n in names]
        used = [i for i in self.ids if i > 0]
        self.held = bool(used) and -1 not in self.ids  # else the general path (a row not in a slot, or none)
        self.first, self.end = (min(used), max(used) + 1) if used else (0, 0)  # the slots the rows use
        self._shared: dict[tuple, torch.Tensor | None] = {}

    def sliced(self, tokens: int) -> bool:
        """Whether layers take the slice (else the gather) for rows of ``tokens`` tokens: the slice
        multiplies every row by all the slots in it, so it runs while that costs at most about twice
        the gather (which copies each row's factors first); always for one slot, never for a wide
        span over long prompts."""
        span = self.end - self.first
        return span == 1 or span * tokens <= 2 * len(self.ids)

    def held_delta(self, layer: Any, x: torch.Tensor) -> torch.Tensor | None:
        """``layer``'s delta for every row from the slot table; None where the table does not hold it."""
        table = self.table.tables.get(id(layer))  # the table holds the layer: its id is not reused
        if table is None or not self.held or x.shape[0] != len(self.ids):
            return None
        if x.dtype != table.a.dtype:
            x = x.to(table.a.dtype)
        tokens = x.numel() // (x.shape[0] * x.shape[-1])
        if self.sliced(tokens):  # x: rows × … × in
            a, b = table.span(self.first, self.end)
            h = F.linear(x, a)
            mask = self._mask(h)
            return torch.matmul(h if mask is None else h.mul_(mask), b)
        index = self._index(x.device)
        h = x.reshape(x.shape[0], tokens, x.shape[-1])
        return torch.bmm(torch.bmm(h, table.a[index].transpose(1, 2)), table.b[index]).view(*x.shape[:-1], -1)

    def _mask(self, h: torch.Tensor) -> torch.Tensor | None:
        """rows × 1 … × columns (``h``'s dimensions): 1 in each row's own slot's columns, 0 elsewhere
        (all of a base row); None when it would be all ones (one slot, no base row)."""
        key = ("mask", h.dtype, h.device, h.dim())
        if key not in self._shared:
            ids = torch.tensor(self.ids, device=h.device)
            slots = torch.arange(self.first, self.end, device=h.device).repeat_interleave(self.table.max_rank)
            every = self.end - self.first == 1 and 0 not in self.ids
            mask = (ids[:, None] == slots).to(h.dtype)
            self._shared[key] = None if every else mask.view(len(self.ids), *[1] * (h.dim() - 2), -1)
        return self._shared[key]

    def _index(self, device: torch.device) -> torch.Tensor:
        key = ("index", device)
        if key not in self._shared:
            self._shared[key] = torch.tensor(self.ids, device=device)
        return self._shared[key]
