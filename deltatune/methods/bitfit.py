"""BitFit: train only the bias terms, h = W0·x + (b0 + Δb).

        x
        │
 ┌──────┴──────┐
 │ W0·x + b0   │  frozen Linear / Conv1D / LayerNorm
 └──────┬──────┘
        │
        + ── Δb   one vector per adapter, zero init -> output unchanged at start
        │
        h

Ben-Zaken et al. (2022) reach close to full fine-tuning on GLUE by training the biases alone
(~0.1% of the parameters). Training a separate Δb instead of b0 itself keeps the base model
intact, lets several adapters coexist and keeps checkpoints down to the 1-D deltas; ``merge``
folds Δb into b0. ``bias="all"`` follows the paper and includes the LayerNorm biases.
Architectures without biases (Llama) need ``add_missing=True``: Δb is then a new bias, and
merging gives the base layer a bias parameter it did not have.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.config import ConfigError, DeltaConfig, method_config
from deltatune.methods.base import DeltaLayer, SplitsRows, wrap_modules
from deltatune.methods.contract import Method, register
from deltatune.targeting import find_targets, layer_index, name_matches, output_head_names
from deltatune.wrappers import base_of

BIAS_CHOICES = ("all", "attention", "mlp")
BIAS_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D, nn.LayerNorm)


@method_config
class BitFitConfig(DeltaConfig):
    """Which biases train: ``all`` (every Linear/Conv1D and LayerNorm but the output head),
    ``attention`` (the attention blocks' linears) or ``mlp`` (the feed-forward linears).

    ``bias`` replaces ``target_modules`` (which is refused); ``exclude_modules`` and
    ``layers_to_transform`` narrow the selection as for every method.
    """

    peft_type = "BITFIT"
    cli_hidden: ClassVar[frozenset[str]] = DeltaConfig.cli_hidden | {"target_modules"}
    bias: str = "all"
    """which biases train: all, attention or mlp (it replaces --target-modules, which is refused)"""
    add_missing: bool = False
    """give selected layers without a bias (e.g. Llama's) a new zero-initialised bias; off: they are skipped"""

    def validate(self) -> None:
        if self.bias not in BIAS_CHOICES:
            raise ConfigError(f"BitFit bias must be one of {', '.join(BIAS_CHOICES)}, got {self.bias!r}")
        if self.target_modules is not None:
            raise ConfigError(
                "BitFit picks its layers with bias='all', 'attention' or 'mlp', not target_modules; "
                "narrow the choice with exclude_modules or layers_to_transform"
            )


class BitFitLayer(SplitsRows, DeltaLayer):
    """A frozen layer whose output gets a per-adapter bias delta."""

    adapter_attrs = ("bias_delta",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.bias_delta = nn.ParameterDict()
        self.created_bias = False  # merge gave a bias-less base layer its bias

    def bias_shape(self) -> tuple[int, ...]:
        base = self.base_layer
        if base.bias is not None:
            return tuple(base.bias.shape)
        if isinstance(base, nn.LayerNorm):
            return tuple(base.normalized_shape)
        return (base.weight.shape[1] if isinstance(base, Conv1D) else base.weight.shape[0],)

    def add(self, name: str) -> None:
        param = next(self.base_layer.parameters(), None)
        device = param.device if param is not None else None
        self.bias_delta[name] = nn.Parameter(torch.zeros(self.bias_shape(), device=device))

    def delta(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.bias_delta[name]

    # The delta belongs to the bias, not to the weight that DeltaLayer.merge updates.
    def merge(self, name: str) -> None:
        if self.merged_adapter == name or name not in self.bias_delta:
            return
        if self.merged_adapter is not None:
            self.unmerge()
        base = self.base_layer
        delta = self.bias_delta[name].detach()
        if base.bias is None:
            dtype = base.weight.dtype if base.weight is not None else delta.dtype
            base.bias = nn.Parameter(torch.zeros_like(delta, dtype=dtype), requires_grad=False)
            self.created_bias = True
        with torch.no_grad():
            base.bias += delta.to(base.bias.dtype)
        self.merged_adapter = name

    def unmerge(self) -> None:
        if self.merged_adapter is None:
            return
        base = self.base_layer
        if self.created_bias:
            base.bias = None
            self.created_bias = False
        else:
            with torch.no_grad():
                base.bias -= self.bias_delta[self.merged_adapter].detach().to(base.bias.dtype)
        self.merged_adapter = None


def _is_attention(name: str) -> bool:
    return any("attn" in part or "attention" in part for part in name.lower().split("."))


def _in_scope(name: str, module: nn.Module, config: BitFitConfig, heads: list[str]) -> bool:
    """Whether ``bias`` selects this layer. Heads are left out: they train whole or not at all."""
    if ".modules_to_save." in f".{name}." or any(name_matches(name, h) for h in heads):
        return False
    if config.bias == "all":
        return True
    if isinstance(module, nn.LayerNorm):
        return False
    if config.bias == "attention":
        return _is_attention(name)
    return layer_index(name, config.layers_pattern) is not None and not _is_attention(name)  # mlp


def select(model: nn.Module, config: BitFitConfig) -> list[str]:
    """Names of the layers whose bias trains; raises ConfigError before anything is changed."""
    heads = sorted(output_head_names(model) | set(config.modules_to_save or []))
    in_scope = {
        n
        for n, m in model.named_modules()
        if ".base_layer" not in n and isinstance(base_of(m), BIAS_TYPES) and _in_scope(n, base_of(m), config, heads)
    }
    if not in_scope:
        raise ConfigError(f"BitFit bias={config.bias!r} selects no layer of {type(model).__name__}")
    names = find_targets(
        model,
        ".*",
        allowed_types=BIAS_TYPES,
        exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
        skip=lambda n, m: n not in in_scope,
    )
    if config.add_missing:
        return names
    with_bias = [n for n in names if base_of(model.get_submodule(n)).bias is not None]
    if not with_bias:
        raise ConfigError(
            f"BitFit trains bias terms, but the {len(names)} layers bias={config.bias!r} selects in "
            f"{type(model).__name__} (e.g. {names[0]}) have no bias. Pass add_missing=True "
            "(--add-missing) to train new zero-initialised biases there."
        )
    return with_bias


def finalize_merged(model: nn.Module) -> list[str]:
    """Set the config flags (Llama's ``attention_bias``/``mlp_bias``) that make ``from_pretrained``
    build the biases ``merge_and_unload`` gave a bias-less model; without them a saved merged
    model silently loads without its biases. Returns the flags set."""
    config = getattr(model, "config", None)
    flags = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.bias is not None and layer_index(name) is not None:
            flag = "attention_bias" if _is_attention(name) else "mlp_bias"
            if getattr(config, flag, None) is False:
                setattr(config, flag, True)
                flags.add(flag)
    return sorted(flags)


def inject(model: nn.Module, adapter_name: str, config: BitFitConfig) -> list[str]:
    """Add bias deltas for adapter ``adapter_name`` to the layers ``config`` selects; return their names."""
    names = select(model, config)
    for layer in wrap_modules(model, dict.fromkeys(names, BitFitLayer)).values():
        layer.add(adapter_name)
    return names


register(
    Method(
        "bitfit",
        BitFitConfig,
        inject,
        (BitFitLayer,),
        merges=True,
        mixes="rows",
        finalize_merged=finalize_merged,
        learning_rates=(("classification", 5e-3),),  # docs/defaults.md
    )
)
