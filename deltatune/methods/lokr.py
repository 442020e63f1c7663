"""LoKr (LyCORIS; Yeh et al., 2024): the weight update as a Kronecker product, ΔW = s · (W1 ⊗ W2).

With out = a·b and in = c·d (each split near its square root, or by ``decompose_factor``),
W1 is a×c and W2 is b×d, so ΔW (out×in) costs a·c + b·d numbers where a full update costs
out·in; a factor whose sides are large next to ``r`` is itself low rank (W2 = W2_a·W2_b, and W1
too with ``decompose_both``). s = alpha/r. W1 starts at zero, so the model starts as the base.
The update folds into W0 (``merge``). Linear layers only, as in peft; checkpoints are peft's
(``lokr_w1``, ``lokr_w2_a``, ...). ``rank_dropout`` drops rows of ΔW and ``module_dropout`` the
whole update of a layer, during training only.
"""

from __future__ import annotations

import math
import re
from dataclasses import field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.config import ConfigError, DeltaConfig, method_config
from deltatune.methods.base import DeltaLayer, SplitsRows, wrap_modules
from deltatune.methods.contract import Method, register
from deltatune.targeting import find_targets


@method_config
class LoKrConfig(DeltaConfig):
    """LoKr options, with peft's names and defaults."""

    peft_type = "LOKR"
    r: int = 8
    """rank of a factor that is decomposed (W2 when r < max(b, d)/2; W1 too with decompose_both)"""
    alpha: float = 8
    """the update is scaled by alpha/r"""
    rank_dropout: float = 0.0
    """during training, drop each output row of the update with this probability"""
    module_dropout: float = 0.0
    """during training, skip a layer's whole update with this probability"""
    use_effective_conv2d: bool = False
    """peft's option for Conv2d layers; deltatune adapts Linear layers only"""
    decompose_both: bool = False
    """also write W1 as a low-rank product when r is small next to its sides"""
    decompose_factor: int = -1
    """split each dimension as factor × rest when it divides it; -1: near its square root"""
    rank_dropout_scale: bool = False
    """rescale the kept rows by the mean of the rank-dropout mask"""
    init_weights: bool | str = True
    """True: W1 = 0 (the base model at start); 'lycoris': W2 = 0 instead; False: random (debugging)"""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """per-module ranks overriding r: {name or regex: rank}"""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """per-module alpha overrides: {name or regex: alpha}"""

    def validate(self) -> None:
        if any(not isinstance(r, int) or r <= 0 for r in [self.r, *self.rank_pattern.values()]):
            raise ConfigError(f"LoKr rank r must be a positive integer, got {self.r}")
        for key in ("rank_dropout", "module_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"{key} must be in [0, 1), got {getattr(self, key)}")
        if self.init_weights not in (True, False, "lycoris"):
            raise ConfigError(f"init_weights must be True, False or 'lycoris', got {self.init_weights!r}")

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        def lookup(patterns: dict[str, Any], default: Any) -> Any:
            return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", module_name)), default)

        return lookup(self.rank_pattern, self.r), lookup(self.alpha_pattern, self.alpha)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m·n = dimension and m ≤ n: m = factor if it divides, else the divisor pair
    with the smallest sum whose first part stays ≤ factor (LyCORIS's and peft's rule)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        candidate = next(k for k in range(m + 1, dimension + 1) if dimension % k == 0)
        if candidate + dimension // candidate > m + n or candidate > limit:
            break
        m, n = candidate, dimension // candidate
    return min(m, n), max(m, n)


class LoKrLinear(SplitsRows, DeltaLayer):
    """A frozen Linear plus s·(W1 ⊗ W2) per adapter."""

    sums_active = True
    adapter_attrs = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    adapter_values = ("scaling", "dropouts")

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        for attr in self.adapter_attrs:
            setattr(self, attr, nn.ParameterDict())
        self.scaling: dict[str, float] = {}
        self.dropouts: dict[str, tuple[float, float, bool]] = {}

    @property
    def adapter_names(self) -> list[str]:
        return list(dict.fromkeys(n for attr in self.adapter_attrs for n in getattr(self, attr)))

    def holds(self, name: str) -> bool:
        return name in self.scaling

    def add(self, name: str, r: int, alpha: float, config: LoKrConfig) -> None:
        out_dim, in_dim = self.base_layer.weight.shape
        (a, b), (c, d) = factorization(out_dim, config.decompose_factor), factorization(in_dim, config.decompose_factor)
        device = self.base_layer.weight.device

        def new(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, device=device))

        if config.decompose_both and r < max(a, c) / 2:
            self.lokr_w1_a[name], self.lokr_w1_b[name] = new(a, r), new(r, c)
        else:
            self.lokr_w1[name] = new(a, c)
        if r < max(b, d) / 2:
            self.lokr_w2_a[name], self.lokr_w2_b[name] = new(b, r), new(r, d)
        else:
            self.lokr_w2[name] = new(b, d)
        self.scaling[name] = alpha / r
        self.dropouts[name] = (config.rank_dropout, config.module_dropout, config.rank_dropout_scale)
        self._init(name, config.init_weights)

    def _init(self, name: str, init: bool | str) -> None:
        """In peft's order (same draws for the same seed): W1 (or its factors), then W2's."""
        zero = {True: "w1", "lycoris": "w2", False: None}[init]

        def fill(param: nn.Parameter, zeroed: bool) -> None:
            nn.init.zeros_(param) if zeroed else nn.init.kaiming_uniform_(param, a=math.sqrt(5))

        with torch.no_grad():
            if name in self.lokr_w1:
                fill(self.lokr_w1[name], zero == "w1")
            else:
                fill(self.lokr_w1_a[name], zero == "w1")
                fill(self.lokr_w1_b[name], False)
            if name in self.lokr_w2:
                fill(self.lokr_w2[name], zero == "w2")
            else:
                fill(self.lokr_w2_a[name], False)
                fill(self.lokr_w2_b[name], zero == "w2")

    def _factor(self, name: str, which: str) -> torch.Tensor:
        whole = getattr(self, f"lokr_{which}")
        if name in whole:
            return whole[name]
        return getattr(self, f"lokr_{which}_a")[name] @ getattr(self, f"lokr_{which}_b")[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        return torch.kron(self._factor(name, "w1"), self._factor(name, "w2")) * self.scaling[name]

    def delta(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        """s·(W1 ⊗ W2)·x, with LoKr's module dropout (None: dropped this step) and rank dropout."""
        rank_dropout, module_dropout, rescale = self.dropouts[name]
        if self.training and module_dropout and float(torch.rand(1)) <= module_dropout:
            return None
        delta = self.delta_weight(name)
        if self.training and rank_dropout:
            keep = (torch.rand(delta.shape[0]) > rank_dropout).to(delta)
            delta = delta * (keep / keep.mean() if rescale else keep).view(-1, 1)
        return F.linear(x.to(delta.dtype), delta)


def inject(model: nn.Module, adapter_name: str, config: LoKrConfig) -> list[str]:
    """Add LoKr adapter ``adapter_name`` to the Linear layers ``config`` selects; return their names."""
    if config.target_modules is None:
        raise ConfigError("LoKr needs target_modules (e.g. ['q_proj', 'v_proj'] or 'all-linear')")
    names = find_targets(
        model,
        config.target_modules,
        allowed_types=LOKR.module_types,
        exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
    )
    for name, layer in wrap_modules(model, LOKR.layers_for(model, names), "a LoKr adapter").items():
        r, alpha = config.rank_and_alpha(name)
        layer.add(adapter_name, r, alpha, config)
    return names


LOKR = register(
    Method(
        "lokr",
        LoKrConfig,
        inject,
        (LoKrLinear,),
        merges=True,
        mixes="rows",
        rank_option="r",
        layer_types=((nn.Linear, LoKrLinear),),
    )
)
