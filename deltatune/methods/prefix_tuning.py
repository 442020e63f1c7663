"""Prefix tuning: every attention layer also attends to n trainable keys and values.

    E (n × kv) ──► Linear kv→h ─ tanh ─ Linear h→2·layers·kv ──► prefix (n × 2·layers·kv)
                   (prefix_projection; without it the prefix is the trained table itself)
                                          │ split per layer into K_l, V_l: (heads_kv, n, head_dim)
                                          ▼
    layer l attention:  softmax(q · [K_l ; k]ᵀ) · [V_l ; v]      the KV cache starts with the prefix
    attention_mask ─► [1]*n + mask                               input and labels are unchanged

Li & Liang (2021): steering all layers, not only the input, reaches fine-tuning quality on
generation tasks with ~0.1% of the parameters; optimizing the prefix directly is unstable, hence
the MLP reparametrization during training. Only the prefix matters at inference, so checkpoints
store it (peft's ``prompt_embeddings``, n × 2·layers·kv) and the encoder goes to the
training-state file (see prompt_learning.py). The prefix is handed to the model as its KV cache,
so positions continue after it and generation with the cache needs nothing else. As in peft,
``kv`` is the key/value width: head_dim × num_key_value_heads for grouped-query attention
(recorded as ``token_dim``, with the KV heads as ``num_attention_heads``). Causal LMs only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache

from deltatune.compat import get_cache, set_cache
from deltatune.config import ConfigError, method_config
from deltatune.methods import prompt_learning as pl
from deltatune.methods.contract import AdapterHost, Method, register
from deltatune.methods.prompt_learning import PromptEncoder, PromptLearningConfig, PromptLearningLayer


@method_config
class PrefixTuningConfig(PromptLearningConfig):
    """``prefix_projection``: train the prefix through an MLP of ``encoder_hidden_size`` units
    (default: the key/value width). ``init_weights="zero"`` starts with a zero prefix."""

    peft_type = "PREFIX_TUNING"
    prefix_projection: bool = True
    """train the prefix through an MLP of --encoder-hidden-size units (off: train the prefix itself)"""
    encoder_hidden_size: int | None = None
    """hidden width of the prefix MLP (default: the key/value width)"""
    init_weights: str | None = None
    """'zero' starts with a zero prefix (none: the usual random one)"""

    def validate(self) -> None:
        super().validate()
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"init_weights must be None (random) or 'zero', got {self.init_weights!r}")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise ConfigError(f"encoder_hidden_size must be positive, got {self.encoder_hidden_size}")


class PrefixEncoder(PromptEncoder):
    """The table E through a two-layer tanh MLP to all layers' keys and values; peft's names."""

    reparametrized = True

    def __init__(self, num_tokens: int, kv_dim: int, num_layers: int, hidden: int, zero: bool) -> None:
        super().__init__(num_tokens, kv_dim)
        width = 2 * num_layers * kv_dim
        self.transform = nn.Sequential(nn.Linear(kv_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
        self.output_shape = (num_tokens, width)
        if zero:
            nn.init.zeros_(self.transform[-1].weight)
            nn.init.zeros_(self.transform[-1].bias)

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding.weight)


def kv_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head_dim) of the base model's attention."""
    cfg = pl.text_config(model)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or heads, head_dim


def inject(model: nn.Module, adapter_name: str, config: PrefixTuningConfig) -> list[str]:
    pl.check_task(config, ("CAUSAL_LM",))
    layers, kv_heads, head_dim = kv_shape(model)
    kv_dim = head_dim * kv_heads
    if config.token_dim not in (None, kv_dim) or config.num_attention_heads not in (None, kv_heads):
        raise ConfigError(
            f"prefix tuning needs token_dim={kv_dim} and num_attention_heads={kv_heads} (this model's {kv_heads} "
            f"key/value heads × head_dim {head_dim}), got token_dim={config.token_dim} and num_attention_heads="
            f"{config.num_attention_heads}: the adapter was made for another model, or saved by a peft version "
            "that sized prefixes by query heads for grouped-query attention"
        )
    config.token_dim, config.num_attention_heads = kv_dim, kv_heads
    pl.record_model_dims(config, model)
    pl.record(config, "num_layers", layers)
    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    n, width = config.num_virtual_tokens, 2 * layers * config.token_dim
    if config.prefix_projection and not config.inference_mode:
        hidden, zero = config.encoder_hidden_size, config.init_weights == "zero"
        encoder = PrefixEncoder(n, config.token_dim, layers, hidden, zero)
    else:  # the prefix itself is the table (trained, or loaded)
        encoder = PromptEncoder(n, width)
        if config.init_weights == "zero":
            nn.init.zeros_(encoder.embedding.weight)
    return pl.attach(model, adapter_name, encoder)


def key_values(model: nn.Module, config: PrefixTuningConfig, prefix: torch.Tensor) -> torch.Tensor:
    """The prefix as attention keys and values: (2·layers, heads_kv, n, head_dim), keys at even indices."""
    n = prefix.shape[0]
    return prefix.to(model.dtype).view(n, 2 * config.num_layers, config.num_attention_heads, -1).permute(1, 2, 0, 3)


def fill_cache(model: nn.Module, kv: torch.Tensor, cache: Any) -> Cache:
    """Put layer l's keys kv[:, 2l] and values kv[:, 2l+1] (each batch × heads_kv × n × head_dim) in the KV cache."""
    cache = cache if isinstance(cache, Cache) else DynamicCache(config=model.config)
    for layer in range(kv.shape[1] // 2):
        cache.update(kv[:, 2 * layer], kv[:, 2 * layer + 1], layer)
    return cache


def prepare_inputs(
    host: AdapterHost, adapter_name: str, kwargs: dict[str, Any], generating: bool = False
) -> dict[str, Any]:
    """The prefix becomes the KV cache (unless a later decoding step already has it there); the
    attention mask covers it and explicit positions move past it."""
    config = host.peft_config[adapter_name]
    n = config.num_virtual_tokens
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + n
    pl.drop(kwargs, "token_type_ids", "the prefix has none", quietly=generating)
    if pl.is_empty(get_cache(kwargs)):
        model = host.base_model
        if model.training and torch.is_grad_enabled() and getattr(model, "is_activation_checkpointing", False):
            raise ConfigError(
                "prefix tuning feeds its prefix through the KV cache, which activation (gradient) checkpointing "
                "would fill twice when it recomputes a layer: train without gradient checkpointing"
            )
        inputs = kwargs.get("input_ids")
        batch = (inputs if inputs is not None else kwargs["inputs_embeds"]).shape[0]
        kv = key_values(model, config, pl.prompt_layer(host).prompt(adapter_name))
        set_cache(kwargs, model, fill_cache(model, kv.expand(batch, -1, -1, -1, -1), get_cache(kwargs)))
    pl.extend_attention_mask(kwargs, n)
    return kwargs


generate = pl.generate_with(prepare_inputs)
register(
    Method(
        "prefix_tuning",
        PrefixTuningConfig,
        inject,
        (PromptLearningLayer,),
        mixes="prefix",
        prepare_inputs=prepare_inputs,
        generate=generate,
        packable=False,  # virtual tokens take the positions that keep packed examples apart
    )
)
