"""Refusing inputs longer than a model's position table.

transformers only warns when a sequence runs past ``max_position_embeddings``, then computes
garbage (rotary models extrapolate positions they never saw) or fails deep inside (learned
position tables index out of range). These checks say what is too long and how to cut it,
before any compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deltatune.config import ConfigError

POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def max_positions(model: Any) -> int | None:
    """The most positions ``model`` (or its config) has; None when its config does not say."""
    config = getattr(model, "config", model)
    for field in POSITION_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_features(model: Any, features: Sequence[dict], max_length: int) -> None:
    """Training rows must fit the model; ``--max-length`` is what cuts (or splits) them."""
    limit = max_positions(model)
    if limit is None or not features:
        return
    index, longest = max(enumerate(len(f["input_ids"]) for f in features), key=lambda pair: pair[1])
    if longest > limit:
        raise ConfigError(
            f"training row {index} has {longest} tokens (--max-length {max_length}), more than the {limit} positions "
            f"this model has: set --max-length {limit} or less (longer examples are then cut, plain text split "
            "into windows)"
        )


def check_prompts(model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Each prompt plus the tokens to generate must fit the model's positions."""
    limit = max_positions(model)
    if limit is None or not prompts:
        return
    index, longest = max(enumerate(map(len, prompts)), key=lambda pair: pair[1])
    if longest + max_new_tokens > limit:
        room = limit - max_new_tokens
        cut = f"keep its last {room} tokens" if room > 0 else "it leaves no room to generate"
        raise ConfigError(
            f"prompt {index} has {longest} tokens and {max_new_tokens} more are to be generated: "
            f"{longest + max_new_tokens} positions, more than the {limit} this model has. Shorten the prompt ({cut}) "
            "or lower --max-new-tokens"
        )
