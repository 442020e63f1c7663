"""Blockwise self-attention (Qiu et al., 2020): the n x n matrix cut into m x m blocks, each query
block attending to one key block, a different block pattern per head group.

A head group's pattern is a shift s: in encoders query block i sees key block (i + s) mod m (the
lecture's permutations (1,2,3), (2,3,1), (3,1,2) are shifts 0, 1, 2). In causal models query block
i sees its own block causally, and with s > 0 also all of block i - s (our extension: the paper is
for encoders). Cost O(n * block_size).

Padding: the paper's sequence is a row's real tokens. In encoders each row's blocks and its
permutation are counted over its own tokens (the key mask's kept positions, in order; m = its own
block count), so a row comes out as when it runs alone, however and wherever it is padded. Rows of
one length share one blocked call. Causal blocks are counted from position 0 of the padded row:
exact with right padding; left padding moves the block boundaries by the padding's length.
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
        if not call.causal and mask is not None and mask.shape[1:3] == (1, 1) and not call.decoding:
            outs.append(_encoder_rows(q, k, v, mask[:, 0, 0], opts.block_size, shift, call))
            continue
        if call.decoding:
            allowed_ = dense_allowed(keep, q.shape[2], n, call.causal, q.device)
            outs.append(dense_sdpa(q, k, v, allowed_, mask, call.scale, call.dropout))
            continue
        q_idx, k_idx = (t.to(q.device) for t in _tables(n, opts.block_size, shift, call.causal))
        outs.append(block_sdpa(q, k, v, q_idx, k_idx, keep, call.causal, call.scale, mask, call.dropout))
    return torch.cat(outs, dim=1)


def _encoder_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, block: int, shift: int, call: Call
) -> torch.Tensor:
    """Encoder blocks over each row's own tokens: the kept positions of ``keys`` (b, n) gathered in
    order to the front, rows of one token count blocked together with that count's tables, and the
    results put back at their positions (padding positions get zeros, which nothing reads)."""
    b, h, n, d = q.shape
    counts = keys.sum(-1)
    order = torch.argsort((~keys).to(torch.int8), dim=-1, stable=True)  # kept positions first, in order
    out = q.new_zeros(b, h, n, d)
    for count in counts.unique().tolist():
        if count == 0:
            continue
        rows = (counts == count).nonzero().squeeze(1)
        where = order[rows, :count][:, None, :, None]  # (r, 1, count, 1)

        def take(x: torch.Tensor, where: torch.Tensor = where, rows: torch.Tensor = rows) -> torch.Tensor:
            return x[rows].gather(2, where.expand(-1, x.shape[1], -1, d))

        q_idx, k_idx = (t.to(q.device) for t in _tables(count, block, shift, False))
        keep = rule(count, block, shift, False)
        res = block_sdpa(take(q), take(k), take(v), q_idx, k_idx, keep, False, call.scale, None, call.dropout)
        placed = q.new_zeros(len(rows), h, n, d).scatter(2, where.expand(-1, h, -1, d), res)
        out = out.index_copy(0, rows, placed)
    return out


register(
    Pattern(
        name="blockwise",
        options_class=BlockwiseOptions,
        forward=forward,
        allowed=allowed,
        summary="BlockBERT: each query block sees one key block, a block shift per head group; O(n*b)",
    )
)
