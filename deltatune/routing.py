"""Which adapter each call runs: a per-call scope that travels with the call, not with the layers.

``DeltaModel.forward``/``generate`` open a :class:`Call` for their duration (a
:class:`contextvars.ContextVar`, so it belongs to the thread, or asyncio task, that made the
call) and every adapted layer reads it::

    DeltaModel.forward(adapter_name="b")       ─► Call(adapter="b")            one adapter for the call
    DeltaModel.forward(adapter_names=[...])    ─► Call(rows=RowAdapters(...))  one adapter per row
    DeltaModel.generate (prompt learning)      ─► Call(step=prepare)           each decoding step's inputs

Nothing on the shared model changes per call, so two threads may call one model with different
adapters at once, and calls nest (an inner scope hides the outer one until it ends). Without a
scope a layer runs its ``active_adapter`` (set by ``DeltaModel.set_adapter``), which is what the
trainer uses. This module imports nothing above :mod:`deltatune.constants`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from deltatune.constants import BASE_ADAPTER

__all__ = [
    "BASE_ADAPTER",
    "Call",
    "RowAdapters",
    "current",
    "install_step_hook",
    "remove_step_hook",
    "rows",
    "scope",
    "state",
]


class RowAdapters:
    """The adapter of each row of a batch, and what layers derive from it during one call."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.extra_mask: torch.Tensor | None = None  # prefix + virtual-token mask, for decoding steps
        self._stacks: dict[tuple[int, int], Any] = {}

    def for_batch(self, batch: int) -> list[str]:
        """Names for ``batch`` rows: generate repeats each row in place for beams and samples."""
        if batch % len(self.names):
            raise ValueError(f"adapter_names has {len(self.names)} entries for a batch of {batch} rows")
        return [name for name in self.names for _ in range(batch // len(self.names))]

    def groups(self, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Row indices of each adapter."""
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(self.for_batch(batch)):
            rows.setdefault(name, []).append(i)
        return {name: torch.tensor(index, device=device) for name, index in rows.items()}

    def held_delta(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """What ``layer`` adds for every row when this routing holds the layer's factors itself (a
        server's adapter slots: deltatune.serving.slots); None (here, always): the layer computes it."""
        return None

    def per_row(
        self, layer: nn.Module, store: Any, batch: int, device: torch.device, build: Callable[..., tuple]
    ) -> tuple | None:
        """``build(names, slots)``: a layer's per-row tensors from the batch's adapters that it holds
        in ``store`` (``slots``: each row's index into ``names``, counted from 1; 0 for none).
        None when no row uses this layer. Without gradients the result is kept for the call, so
        every decoding step reuses it."""
        key = (id(layer), batch)
        if key in self._stacks:
            return self._stacks[key]
        rows = self.for_batch(batch)
        names = [name for name in dict.fromkeys(rows) if name in store]
        result = None
        if names:
            slot_of = {name: i + 1 for i, name in enumerate(names)}
            slots = torch.tensor([slot_of.get(name, 0) for name in rows], device=device)
            result = build(names, slots)
        if not torch.is_grad_enabled():
            self._stacks[key] = result
        return result


Step = Callable[[dict[str, Any]], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Call:
    """What one call of a DeltaModel runs with.

    ``adapter``: the call's one adapter (``BASE_ADAPTER``: none; None: each layer's active adapter).
    ``rows``: a mixed batch, one adapter per row (layers that cannot split rows run as the base).
    ``step``/``model``: during generate, the change every forward of ``model`` gets to its inputs.
    ``state``: what methods derive from this call's inputs for its layers (HyperFormer: each row's
    task and the weights generated for them), private to the call; scopes nested in it share it.
    """

    adapter: str | None = None
    rows: RowAdapters | None = None
    step: Step | None = None
    model: nn.Module | None = None
    state: dict[Any, Any] | None = None


_CALL: ContextVar[Call | None] = ContextVar("deltatune_call", default=None)
EMPTY: dict[str, Any] = {f.name: None for f in dataclasses.fields(Call)}  # scope(**EMPTY): a clean call


# Scopes open now, in any thread, that route (name an adapter, rows or a decoding step). While there are none,
# every layer runs its active adapter without reading the ContextVar, which torch.compile cannot trace: a
# compiled model guards on this count instead, so the training path has no graph break.
_ROUTING = 0
_ROUTING_LOCK = threading.Lock()


def routed() -> bool:
    """Whether any thread has a scope open that names an adapter, rows or a decoding step."""
    return _ROUTING > 0


def current() -> Call | None:
    """The innermost call scope of this thread that routes (None outside any, or while none routes)."""
    return _CALL.get() if _ROUTING else None


def state() -> dict[Any, Any] | None:
    """The current call's private state (None outside a call scope that has one)."""
    call = _CALL.get()
    return None if call is None else call.state


def rows() -> RowAdapters | None:
    """The mixed batch this call runs, if any."""
    call = _CALL.get() if _ROUTING else None
    return None if call is None else call.rows


@contextlib.contextmanager
def scope(**changes: Any) -> Iterator[Call]:
    """Run the block with the current call changed by ``changes`` (fields of :class:`Call`)."""
    global _ROUTING
    call = dataclasses.replace(_CALL.get() or Call(), **changes)
    routes = call.adapter is not None or call.rows is not None or call.step is not None
    if routes:
        with _ROUTING_LOCK:
            _ROUTING += 1
    token = _CALL.set(call)
    try:
        yield call
    finally:
        _CALL.reset(token)
        if routes:
            with _ROUTING_LOCK:
                _ROUTING -= 1


# --- decoding steps: one forward pre-hook per model, registered once, reading the call scope -----
def _apply_step(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    call = _CALL.get()
    if call is None or call.step is None or call.model is not module:
        return None
    step = call.step
    token = _CALL.set(dataclasses.replace(call, step=None))  # forwards nested in this one are left alone
    try:
        return args, step(dict(kwargs))
    finally:
        _CALL.reset(token)


def install_step_hook(model: nn.Module) -> None:
    """Let generate's decoding steps of ``model`` read their input changes from the call scope
    (see :class:`Call`); idempotent. A forward outside such a scope is untouched."""
    if not any(hook is _apply_step for hook in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(_apply_step, with_kwargs=True)


def remove_step_hook(model: nn.Module) -> None:
    for key, hook in list(model._forward_pre_hooks.items()):
        if hook is _apply_step:
            del model._forward_pre_hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)
            getattr(model, "_forward_pre_hooks_always_called", {}).pop(key, None)
