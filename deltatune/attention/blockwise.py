"""Blockwise self-attention (Qiu et al., 2020): the n x n matrix cut into m x m blocks, each query
block attending to one key block, a different block pattern per head group.

A head group's pattern is a shift s: in encoders query block i sees key block (i + s) mod m (the
lecture's permutations (1,2,3), (2,3,1), (3,1,2) are shifts 0, 1, 2). In causal models query block
i sees its own block causally, and with s > 0 also all of block i - s (our extension: the paper is
for encoders). Cost O(n * block_size).

In a padded batch the encoder permutation is over the blocks of the padded length, as in BlockBERT
(which pads every input to its fixed length): with a shift, a row's result depends on how far it is
padded, and a block whose partner block is all padding has no key to see.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from deltatune.attention.blocks import block_sdpa, chunk_positions, dense_allowed, dense_sdpa, head_slice
from deltatune.attention.registry import Call, Pattern, head_groups, positive, register
from deltatune.config import ConfigError


@dataclasses.dataclass
class BlockwiseOptions:
    block_size: int = 512
    """tokens per block (the last block may be shorter)"""
    block_shifts: list[int] = dataclasses.field(default_factory=lambda: [0])
    """one block pattern per head group (heads split evenly): query block i sees key block i+s (encoders,
    mod the block count) or its own block and block i-s (causal); e.g. 0 1 for half the heads each"""

    def __post_init__(self) -> None:
        positive(self.block_size, "blockwise: --block-size")
        if not self.block_shifts or not all(isinstance(s, int) and s >= 0 for s in self.block_shifts):
            raise ConfigError(f"blockwise: --block-shifts takes whole numbers >= 0, got {self.block_shifts!r}")


def rule(n: int, block: int, shift: int, causal: bool):
    blocks = -(-n // block)

    def allowed(qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        qb, kb = qpos // block, kpos // block
        if causal:
            return (kb == qb) | ((kb == qb - shift) & (shift > 0))
        return kb == (qb + shift) % blocks

    return allowed


def allowed(n: int, options: BlockwiseOptions, causal: bool, head: int = 0, heads: int = 1) -> torch.Tensor:
    shift = options.block_shifts[head * len(options.block_shifts) // heads]
    return dense_allowed(rule(n, options.block_size, shift, causal), n, n, causal)


@functools.lru_cache(maxsize=64)
def _tables(n: int, block: int, shift: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    q_idx = chunk_positions(n, block)
    if not causal:
        return q_idx, q_idx.roll(-shift, dims=0)
    if shift == 0:
        return q_idx, q_idx
    earlier = torch.cat([q_idx.new_full((min(shift, len(q_idx)), block), -1), q_idx])[: len(q_idx)]
    return q_idx, torch.cat([earlier, q_idx], dim=1)


def forward(call: Call) -> torch.Tensor:
    opts: BlockwiseOptions = call.options
    h = call.query.shape[1]
    outs = []
    groups = head_groups(h, len(opts.block_shifts), "blockwise --block-shifts")
    for heads, shift in zip(groups, opts.block_shifts, strict=True):
        q, k, v, mask = head_slice(call, heads)
        n = k.shape[2]
        keep = rule(n, opts.block_size, shift, call.causal)
        if call.decoding:
            allowed_ = dense_allowed(keep, q.shape[2], n, call.causal, q.device)
            outs.append(dense_sdpa(q, k, v, allowed_, mask, call.scale, call.dropout))
            continue
        q_idx, k_idx = (t.to(q.device) for t in _tables(n, opts.block_size, shift, call.causal))
        outs.append(block_sdpa(q, k, v, q_idx, k_idx, keep, call.causal, call.scale, mask, call.dropout))
    return torch.cat(outs, dim=1)


register(
    Pattern(
        name="blockwise",
        options_class=BlockwiseOptions,
        forward=forward,
        allowed=allowed,
        summary="BlockBERT: each query block sees one key block, a block shift per head group; O(n*b)",
    )
)
