"""(IA)³ (Liu et al., 2022): learned vectors that rescale activations, h = l ⊙ (W0·x + b).

        x ──► [× l_ff] ──► W0 ──► (+ b) ──► [× l] ──► h
              feed-forward        other targets

A target listed in ``feedforward_modules`` scales its *input* (one number per input feature,
peft's ``(1, in)`` vector); every other target scales its *output*, bias included (``(out, 1)``).
The vectors start at 1, so the model starts as the base model, and they are all that trains
(fewer parameters than LoRA at r=1). Since ``W0·(l ⊙ x) = (W0 · diag l)·x`` and
``l ⊙ (W0·x + b) = diag l · W0·x + l ⊙ b``, merging multiplies columns or rows (and the bias) of
W0: no added latency. Unmerging divides them back, so a scale of exactly 0 cannot be merged.
Several adapters active at once multiply their scales, as in peft. Checkpoints are peft's
(``<module>.ia3_l``).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.config import ConfigError, DeltaConfig, method_config
from deltatune.methods.base import DeltaLayer, SplitsRows, wrap_modules
from deltatune.methods.contract import Method, register
from deltatune.targeting import find_targets, name_matches
from deltatune.wrappers import base_of

# peft's defaults when target_modules is not set: (targets, feed-forward targets) per model type.
DEFAULT_TARGETS = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
}


@method_config
class IA3Config(DeltaConfig):
    """(IA)³ options, with peft's names and defaults."""

    peft_type = "IA3"
    feedforward_modules: list[str] | str | None = None
    """targets whose input (not output) is scaled, e.g. down_proj; a subset of target_modules (names or a regex)"""
    fan_in_fan_out: bool = False
    """peft's flag for weights stored in×out (GPT-2 Conv1D); set automatically when such a layer is adapted"""
    init_ia3_weights: bool = True
    """True: scales start at 1 (the base model); False: random (debugging)"""

    def to_dict(self) -> dict[str, Any]:
        """peft's IA3Config has no layer selection: leave those keys out while unset (peft warns on them)."""
        data = super().to_dict()
        return {k: v for k, v in data.items() if v is not None or k not in ("layers_to_transform", "layers_pattern")}

    def validate(self) -> None:
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ConfigError(f"feedforward_modules {extra} are not in target_modules {self.target_modules}")


class IA3Layer(SplitsRows, DeltaLayer):
    """A frozen Linear/Conv1D whose input (feed-forward) or output is scaled per adapter."""

    sums_active = True
    adapter_attrs = ("ia3_l",)
    adapter_values = ("feedforward",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.transposed = isinstance(base_layer, Conv1D)
        weight = base_layer.weight
        self.in_features, self.out_features = weight.shape if self.transposed else weight.shape[::-1]
        self.ia3_l = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}

    def add(self, name: str, feedforward: bool, init: bool) -> None:
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        weight = torch.ones(shape) if init else torch.randn(shape)
        self.ia3_l[name] = nn.Parameter(weight.to(self.base_layer.weight.device))
        self.feedforward[name] = feedforward

    def scales(self, names: list[str], feedforward: bool) -> torch.Tensor | None:
        """The product of the named adapters' scales of one kind, flat (None: none of that kind)."""
        chosen = [self.ia3_l[n].flatten() for n in names if self.feedforward[n] == feedforward]
        if not chosen:
            return None
        out = chosen[0]
        for scale in chosen[1:]:
            out = out * scale
        return out

    def forward_active(self, names: list[str], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """(IA)³ scales, not adds: the input (feed-forward) or the output, by every active adapter's scale."""
        inputs = self.scales(names, feedforward=True)
        if inputs is not None:
            x = (x.to(inputs.dtype) * inputs).to(x.dtype)
        out = self.base_layer(x, *args, **kwargs)
        outputs = self.scales(names, feedforward=False)
        return out if outputs is None else (out * outputs).to(out.dtype)

    def _factor(self, name: str) -> torch.Tensor:
        """The scale laid out to multiply the stored weight (in×out for Conv1D)."""
        scale = self.ia3_l[name].detach()
        return scale.T if self.transposed else scale

    def _rescale(self, name: str, divide: bool) -> None:
        base, scale = self.base_layer, self.ia3_l[name].detach()
        if not isinstance(base.weight, torch.Tensor):
            raise TypeError("(IA)³ cannot merge into a quantized base: merge after dequantize_base")
        op = torch.div if divide else torch.mul
        with torch.no_grad():
            base.weight.data = op(base.weight, self._factor(name).to(base.weight.dtype))
            if not self.feedforward[name] and base.bias is not None:
                base.bias.data = op(base.bias, scale.flatten().to(base.bias.dtype))

    def merge(self, name: str) -> None:
        if self.merged_adapter == name or name not in self.ia3_l:
            return
        if bool((self.ia3_l[name] == 0).any()):
            raise ValueError(f"adapter {name!r} has (IA)³ scales of exactly 0: merging them could not be undone")
        self.unmerge()
        self._rescale(name, divide=False)
        self.merged_adapter = name

    def unmerge(self) -> None:
        if self.merged_adapter is None:
            return
        self._rescale(self.merged_adapter, divide=True)
        self.merged_adapter = None


def _resolve(model: nn.Module, config: IA3Config) -> tuple[Any, Any]:
    if config.target_modules is not None:
        return config.target_modules, config.feedforward_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise ConfigError(
            f"no default (IA)³ targets for model type {model_type!r}: set target_modules and feedforward_modules"
        )
    targets, feedforward = DEFAULT_TARGETS[model_type]
    return targets, (feedforward if config.feedforward_modules is None else config.feedforward_modules)


def is_feedforward(name: str, feedforward: list[str] | str | None) -> bool:
    if feedforward is None:
        return False
    if isinstance(feedforward, str):  # a regex over the whole name, as peft
        return re.fullmatch(feedforward, name) is not None
    return any(name_matches(name, entry) for entry in feedforward)


def inject(model: nn.Module, adapter_name: str, config: IA3Config) -> list[str]:
    """Add (IA)³ adapter ``adapter_name`` to the modules ``config`` selects; return their names."""
    config.target_modules, config.feedforward_modules = _resolve(model, config)  # recorded, as peft does
    names = find_targets(
        model,
        config.target_modules,
        allowed_types=IA3.module_types,
        exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
    )
    for name, layer in wrap_modules(model, IA3.layers_for(model, names), "an (IA)³ adapter").items():
        if isinstance(base_of(layer), Conv1D):
            config.fan_in_fan_out = True
        layer.add(adapter_name, is_feedforward(name, config.feedforward_modules), config.init_ia3_weights)
    return names


IA3 = register(
    Method(
        "ia3",
        IA3Config,
        inject,
        (IA3Layer,),
        merges=True,
        mixes="rows",
        layer_types=((nn.Linear, IA3Layer), (Conv1D, IA3Layer)),
    )
)
