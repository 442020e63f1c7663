"""Longformer's sliding window (Beltagy et al., 2020): each query sees the ``window`` nearest keys,
with gaps of ``dilation`` on some head groups, plus ``global_tokens`` (e.g. [CLS]) that see and are
seen by every position.

Causal models follow transformers' ``sliding_window`` convention: query i sees itself and the
window - 1 keys before it (spaced ``dilation`` apart). Encoders follow the paper: ``window // 2`` keys
on each side (Longformer's "1/2 w tokens on each side"; w + 1 keys in all for an even w, as
transformers' LongformerModel).
A dilated head group is a plain window over each residue class mod ``dilation``, so all heads run
as blocks of ``window`` queries over 2 (causal) or 3 blocks of keys: O(n * window).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from deltatune.attention.blocks import (
    block_sdpa,
    chunk_positions,
    dense_allowed,
    dense_sdpa,
    head_slice,
    with_neighbours,
)
from deltatune.attention.registry import Call, Pattern, head_groups, positive, register
from deltatune.config import ConfigError


@dataclasses.dataclass
class SlidingWindowOptions:
    window: int = 512
    """keys each query sees (causal: itself and window-1 before; encoders: window//2 on each side, as Longformer)"""
    dilation: list[int] = dataclasses.field(default_factory=lambda: [1])
    """gap between attended keys, one entry per head group (heads split evenly), e.g. 1 1 2 4"""
    global_tokens: int = 0
    """the first N positions attend to all and are attended by all (causal: every query sees them)"""

    def __post_init__(self) -> None:
        positive(self.window, "sliding_window: --window")
        if not self.dilation or not all(isinstance(d, int) and d >= 1 for d in self.dilation):
            raise ConfigError(f"sliding_window: --dilation takes whole numbers >= 1, got {self.dilation!r}")
        if not isinstance(self.global_tokens, int) or self.global_tokens < 0:
            raise ConfigError(f"sliding_window: --global-tokens must be 0 or more, got {self.global_tokens!r}")


def rule(options: SlidingWindowOptions, causal: bool, dilation: int):
    span = (options.window - 1 if causal else options.window // 2) * dilation

    def allowed(qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        gap = qpos - kpos
        near = (gap.abs() <= span) & (gap % dilation == 0)
        if causal:
            return near | (kpos < options.global_tokens)
        return near | (kpos < options.global_tokens) | (qpos < options.global_tokens)

    return allowed


def allowed(n: int, options: SlidingWindowOptions, causal: bool, head: int = 0, heads: int = 1) -> torch.Tensor:
    """Which keys each query sees, for head ``head`` of ``heads``."""
    group = head * len(options.dilation) // heads
    return dense_allowed(rule(options, causal, options.dilation[group]), n, n, causal)


@functools.lru_cache(maxsize=64)
def _tables(n: int, window: int, dilation: int, global_tokens: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of ``window`` queries from one residue class mod dilation, and the keys near them."""
    q_blocks, k_blocks = [], []
    for r in range(min(dilation, n)):
        members = torch.arange(r, n, dilation)
        chunks = chunk_positions(len(members), window)
        q = torch.where(chunks >= 0, members[chunks.clamp(min=0)], -1)
        keys = with_neighbours(q, before=1, after=0 if causal else 1)
        q_blocks.append(q)
        k_blocks.append(torch.where(keys < global_tokens, -1, keys))  # globals come once, in front
    q_idx, k_idx = torch.cat(q_blocks), torch.cat(k_blocks)
    if global_tokens:
        front = torch.arange(min(global_tokens, n)).expand(k_idx.shape[0], -1)
        k_idx = torch.cat([front, k_idx], dim=1)
    return q_idx, k_idx


def forward(call: Call) -> torch.Tensor:
    opts: SlidingWindowOptions = call.options
    h, n = call.query.shape[1], call.query.shape[2]
    outs = []
    groups = head_groups(h, len(opts.dilation), "sliding_window --dilation")
    for heads, dilation in zip(groups, opts.dilation, strict=True):
        q, k, v, mask = head_slice(call, heads)
        keep = rule(opts, call.causal, dilation)
        if call.decoding:
            allowed_ = dense_allowed(keep, q.shape[2], k.shape[2], call.causal, q.device)
            outs.append(dense_sdpa(q, k, v, allowed_, mask, call.scale, call.dropout))
            continue
        q_idx, k_idx = (t.to(q.device) for t in _tables(n, opts.window, dilation, opts.global_tokens, call.causal))
        out = block_sdpa(q, k, v, q_idx, k_idx, keep, call.causal, call.scale, mask, call.dropout)
        if opts.global_tokens and not call.causal:  # global queries see every key
            g = min(opts.global_tokens, n)
            row_mask = None if mask is None else mask[:, :, :g]
            full = torch.ones(g, n, dtype=torch.bool, device=q.device)
            top = dense_sdpa(q[:, :, :g], k, v, full, row_mask, call.scale, call.dropout)
            out = torch.cat([top, out[:, :, g:]], dim=2)
        outs.append(out)
    return torch.cat(outs, dim=1)


register(
    Pattern(
        name="sliding_window",
        options_class=SlidingWindowOptions,
        forward=forward,
        allowed=allowed,
        summary="Longformer: a window of nearby keys, dilated per head group, plus global tokens; O(n*w)",
    )
)
