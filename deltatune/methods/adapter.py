"""Bottleneck adapters (Houlsby et al., 2019): a small residual MLP after each sub-layer's output.

              x
              │
     ┌────────┴────────┐
     │ attention / FFN │  frozen
     │ output proj.    │  o_proj, down_proj / c_proj / output.dense
     └────────┬────────┘
              │ h (d)
              ├─────────────┐
              │       ┌─────┴─────┐
              │       │ down d→m  │  normal(0, init_std), zero bias
              │       └─────┬─────┘
              │             │ non-linearity (gelu)
              │       ┌─────┴─────┐
              │       │  up m→d   │  normal(0, init_std) -> near-identity at start
              │       └─────┬─────┘
              └──── + ──────┘
                    │  y = h + up(act(down(h)))
                    ▼  then the block's own residual and layer norm

Two adapters per transformer layer, each 2md + m + d parameters. The adapter wraps the output
projection itself, whose output is exactly "the sub-layer output before the residual is added".
The non-linearity means it cannot fold into the weights: unlike LoRA it stays as extra depth
(added latency at inference) and ``merge`` raises. Houlsby et al. also train the layer norms per
task; ``train_layer_norms`` wraps them in :class:`ModulesToSave` here, in ``inject``, because
``DeltaModel`` resolves ``config.modules_to_save`` before the method runs and that list would
be saved with the config. ``leave_out`` prunes adapters from (lower) layers, as the paper does.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

from deltatune.config import ConfigError, DeltaConfig, method_config
from deltatune.methods.base import DeltaLayer, ModulesToSave, SplitsRows, wrap_modules
from deltatune.methods.contract import Method, register
from deltatune.targeting import find_targets, layer_index
from deltatune.wrappers import base_of

# Regexes (matching the whole module name) of the two output projections, by model_type.
# In BERT the suffix "output.dense" also matches attention.output.dense: anchor it on the layer.
_LLAMA_LIKE = {"attention": r".*\.self_attn\.o_proj", "ffn": r".*\.mlp\.down_proj"}
_BERT_LIKE = {"attention": r".*\.attention\.output\.dense", "ffn": r".*\.layer\.\d+\.output\.dense"}
SITES = ("attention", "ffn")
PLACEMENTS: dict[str, dict[str, str]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gpt2": {"attention": r".*\.attn\.c_proj", "ffn": r".*\.mlp\.c_proj"},
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
}


@method_config
class AdapterConfig(DeltaConfig):
    """Bottleneck size m, where the adapters go, and which layers (``leave_out``) get none.

    ``target_modules`` overrides the per-architecture placement table (and ``placement``) for
    models it does not know: name the attention and feed-forward output projections.
    """

    peft_type = "BOTTLENECK_ADAPTER"
    bottleneck_size: int = 64
    """m, the adapter MLP's hidden width: 2md + m + d parameters per adapter; larger fits more, costs more"""
    non_linearity: str = "gelu"
    """activation between the down and up projections: a transformers ACT2FN name (gelu, relu, silu...)"""
    placement: tuple[str, ...] | list[str] = ("attention", "ffn")
    """where adapters go: after the attention output, the feed-forward output, or both (--target-modules overrides
    this for architectures the placement table does not know)"""
    leave_out: list[int] = field(default_factory=list)
    """layer indices that get no adapter"""
    init_std: float = 1e-3
    """std of the normal init of both projections' weights; small keeps the adapter near the identity at the start"""
    train_layer_norms: bool = True
    """also train per-adapter copies of the adapted layers' layer norms (as Houlsby et al.); off: adapters alone"""

    def __post_init__(self) -> None:
        normalize_sites(self)
        super().__post_init__()

    def validate(self) -> None:
        if not isinstance(self.bottleneck_size, int) or self.bottleneck_size <= 0:
            raise ConfigError(f"bottleneck_size must be a positive integer, got {self.bottleneck_size!r}")
        if self.non_linearity not in ACT2FN:
            raise ConfigError(f"non_linearity {self.non_linearity!r} is unknown; choose one of: {', '.join(ACT2FN)}")
        check_sites(self)
        if self.init_std < 0:
            raise ConfigError(f"init_std must be >= 0, got {self.init_std}")


def normalize_sites(config: Any) -> None:
    """``placement`` as a tuple and ``leave_out`` as a list, whichever form they were given in
    (shared by every config that places adapters at the Houlsby sites: this one, HyperFormer's)."""
    config.placement = (config.placement,) if isinstance(config.placement, str) else tuple(config.placement)
    config.leave_out = [config.leave_out] if isinstance(config.leave_out, int) else list(config.leave_out)


def check_sites(config: Any) -> None:
    if not config.placement or not set(config.placement) <= set(SITES):
        raise ConfigError(f"placement must name 'attention' and/or 'ffn', got {list(config.placement)}")


class BottleneckAdapter(SplitsRows, DeltaLayer):
    """A frozen output projection followed by a per-adapter bottleneck MLP with its own skip."""

    adapter_attrs = ("adapter_down", "adapter_up", "adapter_act")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        weight = base_layer.weight  # Conv1D stores in×out, nn.Linear out×in
        self.features = weight.shape[1] if isinstance(base_layer, Conv1D) else weight.shape[0]
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_act = nn.ModuleDict()

    def add(self, name: str, bottleneck: int, non_linearity: str, init_std: float) -> None:
        down, up = nn.Linear(self.features, bottleneck), nn.Linear(bottleneck, self.features)
        with torch.no_grad():
            for linear in (down, up):
                nn.init.normal_(linear.weight, std=init_std)
                nn.init.zeros_(linear.bias)
        self.adapter_down[name], self.adapter_up[name] = down, up
        self.adapter_act[name] = ACT2FN[non_linearity]
        self.to(self.base_layer.weight.device)

    def delta(self, name: str, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The bottleneck on the base output ``h`` (its own skip is the template's sum)."""
        down = self.adapter_down[name]
        return self.adapter_up[name](self.adapter_act[name](down(h.to(down.weight.dtype))))


def adapter_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in PLACEMENTS:
            raise ConfigError(
                f"no adapter placement known for model type {model_type!r} (known: {', '.join(PLACEMENTS)}); "
                "set target_modules to its attention and feed-forward output projections"
            )
        targets = "|".join(PLACEMENTS[model_type][p] for p in config.placement)
    names = find_targets(
        model,
        targets,
        allowed_types=ADAPTER.module_types,
        exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
    )
    kept = [n for n in names if layer_index(n, config.layers_pattern) not in set(config.leave_out)]
    if not kept:
        raise ConfigError(f"leave_out={config.leave_out} removes every adapter: nothing to adapt")
    return kept


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def _layer_norms(model: nn.Module, layers: set[int | None], layers_pattern: Any) -> list[str]:
    """Norms inside the transformer layers that carry adapters (not the final norm)."""
    names = []
    for name, module in model.named_modules():
        if ".base_layer" in name or ".modules_to_save." in name:
            continue  # the frozen original and the copies inside a ModulesToSave
        if _is_norm(base_of(module)) and layer_index(name, layers_pattern) in layers - {None}:
            names.append(name)
    return names


def inject(model: nn.Module, adapter_name: str, config: AdapterConfig) -> list[str]:
    """Add bottleneck adapter ``adapter_name`` (and per-adapter layer norms); return the module names."""
    names = adapter_targets(model, config)
    norms: list[str] = []
    if config.train_layer_norms:
        norms = _layer_norms(model, {layer_index(n, config.layers_pattern) for n in names}, config.layers_pattern)
    wrapped = wrap_modules(model, {**ADAPTER.layers_for(model, names), **dict.fromkeys(norms, ModulesToSave)})
    for name in names:
        wrapped[name].add(adapter_name, config.bottleneck_size, config.non_linearity, config.init_std)
    for name in norms:
        wrapped[name].add(adapter_name)
    return names + norms


ADAPTER = register(
    Method(
        "adapter",
        AdapterConfig,
        inject,
        (BottleneckAdapter, ModulesToSave),
        mixes="rows",
        layer_types=((nn.Linear, BottleneckAdapter), (Conv1D, BottleneckAdapter)),
        learning_rates=(("classification", 2e-4),),  # docs/defaults.md (1e-3 ties it)
    )
)
