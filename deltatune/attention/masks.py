"""The attention mask our patterns get from transformers (registered with ``AttentionMaskInterface`` next to
each pattern's implementation, without which the padding mask silently disappears)."""

from __future__ import annotations

from typing import Any

import torch
from transformers.masking_utils import (
    bidirectional_mask_function,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)


def compact_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The mask our patterns get: for plain causal or bidirectional attention only the padding, as a
    (b, 1, 1, kv) key mask (O(n); causality comes from the attention module), None without padding;
    anything else (packed sequences, overlays) as transformers' dense SDPA mask."""
    if mask_function not in (causal_mask_function, bidirectional_mask_function):
        return sdpa_mask(
            batch_size=batch_size,
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            mask_function=mask_function,
            attention_mask=attention_mask,
            **kwargs,
        )
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is None:
        return None
    padding = padding[:, kv_offset : kv_offset + kv_length].bool()
    return None if bool(padding.all()) else padding[:, None, None, :]
