"""Prompt tuning: a trainable soft prompt of n virtual tokens before the input embeddings.

    input_ids  ──► embed_tokens (frozen) ──────────────┐
                                                       cat ──► frozen model ──► logits (n + L)
    soft prompt P (n × d, the only trained tensor) ────┘

Lester et al. (2021): with a large enough model, a few thousand parameters (n·d) per task come
close to fine-tuning the whole model. The table starts random, as rows of the vocabulary
(``init="vocab"``) or as the embeddings of a text (``init="text"``, which needs the tokenizer:
``tokenizer_name_or_path``, by default the base model's own directory, plus ``tokenizer_kwargs``
such as ``{"gguf_file": ...}``). Causal LMs and sequence classifiers (peft's SEQ_CLS).
Shared machinery and checkpoint format: prompt_learning.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune.config import ConfigError, method_config
from deltatune.methods import prompt_learning as pl
from deltatune.methods.contract import Method, register
from deltatune.methods.prompt_learning import PromptEncoder, PromptLearningConfig, PromptLearningLayer

INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}  # ours -> peft's


@method_config
class PromptTuningConfig(PromptLearningConfig):
    """``init``: "random", "vocab" (rows sampled from the embedding matrix) or "text" (the
    embeddings of ``init_text``, repeated or cut to n tokens). ``prompt_tuning_init`` and
    ``prompt_tuning_init_text`` are peft's names for the same two options (the saved config uses them)."""

    peft_type = "PROMPT_TUNING"
    peft_spellings: ClassVar[dict[str, str]] = {"init": "prompt_tuning_init", "init_text": "prompt_tuning_init_text"}
    cli_hidden: ClassVar[frozenset[str]] = pl.PromptLearningConfig.cli_hidden | set(peft_spellings.values())
    init: str | None = None
    """how the prompt starts: "random", "vocab" (rows sampled from the embedding matrix) or "text" (the embeddings
    of --init-text, repeated or cut to n tokens)"""
    init_text: str | None = None
    """the text whose embeddings start the prompt (with --init text)"""
    tokenizer_name_or_path: str | None = None
    """tokenizer (directory or hub name) for init_text with init='text'; default: the base model's directory"""
    tokenizer_kwargs: dict[str, Any] | None = None
    """extra keyword arguments for loading that tokenizer (e.g. {"gguf_file": ...}); only with init='text'"""
    prompt_tuning_init: str | None = None
    prompt_tuning_init_text: str | None = None

    def validate(self) -> None:
        super().validate()
        pl.reconcile_spelling(self, "init", "prompt_tuning_init", INITS, default="random")
        pl.reconcile_spelling(self, "init_text", "prompt_tuning_init_text")
        if self.init == "text" and not self.init_text:
            raise ConfigError("init='text' needs init_text, the text whose embeddings start the prompt")
        if self.tokenizer_kwargs and self.init != "text":
            raise ConfigError("tokenizer_kwargs are only used with init='text'")


def _text_ids(config: PromptTuningConfig, model: nn.Module, n: int) -> list[int]:
    """``init_text``'s token ids, repeated or cut to ``n``; the tokenizer used is recorded."""
    if config.tokenizer_name_or_path is None:
        own = getattr(model.config, "name_or_path", "") or ""
        if not (own and Path(own).is_dir()):
            raise ConfigError(
                "init='text' needs a tokenizer: set tokenizer_name_or_path (a local directory or hub name, "
                "with tokenizer_kwargs such as {'gguf_file': ...} if needed)"
            )
        config.tokenizer_name_or_path = own
    ids = pl.load_tokenizer(config.tokenizer_name_or_path, config.tokenizer_kwargs)(config.init_text)["input_ids"]
    if not ids:
        raise ConfigError(f"init_text {config.init_text!r} gives no tokens")
    return (ids * math.ceil(n / len(ids)))[:n]


def build_encoder(config: PromptTuningConfig, model: nn.Module, embedding: nn.Module) -> PromptEncoder:
    n = config.num_virtual_tokens
    encoder = PromptEncoder(n, config.token_dim)
    if config.inference_mode or config.init == "random":  # a loaded adapter brings its own values
        return encoder
    device = embedding.weight.device
    if config.init == "vocab":
        ids = torch.randint(0, embedding.weight.shape[0], (n,), device=device)
    else:
        ids = torch.tensor(_text_ids(config, model, n), device=device)
    with torch.no_grad():
        encoder.embedding.weight.copy_(embedding(ids).float())
    return encoder


def inject(model: nn.Module, adapter_name: str, config: PromptTuningConfig) -> list[str]:
    pl.check_task(config, ("CAUSAL_LM", "SEQ_CLS"))
    _, embedding = pl.input_embeddings(model)
    pl.record_model_dims(config, model)
    pl.record(config, "token_dim", embedding.weight.shape[1])
    return pl.attach(model, adapter_name, build_encoder(config, model, embedding))


prepare_inputs = pl.prepend_virtual_tokens
generate = pl.generate_virtual_tokens
register(
    Method(
        "prompt_tuning",
        PromptTuningConfig,
        inject,
        (PromptLearningLayer,),
        mixes="virtual_tokens",
        prepare_inputs=prepare_inputs,
        generate=generate,
        packable=False,  # virtual tokens take the positions that keep packed examples apart
        learning_rates=(("classification", 1e-1),),  # docs/defaults.md
    )
)
