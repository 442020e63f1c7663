"""The record every data format is read into, and the train/eval split."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from deltatune.config import ConfigError

TASKS = ("causal-lm", "classification")
IGNORE_INDEX = -100  # label of tokens the loss skips (prompt tokens, padding)

T = TypeVar("T")


@dataclass
class Example:
    """One training or evaluation example after format detection, before tokenization."""

    prompt: str | list[dict] | None  # text prompt, or chat messages (everything before the final assistant turn)
    target: str | None  # response for causal-lm (loss only on its tokens); None for plain LM text
    text: str | None = None  # plain language-modelling text (loss on all tokens), or the classification text
    text_pair: str | None = None  # classification second sentence
    label: int | None = None  # classification label
    task: str | None = None  # the example's task in multi-task training (a data file's name or a task column)


def split_train_eval(examples: Sequence[T], eval_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """A seeded random split keeping the file order inside each part; eval and train get at least one example."""
    if not 0 < eval_fraction < 1:
        raise ConfigError(f"eval fraction {eval_fraction} must be between 0 and 1 (exclusive).")
    if len(examples) < 2:
        raise ConfigError(f"cannot split {len(examples)} example(s) into train and eval; give an eval file instead.")
    n_eval = min(max(1, round(len(examples) * eval_fraction)), len(examples) - 1)
    eval_idx = set(np.random.default_rng(seed).permutation(len(examples))[:n_eval].tolist())
    train = [e for i, e in enumerate(examples) if i not in eval_idx]
    return train, [e for i, e in enumerate(examples) if i in eval_idx]
