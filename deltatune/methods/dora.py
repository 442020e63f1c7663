"""DoRA (Liu et al., 2024): LoRA with the weight split into a magnitude and a direction,

    W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖        (‖·‖: the norm of each output row)

``m`` (one number per output, peft's ``lora_magnitude_vector``) starts at ‖W0‖, so the model
starts as the base model. As in the paper (section 4.3) and in peft, the norm is a constant for
the gradient (detached), which lets the forward stay a LoRA forward plus two scalings per output:

    h = W'x + b = g ⊙ (W0·x + s·B·A·x) + b,    g = m / ‖W0 + s·B·A‖

The norm costs one (out × in) pass per call; while A, B and W0 do not change (inference, a
frozen base between optimizer steps) it is read from a cache keyed by the tensors' version
counters, so an in-place update (optimizer step, ``load_adapter``, hot-swap) invalidates it.
These helpers serve :class:`~deltatune.methods.lora.LoraLinear` (weights kept out×in here,
transposed for GPT-2's Conv1D) and :class:`~deltatune.methods.lora.LoraEmbedding` (whose
norm runs over the vocabulary, one magnitude per embedding dimension, as peft does).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def column_norm(weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """‖W + s·ΔW‖ along dim 1 (W out×in: one norm per output), without gradient."""
    with torch.no_grad():
        return torch.linalg.norm(weight + scaling * lora_weight, dim=1).to(weight.dtype)


def _stamp(tensors: tuple[torch.Tensor, ...]) -> tuple:
    """What changes when any tensor is replaced or written in place."""
    return tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)


class NormCache:
    """The detached DoRA norm per adapter, recomputed only when a tensor it depends on changed.

    Shared by threads: a stale read is impossible (the stamp is checked), a race only computes twice."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple, torch.Tensor]] = {}

    def get(self, name: str, tensors: tuple[torch.Tensor, ...], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return compute()
        stamp = _stamp(tensors)
        entry = self._entries.get(name)
        if entry is not None and entry[0] == stamp:
            return entry[1]
        value = compute()
        self._entries[name] = (stamp, value)
        return value

    def drop(self, name: str) -> None:
        self._entries.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def pop(self, name: str, default: object = None) -> object:
        """Forget adapter ``name``'s norm (as a dict does: a per-adapter value of its layer)."""
        entry = self._entries.pop(name, None)
        return default if entry is None else entry[1]


def merged_weight_delta(weight: torch.Tensor, lora_delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """W' − W0 for a weight W0 (out×in) and the scaled LoRA delta s·B·A (out×in): what merging adds."""
    factor = (magnitude / column_norm(weight, lora_delta, 1.0)).view(-1, 1)
    return (factor - 1) * weight + factor * lora_delta


class KeepsMergedDelta:
    """merge/unmerge for a layer that may hold DoRA adapters (put before DeltaLayer in the bases):
    DoRA's delta depends on W0, which W0 + delta no longer gives back, so unmerge subtracts the
    very delta merge added."""

    merged_delta: torch.Tensor | None = None
    lora_magnitude_vector: dict
    merged_adapter: str | None
    base_layer: torch.nn.Module

    def merge(self, name: str) -> None:
        if name not in self.lora_magnitude_vector or self.merged_adapter == name:
            return super().merge(name)
        self.unmerge()
        delta = self.delta_weight(name).detach()
        with torch.no_grad():
            self.base_layer.weight += delta.to(self.base_layer.weight.dtype)
        self.merged_delta, self.merged_adapter = delta, name

    def unmerge(self) -> None:
        if self.merged_delta is None:
            return super().unmerge()
        with torch.no_grad():
            self.base_layer.weight -= self.merged_delta.to(self.base_layer.weight.dtype)
        self.merged_delta, self.merged_adapter = None, None
