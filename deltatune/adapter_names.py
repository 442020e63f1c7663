"""What an adapter may be called: the one place that owns the rules, for the library
(``DeltaModel.add_adapter``, before anything is wrapped) and the server (names in requests and folders).

A name is letters, digits, '_' or '-'; it is not ``__base__`` (a call's "no adapter") nor the served
base model's name; and it is no attribute of ``nn.ModuleDict``, since layers keep each adapter's
tensors in such dicts under its name (an adapter called ``keys`` would shadow the dict's method).
"""

from __future__ import annotations

from collections.abc import Collection

from torch import nn

from deltatune.constants import BASE_ADAPTER, valid_name

RESERVED = frozenset(n for n in dir(nn.ModuleDict) if not n.startswith("__"))  # names layers' dicts already use


def name_problem(name: object, base_name: str | None = None, taken: Collection[str] = ()) -> str | None:
    """Why ``name`` cannot name a new adapter (None: it can); ``taken``: the adapters there are."""
    if not valid_name(name):
        return f"adapter name {name!r} must be letters, digits, '_' or '-'"
    if name in (base_name, BASE_ADAPTER):
        return f"adapter name {name!r} is the base model's (no adapter); pick another"
    if name in RESERVED:
        return f"adapter name {name!r} is reserved (a method name of the layers' adapter tables); pick another"
    if name in taken:
        return f"adapter {name!r} already exists; delete_adapter it first or pick another name"
    return None


def check_name(name: object, taken: Collection[str] = ()) -> None:
    """Raise ValueError saying why ``name`` cannot name a new adapter beside ``taken``."""
    problem = name_problem(name, taken=taken)
    if problem is not None:
        raise ValueError(problem)
