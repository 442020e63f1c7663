"""LoRA on a token embedding (see deltatune.methods.lora): the update is a low-rank table B·A
(num_embeddings × dim) looked up by token id; A starts at zero, so the model starts as the base."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from deltatune import routing
from deltatune.methods import dora
from deltatune.methods.base import DeltaLayer, GathersRows


def stacked_factors(a: list[torch.Tensor], b: list[torch.Tensor], scaling: list[float]) -> tuple[torch.Tensor, ...]:
    """Adapters' Aᵀ (k×r) and scaled Bᵀ (r×n), zero-padded to the largest rank and stacked after
    a zero slot (index 0: no adapter), for mixed batches to index by row."""
    rank = max(t.shape[0] for t in a)
    a_t = [F.pad(t, (0, 0, 0, rank - t.shape[0])).T for t in a]
    b_t = [F.pad(t * s, (0, rank - t.shape[1])).T for t, s in zip(b, scaling, strict=True)]
    return torch.stack([torch.zeros_like(a_t[0]), *a_t]), torch.stack([torch.zeros_like(b_t[0]), *b_t])


class LoraEmbedding(dora.KeepsMergedDelta, GathersRows, DeltaLayer):
    """LoRA on a token embedding: the update is a low-rank (num_embeddings × dim) table. With DoRA
    the magnitude is per embedding dimension and the norm runs over the vocabulary (as peft)."""

    sums_active = True
    adapter_attrs = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    adapter_values = ("scaling", "norms")
    loraplus_roles: ClassVar[dict[str, str]] = {"lora_embedding_A": "embedding", "lora_embedding_B": "embedding"}

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
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
        num, dim = self.base_layer.weight.shape
        device = self.base_layer.weight.device
        # Drawn like peft's (same random stream on the same seed), then zero A, normal B: the update
        # starts at zero for every init; False keeps the random draws (debugging).
        self.lora_embedding_A[name] = nn.Parameter(torch.randn(r, num).to(device))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(dim, r).to(device))
        if init is not False:
            with torch.no_grad():
                nn.init.zeros_(self.lora_embedding_A[name])
                nn.init.normal_(self.lora_embedding_B[name])
        self.scaling[name] = alpha / math.sqrt(r) if rslora else alpha / r
        if use_dora:
            self.lora_magnitude_vector[name] = nn.Parameter(self.dora_norm(name))

    def dora_norm(self, name: str) -> torch.Tensor:
        weight, a, b = self.base_layer.weight, self.lora_embedding_A[name], self.lora_embedding_B[name]
        return self.norms.get(name, (weight, a, b), lambda: dora.column_norm(weight.T, b @ a, self.scaling[name]))

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T * self.scaling[name]
        if name in self.lora_magnitude_vector:
            weight = self.base_layer.weight
            delta = dora.merged_weight_delta(weight.T, delta.T, self.lora_magnitude_vector[name]).T
        return delta

    def load_adapter_state_dict(self, name: str, tensors: dict[str, torch.Tensor]) -> list[str]:
        # peft saves the (possibly resized) embedding itself beside the LoRA factors.
        base = tensors.pop("base_layer.weight", None)
        if base is not None and not torch.equal(base, self.base_layer.weight.detach()):
            raise ValueError(
                "the checkpoint carries its own embedding weights that differ from this base model's "
                "(peft save_embedding_layers): load it onto the base model it was trained on"
            )
        return super().load_adapter_state_dict(name, tensors)

    def row_factors(self, names: list[str], slots: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Aᵀ (num×r) per adapter after a zero slot, each row's scaled Bᵀ (r×dim), the slots, and
        each row's DoRA factor (dim; 1 for plain LoRA rows) or None."""
        a_t, b_t = stacked_factors(
            [self.lora_embedding_A[n] for n in names],
            [self.lora_embedding_B[n] for n in names],
            [self.scaling[n] for n in names],
        )
        gains = None
        if any(n in self.lora_magnitude_vector for n in names):
            ones = a_t.new_ones(self.base_layer.weight.shape[1])
            gains = torch.stack(
                [ones, *(self.dora_gain(n) if n in self.lora_magnitude_vector else ones for n in names)]
            )
            gains = gains[slots]
        return a_t, b_t[slots], slots, gains

    def dora_gain(self, name: str) -> torch.Tensor:
        return self.lora_magnitude_vector[name] / self.dora_norm(name)

    def delta_rows(self, rows: routing.RowAdapters, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        """Each row looks its ids up in its own adapter's A; DoRA rows scale by their own g."""
        factors = rows.per_row(self, self.lora_embedding_A, x.shape[0], x.device, self.row_factors)
        if factors is None:
            return None
        a_t, b_rows, slots, gains = factors
        looked_up = a_t[slots.view(-1, *[1] * (x.dim() - 1)), x].reshape(x.shape[0], -1, a_t.shape[-1])
        delta = torch.bmm(looked_up, b_rows).view_as(out)
        if gains is None:
            return delta
        gains = gains.view(x.shape[0], *[1] * (x.dim() - 1), -1)
        return (gains - 1) * out + gains * delta

    def delta(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
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
        lora = a @ self.lora_embedding_B[name].T * self.scaling[name]
        if name not in self.lora_magnitude_vector:
            return lora
        gain = self.dora_gain(name)
        return (gain - 1) * out + gain * lora
