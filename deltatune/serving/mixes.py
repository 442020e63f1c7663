"""Per-request adapter mixes, as LoRAX offers them: a request names the base model and carries
``merged_adapters`` ``{"ids", "weights", "merge_strategy", "density", "majority_sign_method"}``.

The mix is computed once, between two steps, with the library's combination code
(``DeltaModel.add_weighted_adapter``, deltatune/methods/combine.py), and kept as one more loaded
adapter under a name derived from its spec (``mix-`` + a hash): the same mix asked again runs at
once, and it is evicted least-recently-used like any adapter. Its parts are loaded first (they
count against ``--max-loaded-adapters`` too, and may be evicted afterwards: the mix keeps its own
weights).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deltatune.methods.combine import COMBINATIONS

MAX_PARTS = 16


class MergedAdapters(BaseModel):
    """LoRAX's ``merged_adapters`` field (strategies: those of add_weighted_adapter)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    ids: list[str] = Field(min_length=1, max_length=MAX_PARTS)
    weights: list[float] | None = None  # None: equal weights (1/n each)
    merge_strategy: str = "linear"
    density: float = Field(1.0, ge=0.0, le=1.0)
    majority_sign_method: Literal["total", "frequency"] = "total"

    def problem(self) -> tuple[str, str] | None:
        """(message, param) when the spec cannot be mixed, else None."""
        if self.merge_strategy not in COMBINATIONS:
            return f"merge_strategy must be one of {', '.join(COMBINATIONS)}", "merged_adapters.merge_strategy"
        if self.weights is not None and len(self.weights) != len(self.ids):
            message = f"give one weight per id: {len(self.ids)} ids, {len(self.weights)} weights"
            return message, "merged_adapters.weights"
        if len(set(self.ids)) != len(self.ids):
            return "merged_adapters.ids names an adapter twice", "merged_adapters.ids"
        return None

    def spec(self) -> dict[str, Any]:
        weights = self.weights if self.weights is not None else [1.0 / len(self.ids)] * len(self.ids)
        return {**self.model_dump(), "weights": weights}


def mix_name(spec: dict[str, Any]) -> str:
    """The name a mix is loaded under: the same spec, the same name (so it is computed once)."""
    return "mix-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def build(model: Any, name: str, spec: dict[str, Any]) -> None:
    """Add the mix ``name`` to ``model`` (its parts loaded) with the library's combination code."""
    options: dict[str, Any] = {"combination_type": spec["merge_strategy"]}
    if spec["merge_strategy"] not in ("linear", "cat", "svd"):
        options |= {"density": spec["density"], "majority_sign_method": spec["majority_sign_method"]}
    model.add_weighted_adapter(list(spec["ids"]), list(spec["weights"]), name, **options)
