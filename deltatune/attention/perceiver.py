"""Perceiver-style latents (Jaegle et al., 2021) for encoders: from layer ``from_layer`` on, the
model runs on ``num_latents`` latent states instead of the n tokens. The latents are made by cross
attention: learned latent queries attend to the hidden states (O(n k)); the layers after that are
self-attention over the latents (O(L k^2)), decoupling depth from input length.

Latent 0 is the first token's state as it is ([CLS]: the pooler and classification heads read
position 0), the other k - 1 come from the cross attention. The latent queries are a trainable
module named ``perceiver_latents`` (an adapter's ``modules_to_save`` entry, so it is saved with the
adapter). The model's output then has k positions, so this suits sequence-level tasks only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.attention.registry import Call, Pattern, positive, register
from deltatune.config import ConfigError

REASON = (
    "Perceiver replaces the n token positions with k latents made from all of them, so there is no position "
    "left to predict the next token from; it suits encoders (sequence classification)"
)
HOOK = "_deltatune_perceiver_hook"


@dataclasses.dataclass
class PerceiverOptions:
    num_latents: int = 64
    """latent states the layers run on from --from-layer on (the first is the [CLS] token's own state)"""
    from_layer: int | None = None
    """first layer that runs on the latents (default: the middle layer)"""

    trainable_modules: ClassVar[tuple[str, ...]] = ("perceiver_latents",)

    def __post_init__(self) -> None:
        positive(self.num_latents, "perceiver: --num-latents")
        if self.num_latents < 2:
            raise ConfigError("perceiver: --num-latents must be at least 2 (the [CLS] state and one latent)")
        if self.from_layer is not None and (not isinstance(self.from_layer, int) or self.from_layer < 0):
            raise ConfigError(f"perceiver: --from-layer must be a layer index >= 0, got {self.from_layer!r}")


class PerceiverLatents(nn.Module):
    """Learned latent queries and the cross attention that turns n hidden states into k latents."""

    def __init__(self, num_latents: int, hidden: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_latents - 1, hidden) / math.sqrt(hidden))

    def forward(self, hidden: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        mask = None if keep is None else keep[:, None, :]
        queries = self.queries.to(hidden.dtype).expand(hidden.shape[0], -1, -1)
        latents = F.scaled_dot_product_attention(queries, hidden, hidden, attn_mask=mask)
        return torch.cat([hidden[:, :1], latents], dim=1)


def _layers(model: nn.Module) -> nn.ModuleList:
    count = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ConfigError(f"perceiver: found no list of {count} layers in {type(model).__name__}")


def _hook(layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    hidden = args[0] if args else kwargs["hidden_states"]
    mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
    keep = None
    if isinstance(mask, torch.Tensor):
        mask = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        keep = mask[:, 0].any(1) if mask.ndim == 4 else mask.bool()
    latents = layer.perceiver_latents(hidden, keep)
    if args:
        return (latents, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": latents}


def install(model: nn.Module, options: PerceiverOptions) -> list[str]:
    layers = _layers(model)
    start = len(layers) // 2 if options.from_layer is None else options.from_layer
    if start >= len(layers):
        raise ConfigError(
            f"perceiver: --from-layer {start} but the model has {len(layers)} layers (0..{len(layers) - 1})"
        )
    layer = layers[start]
    layer.perceiver_latents = PerceiverLatents(options.num_latents, model.config.hidden_size).to(
        next(layer.parameters())
    )
    setattr(layer, HOOK, layer.register_forward_pre_hook(_hook, with_kwargs=True))
    return [name for name, m in model.named_modules() if m is layer.perceiver_latents]


def uninstall(model: nn.Module) -> None:
    for module in list(model.modules()):
        handle = module.__dict__.pop(HOOK, None)
        if handle is not None:
            handle.remove()
        if "perceiver_latents" in module._modules:
            del module._modules["perceiver_latents"]


def forward(call: Call) -> torch.Tensor:
    """Full attention; on the latents the token mask no longer fits (and no latent is padding)."""
    mask = call.mask
    if mask is not None and mask.shape[-1] != call.key.shape[2]:
        mask = None
    return F.scaled_dot_product_attention(
        call.query,
        call.key,
        call.value,
        attn_mask=mask,
        dropout_p=call.dropout,
        scale=call.scale,
        is_causal=False,
        enable_gqa=call.key.shape[1] != call.query.shape[1],
    )


register(
    Pattern(
        name="perceiver",
        options_class=PerceiverOptions,
        forward=forward,
        allowed=None,
        summary="Perceiver: from a chosen layer on, k latents made by cross-attention; O(n*k + L*k^2); encoders",
        encoder_only=True,
        encoder_reason=REASON,
        install=install,
        uninstall=uninstall,
    )
)
