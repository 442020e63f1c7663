"""Linformer (Wang et al., 2020): self-attention is nearly low rank, so keys and values are projected
from n rows to k (E K, F V) and every query attends to those k rows: O(n k) time and memory.

E and F (k x max_len, one pair per attention layer, shared by its heads) are trainable modules
named ``linformer``: put that name in an adapter's ``modules_to_save`` (the trainer does) and they
are saved and loaded with it. They start as mean pooling over k equal segments of the max_len grid.

The paper fixes n. An input of n < max_len positions is stretched onto the max_len grid by nearest
neighbour (grid column u holds position floor(u n / max_len)), so it is projected as
``E_n = E S_n`` with S_n the 0/1 stretch matrix: each of the k rows still covers its share of the
input (not the first n*k/max_len rows only, as cutting E to its first n columns would), and with
the initial pooling k = n is exactly the identity, i.e. full attention, at every n. Padded positions
are zeroed and projected rows that cover no real position are masked out.

Encoders only: projecting the n positions onto k rows mixes past and future, and there is no clear
way to mask that for a decoder.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.attention.registry import Call, Pattern, positive, register

REASON = (
    "Linformer projects the n keys and values onto k rows, mixing past and future positions, so it is "
    "unclear how to mask it for a decoder (a causal model); use sliding_window, blockwise, lsh or s2 there"
)


@dataclasses.dataclass
class LinformerOptions:
    k: int = 64
    """rows the keys and values are projected to (k = sequence length with the initial projections: exact)"""

    trainable_modules: ClassVar[tuple[str, ...]] = ("linformer",)

    def __post_init__(self) -> None:
        positive(self.k, "linformer: --k")


def pooling(k: int, length: int) -> torch.Tensor:
    """(k, length): row j averages positions [j*length/k, (j+1)*length/k); the identity when k = length."""
    segment = torch.arange(length) * k // length
    weights = (segment[None, :] == torch.arange(k)[:, None]).float()
    return weights / weights.sum(1, keepdim=True).clamp(min=1)


def fitted(weight: torch.Tensor, n: int) -> torch.Tensor:
    """(k, max_len) -> (k, n): ``weight @ S_n``, the columns of the grid positions each input position
    is stretched over added up (``index_add``: O(k * max_len), differentiable)."""
    max_len = weight.shape[1]
    if n == max_len:
        return weight
    cols = torch.arange(max_len, device=weight.device) * n // max_len
    return weight.new_zeros(weight.shape[0], n).index_add(1, cols, weight)


class LinformerProjection(nn.Module):
    """E and F of one attention layer."""

    def __init__(self, k: int, max_len: int) -> None:
        super().__init__()
        self.E = nn.Parameter(pooling(k, max_len))
        self.F = nn.Parameter(pooling(k, max_len))

    def forward(
        self, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """key/value (b, h, n, d), keep (b, n) real positions -> (E K, F V, which of the k rows are real)."""
        n = key.shape[2]
        if n > self.E.shape[1]:
            raise ValueError(
                f"linformer: {n} tokens exceed the projections' {self.E.shape[1]} (max_position_embeddings)"
            )
        e, f = fitted(self.E, n), fitted(self.F, n)
        real = torch.ones(key.shape[0], n, dtype=key.dtype, device=key.device) if keep is None else keep.to(key.dtype)
        key, value = key * real[:, None, :, None], value * real[:, None, :, None]
        covered = (e.detach().abs() @ real.T).T > 0  # (b, k)
        return torch.einsum("kn,bhnd->bhkd", e, key), torch.einsum("kn,bhnd->bhkd", f, value), covered


def forward(call: Call) -> torch.Tensor:
    projection = getattr(call.module, "linformer", None)
    if projection is None:
        raise RuntimeError("linformer: this attention layer has no projections; call set_attention(model, 'linformer')")
    keep = None if call.mask is None else call.mask[:, 0].any(1)
    key, value, covered = projection(call.key, call.value, keep)
    return F.scaled_dot_product_attention(
        call.query,
        key,
        value,
        attn_mask=covered[:, None, None, :],
        dropout_p=call.dropout,
        scale=call.scale,
        enable_gqa=key.shape[1] != call.query.shape[1],
    )


def install(model: nn.Module, options: LinformerOptions) -> list[str]:
    from deltatune.attention import _is_attention

    max_len = model.config.max_position_embeddings
    names = []
    for name, module in model.named_modules():
        if _is_attention(module):
            module.linformer = LinformerProjection(options.k, max_len).to(next(module.parameters()))
            names.append(f"{name}.linformer")
    return names


def uninstall(model: nn.Module) -> None:
    for module in list(model.modules()):
        if "linformer" in module._modules:
            del module._modules["linformer"]


def allowed(n: int, options: LinformerOptions, causal: bool, head: int = 0, heads: int = 1) -> torch.Tensor:
    """(k, n): which input positions feed each projected key row at the initial projections, n = max_len."""
    return pooling(options.k, n) > 0


register(
    Pattern(
        name="linformer",
        options_class=LinformerOptions,
        forward=forward,
        allowed=allowed,
        summary="Linformer: keys and values projected from n rows to k (trainable E, F); O(n*k); encoders",
        encoder_only=True,
        encoder_reason=REASON,
        install=install,
        uninstall=uninstall,
    )
)
