"""What a base model is for (its natural task) and its tokenizer, read without loading the weights."""

from __future__ import annotations

import json
from typing import Any

from deltatune.loading.base_models import BUILTIN_MODELS, _dense_smollm2, resolve_model_dir


def task_of(base: str) -> str:
    """ "classification" for a sequence-classification model (built-in or a local directory), else "causal-lm"."""
    if base in BUILTIN_MODELS:
        return BUILTIN_MODELS[base].default_task
    config = json.loads((resolve_model_dir(base)[0] / "config.json").read_text())
    heads = config.get("architectures") or []
    return "classification" if any(a.endswith("ForSequenceClassification") for a in heads) else "causal-lm"


def load_tokenizer(base: str) -> Any:
    """The tokenizer :func:`~deltatune.loading.load_base` returns, without the model weights (seconds, not tens
    of seconds), so that data errors that need only tokens are reported before the slow load."""
    from transformers import AutoTokenizer

    directory, spec = resolve_model_dir(base)
    if spec is not None and spec.gguf_file:
        directory = _dense_smollm2(directory, spec)  # instant once cached; parsing the GGUF would take as long
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
