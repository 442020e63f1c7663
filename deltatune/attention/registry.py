"""What an attention pattern is, written down: one :class:`Pattern` record per pattern, registered
by the pattern's own file with one ``register(Pattern(...))`` line (as deltatune.methods.contract
does for methods).

    Pattern(name, options_class, forward, allowed, encoder_only, install, summary)

* ``forward(call) -> (b, h, n, d)`` computes the attention of one :class:`Call` (the tensors and
  what transformers said about them; nothing of a call is ever stored on a module).
* ``allowed(n, options, causal, head) -> (n, n) bool``: which key positions each query position
  sees, for head ``head``. The same function drives the pictures in docs/attention/ and the tests
  that compare ``forward`` with dense SDPA under this mask, so picture and code cannot disagree.
  None for data-dependent patterns (LSH), which offer their own.
* ``encoder_only``: a causal model is refused with the pattern's ``encoder_reason``.
* ``install(model, options) -> [module names]`` adds the pattern's own trainable modules (Linformer's
  projections, Perceiver's latents); the names go to an adapter's ``modules_to_save`` so they are
  saved and loaded with it. ``uninstall(model)`` takes them out again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deltatune.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Call:
    """One attention call: heads-first tensors (query (b, h, q, d), key/value (b, h_kv, kv, d))."""

    module: nn.Module
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None  # bool (b, 1|h, q, kv), True = attend; None = no padding
    causal: bool
    scale: float | None
    dropout: float
    options: Any

    @property
    def decoding(self) -> bool:
        """A few new queries over a longer KV cache: the dense path is cheap and exact there."""
        return self.query.shape[2] != self.key.shape[2]


@dataclasses.dataclass(frozen=True)
class Pattern:
    name: str
    options_class: type
    forward: Callable[[Call], torch.Tensor]
    allowed: Callable[..., torch.Tensor] | None
    summary: str
    encoder_only: bool = False
    encoder_reason: str = ""
    install: Callable[[nn.Module, Any], list[str]] | None = None
    uninstall: Callable[[nn.Module], None] | None = None

    def __post_init__(self) -> None:
        if not dataclasses.is_dataclass(self.options_class):
            raise TypeError(f"pattern {self.name!r}: options_class must be a dataclass")
        if self.encoder_only and not self.encoder_reason:
            raise TypeError(f"pattern {self.name!r} is encoder-only but gives no reason for causal models")
        if (self.install is None) != (self.uninstall is None):
            raise TypeError(f"pattern {self.name!r}: install and uninstall come together")


_PATTERNS: dict[str, Pattern] = {}


def register(pattern: Pattern) -> Pattern:
    taken = _PATTERNS.get(pattern.name)
    if taken is not None and taken != pattern:
        raise ConfigError(f"an attention pattern named {pattern.name!r} is already registered")
    _PATTERNS[pattern.name] = pattern
    return pattern


def registered() -> tuple[Pattern, ...]:
    return tuple(_PATTERNS.values())


def pattern_named(name: str) -> Pattern:
    if name not in _PATTERNS:
        raise ConfigError(f"unknown attention pattern {name!r}; choose sdpa or one of: {', '.join(_PATTERNS)}")
    return _PATTERNS[name]


def head_groups(heads: int, groups: int, what: str) -> list[slice]:
    """Heads split into ``groups`` equal runs, one per entry of a per-head-group option."""
    if groups < 1 or heads % groups:
        raise ConfigError(f"{what}: {groups} head groups do not split {heads} attention heads evenly; give a divisor")
    size = heads // groups
    return [slice(i * size, (i + 1) * size) for i in range(groups)]


def positive(value: int | None, what: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{what} must be a positive whole number, got {value!r}")
