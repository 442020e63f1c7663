"""Mixed-adapter batches: every row of one batch runs with its own adapter, in one pass.

Seed 003 names merged LoRA's limit: with W0 + BA folded in for one task, a batch serves one task.
Here ``model(**batch, adapter_names=[...])`` / ``model.generate(..., adapter_names=[...])`` take
one adapter per row (``"__base__"``: none), and every adapted layer serves all rows at once::

    rows        x0 "sql"      x1 "__base__"      x2 "chat" (rank 16)      x3 "sql"
    slots           1               0                   2                     1
    LoRA layer  h = W0·x + bmm(bmm(x, Aᵀ[slot]), Bᵀ[slot])     Aᵀ: (K+1) × in × r_max, Bᵀ scaled
                (slot 0 is zero: base rows, and adapters this layer does not adapt)
    Houlsby adapters, BitFit, trained heads: each adapter's rows through the layer (rows partition
                the batch: the frozen weights still see each row once)
    prompt / P-tuning rows: their virtual tokens, right-aligned and left-padded to the longest
    prefix rows: their prefix keys/values in the KV cache, right-aligned and padded likewise
                (padding masked out; positions follow the mask, so every row sees what it would alone)

The batch's :class:`RowAdapters` reaches the layers through the call scope (deltatune.routing);
each row's LoRA factors are gathered once per call and reused by every decoding step. Methods whose
layers see more than single rows (partial fine-tuning's blocks, LLaMA-Adapter's attention,
HyperFormer's task routing) cannot mix and are refused by name, as are merged adapters: each
method's record (deltatune.methods.contract.Method.mixes) says whether and how it mixes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from deltatune import routing
from deltatune.compat import get_cache, set_cache
from deltatune.config import DeltaConfig
from deltatune.constants import BASE_ADAPTER, IGNORE_INDEX
from deltatune.methods import prefix_tuning
from deltatune.methods import prompt_learning as pl
from deltatune.methods.contract import INPUT_WISE, AdapterHost, Mixes, describe, method_for, registered

RowAdapters = routing.RowAdapters


class MixingHost(AdapterHost, Protocol):
    """What mixing reads of a DeltaModel besides what every hook may."""

    merged_adapter: str | None
    adapters_disabled: bool


def mixes(config: DeltaConfig) -> Mixes | None:
    """How the adapter's method mixes in a batch (its record says; None: it cannot)."""
    return method_for(config).mixes


def mixable() -> frozenset[str]:
    """The peft types of the registered methods that can share a batch."""
    return frozenset(m.peft_type for m in registered() if m.mixes is not None)


MIXABLE = mixable()  # the built-in methods'; mixable() also knows those registered later


def check(delta_model: MixingHost, names: Sequence[str]) -> list[str]:
    """The names, if every one is an adapter (or the base) that can mix; otherwise a clear error."""
    if isinstance(names, str) or not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"adapter_names takes a list with one adapter name per row, got {names!r}")
    configs = delta_model.peft_config
    unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in configs})
    if unknown:
        raise KeyError(
            f"unknown adapter name(s) in adapter_names: {', '.join(unknown)}; this model has: "
            f"{', '.join(configs) or 'none'} (and {BASE_ADAPTER!r} for no adapter)"
        )
    refused = sorted({f"{n} ({configs[n].peft_type})" for n in names if n in configs and mixes(configs[n]) is None})
    if refused:
        raise ValueError(
            f"adapters {', '.join(refused)} cannot share a batch with other adapters: mixed batches support "
            f"{describe([m for m in registered() if m.mixes is not None])}"
        )
    if delta_model.merged_adapter is not None:
        raise ValueError(
            f"adapter {delta_model.merged_adapter!r} is merged into the base weights, which every row shares: "
            "call unmerge_adapter() before running mixed batches"
        )
    if delta_model.adapters_disabled:
        raise ValueError("adapter_names inside disable_adapter(): name '__base__' for rows without an adapter")
    for name in {n for n in names if n in configs and mixes(configs[n]) in INPUT_WISE}:
        if configs[name].task_type != "CAUSAL_LM":
            raise ValueError(f"adapter {name!r}: mixed batches with prompt learning need a causal LM")
    return list(names)


def row_adapters(delta_model: MixingHost, names: Sequence[str] | RowAdapters) -> RowAdapters:
    """The routing of a per-row call: ``names`` checked (:func:`check`), or a routing the caller built for rows it
    has checked itself (a server's adapter slots: deltatune.serving.slots.SlotTable.rows), used as it is. With
    such a routing, a forward on a non-empty KV cache takes its inputs as they are: rows with virtual tokens or a
    prefix got them at their own prefill, and the caller's attention mask and positions cover them."""
    return names if isinstance(names, RowAdapters) else RowAdapters(check(delta_model, names))


def routed(delta_model: MixingHost, rows: RowAdapters) -> contextlib.AbstractContextManager[routing.Call]:
    """A call scope in which every layer routes its rows by ``rows`` (see deltatune.routing); rows that all run the
    base need no routing: the call names the base, and layers run as the plain model."""
    if all(name == BASE_ADAPTER for name in rows.names):
        return routing.scope(adapter=BASE_ADAPTER, rows=None)
    return routing.scope(adapter=None, rows=rows)


def _counts(host: AdapterHost, rows: list[str], kind: Mixes) -> list[int]:
    """Each row's number of virtual tokens (or prefix positions) of the given kind."""
    configs = host.peft_config
    return [configs[n].num_virtual_tokens if n in configs and mixes(configs[n]) == kind else 0 for n in rows]


def _right_aligned(counts: list[int], device: torch.device) -> torch.Tensor:
    """Mask (rows × longest) with each row's count of ones at the right end."""
    longest = max(counts)
    return (torch.arange(longest, device=device) >= longest - torch.tensor(counts, device=device)[:, None]).long()


def prepare_inputs(
    delta_model: AdapterHost, batch_rows: RowAdapters, kwargs: dict[str, Any], generating: bool = False
) -> dict:
    """Each row's virtual tokens and prefix, padded to the batch's longest and masked; positions
    from the full mask. Batches without prompt-learning rows pass through unchanged."""
    if not _changes_inputs(delta_model, batch_rows.names):
        return kwargs
    kwargs.pop("position_ids", None)  # recomputed from the full mask below
    pl.drop(kwargs, "token_type_ids", "virtual tokens and prefixes have none", quietly=generating)
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    batch, length = (ids if ids is not None else embeds).shape[:2]
    device = (ids if ids is not None else embeds).device
    mask = kwargs.get("attention_mask")
    mask = torch.ones(batch, length, dtype=torch.long, device=device) if mask is None else mask.long()
    if pl.is_empty(get_cache(kwargs)):
        rows = batch_rows.for_batch(batch)
        prefix_mask = _add_prefixes(delta_model, rows, kwargs, device)
        virtual_mask = _add_virtual_tokens(delta_model, rows, kwargs)
        batch_rows.extra_mask = torch.cat([prefix_mask, virtual_mask], dim=1)
    elif batch_rows.extra_mask is None:
        raise ValueError("mixed batches with virtual tokens or prefixes must start from an empty KV cache")
    full = torch.cat([batch_rows.extra_mask.to(mask.device), mask], dim=1)
    query = (kwargs["inputs_embeds"] if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]).shape[1]
    kwargs["attention_mask"] = full
    kwargs["position_ids"] = (full.cumsum(-1) - 1).clamp(min=0)[:, -query:]
    return kwargs


def _changes_inputs(host: AdapterHost, names: list[str]) -> bool:
    """Whether any row brings virtual tokens or a prefix."""
    configs = host.peft_config
    return any(mixes(configs[n]) in INPUT_WISE for n in names if n in configs)


def _add_virtual_tokens(delta_model: AdapterHost, rows: list[str], kwargs: dict[str, Any]) -> torch.Tensor:
    counts = _counts(delta_model, rows, "virtual_tokens")
    ids = kwargs.get("input_ids")
    device = (ids if ids is not None else kwargs["inputs_embeds"]).device
    if not any(counts):
        return torch.zeros(len(rows), 0, dtype=torch.long, device=device)
    layer = pl.prompt_layer(delta_model)
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        embeds = layer(kwargs.pop("input_ids"))
    kwargs.pop("input_ids", None)
    longest = max(counts)
    virtual = [embeds.new_zeros(longest, embeds.shape[-1]) for _ in rows]
    for name in {n for n, c in zip(rows, counts, strict=True) if c}:
        table = layer.prompt(name).to(embeds.dtype)
        for i in (i for i, n in enumerate(rows) if n == name):
            virtual[i] = torch.cat([virtual[i][: longest - len(table)], table])
    kwargs["inputs_embeds"] = torch.cat([torch.stack(virtual), embeds], dim=1)
    if kwargs.get("labels") is not None:
        labels = kwargs["labels"]
        kwargs["labels"] = torch.cat([labels.new_full((len(rows), longest), IGNORE_INDEX), labels], dim=1)
    return _right_aligned(counts, device)


def _add_prefixes(
    delta_model: AdapterHost, rows: list[str], kwargs: dict[str, Any], device: torch.device
) -> torch.Tensor:
    counts = _counts(delta_model, rows, "prefix")
    if not any(counts):
        return torch.zeros(len(rows), 0, dtype=torch.long, device=device)
    model, longest = delta_model.base_model, max(counts)
    per_row: dict[str, torch.Tensor] = {}
    for name in {n for n, c in zip(rows, counts, strict=True) if c}:
        prefix = pl.prompt_layer(delta_model).prompt(name)
        per_row[name] = prefix_tuning.key_values(model, delta_model.peft_config[name], prefix)
    template = next(iter(per_row.values()))
    zeros = template.new_zeros(*template.shape[:2], longest, template.shape[-1])
    kv = [
        torch.cat([zeros[..., : longest - c, :], per_row[n]], dim=2) if c else zeros
        for n, c in zip(rows, counts, strict=True)
    ]
    set_cache(kwargs, model, prefix_tuning.fill_cache(model, torch.stack(kv), get_cache(kwargs)))
    return _right_aligned(counts, device)


def forward(delta_model: MixingHost, names: Sequence[str] | RowAdapters, kwargs: dict[str, Any]) -> Any:
    rows = row_adapters(delta_model, names)
    with routed(delta_model, rows):
        if rows is names and rows.extra_mask is None and not pl.is_empty(get_cache(kwargs)):
            # a caller's routing on a later step of rows it prefilled itself (a server's decoding step): their
            # virtual tokens and prefixes are in the cache already, and the caller's mask and positions cover them
            return delta_model.base_model(**kwargs)
        return delta_model.base_model(**prepare_inputs(delta_model, rows, kwargs))


def generate(delta_model: MixingHost, names: Sequence[str] | RowAdapters, *args: Any, **kwargs: Any) -> Any:
    rows = row_adapters(delta_model, names)
    with routed(delta_model, rows):
        if not _changes_inputs(delta_model, rows.names):  # weights only: transformers' generate as it is
            return delta_model.base_model.generate(*args, **kwargs)

        def step(inputs: dict[str, Any]) -> dict[str, Any]:
            return prepare_inputs(delta_model, rows, inputs, generating=True)

        return pl.generate_stepping(delta_model, step, *args, **kwargs)
