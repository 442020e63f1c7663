"""Differences between the transformers releases deltatune supports, in one place.

transformers 5.24 renamed the forward argument that carries the KV cache from ``past_key_values``
to ``cache`` (the old name is deprecated, and ignored when both are given). Code that reads or
hands a model its cache goes through these helpers, so it works with either name.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn

CACHE_NAMES = ("cache", "past_key_values")


@functools.cache
def _cache_key_of(model_type: type) -> str:
    params = inspect.signature(model_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_key(model: nn.Module) -> str:
    """The name under which ``model``'s forward takes its KV cache."""
    return _cache_key_of(type(model))


def get_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache among a forward's keyword arguments, under either name (None if absent)."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def set_cache(kwargs: dict[str, Any], model: nn.Module, cache: Any) -> None:
    """Hand ``cache`` to ``model`` under the name it takes, dropping the other spelling."""
    pop_cache(kwargs)
    kwargs[cache_key(model)] = cache


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove the cache from a forward's keyword arguments (both spellings); return it."""
    found = get_cache(kwargs)
    for name in CACHE_NAMES:
        kwargs.pop(name, None)
    return found


def output_cache(output: Any) -> Any:
    """The cache a forward returned (``output.cache`` from 5.24 on, ``past_key_values`` before)."""
    for name in CACHE_NAMES:
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None
