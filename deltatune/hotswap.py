"""Swap a LoRA adapter's weights in place, so a ``torch.compile``d model serves another adapter
without recompiling (peft's ``hotswap_adapter`` and ``prepare_model_for_compiled_hotswap``).

A compiled graph reads the adapter's tensors as inputs but specialises on their shapes and on
Python numbers such as LoRA's scale alpha/r. So, once, before compiling:

    prepare_model_for_compiled_hotswap(model, target_rank=64)   # pad every A and B to rank 64
                                                                # (zeros: outputs unchanged) and
                                                                # hold each scale in a tensor
    model = torch.compile(model)
    hotswap_adapter(model, "adapters/other", "default")         # copy in; no recompilation

``hotswap_adapter`` copies the new factors into the live tensors (zero-padding a smaller rank)
and writes the new scale into the scale tensor. The new adapter must target the same modules
(and use DoRA if the old one does); a rank above the padded one is refused. Without the
preparation it still swaps (eagerly, or with a recompile when the rank or scale changed).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.checkpoint.adapter import KEY_PREFIX, load_tensors, split_by_module
from deltatune.config import ConfigError, DeltaConfig
from deltatune.methods.lora import LoraConfig, LoraEmbedding, LoraLinear

__all__ = ["hotswap_adapter", "prepare_model_for_compiled_hotswap"]


def _delta_model(model: nn.Module) -> Any:
    """The DeltaModel, also when ``model`` is its torch.compile wrapper."""
    inner = getattr(model, "_orig_mod", model)
    if not hasattr(inner, "peft_config") or not hasattr(inner, "delta_layers"):
        raise TypeError(f"expected a DeltaModel (or a torch.compile of one), got {type(model).__name__}")
    return inner


def _lora_layers(host: Any, adapter_name: str) -> dict[str, LoraLinear | LoraEmbedding]:
    host.check_adapter(adapter_name)
    if not isinstance(host.peft_config[adapter_name], LoraConfig):
        raise ConfigError(
            f"hot-swapping is for LoRA adapters; {adapter_name!r} is {type(host.peft_config[adapter_name]).__name__}"
        )
    return {
        n: layer
        for n, layer in host.delta_layers()
        if isinstance(layer, (LoraLinear, LoraEmbedding)) and adapter_name in layer.scaling
    }


def _factors(layer: LoraLinear | LoraEmbedding, name: str) -> tuple[nn.Parameter, nn.Parameter]:
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def _pad(layer: LoraLinear | LoraEmbedding, name: str, rank: int) -> None:
    """Give adapter ``name``'s A (r×in) and B (out×r) ``rank`` rows/columns, the new ones zero."""
    a, b = _factors(layer, name)
    if a.shape[0] > rank:
        raise ConfigError(f"target_rank {rank} is below an adapter's rank {a.shape[0]}: use the largest rank")
    if a.shape[0] == rank:
        return
    with torch.no_grad():
        a.data = torch.cat([a.data, a.new_zeros(rank - a.shape[0], a.shape[1])])
        b.data = torch.cat([b.data, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)


def _record_shapes(host: Any, adapter_name: str, layers: dict[str, Any]) -> None:
    """Rewrite the adapter's config so that its saved tensors load again: every module's rank and
    an alpha that keeps its scale (explicit per-module patterns)."""
    config = host.peft_config[adapter_name]
    ranks = {n: _factors(layer, adapter_name)[0].shape[0] for n, layer in layers.items()}
    alphas = {
        n: float(layer.scaling[adapter_name]) * (math.sqrt(ranks[n]) if config.use_rslora else ranks[n])
        for n, layer in layers.items()
    }
    host.peft_config[adapter_name] = dataclasses.replace(
        config,
        r=max(ranks.values()),
        rank_pattern={re.escape(n): r for n, r in ranks.items()},
        alpha_pattern={re.escape(n): a for n, a in alphas.items()},
    )


def prepare_model_for_compiled_hotswap(
    model: nn.Module, *, target_rank: int | None = None, config: Any = None, check_compiled: str = "error"
) -> None:
    """Before ``torch.compile``: pad every LoRA adapter to ``target_rank`` (the largest rank you
    will swap in; None: keep the ranks) and hold every scale in a tensor, so later swaps change
    neither a shape nor a constant of the compiled graph. ``config`` is accepted for peft's
    signature; the model's own configs are updated to the padded ranks."""
    if hasattr(model, "_orig_mod"):
        message = "prepare_model_for_compiled_hotswap must run before torch.compile, not after"
        if check_compiled == "error":
            raise ValueError(message)
        if check_compiled == "warn":
            import warnings

            warnings.warn(message, stacklevel=2)
    host = _delta_model(model)
    for adapter_name, adapter_config in host.peft_config.items():
        if not isinstance(adapter_config, LoraConfig):
            continue
        layers = _lora_layers(host, adapter_name)
        for layer in layers.values():
            if target_rank is not None:
                _pad(layer, adapter_name, target_rank)
            scale = layer.scaling[adapter_name]
            if not isinstance(scale, torch.Tensor):
                device = _factors(layer, adapter_name)[0].device
                layer.scaling[adapter_name] = torch.tensor(float(scale), device=device)
        _record_shapes(host, adapter_name, layers)


def hotswap_adapter(model: nn.Module, model_name_or_path: str | Path, adapter_name: str = "default", **_: Any) -> None:
    """Replace adapter ``adapter_name``'s weights by those saved at ``model_name_or_path``, in place."""
    host = _delta_model(model)
    layers = _lora_layers(host, adapter_name)
    new_config = DeltaConfig.load(model_name_or_path)
    old_config = host.peft_config[adapter_name]
    if not isinstance(new_config, LoraConfig):
        raise ConfigError(f"{model_name_or_path} holds a {type(new_config).__name__}; only LoRA adapters hot-swap")
    if new_config.use_dora != old_config.use_dora:
        raise ConfigError(
            f"cannot hot-swap: use_dora is {old_config.use_dora} here and {new_config.use_dora} in {model_name_or_path}"
        )
    by_module, unmatched = split_by_module(load_tensors(model_name_or_path), list(layers), KEY_PREFIX, None)
    missing = sorted(set(layers) - set(by_module))
    if unmatched or missing:
        raise ConfigError(
            f"cannot hot-swap {model_name_or_path} into {adapter_name!r}: the adapters target different modules "
            f"(only in the new one: {sorted(unmatched)[:5]}; only in the loaded one: {missing[:5]})"
        )
    for name, layer in layers.items():
        _swap(layer, adapter_name, by_module[name], *new_config.rank_and_alpha(name), new_config.use_rslora)
    host.peft_config[adapter_name] = dataclasses.replace(new_config, inference_mode=old_config.inference_mode)
    _record_shapes(host, adapter_name, layers)


def _swap(layer: Any, name: str, tensors: dict[str, torch.Tensor], r: int, alpha: float, rslora: bool) -> None:
    a, b = _factors(layer, name)
    keys = (
        ("lora_embedding_A", "lora_embedding_B")
        if isinstance(layer, LoraEmbedding)
        else ("lora_A.weight", "lora_B.weight")
    )
    new_a, new_b = tensors[keys[0]], tensors[keys[1]]
    rank = new_a.shape[0]
    if rank > a.shape[0]:
        raise ConfigError(
            f"the new adapter's rank {rank} exceeds the loaded one's {a.shape[0]}: call "
            f"prepare_model_for_compiled_hotswap(model, target_rank={rank}) (or more) before compiling"
        )
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    with torch.no_grad():
        a.zero_()
        b.zero_()
        a[:rank].copy_(new_a)
        b[:, :rank].copy_(new_b)
        if "lora_magnitude_vector" in tensors:
            layer.lora_magnitude_vector[name].copy_(tensors["lora_magnitude_vector"])
        if isinstance(layer.scaling[name], torch.Tensor):
            layer.scaling[name].fill_(scale)
        else:
            layer.scaling[name] = scale
