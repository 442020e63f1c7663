"""LongLoRA's shifted sparse attention, S2-Attn (Chen et al., 2023), for fine-tuning on long inputs:
in training, tokens attend within groups of ``group_size``; half the heads use groups shifted by half
a group, so information flows between neighbouring groups. In evaluation (``model.eval()``) it is
full attention: train sparse, infer dense, as LongLoRA does.

Causality is by true position, so the shifted group that wraps around (the last tokens with the
first ones) never lets an early token see a later one. Cost in training O(n * group_size).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F

from deltatune.attention.blocks import block_sdpa, chunk_positions, dense_allowed, dense_sdpa, repeat_kv
from deltatune.attention.registry import Call, Pattern, positive, register


@dataclasses.dataclass
class S2Options:
    group_size: int | None = None
    """tokens per attention group while training (default: a quarter of the sequence, LongLoRA's choice)"""

    def __post_init__(self) -> None:
        positive(self.group_size, "s2: --group-size", allow_none=True)


def group_size(options: S2Options, n: int) -> int:
    return options.group_size or max(1, n // 4)


def rule(n: int, group: int, shifted: bool):
    half = group // 2 if shifted else 0
    padded = -(-n // group) * group

    def allowed(qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        return (qpos - half) % padded // group == (kpos - half) % padded // group

    return allowed


def allowed(n: int, options: S2Options, causal: bool, head: int = 0, heads: int = 1) -> torch.Tensor:
    """Training-time pattern: the first half of the heads plain groups, the second half shifted."""
    return dense_allowed(rule(n, group_size(options, n), head >= heads // 2), n, n, causal)


@functools.lru_cache(maxsize=64)
def _tables(n: int, group: int, shifted: bool) -> torch.Tensor:
    idx = chunk_positions(n, group).reshape(-1)
    return idx.roll(-(group // 2) if shifted else 0).view(-1, group)


def forward(call: Call) -> torch.Tensor:
    q, k, v = call.query, call.key, call.value
    if not call.module.training or call.decoding:
        h = q.shape[1]
        if call.mask is None and not call.decoding:
            return F.scaled_dot_product_attention(
                q, repeat_kv(k, h), repeat_kv(v, h), dropout_p=call.dropout, scale=call.scale, is_causal=call.causal
            )
        allowed_ = dense_allowed(lambda a, b: a == a, q.shape[2], k.shape[2], call.causal, q.device)
        return dense_sdpa(q, k, v, allowed_, call.mask, call.scale, call.dropout)
    h, n = q.shape[1], q.shape[2]
    g = group_size(call.options, n)
    k, v = repeat_kv(k, h), repeat_kv(v, h)
    mask = call.mask
    outs = []
    for heads, shifted in ((slice(0, h // 2), False), (slice(h // 2, h), True)):
        m = mask[:, heads] if mask is not None and mask.shape[1] > 1 else mask
        idx = _tables(n, g, shifted).to(q.device)
        keep = rule(n, g, shifted)
        outs.append(
            block_sdpa(q[:, heads], k[:, heads], v[:, heads], idx, idx, keep, call.causal, call.scale, m, call.dropout)
        )
    return torch.cat(outs, dim=1)


register(
    Pattern(
        name="s2",
        options_class=S2Options,
        forward=forward,
        allowed=allowed,
        summary="LongLoRA S2-Attn: attention in groups, half the heads shifted, while training; full at inference",
    )
)
