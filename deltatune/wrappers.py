"""Modules that stand in for another one: finding the original inside, swapping one in place, and
reading attributes through to the original. A bottom floor: it imports nothing of deltatune.

A *wrapper* is any module with a ``base_layer`` module inside (deltatune's DeltaLayers, and peft's
tuner layers too): it stands for that module wherever the model's code looks for it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

from torch import nn


@runtime_checkable
class Wrapper(Protocol):
    """A module that wraps ``base_layer`` and stands for it."""

    base_layer: nn.Module


def is_wrapper(module: nn.Module) -> bool:
    return isinstance(getattr(module, "base_layer", None), nn.Module)


def base_of(module: nn.Module) -> nn.Module:
    """The module a wrapper stands for (itself when it wraps nothing)."""
    base = getattr(module, "base_layer", None)
    return base if isinstance(base, nn.Module) else module


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``name`` is in ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class ForwardsAttributes:
    """Attributes a wrapper lacks are read from the module it wraps (``forwards_to``): the model's
    code reads attributes of the modules it built (an embedding's ``weight`` and ``padding_idx``, an
    attention's ``layer_idx``, a block's ``attention_type``, a model's ``config``...).

    Mixed into an ``nn.Module`` subclass before ``nn.Module``. The wrapped module's own name and the
    ``adapter_attrs`` of a DeltaLayer are never forwarded (they exist once ``__init__`` has run).
    """

    forwards_to: ClassVar[str] = "base_layer"

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # type: ignore[misc]  # nn.Module's: parameters, buffers, modules
        except AttributeError:
            target = type(self).forwards_to
            if name == target or name in getattr(type(self), "adapter_attrs", ()):
                raise
            return getattr(super().__getattr__(target), name)  # type: ignore[misc]
