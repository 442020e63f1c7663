"""LoRA's in-place weight swap (the ``hotswap`` entry of its method record; see deltatune.hotswap).

A compiled graph specialises on tensor shapes and on Python numbers such as the scale alpha/r, so
:meth:`LoraHotSwap.prepare` pads every A and B to one rank (zeros: outputs unchanged) and holds each
scale in a tensor; :meth:`LoraHotSwap.swap` then copies new factors and scales into those tensors.
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
from deltatune.methods.base import DeltaLayer
from deltatune.methods.lora_embedding import LoraEmbedding


def factors(layer: Any, name: str) -> tuple[nn.Parameter, nn.Parameter]:
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def pad(layer: Any, name: str, rank: int) -> None:
    """Give adapter ``name``'s A (r×in) and B (out×r) ``rank`` rows/columns, the new ones zero."""
    a, b = factors(layer, name)
    if a.shape[0] > rank:
        raise ConfigError(f"target_rank {rank} is below an adapter's rank {a.shape[0]}: use the largest rank")
    if a.shape[0] == rank:
        return
    with torch.no_grad():
        a.data = torch.cat([a.data, a.new_zeros(rank - a.shape[0], a.shape[1])])
        b.data = torch.cat([b.data, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)


def record_shapes(host: Any, adapter_name: str, layers: dict[str, Any]) -> None:
    """Rewrite the adapter's config so that its saved tensors load again: every module's rank and
    an alpha that keeps its scale (explicit per-module patterns)."""
    config = host.peft_config[adapter_name]
    ranks = {n: factors(layer, adapter_name)[0].shape[0] for n, layer in layers.items()}
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


@dataclasses.dataclass(frozen=True)
class LoraHotSwap:
    """:class:`~deltatune.methods.contract.HotSwap` for LoRA (and DoRA) adapters in ``layer_classes``."""

    layer_classes: tuple[type[DeltaLayer], ...]

    def layers(self, host: Any, adapter_name: str) -> dict[str, Any]:
        return {
            n: layer
            for n, layer in host.delta_layers()
            if isinstance(layer, self.layer_classes) and adapter_name in layer.scaling
        }

    def prepare(self, host: Any, adapter_name: str, target_rank: int | None) -> None:
        layers = self.layers(host, adapter_name)
        for layer in layers.values():
            if target_rank is not None:
                pad(layer, adapter_name, target_rank)
            scale = layer.scaling[adapter_name]
            if not isinstance(scale, torch.Tensor):
                device = factors(layer, adapter_name)[0].device
                layer.scaling[adapter_name] = torch.tensor(float(scale), device=device)
        record_shapes(host, adapter_name, layers)

    def swap(self, host: Any, adapter_name: str, path: str | Path, new_config: DeltaConfig) -> None:
        layers = self.layers(host, adapter_name)
        old_config = host.peft_config[adapter_name]
        if new_config.use_dora != old_config.use_dora:
            raise ConfigError(
                f"cannot hot-swap: use_dora is {old_config.use_dora} here and {new_config.use_dora} in {path}"
            )
        by_module, unmatched = split_by_module(load_tensors(path), list(layers), KEY_PREFIX, None)
        missing = sorted(set(layers) - set(by_module))
        if unmatched or missing:
            raise ConfigError(
                f"cannot hot-swap {path} into {adapter_name!r}: the adapters target different modules "
                f"(only in the new one: {sorted(unmatched)[:5]}; only in the loaded one: {missing[:5]})"
            )
        for name, layer in layers.items():
            swap_layer(layer, adapter_name, by_module[name], *new_config.rank_and_alpha(name), new_config.use_rslora)
            set_dropout(layer, adapter_name, new_config.lora_dropout)
        host.peft_config[adapter_name] = dataclasses.replace(new_config, inference_mode=old_config.inference_mode)
        record_shapes(host, adapter_name, layers)


def set_dropout(layer: Any, name: str, p: float) -> None:
    """The new adapter's dropout (it matters once the adapter trains on), in the layer's train/eval mode."""
    dropouts = getattr(layer, "lora_dropout", None)
    if dropouts is None:
        return
    if p <= 0:
        if name in dropouts:
            del dropouts[name]
    elif name in dropouts:
        dropouts[name].p = p
    else:
        dropouts[name] = nn.Dropout(p).train(layer.training)


def swap_layer(layer: Any, name: str, tensors: dict[str, torch.Tensor], r: int, alpha: float, rslora: bool) -> None:
    a, b = factors(layer, name)
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
