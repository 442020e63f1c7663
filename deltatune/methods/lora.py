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
from dataclasses import field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune import routing
from deltatune.config import ConfigError, DeltaConfig, method_config
from deltatune.methods.base import DeltaLayer, wrap_modules
from deltatune.methods.contract import Method, register
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
    """True: Kaiming A, zero B (starts as the base model); 'gaussian': normal A, std 1/r; False: skip (debugging)"""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """per-module ranks overriding r: {name or regex: rank}, a key matching the module name or a dotted suffix of it"""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """per-module lora_alpha overrides: {name or regex: alpha}, matched as rank_pattern"""

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
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ConfigError(f"init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}")

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """peft's per-module overrides: a pattern key matches the name or a dotted suffix of it."""

        def lookup(patterns: dict[str, Any] | None, default: Any) -> Any:
            for key, value in (patterns or {}).items():
                if re.match(rf"(.*\.)?({key})$", module_name):
                    return value
            return default

        return lookup(self.rank_pattern, self.r), lookup(self.alpha_pattern, self.lora_alpha)


def stacked_factors(a: list[torch.Tensor], b: list[torch.Tensor], scaling: list[float]) -> tuple[torch.Tensor, ...]:
    """Adapters' Aᵀ (k×r) and scaled Bᵀ (r×n), zero-padded to the largest rank and stacked after
    a zero slot (index 0: no adapter), for mixed batches to index by row."""
    rank = max(t.shape[0] for t in a)
    a_t = [F.pad(t, (0, 0, 0, rank - t.shape[0])).T for t in a]
    b_t = [F.pad(t * s, (0, rank - t.shape[1])).T for t, s in zip(b, scaling, strict=True)]
    return torch.stack([torch.zeros_like(a_t[0]), *a_t]), torch.stack([torch.zeros_like(b_t[0]), *b_t])


class LoraLinear(DeltaLayer):
    """LoRA around ``nn.Linear`` or ``Conv1D`` (whose weight is stored as in×out)."""

    adapter_attrs = ("lora_A", "lora_B", "lora_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.transposed = isinstance(base_layer, Conv1D)
        weight = base_layer.weight
        self.in_features, self.out_features = weight.shape[::-1] if not self.transposed else weight.shape
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}

    def add(self, name: str, r: int, alpha: float, dropout: float, rslora: bool, init: bool | str) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False)
        if dropout > 0:
            self.lora_dropout[name] = nn.Dropout(dropout)
        self.scaling[name] = alpha / math.sqrt(r) if rslora else alpha / r
        if init is not False:
            with torch.no_grad():
                if init == "gaussian":
                    nn.init.normal_(self.lora_A[name].weight, std=1 / r)
                else:
                    nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B[name].weight)
        self.to(self.base_layer.weight.device)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.scaling.pop(name, None)

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = self.lora_B[name].weight @ self.lora_A[name].weight * self.scaling[name]
        return delta.T if self.transposed else delta

    def row_factors(self, names: list[str], slots: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each row's Aᵀ (in×r) and scaled Bᵀ (r×out) (zero for rows whose adapter this layer
        lacks), and its dropout probability."""
        a_t, b_t = stacked_factors(
            [self.lora_A[n].weight for n in names],
            [self.lora_B[n].weight for n in names],
            [self.scaling[n] for n in names],
        )
        p = [self.lora_dropout[n].p if n in self.lora_dropout else 0.0 for n in names]
        return a_t[slots], b_t[slots], torch.tensor([0.0, *p], device=slots.device)[slots]

    def forward_mixed(self, rows: routing.RowAdapters, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Every row's own adapter in one pass: rows gather their A and B, then two batched
        matmuls (the gather-BMM that Punica/S-LoRA write as kernels); no loop over adapters."""
        out = self.base_layer(x, *args, **kwargs)
        factors = rows.per_row(self, self.lora_A, x.shape[0], x.device, self.row_factors)
        if factors is None:
            return out
        a_rows, b_rows, dropout = factors
        h = x.reshape(x.shape[0], -1, x.shape[-1]).to(a_rows.dtype)
        if self.training and bool(dropout.any()):
            keep = (1 - dropout).view(-1, 1, 1)
            h = h * torch.bernoulli(keep.expand_as(h)) / keep
        delta = torch.bmm(torch.bmm(h, a_rows), b_rows).view(*x.shape[:-1], -1)
        return out + delta.to(out.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        mixed = routing.rows()
        if mixed is not None:
            return self.forward_mixed(mixed, x, *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        name = self.adapter_active()
        if name is None:
            return out
        lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
        x = x.to(lora_a.dtype)
        if name in self.lora_dropout:
            x = self.lora_dropout[name](x)
        # Scaling B (r columns) is cheaper than scaling the output (all tokens x out_features).
        return out + F.linear(F.linear(x, lora_a), lora_b * self.scaling[name]).to(out.dtype)


class LoraEmbedding(DeltaLayer):
    """LoRA on a token embedding: the update is a low-rank (num_embeddings × dim) table."""

    adapter_attrs = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}

    def add(self, name: str, r: int, alpha: float, dropout: float, rslora: bool, init: bool | str) -> None:
        num, dim = self.base_layer.weight.shape
        device = self.base_layer.weight.device
        self.lora_embedding_A[name] = nn.Parameter(torch.zeros(r, num, device=device))
        self.lora_embedding_B[name] = nn.Parameter(torch.zeros(dim, r, device=device))
        if init is not False:  # zero A, random B: the update starts at zero, as in peft
            nn.init.normal_(self.lora_embedding_B[name])
        self.scaling[name] = alpha / math.sqrt(r) if rslora else alpha / r

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.scaling.pop(name, None)

    def delta_weight(self, name: str) -> torch.Tensor:
        return (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T * self.scaling[name]

    def load_adapter_state_dict(self, name: str, tensors: dict[str, torch.Tensor]) -> list[str]:
        # peft saves the (possibly resized) embedding itself beside the LoRA factors.
        base = tensors.pop("base_layer.weight", None)
        if base is not None and not torch.equal(base, self.base_layer.weight.detach()):
            raise ValueError(
                "the checkpoint carries its own embedding weights that differ from this base model's "
                "(peft save_embedding_layers): load it onto the base model it was trained on"
            )
        return super().load_adapter_state_dict(name, tensors)

    def row_factors(self, names: list[str], slots: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Aᵀ (num×r) per adapter after a zero slot, each row's scaled Bᵀ (r×dim), and the slots."""
        a_t, b_t = stacked_factors(
            [self.lora_embedding_A[n] for n in names],
            [self.lora_embedding_B[n] for n in names],
            [self.scaling[n] for n in names],
        )
        return a_t, b_t[slots], slots

    def forward_mixed(self, rows: routing.RowAdapters, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each row looks its ids up in its own adapter's A."""
        out = self.base_layer(x, *args, **kwargs)
        factors = rows.per_row(self, self.lora_embedding_A, x.shape[0], x.device, self.row_factors)
        if factors is None:
            return out
        a_t, b_rows, slots = factors
        looked_up = a_t[slots.view(-1, *[1] * (x.dim() - 1)), x].reshape(x.shape[0], -1, a_t.shape[-1])
        return out + torch.bmm(looked_up, b_rows).view_as(out).to(out.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        mixed = routing.rows()
        if mixed is not None:
            return self.forward_mixed(mixed, x, *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        name = self.adapter_active()
        if name is None:
            return out
        base = self.base_layer
        a = F.embedding(
            x,
            self.lora_embedding_A[name].T,
            base.padding_idx,
            base.max_norm,
            base.norm_type,
            base.scale_grad_by_freq,
            base.sparse,
        )
        return out + (a @ self.lora_embedding_B[name].T * self.scaling[name]).to(out.dtype)


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
        allowed_types=(nn.Linear, Conv1D, nn.Embedding),
        exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
    )
    kinds = {n: LoraEmbedding if isinstance(model.get_submodule(n), nn.Embedding) else LoraLinear for n in names}
    for name, layer in wrap_modules(model, kinds).items():
        if isinstance(layer, LoraLinear) and layer.transposed:
            config.fan_in_fan_out = True  # peft's flag for Conv1D weights
        r, alpha = config.rank_and_alpha(name)
        layer.add(adapter_name, r, alpha, config.lora_dropout, config.use_rslora, config.init_lora_weights)
    return names


register(Method("lora", LoraConfig, inject, (LoraLinear, LoraEmbedding), merges=True, mixes="weights"))
