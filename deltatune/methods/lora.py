"""LoRA: a frozen weight W0 plus a trainable low-rank update, h = W0·x + (alpha/r)·B·A·x.

        x ──────────────┬──────────────┐
                        │              │ dropout
                 ┌──────┴──────┐   ┌───┴───┐
                 │  W0 (d×k)   │   │ A r×k │  random init
                 │  frozen     │   └───┬───┘
                 └──────┬──────┘   ┌───┴───┐
                        │          │ B d×r │  zero init -> output unchanged at start
                        │          └───┬───┘
                        │              │ × alpha/r  (alpha/√r with rsLoRA)
                        └──── + ───────┘
                              h

Because B·A has the shape of W0, it folds into the weight (``merge``) for zero added latency,
and unfolds again (``unmerge``) to switch tasks. Works on ``nn.Linear``, transformers' GPT-2
``Conv1D`` (weights stored transposed) and ``nn.Embedding``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune import routing
from deltatune.config import ConfigError, DeltaConfig, method_config
from deltatune.methods import dora, lora_fused, lora_init
from deltatune.methods.base import DeltaLayer, GathersRows, wrap_modules
from deltatune.methods.contract import Method, register
from deltatune.methods.lora_embedding import LoraEmbedding, stacked_factors
from deltatune.methods.lora_hotswap import LoraHotSwap
from deltatune.targeting import find_targets


@method_config
class LoraConfig(DeltaConfig):
    """LoRA options, with Hugging Face peft's names and defaults."""

    peft_type = "LORA"
    r: int = 8
    """rank of the update B·A: parameters grow with r; raise it for harder tasks (rank_pattern overrides per module)"""
    lora_alpha: float = 8
    """the update is scaled by lora_alpha/r (lora_alpha/√r with use_rslora): raise it for larger updates"""
    lora_dropout: float = 0.0
    """dropout on the LoRA branch's input during training, in [0, 1); 0 disables it"""
    use_rslora: bool = False
    """rank-stabilised LoRA: scale by lora_alpha/√r instead of lora_alpha/r, so large ranks still learn"""
    fan_in_fan_out: bool = False
    """peft's flag for weights stored in×out (GPT-2 Conv1D); set automatically when such a layer is adapted"""
    bias: str = "none"
    """peft's LoRA bias training; only 'none' is supported (train biases with the bitfit method)"""
    init_lora_weights: bool | str = True
    """True: Kaiming A, zero B; 'gaussian': normal A (std 1/r); 'pissa', 'pissa_niter_K' (randomized SVD),
    'olora': A, B from W0's SVD/QR, the residual left in W0; 'loftq': A, B fit the quantized base's error
    (loftq_config); False: skip (debugging)"""
    use_dora: bool = False
    """DoRA: also train a magnitude per output (peft's use_dora); a norm per forward, cached while weights stay"""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """per-module ranks overriding r: {name or regex: rank}, a key matching the module name or a dotted suffix of it"""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """per-module lora_alpha overrides: {name or regex: alpha}, matched as rank_pattern"""
    loftq_config: dict[str, Any] = field(default_factory=dict)
    """with init_lora_weights='loftq': {'loftq_bits': 4 (nf4 base) or 8 (int8), 'loftq_iter': N} (peft's LoftQConfig)"""

    def validate(self) -> None:
        ranks = [self.r, *self.rank_pattern.values()]
        if any(not isinstance(r, int) or r <= 0 for r in ranks):
            raise ConfigError(f"LoRA rank r must be a positive integer, got {ranks}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias != "none":
            raise ConfigError(
                f"LoRA bias={self.bias!r} is not supported: use bias='none', and BitFitConfig to train biases"
            )
        lora_init.check(self.init_lora_weights)
        self.loftq_config = lora_init.check_options(self.init_lora_weights, self.loftq_config)

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """peft's per-module overrides: a pattern key matches the name or a dotted suffix of it."""

        def lookup(patterns: dict[str, Any] | None, default: Any) -> Any:
            for key, value in (patterns or {}).items():
                if re.match(rf"(.*\.)?({key})$", module_name):
                    return value
            return default

        return lookup(self.rank_pattern, self.r), lookup(self.alpha_pattern, self.lora_alpha)


class LoraLinear(dora.KeepsMergedDelta, GathersRows, DeltaLayer):
    """LoRA (and DoRA, see deltatune.methods.dora) around ``nn.Linear`` or ``Conv1D`` (weight stored in×out)."""

    sums_active = True
    adapter_attrs = ("lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector")
    adapter_values = ("scaling", "norms")
    loraplus_roles: ClassVar[dict[str, str]] = {"lora_B": "B"}
    shared_input: lora_fused.SharedInput | None = None  # siblings reading one input share the A matmul

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.transposed = isinstance(base_layer, Conv1D)
        weight = base_layer.weight
        self.in_features, self.out_features = weight.shape[::-1] if not self.transposed else weight.shape
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.norms = dora.NormCache()

    def add(
        self,
        name: str,
        r: int,
        alpha: float,
        dropout: float,
        rslora: bool,
        init: bool | str,
        use_dora: bool = False,
        config: Any = None,
    ) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False)
        if dropout > 0:
            self.lora_dropout[name] = nn.Dropout(dropout)
        self.scaling[name] = alpha / math.sqrt(r) if rslora else alpha / r
        device = self.base_layer.weight.device
        if device.type != "cpu":  # created on the CPU as peft does (the same random draws), then moved
            for store in (self.lora_A, self.lora_B, self.lora_dropout):
                if name in store:
                    store[name].to(device)
        lora_init.initialize(self, name, init, config)
        if use_dora:  # after the init: a residual init changes W0, and m starts at ‖W0 + s·B·A‖
            self.lora_magnitude_vector[name] = nn.Parameter(self.dora_norm(name, self.base_weight()))

    def base_weight(self) -> torch.Tensor:
        """W0 as out×in (dequantized for a quantized base)."""
        base = self.base_layer
        weight = base.dequantize() if hasattr(base, "dequantize") else base.weight
        return weight.T if self.transposed else weight

    def lora_delta(self, name: str) -> torch.Tensor:
        """s·B·A, out×in."""
        return self.lora_B[name].weight @ self.lora_A[name].weight * self.scaling[name]

    def dora_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        base = self.base_layer  # a quantized base's codes say when its dequantized weight changed
        stored = tuple(base.quantized_tensors()) if hasattr(base, "quantized_tensors") else (base.weight,)
        return self.norms.get(
            name,
            (*stored, weight, a, b),
            lambda: dora.column_norm(weight, (b @ a).to(weight.dtype), self.scaling[name]),
        )

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = self.lora_delta(name)
        if name in self.lora_magnitude_vector:
            weight = self.base_weight()
            delta = dora.merged_weight_delta(weight, delta.to(weight.dtype), self.lora_magnitude_vector[name])
        return delta.T if self.transposed else delta

    def row_factors(self, names: list[str], slots: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Each row's Aᵀ (in×r) and scaled Bᵀ (r×out) (zero for rows whose adapter this layer
        lacks), its dropout probability, and its DoRA factor g (out; 1 for plain LoRA rows), or None."""
        a_t, b_t = stacked_factors(
            [self.lora_A[n].weight for n in names],
            [self.lora_B[n].weight for n in names],
            [self.scaling[n] for n in names],
        )
        p = [self.lora_dropout[n].p if n in self.lora_dropout else 0.0 for n in names]
        gains = None
        if any(n in self.lora_magnitude_vector for n in names):
            weight, ones = self.base_weight(), a_t.new_ones(self.out_features)
            gains = torch.stack(
                [ones, *(self.dora_gain(n, weight) if n in self.lora_magnitude_vector else ones for n in names)]
            )[slots]
        return a_t[slots], b_t[slots], torch.tensor([0.0, *p], device=slots.device)[slots], gains

    def slot_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A (r×in) and s·B (out×r) of adapter ``name`` for a server's adapter slots (deltatune.serving.slots),
        None when this layer lacks it; a DoRA adapter's rows are no plain product, so slots refuse it."""
        if name not in self.lora_A:
            return None
        if name in self.lora_magnitude_vector:
            raise ValueError(f"adapter {name!r} uses DoRA, which adapter slots cannot hold")
        return self.lora_A[name].weight, self.lora_B[name].weight * self.scaling[name]

    def dora_gain(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """g = m / ‖W0 + s·B·A‖ (per output), the factor DoRA applies to the LoRA layer's output."""
        return self.lora_magnitude_vector[name] / self.dora_norm(name, weight)

    def delta_rows(self, rows: routing.RowAdapters, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        """Every row's own adapter in one pass: rows gather their A and B, then two batched
        matmuls (the gather-BMM that Punica/S-LoRA write as kernels); no loop over adapters.
        DoRA rows then scale their outputs by their own g (W0·x is the base output less its bias)."""
        held = rows.held_delta(self, x)  # a server's adapter slots hold this layer's factors
        if held is not None:
            return held
        factors = rows.per_row(self, self.lora_A, x.shape[0], x.device, self.row_factors)
        if factors is None:
            return None
        a_rows, b_rows, dropout, gains = factors
        h = x.reshape(x.shape[0], -1, x.shape[-1]).to(a_rows.dtype)
        if self.training and bool(dropout.any()):
            if gains is not None:
                raise ValueError("DoRA with lora_dropout cannot train in a mixed batch: train one adapter per batch")
            keep = (1 - dropout).view(-1, 1, 1)
            h = h * torch.bernoulli(keep.expand_as(h)) / keep
        delta = torch.bmm(torch.bmm(h, a_rows), b_rows).view(*x.shape[:-1], -1)
        if gains is None:
            return delta
        gains = gains.view(x.shape[0], *[1] * (x.dim() - 2), -1)
        return (gains - 1) * self.without_bias(out) + gains * delta

    def without_bias(self, out: torch.Tensor) -> torch.Tensor:
        bias = self.base_layer.bias
        return out if bias is None else out - bias

    def forward_active(self, names: list[str], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base output plus each adapter's update. A plain LoRA's B matmul adds into the output in the
        GEMM itself (``addmm``), so no separate pass over the (tokens x out_features) output adds it."""
        base = self.base_layer(x, *args, **kwargs)
        out = base
        for name in names:
            b = self.lora_B[name].weight
            if name in self.lora_magnitude_vector or out.dtype != b.dtype:
                out = out + self.delta(name, x, base).to(out.dtype)
                continue
            h = self.a_product(name, x)[0]
            flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), (b * self.scaling[name]).T)
            out = flat.view(out.shape)
        return out

    def a_product(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x·Aᵀ, the input A saw). Without dropout at work that input is x itself (no copy), and the
        product a slice of one matmul with the siblings that read the same x (deltatune.methods.lora_fused)."""
        lora_a = self.lora_A[name].weight
        dropping = self.training and name in self.lora_dropout
        product = None if dropping else lora_fused.shared_product(self, name, x)
        x = x.to(lora_a.dtype)
        dropped = self.lora_dropout[name](x) if dropping else x
        return (F.linear(dropped, lora_a) if product is None else product), dropped

    def delta(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """What adapter ``name`` adds to the base output ``out`` for input ``x``."""
        product, dropped = self.a_product(name, x)
        # Scaling B (r columns) is cheaper than scaling the output (all tokens x out_features).
        lora = F.linear(product, self.lora_B[name].weight * self.scaling[name])
        if name not in self.lora_magnitude_vector:
            return lora
        weight = self.base_weight().to(dropped.dtype)
        gain = self.dora_gain(name, weight)
        # As peft: with dropout at work W0 sees the same dropped input as the LoRA branch.
        dropping = self.training and name in self.lora_dropout
        base = F.linear(dropped, weight) if dropping else self.without_bias(out).to(dropped.dtype)
        return (gain - 1) * base + gain * lora


# Targets when the config names none, as in peft: the attention query and value projections.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
}


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise ConfigError(
            f"no default LoRA targets for model type {model_type!r}: set target_modules "
            "(e.g. 'all-linear', or names from `deltatune inspect`)"
        )
    return DEFAULT_TARGETS[model_type]


def inject(model: nn.Module, adapter_name: str, config: LoraConfig) -> list[str]:
    """Add LoRA adapter ``adapter_name`` to every module ``config`` selects; return their names."""
    if config.target_modules is None:
        config.target_modules = default_targets(model)  # recorded, so the saved config says what ran
    names = find_targets(
        model,
        config.target_modules,
        allowed_types=LORA.module_types,
        exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
    )
    for name, layer in wrap_modules(model, LORA.layers_for(model, names)).items():
        if isinstance(layer, LoraLinear) and layer.transposed:
            config.fan_in_fan_out = True  # peft's flag for Conv1D weights
        r, alpha = config.rank_and_alpha(name)
        layer.add(
            adapter_name,
            r,
            alpha,
            config.lora_dropout,
            config.use_rslora,
            config.init_lora_weights,
            config.use_dora,
            config,
        )
    lora_fused.group_siblings(model, names, LoraLinear)
    return names


A_SUFFIXES = (".lora_A.weight", ".lora_embedding_A")


def low_rank_factors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{module: A (r x in)}`` from a saved adapter's tensors (keys without the model prefix)."""
    out = {}
    for key, value in tensors.items():
        suffix = next((s for s in A_SUFFIXES if key.endswith(s)), None)
        if suffix is not None:
            out[key[: -len(suffix)]] = value.float()
    return out


LORA = register(
    Method(
        "lora",
        LoraConfig,
        inject,
        (LoraLinear, LoraEmbedding),
        merges=True,
        mixes="weights",
        rank_option="r",
        low_rank_factors=low_rank_factors,
        hotswap=LoraHotSwap((LoraLinear, LoraEmbedding)),
        layer_types=((nn.Embedding, LoraEmbedding), (nn.Linear, LoraLinear), (Conv1D, LoraLinear)),
        convert_saved=lora_init.converted,
        learning_rates=(("causal-lm", 2e-4), ("classification", 1e-3)),  # docs/defaults.md
    )
)

__all__ = ["LoraConfig", "LoraEmbedding", "LoraLinear", "inject", "stacked_factors"]
