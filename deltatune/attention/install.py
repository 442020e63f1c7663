"""Putting a pattern on a model: check its options against the model, register an implementation named after the
pattern and its options (``deltatune_<pattern>_<hash>``) and point every attention layer's config at it."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from deltatune.attention.blocks import as_bool_mask
from deltatune.attention.masks import compact_mask
from deltatune.attention.registry import Call, Pattern, pattern_named, registered
from deltatune.config import ConfigError

DEFAULT = "sdpa"
PREFIX = "deltatune_"


def options_for(pattern: str, **options: Any) -> Any:
    """The pattern's options object; unknown options are an error that lists the known ones."""
    record = pattern_named(pattern)
    known = {f.name for f in dataclasses.fields(record.options_class)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"attention pattern {pattern!r} has no option {', '.join(unknown)}; its options: {', '.join(sorted(known))}"
        )
    return record.options_class(**options)


def set_attention(model: nn.Module, pattern: str = DEFAULT, **options: Any) -> nn.Module:
    """Run every attention layer of ``model`` (a transformers model, or a DeltaModel around one) with
    ``pattern``; ``"sdpa"`` restores the default. Returns the model."""
    base = _transformers_model(model)
    _uninstall(base)
    if pattern == DEFAULT:
        if options:
            raise ConfigError(f"attention 'sdpa' takes no options, got {', '.join(sorted(options))}")
        _set_implementation(base, DEFAULT)
        return model
    record = pattern_named(pattern)
    opts = options_for(pattern, **options)
    if record.encoder_only and _is_causal(base):
        raise ConfigError(f"attention {pattern!r} is for encoders only: {record.encoder_reason}")
    _check_heads(base, record, opts)
    if record.install is not None:
        record.install(base, opts)
    _set_implementation(base, _register(record, opts))
    return model


def pattern_of(model: nn.Module) -> str:
    """The pattern a model runs (``sdpa`` when none of ours)."""
    impl = _transformers_model(model).config._attn_implementation or DEFAULT
    return impl[len(PREFIX) :].rsplit("_", 1)[0] if impl.startswith(PREFIX) else impl


def trainable_modules(pattern: str) -> list[str]:
    """Module names a pattern adds that an adapter must save (``modules_to_save`` entries)."""
    if pattern == DEFAULT:
        return []
    return list(getattr(pattern_named(pattern).options_class, "trainable_modules", ()))


# --- plumbing ---------------------------------------------------------------------------------
def _transformers_model(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", model)  # a DeltaModel holds the transformers model here
    if not hasattr(base, "config") or not hasattr(base.config, "_attn_implementation"):
        raise ConfigError(
            f"set_attention needs a transformers model (or a DeltaModel around one), got {type(model).__name__}"
        )
    return base


def _is_causal(model: nn.Module) -> bool:
    return any(getattr(m, "is_causal", False) for m in model.modules() if _is_attention(m))


def _is_attention(module: nn.Module) -> bool:
    names = dict(module.named_children())
    return hasattr(module, "is_causal") and any(p in names for p in ("q_proj", "query", "c_attn", "qkv_proj"))


def _check_heads(model: nn.Module, record: Pattern, opts: Any) -> None:
    from deltatune.attention.registry import head_groups

    heads = getattr(model.config, "num_attention_heads", None)
    for f in dataclasses.fields(opts):
        value = getattr(opts, f.name)
        if heads and isinstance(value, list):
            head_groups(heads, len(value), f"{record.name} --{f.name.replace('_', '-')}")


def _register(record: Pattern, opts: Any) -> str:
    digest = hashlib.sha1(json.dumps(dataclasses.asdict(opts), sort_keys=True).encode()).hexdigest()[:10]
    name = f"{PREFIX}{record.name}_{digest}"
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _attention_function(record, opts))
        AttentionMaskInterface.register(name, compact_mask)  # without it the padding mask silently disappears
    return name


def _set_implementation(model: nn.Module, name: str) -> None:
    for module in model.modules():  # the model and any sub-models with their own config
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = name


def _uninstall(model: nn.Module) -> None:
    for record in registered():
        if record.uninstall is not None:
            record.uninstall(model)


def _attention_function(record: Pattern, opts: Any):
    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        mask = as_bool_mask(attention_mask)
        if mask is not None and mask.ndim == 2:  # a plain key padding mask
            mask = mask[:, None, None, :]
        call = Call(module, query, key, value, mask, bool(causal), scaling, dropout, opts)
        return record.forward(call).transpose(1, 2).contiguous(), None

    attention.__name__ = f"{record.name}_attention"
    return attention


def with_pattern_modules(config: Any, model: nn.Module, pattern: str) -> Any:
    """``config`` (a method config) with the pattern's trainable modules added to its ``modules_to_save``,
    so they train and are saved with the adapter; a classifier's head stays in (as DeltaModel would add it)."""
    extra = trainable_modules(pattern)
    if not extra:
        return config
    from deltatune.model import _CLASSIFIER_HEADS

    saved = list(config.modules_to_save or [])
    if config.modules_to_save is None and getattr(model.config, "num_labels", None) and _is_classifier(model):
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        saved = [h for h in _CLASSIFIER_HEADS if h in names]
    config = copy.copy(config)
    config.modules_to_save = saved + [m for m in extra if m not in saved]
    return config


def _is_classifier(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")
