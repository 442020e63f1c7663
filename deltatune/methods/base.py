"""What every method's wrapped layer shares: a frozen base layer plus per-adapter deltas.

A method keeps its per-adapter parameters in ``nn.ModuleDict``/``nn.ParameterDict`` attributes
keyed by adapter name and lists those attributes in ``adapter_attrs``; other per-adapter values
(a scale, a flag, a cache: anything with ``pop(name, default)``) it lists in ``adapter_values``.
That one convention gives every method, for free: adapter switching, deletion, trainable flags,
and the state-dict keys of Hugging Face peft's checkpoint layout (the adapter name is dropped from
the key on save).

``DeltaLayer.forward`` is the template every layer shares: a mixed batch goes to the layer's
``forward_mixed`` (if it mixes rows; :class:`GathersRows` builds it from the method's ``delta_rows``,
:class:`SplitsRows` from its one-adapter forward), no active adapter runs the base layer alone, and
otherwise the base output gets each active adapter's ``delta``. A method whose adapter is not an
added output (a scaled input, another attention) overrides ``forward_active`` or ``forward``.

Which adapter a forward runs comes from the call (deltatune.routing) when the call names one,
else from the layer's ``active_adapter`` (``DeltaModel.set_adapter``); a mixed batch reaches a
layer as ``routing.rows()``, which layers that can serve it hand to their ``forward_mixed``
(:class:`SplitsRows` does it row group by row group). Whether a method merges or mixes is stated
once, in its record (deltatune.methods.contract), and checked against its layers there.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from deltatune import routing
from deltatune.config import ConfigError
from deltatune.wrappers import ForwardsAttributes, replace_module


class DeltaLayer(nn.Module):
    """A frozen ``base_layer`` plus per-adapter tensors in the ``adapter_attrs`` stores."""

    adapter_attrs: ClassVar[tuple[str, ...]] = ()
    adapter_values: ClassVar[tuple[str, ...]] = ()  # per-adapter dicts beside the stores, dropped on delete
    top_level_keys: ClassVar[bool] = False  # True: checkpoint keys are bare names, not module paths
    sums_active: ClassVar[bool] = False  # True: forward applies every adapter of adapters_active()
    # Stores LoRA+ trains at another learning rate (deltatune.training.loraplus): "B" (lr x ratio) or
    # "embedding" (an embedding's factors, their own lr); a store not named here is grouped by its shape.
    loraplus_roles: ClassVar[dict[str, str]] = {}

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapter: str | None = None
        self.active_adapters: tuple[str, ...] = ()  # several active at once (set_adapter([...])): deltas add
        self.disabled = False
        self.merged_adapter: str | None = None

    @property
    def adapter_names(self) -> list[str]:
        names: dict[str, None] = {}
        for attr in self.adapter_attrs:
            names.update(dict.fromkeys(getattr(self, attr).keys()))
        return list(names)

    def adapter_for_call(self) -> str | None:
        """The adapter this call asks for: the call's own (see deltatune.routing), else the active one."""
        call = routing.current()
        return self.active_adapter if call is None or call.adapter is None else call.adapter

    def adapter_active(self) -> str | None:
        """The adapter whose delta this forward pass adds (None: plain base layer)."""
        name = self.adapter_for_call()
        if (
            routing.rows() is not None  # a mixed batch: a layer that cannot split rows runs as the base
            or self.disabled
            or name is None
            or name == self.merged_adapter
            or not self.holds(name)
        ):
            return None
        return name

    def adapters_active(self) -> list[str]:
        """The adapters whose deltas this forward adds: the call's one adapter, else the active one,
        or the several that ``DeltaModel.set_adapter([...])`` made active (for layers that sum them)."""
        call = routing.current()
        if len(self.active_adapters) < 2 or (call is not None and call.adapter is not None):
            name = self.adapter_active()
            return [] if name is None else [name]
        if routing.rows() is not None or self.disabled:
            return []
        return [n for n in self.active_adapters if self.holds(n) and n != self.merged_adapter]

    def holds(self, name: str) -> bool:
        """Whether this layer has adapter ``name`` (its first store has an entry for it)."""
        return name in getattr(self, self.adapter_attrs[0])

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        params = []
        for attr in self.adapter_attrs:
            store = getattr(self, attr)
            if name in store:
                params += _parameters_of(store[name])
        return params

    def parameters_by_adapter(self) -> dict[str, list[nn.Parameter]]:
        """Every adapter's ``adapter_parameters`` in one pass over the stores (``DeltaModel.set_adapter``
        asks every layer, and a server sets adapters at each load)."""
        found: dict[str, list[nn.Parameter]] = {}
        for attr in self.adapter_attrs:
            for name, item in getattr(self, attr).items():
                found.setdefault(name, []).extend(_parameters_of(item))
        return found

    def rename_adapter(self, old: str, new: str) -> None:
        """Hold adapter ``old`` under the name ``new``: its entries move (a value store without item
        assignment is a cache, dropped and recomputed), and so does the active or merged name."""
        for attr in self.adapter_attrs:
            store = getattr(self, attr)
            if old in store:
                store[new] = store.pop(old)
        for attr in self.adapter_values:
            store = getattr(self, attr)
            value = store.pop(old, _MISSING)
            if value is not _MISSING and hasattr(store, "__setitem__"):
                store[new] = value
        renamed = {old: new}
        self.active_adapter = renamed.get(self.active_adapter, self.active_adapter)
        self.active_adapters = tuple(renamed.get(n, n) for n in self.active_adapters)
        self.merged_adapter = renamed.get(self.merged_adapter, self.merged_adapter)

    def delete_adapter(self, name: str) -> None:
        if self.merged_adapter == name:
            self.unmerge()
        for attr in self.adapter_attrs:
            store = getattr(self, attr)
            if name in store:
                del store[name]
        for attr in self.adapter_values:
            getattr(self, attr).pop(name, None)
        if self.active_adapter == name:
            self.active_adapter = None

    # --- the forward template -------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The steps every layer shares, once: a mixed batch, no adapter, or the active adapters."""
        rows = routing.rows()
        mixed = getattr(self, "forward_mixed", None)
        if rows is not None and mixed is not None:
            return mixed(rows, x, *args, **kwargs)
        if self.sums_active:
            names = self.adapters_active()
        else:
            name = self.adapter_active()
            names = [] if name is None else [name]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        return self.forward_active(names, x, *args, **kwargs)

    def forward_active(self, names: list[str], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base output plus each adapter's :meth:`delta` (several: each relative to the base output)."""
        base = self.base_layer(x, *args, **kwargs)
        out = base
        for name in names:
            delta = self.delta(name, x, base)
            if delta is not None:
                out = out + delta.to(out.dtype)
        return out

    def delta(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor | None:
        """What adapter ``name`` adds to the base output ``base_out`` for input ``x`` (None: nothing)."""
        raise NotImplementedError(f"{type(self).__name__} defines neither delta nor its own forward")

    # --- checkpoint keys (peft layout: the adapter name is not part of the key) ---------------
    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for attr in self.adapter_attrs:
            store = getattr(self, attr)
            if name not in store:
                continue
            item = store[name]
            if isinstance(item, nn.Parameter):
                out[attr] = item.detach()
            else:
                out.update({f"{attr}.{k}": v.detach() for k, v in item.state_dict().items()})
        return out

    def training_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Tensors that resuming training needs but the checkpoint's inference form leaves out (a
        reparametrizing encoder whose output is what peft stores). Saved in a file of their own
        and handed back to :meth:`load_adapter_state_dict` together with the checkpoint's tensors."""
        return {}

    def load_adapter_state_dict(self, name: str, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Copy ``tensors`` (keys as from :meth:`adapter_state_dict`) in; return the keys left over."""
        own = self.adapter_state_dict(name)
        for key, value in tensors.items():
            if key in own:
                if own[key].shape != value.shape:
                    raise ValueError(
                        f"shape mismatch for {key}: checkpoint {tuple(value.shape)}, "
                        f"model {tuple(own[key].shape)} (was the adapter made with another r or base model?)"
                    )
                with torch.no_grad():
                    own[key].copy_(value)
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise KeyError(f"checkpoint lacks {', '.join(missing)}")
        return [k for k in tensors if k not in own]

    # --- merging ---------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} defines no weight delta")

    def merge(self, name: str) -> None:
        if self.merged_adapter == name or name not in self.adapter_names:
            return
        if self.merged_adapter is not None:
            self.unmerge()
        delta = self.delta_weight(name)
        with torch.no_grad():
            self.base_layer.weight += delta.to(self.base_layer.weight.dtype)
        self.merged_adapter = name

    def unmerge(self) -> None:
        if self.merged_adapter is None:
            return
        delta = self.delta_weight(self.merged_adapter)
        with torch.no_grad():
            self.base_layer.weight -= delta.to(self.base_layer.weight.dtype)
        self.merged_adapter = None

    def unwrap(self) -> nn.Module:
        """The module that replaces this one in ``merge_and_unload``."""
        return self.base_layer


def wrap_modules(
    model: nn.Module, targets: dict[str, type[DeltaLayer]], who: str | None = None
) -> dict[str, DeltaLayer]:
    """Wrap each named module in its DeltaLayer type, reusing a wrapper of that type already there.

    The step every method shares. A module that carries another kind of wrapper is refused,
    naming it (and ``who`` would have wrapped it: "a HyperFormer adapter"), before anything changes.
    """
    for name, kind in targets.items():
        layer = model.get_submodule(name)
        if isinstance(layer, DeltaLayer) and not isinstance(layer, kind):
            raise ConfigError(
                f"{name} already carries a {type(layer).__name__}; {who or 'a ' + kind.__name__} cannot wrap it too"
            )
    wrapped = {}
    for name, kind in targets.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, kind):
            layer = kind(layer)
            replace_module(model, name, layer)
        wrapped[name] = layer
    return wrapped


class GathersRows:
    """``forward_mixed`` (see deltatune.methods.contract.MixesRows) for a layer whose rows gather their
    own adapter's weights in one pass: the base output plus the method's ``delta_rows``."""

    def forward_mixed(self, rows: routing.RowAdapters, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        delta = self.delta_rows(rows, x, out)
        return out if delta is None else out + delta.to(out.dtype)

    def delta_rows(self, rows: routing.RowAdapters, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor | None:
        """What each row's adapter adds to ``base_out`` (None: no row's adapter is in this layer)."""
        raise NotImplementedError


class SplitsRows:
    """``forward_mixed`` (see deltatune.methods.contract.MixesRows) for a layer that works row by
    row: each adapter's rows go through the one-adapter forward, in a call scope of that adapter.
    The rows partition the batch, so the base layer still sees every row once."""

    def forward_mixed(self, rows: routing.RowAdapters, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = None
        for name, index in rows.groups(x.shape[0], x.device).items():
            with routing.scope(adapter=name, rows=None):
                y = self(x[index], *args, **kwargs)
            out = y.new_empty((x.shape[0], *y.shape[1:])) if out is None else out
            out[index] = y
        return out


class ModulesToSave(SplitsRows, ForwardsAttributes, DeltaLayer):
    """A fully trained copy of a module per adapter (e.g. a new classification head)."""

    adapter_attrs = ("modules_to_save",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.modules_to_save = nn.ModuleDict()

    def add(self, name: str) -> None:
        import copy

        self.modules_to_save[name] = copy.deepcopy(self.base_layer)

    # Some transformers models read attributes of their blocks (e.g. ``attention_type``): ForwardsAttributes.

    def forward(self, *args, **kwargs):
        rows = routing.rows()
        if rows is not None:
            return self.forward_mixed(rows, *args, **kwargs)
        name = self.adapter_for_call()
        if self.disabled or name is None or name not in self.modules_to_save:
            return self.base_layer(*args, **kwargs)
        return self.modules_to_save[name](*args, **kwargs)

    # peft stores the copy's tensors under the module's own name: ``classifier.weight``.
    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.modules_to_save:
            return {}
        return {k: v.detach() for k, v in self.modules_to_save[name].state_dict().items()}

    def merge(self, name: str) -> None:
        self.merged_adapter = name if name in self.modules_to_save else None

    def unmerge(self) -> None:
        self.merged_adapter = None

    def unwrap(self) -> nn.Module:
        copies = dict(self.modules_to_save.items())
        return copies.get(self.merged_adapter or self.active_adapter, self.base_layer)


_MISSING = object()


def _parameters_of(item: nn.Module | nn.Parameter) -> list[nn.Parameter]:
    """An adapter store's entry as parameters. A leaf module's own are read directly: ``Module.parameters``
    walks the module tree, and a server that loads an adapter per request asks this of every layer's
    every adapter (``DeltaModel.set_adapter``)."""
    if not isinstance(item, nn.Module):  # a Parameter (asked second: its isinstance is the slow one)
        return [item]
    if not item._modules:
        return [p for p in item._parameters.values() if p is not None]
    return list(item.parameters())
