"""The one computation every sparse pattern shares: queries grouped into blocks, each block attending
to its own short list of keys, all blocks in one batched SDPA call.

A pattern says *which* positions meet with index tables (``q_idx``: the query positions of each
block, ``k_idx``: the key positions that block may see, -1 for padding) and a ``rule(qpos, kpos)``
that keeps the allowed pairs. Cost is O(n * keys per block), never O(n^2): the dense n x n mask is
only built for short query runs (decoding with a KV cache) and for pictures and tests.
On CUDA (without dropout) the same rule goes to FlexAttention as a BlockMask instead (``flex_sdpa``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

Rule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(b, h_kv, n, d) -> (b, heads, n, d) for grouped-query attention (a view while it can be)."""
    b, h_kv, n, d = x.shape
    if h_kv == heads:
        return x
    return x[:, :, None].expand(b, h_kv, heads // h_kv, n, d).reshape(b, heads, n, d)


def as_bool_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """transformers hands masks over as bool (True = attend) or additive floats; we keep bools."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def dense_allowed(
    rule: Rule, q_len: int, kv_len: int, causal: bool, device: torch.device | None = None
) -> torch.Tensor:
    """The (q_len, kv_len) bool matrix of a rule, the queries being the last q_len positions."""
    qpos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    kpos = torch.arange(kv_len, device=device)[None, :]
    allowed = rule(qpos, kpos)
    if causal:
        allowed = allowed & (kpos <= qpos)
    return allowed


def dense_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """SDPA with an explicit mask: the reference, and the path for a few queries over a KV cache."""
    if mask is not None:
        allowed = allowed & mask
    allowed = allowed | ~allowed.any(-1, keepdim=True)  # a row with no key (padding) stays finite
    key, value = repeat_kv(key, query.shape[1]), repeat_kv(value, query.shape[1])
    return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, dropout_p=dropout, scale=scale)


def _gather_mask(mask: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
    """The given (b, 1|h, q|1, kv) mask at each block's (query, key) pairs: (b, 1|h, blocks, c|1, kw)."""
    qi, ki = q_idx.clamp(min=0), k_idx.clamp(min=0)
    if mask.shape[2] == 1:  # a key (padding) mask: the same for every query
        return mask[:, :, 0][:, :, ki][:, :, :, None, :]
    return mask[:, :, qi[:, :, None], ki[:, None, :]]


def block_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    rule: Rule,
    causal: bool,
    scale: float | None,
    mask: torch.Tensor | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention of query blocks ``q_idx`` (blocks, c) to key lists ``k_idx`` (blocks, kw).

    query (b, h, n, d); key/value (b, h_kv, n, d). Each real position must appear exactly once in
    ``q_idx``. Returns (b, h, n, d): position p's output is row p, whatever block it sat in. The
    blocks go into SDPA's batch dimension (4-D inputs keep torch's fused CPU kernel, which never
    materialises the scores), and key/value heads stay shared under grouped-query attention.
    """
    if query.is_cuda and dropout == 0.0:
        return flex_sdpa(query, key, value, rule, causal, scale, mask)
    b, h, n, d = query.shape
    blocks, c = q_idx.shape
    qpos, kpos = q_idx[:, :, None], k_idx[:, None, :]
    allowed = (kpos >= 0) & rule(qpos, kpos)
    if causal:
        allowed = allowed & (kpos <= qpos)
    allowed = allowed[None, :, None]  # (1, blocks, 1, c, kw)
    if mask is not None:
        allowed = allowed & _gather_mask(mask, q_idx, k_idx).transpose(1, 2)
    allowed = allowed | ~allowed.any(-1, keepdim=True)  # padding rows: finite garbage, dropped below
    allowed = allowed.expand(b, blocks, allowed.shape[2], c, k_idx.shape[1])
    qb = _blocked(query, q_idx)
    kb, vb = _blocked(key, k_idx), _blocked(value, k_idx)
    out = F.scaled_dot_product_attention(
        qb,
        kb,
        vb,
        attn_mask=allowed.reshape(b * blocks, *allowed.shape[2:]),
        dropout_p=dropout,
        scale=scale,
        enable_gqa=key.shape[1] != h,
    )
    out = out.view(b, blocks, h, c, d).transpose(1, 2).reshape(b, h, blocks * c, d)
    return out[:, :, _inverse(q_idx, n)]


def flex_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rule: Rule,
    causal: bool,
    scale: float | None,
    mask: torch.Tensor | None = None,
    compiled: bool = True,
) -> torch.Tensor:
    """The same attention through FlexAttention (the CUDA path): the pattern's rule, causality and the
    padding mask become one ``mask_mod``, its BlockMask lets the kernel skip every tile the pattern leaves
    empty. ``compiled=False`` runs FlexAttention's eager reference (CPU tests: forward only)."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, h, n, _ = query.shape

    def mask_mod(bi: torch.Tensor, hi: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
        ok = rule(qi, ki)
        if causal:
            ok = ok & (ki <= qi)
        if mask is not None:
            ok = ok & mask[bi, hi if mask.shape[1] > 1 else 0, qi if mask.shape[2] > 1 else 0, ki]
        return ok

    block_mask = create_block_mask(
        mask_mod, B=b if mask is not None else None, H=h, Q_LEN=n, KV_LEN=key.shape[2], device=query.device
    )
    attend = _compiled_flex() if compiled else _flex()
    return attend(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=key.shape[1] != h)


def _flex() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


@functools.cache
def _compiled_flex() -> Callable[..., torch.Tensor]:
    """FlexAttention only fuses (and skips empty tiles) when compiled; compiled once per process."""
    return torch.compile(_flex(), dynamic=False)


def _blocked(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (b, h, n, d) at positions idx (blocks, w) -> (b * blocks, h, w, d), blocks in the batch."""
    b, h, _, d = x.shape
    return x.transpose(1, 2)[:, idx.clamp(min=0)].transpose(2, 3).reshape(b * idx.shape[0], h, idx.shape[1], d)


def _inverse(q_idx: torch.Tensor, n: int) -> torch.Tensor:
    """Where each position 0..n-1 sits in the flattened blocks."""
    flat = q_idx.reshape(-1)
    slots = torch.arange(flat.numel(), device=flat.device)
    keep = flat >= 0
    inverse = torch.empty(n, dtype=torch.long, device=flat.device)
    inverse[flat[keep]] = slots[keep]
    return inverse


def chunk_positions(n: int, size: int, device: torch.device | None = None) -> torch.Tensor:
    """0..n-1 as (ceil(n/size), size) blocks, the last one padded with -1."""
    blocks = -(-n // size)
    idx = torch.arange(blocks * size, device=device)
    return torch.where(idx < n, idx, -1).view(blocks, size)


def with_neighbours(blocks: torch.Tensor, before: int = 1, after: int = 0) -> torch.Tensor:
    """Each block's keys: the ``before`` blocks before it, itself and the ``after`` blocks after (-1 beyond)."""
    fill = blocks.new_full((before, blocks.shape[1]), -1)
    tail = blocks.new_full((after, blocks.shape[1]), -1)
    padded = torch.cat([fill, blocks, tail])
    m = blocks.shape[0]
    return torch.cat([padded[i : i + m] for i in range(before + after + 1)], dim=1)


def head_slice(call, heads: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One head group's query, key, value and mask (key/value heads shared under grouped-query attention)."""
    h = call.query.shape[1]
    rep = h // call.key.shape[1]
    if heads.start % rep == 0 and heads.stop % rep == 0:
        kv = slice(heads.start // rep, heads.stop // rep)
        k, v = call.key[:, kv], call.value[:, kv]
    else:  # the group boundary falls inside a key/value head
        k, v = repeat_kv(call.key, h)[:, heads], repeat_kv(call.value, h)[:, heads]
    mask = call.mask
    if mask is not None and mask.shape[1] > 1:
        mask = mask[:, heads]
    return call.query[:, heads], k, v, mask
