"""Prompt learning: trainable virtual tokens that the frozen model reads as part of its input.

What prompt tuning, P-tuning and prefix tuning share. The first two prepend n soft tokens to the
input embeddings; prefix tuning hands every attention layer n extra keys and values instead
(see prefix_tuning.py)::

    input_ids ──► embed_tokens (frozen) ─────────────┐
                                                     cat ──► inputs_embeds (n + L) ──► model
    PromptLearningLayer: adapter's encoder() ─► n×d ─┘
    attention_mask ─► [1]*n + mask      labels ─► [-100]*n + labels      logits: n + L positions

Where the adapter lives: a :class:`PromptLearningLayer` wraps the model's input embeddings
(``get_input_embeddings()``) and holds each adapter's encoder, while its forward stays the plain
embedding. The method's ``prepare_inputs`` hook, which DeltaModel.forward, the trainer's loss and
every generation step run, does the concatenation, so inputs, masks and labels change in one
place; switching, deletion, trainable flags and checkpoints come from DeltaLayer as for every
other method, and ``disable_adapter`` gives the base model back exactly.

Checkpoints follow peft: one bare key, ``prompt_embeddings``, holding what the encoder computes
(the inference form: loading it needs no encoder). A reparametrizing encoder's own weights, which
only resuming training needs, go to ``adapter_training_state.safetensors`` beside it.

Semantics follow peft's PeftModelForCausalLM, so both libraries give the same logits and tokens:
position ids are ignored (the virtual tokens take positions 0..n-1 and padding counts as a
position, so a left-padded row sees its text shifted by its padding, exactly as in peft).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.cache_utils import Cache

from deltatune import routing
from deltatune.compat import get_cache, pop_cache
from deltatune.config import ConfigError, DeltaConfig, method_config
from deltatune.constants import IGNORE_INDEX
from deltatune.methods.base import DeltaLayer, wrap_modules
from deltatune.methods.contract import AdapterHost
from deltatune.wrappers import ForwardsAttributes, base_of

ENCODER_KEY = "prompt_encoder."  # training-state keys: the encoder's own weights
_TARGETING = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")


@method_config
class PromptLearningConfig(DeltaConfig):
    """Options the three methods share, with peft's names. ``token_dim``, ``num_layers`` and
    ``num_attention_heads`` are read from the base model when the adapter is added and recorded,
    so the saved adapter_config.json is complete for peft."""

    checkpoint_key_prefix: ClassVar[str] = "base_model."  # peft wraps no tuner around the model here
    peft_spellings: ClassVar[dict[str, str]] = {}  # our option -> peft's name, written in its place
    cli_hidden: ClassVar[frozenset[str]] = DeltaConfig.cli_hidden | {
        *_TARGETING,
        "token_dim",
        "num_transformer_submodules",
        "num_attention_heads",
        "num_layers",
    }
    num_virtual_tokens: int = 20
    """n, the virtual tokens added (prefix tuning: keys/values per layer); more capacity, longer sequences"""
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None

    def validate(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise ConfigError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        for name in _TARGETING:
            if getattr(self, name) is not None:
                raise ConfigError(
                    f"{type(self).__name__} adds virtual tokens to the input and adapts no modules: drop {name}"
                )

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        for name in (*_TARGETING, *self.peft_spellings):
            data.pop(name, None)
        return data


def reconcile_spelling(
    config: DeltaConfig, ours: str, theirs: str, choices: dict[str, str] | None = None, default: str | None = None
) -> None:
    """Keep our short option ``ours`` and peft's ``theirs`` in step: either may be given (peft's
    JSON sets ``theirs``). ``choices`` maps our values to peft's; either spelling is accepted."""

    def canonical(value: Any) -> Any:
        if value is None or choices is None:
            return value
        text = str(getattr(value, "value", value)).lower()
        for mine, peft in choices.items():
            if text in (mine, peft.lower()):
                return mine
        raise ConfigError(f"{ours} must be one of {', '.join(choices)}, got {value!r}")

    mine, peft = canonical(getattr(config, ours)), canonical(getattr(config, theirs))
    if mine is not None and peft is not None and mine != peft:
        raise ConfigError(f"{ours}={mine!r} and {theirs}={peft!r} (peft's name for it) disagree: give one of them")
    value = mine if mine is not None else peft if peft is not None else default
    setattr(config, ours, value)
    setattr(config, theirs, choices[value] if choices is not None and value is not None else value)


# --- the encoders: each computes its adapter's table of virtual tokens ------------------------
class PromptEncoder(nn.Module):
    """A plain table of virtual tokens (num_virtual_tokens × width): prompt tuning, and the
    inference form of every method (what a checkpoint stores, used as it is)."""

    reparametrized: ClassVar[bool] = False  # True: a network computes the table from ``embedding``

    def __init__(self, num_tokens: int, width: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_tokens, width)
        self.output_shape = (num_tokens, width)

    @staticmethod
    def stored(table: torch.Tensor) -> PromptEncoder:
        encoder = PromptEncoder(*table.shape).to(table.device)
        with torch.no_grad():
            encoder.embedding.weight.copy_(table)
        return encoder

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


class PromptLearningLayer(ForwardsAttributes, DeltaLayer):
    """The model's input embeddings (unchanged) plus each adapter's prompt encoder. transformers
    reads the embedding's attributes (weight, padding_idx...) through it (ForwardsAttributes)."""

    adapter_attrs = ("prompt_encoder",)
    top_level_keys = True  # peft's bare ``prompt_embeddings`` key

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.prompt_encoder = nn.ModuleDict()

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.base_layer(*args, **kwargs)

    def add(self, name: str, encoder: PromptEncoder) -> None:
        self.prompt_encoder[name] = encoder.to(self.base_layer.weight.device)

    def prompt(self, name: str) -> torch.Tensor:
        """The adapter's virtual tokens, num_virtual_tokens × width (with gradient in training)."""
        return self.prompt_encoder[name]()

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.prompt_encoder:
            return {}
        encoder = self.prompt_encoder[name]
        was_training = encoder.training
        encoder.eval()  # what inference computes: no dropout in the stored values
        try:
            with torch.no_grad():
                return {"prompt_embeddings": encoder().detach()}
        finally:
            encoder.train(was_training)

    def training_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.prompt_encoder or not self.prompt_encoder[name].reparametrized:
            return {}
        return {ENCODER_KEY + k: v.detach() for k, v in self.prompt_encoder[name].state_dict().items()}

    def load_adapter_state_dict(self, name: str, tensors: dict[str, torch.Tensor]) -> list[str]:
        tensors = dict(tensors)
        keys = [k for k in tensors if k.startswith(ENCODER_KEY)]
        encoder_state = {k.removeprefix(ENCODER_KEY): tensors.pop(k) for k in keys}
        if "prompt_embeddings" not in tensors:
            raise KeyError("checkpoint lacks prompt_embeddings")
        table = tensors.pop("prompt_embeddings")
        encoder = self.prompt_encoder[name]
        if tuple(table.shape) != encoder.output_shape:
            raise ValueError(
                f"prompt_embeddings has shape {tuple(table.shape)} but this adapter needs {encoder.output_shape} "
                "(num_virtual_tokens × width): was it made for another base model or num_virtual_tokens?"
            )
        if not encoder.reparametrized:  # a table: the stored values are the adapter (encoder weights unused)
            with torch.no_grad():
                encoder.embedding.weight.copy_(table)
        elif encoder_state:
            try:
                encoder.load_state_dict(encoder_state)
            except RuntimeError as err:
                raise ValueError(f"the saved prompt encoder does not fit this adapter's: {err}") from err
        else:
            warnings.warn(
                f"adapter {name!r}: the checkpoint holds the computed virtual tokens but not the encoder that made "
                "them (peft saves only those), so training continues on the stored values directly",
                stacklevel=2,
            )
            self.prompt_encoder[name] = PromptEncoder.stored(table.to(encoder.embedding.weight))
        return list(tensors)


# --- injection ---------------------------------------------------------------------------------
def check_task(config: PromptLearningConfig, supported: tuple[str, ...]) -> None:
    if config.task_type not in supported:
        raise ConfigError(
            f"{type(config).__name__} supports task_type {', '.join(supported)} (a *ForCausalLM"
            f"{' or *ForSequenceClassification' if 'SEQ_CLS' in supported else ''} model), got {config.task_type!r}"
        )


def text_config(model: nn.Module) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def record(config: PromptLearningConfig, field: str, value: int) -> None:
    """Fill in a model-dependent option, or check the one given (e.g. by a saved config)."""
    given = getattr(config, field)
    if given is None:
        setattr(config, field, value)
    elif given != value:
        raise ConfigError(
            f"{field}={given} does not fit this base model, which needs {value} "
            "(was the adapter made for another base model?)"
        )


def record_model_dims(config: PromptLearningConfig, model: nn.Module) -> None:
    """peft's bookkeeping fields: transformer layers and attention heads of the base model."""
    cfg = text_config(model)
    if getattr(cfg, "is_encoder_decoder", False):
        raise ConfigError("prompt learning in deltatune supports decoder-only and encoder-only models, not seq2seq")
    record(config, "num_transformer_submodules", 1)
    if config.num_layers is None:
        config.num_layers = cfg.num_hidden_layers
    if config.num_attention_heads is None:
        config.num_attention_heads = cfg.num_attention_heads


def input_embeddings(model: nn.Module) -> tuple[str, nn.Module]:
    """The input embedding module's name and the raw embedding inside any wrapper of ours."""
    module = model.get_input_embeddings()
    name = next(n for n, m in model.named_modules() if m is module)
    return name, base_of(module)


def attach(model: nn.Module, adapter_name: str, encoder: PromptEncoder) -> list[str]:
    name, _ = input_embeddings(model)
    layer = wrap_modules(model, {name: PromptLearningLayer})[name]
    layer.add(adapter_name, encoder)
    routing.install_step_hook(model)  # once per model: generate's steps read their inputs from the call
    return [name]


def prompt_layer(host: AdapterHost) -> PromptLearningLayer:
    layer = host.base_model.get_input_embeddings()
    if not isinstance(layer, PromptLearningLayer):
        raise RuntimeError("the model's input embeddings no longer carry the prompt-learning layer")
    return layer


def load_tokenizer(path: str | Path | None, kwargs: dict[str, Any] | None) -> Any:
    from transformers import AutoTokenizer

    kwargs = dict(kwargs or {})
    kwargs.pop("trust_remote_code", None)  # a checkpoint's config must not run code
    return AutoTokenizer.from_pretrained(path, **kwargs)


# --- forward and generation ----------------------------------------------------------------------
def is_empty(cache: Any) -> bool:
    """No cache yet, or an empty one: this step must bring the virtual tokens (a later step finds them cached)."""
    return cache is None or (isinstance(cache, Cache) and cache.get_seq_length() == 0)


def extend_attention_mask(kwargs: dict[str, Any], num_virtual_tokens: int) -> None:
    mask = kwargs.get("attention_mask")
    if mask is None:
        return
    if mask.dim() != 2:
        raise ValueError("prompt learning extends 2-D attention masks only (use the default dynamic KV cache)")
    ones = torch.ones(mask.shape[0], num_virtual_tokens, dtype=mask.dtype, device=mask.device)
    kwargs["attention_mask"] = torch.cat([ones, mask], dim=1)


def drop(kwargs: dict[str, Any], name: str, why: str, quietly: bool) -> None:
    if kwargs.get(name) is not None and not quietly:
        warnings.warn(f"{name} are ignored with prompt learning ({why}), as in peft", stacklevel=3)
    kwargs.pop(name, None)


def prepend_virtual_tokens(
    host: AdapterHost, adapter_name: str, kwargs: dict[str, Any], generating: bool = False
) -> dict[str, Any]:
    """Prompt and P-tuning's ``prepare_inputs``: the adapter's n virtual tokens go before the input."""
    config = host.peft_config[adapter_name]
    n = config.num_virtual_tokens
    drop(kwargs, "position_ids", "the virtual tokens take positions 0..n-1", quietly=generating)
    if not is_empty(get_cache(kwargs)):  # a later decoding step: they are in the cache
        extend_attention_mask(kwargs, n)
        return kwargs
    layer = prompt_layer(host)
    input_ids, embeds = kwargs.pop("input_ids", None), kwargs.get("inputs_embeds")
    if embeds is None:
        if input_ids is None:
            raise ValueError("prompt learning needs input_ids or inputs_embeds")
        embeds = layer(input_ids)
    batch = embeds.shape[0]
    prompts = layer.prompt(adapter_name).to(embeds.dtype).expand(batch, -1, -1)
    kwargs["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)
    extend_attention_mask(kwargs, n)
    if config.task_type == "SEQ_CLS":  # the classifier reads a pooled state: labels stay as they are
        if kwargs.get("token_type_ids") is not None:
            types = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, n), types], dim=1)
        return kwargs
    drop(kwargs, "token_type_ids", "the virtual tokens have none", quietly=generating)
    if kwargs.get("labels") is not None:
        labels = kwargs["labels"]
        kwargs["labels"] = torch.cat([labels.new_full((batch, n), IGNORE_INDEX), labels], dim=1)
    return kwargs


Prepare = Callable[..., dict[str, Any]]


def generate_stepping(host: AdapterHost, step: routing.Step, *args: Any, **kwargs: Any) -> Any:
    """transformers' generate on ``host.base_model``, with ``step`` applied to the inputs of every
    decoding step (the prefill brings the virtual tokens; later steps find them cached). The step
    travels in this call's scope and a forward pre-hook, registered once, applies it (see
    deltatune.routing): the model itself is not patched, so concurrent and nested calls are safe."""
    base = host.base_model

    def prepare_step(inputs: dict[str, Any]) -> dict[str, Any]:
        if inputs.get("use_cache") is False:  # each step reads the whole text: drop the cache a prefix
            pop_cache(inputs)  # was handed in (the model returns it even so)
        return step(inputs)

    with routing.scope(step=prepare_step, model=base):
        return base.generate(*args, **kwargs)


def generate_with(prepare: Prepare) -> Callable[..., Any]:
    """A method's ``generate`` hook: transformers' generate with ``prepare(host, adapter_name,
    inputs, generating=True)`` applied to the model inputs of every step."""

    def generate(host: AdapterHost, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        def step(inputs: dict[str, Any]) -> dict[str, Any]:
            return prepare(host, adapter_name, inputs, generating=True)

        return generate_stepping(host, step, *args, **kwargs)

    return generate


generate_virtual_tokens = generate_with(prepend_virtual_tokens)
