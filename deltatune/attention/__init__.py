"""Efficient attention patterns for long sequences, plugged into Hugging Face models through
``transformers.AttentionInterface`` (and ``AttentionMaskInterface``, so the padding/causal mask
keeps being made), without copies of any modelling code.

    model = set_attention(model, "sliding_window", window=512)    # every attention layer
    model = set_attention(model, "sdpa")                          # back to the default

Each pattern is one file here with one ``register(Pattern(...))`` line (see registry.py). The
pattern and its options are baked into a registered implementation name (``deltatune_<pattern>_<hash>``)
that the model's config carries, so two models may use different options at once, and nothing of a
call is kept on a module.
"""

from __future__ import annotations

from deltatune.attention import blockwise, linformer, lsh, perceiver, s2, sliding_window  # noqa: F401  (register)
from deltatune.attention.install import (  # noqa: F401  (linformer.py, bench/long_attention.py)
    DEFAULT,
    PREFIX,
    _is_attention,
    _register,
    options_for,
    pattern_of,
    set_attention,
    trainable_modules,
    with_pattern_modules,
)
from deltatune.attention.masks import compact_mask
from deltatune.attention.registry import registered

__all__ = [
    "DEFAULT",
    "PREFIX",
    "compact_mask",
    "options_for",
    "pattern_of",
    "registered",
    "set_attention",
    "trainable_modules",
    "with_pattern_modules",
]
