"""Combine LoRA adapters into a new one: ``DeltaModel.add_weighted_adapter`` (peft's name and options).

Each adapter i adds ΔW_i = s_i·B_i·A_i to a layer; ``weights`` w_i say how much of each to keep.

* ``linear`` and ``cat``: ΔW = Σ w_i·ΔW_i **exactly**, as one LoRA of rank Σ r_i whose A stacks
  the w_i·s_i·A_i and whose B stacks the B_i (scale 1). peft's ``cat`` is this; peft's ``linear``
  instead averages A's and B's separately (√w·A, √w·B, equal ranks required), which adds cross
  terms B_i·A_j (a known peft issue); ours keeps the exact sum at a larger rank.
* ``svd``: the exact sum truncated to ``svd_rank`` (default: the largest input rank) by SVD: the
  best rank-k approximation, equal to peft's.
* ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: peft's task-arithmetic heuristics
  (TIES: keep the ``density`` largest entries, elect a sign per entry, average those that agree;
  DARE: drop entries at random with probability 1−density and rescale), applied as peft does to
  A and B separately with √w weights, so results equal peft's (DARE on the same seed).
  Their ``_svd`` forms apply the heuristic to the full ΔW_i, then truncate by SVD.

DoRA adapters are refused (their magnitude rescales W0, which no LoRA delta expresses).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from deltatune.config import ConfigError
from deltatune.methods.lora import LoraConfig, LoraEmbedding, LoraLinear

EXACT = ("linear", "cat")
FACTOR_WISE = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
COMBINATIONS = (*EXACT, "svd", *FACTOR_WISE, *(f"{c}_svd" for c in FACTOR_WISE))


# --- peft's task-arithmetic heuristics, on a stack of task tensors ------------------------------
def _weighted(tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return tensors * weights.view(-1, *[1] * (tensors.dim() - 1))


def _magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density·n) entries of largest magnitude."""
    if density >= 1:
        return tensor
    keep = torch.zeros(tensor.numel(), device=tensor.device, dtype=tensor.dtype)
    keep[torch.topk(tensor.abs().flatten(), k=int(density * tensor.numel())).indices] = 1
    return tensor * keep.view_as(tensor)


def _random_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: keep each entry with probability density, and rescale the kept ones by 1/density."""
    if density >= 1:
        return tensor
    return tensor * torch.bernoulli(torch.full_like(tensor, density)) / density


def _sign_agreeing_mean(weighted: torch.Tensor, method: str) -> torch.Tensor:
    """TIES: per entry, the mean of the tasks whose sign is the majority's."""
    signs = weighted.sign()
    votes = weighted.sum(dim=0) if method == "total" else signs.sum(dim=0)
    agree = signs == torch.where(votes >= 0, 1, -1)
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def _combine(kind: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float, sign: str) -> torch.Tensor:
    """One heuristic (``kind`` without ``_svd``) over ``tensors`` with ``weights``."""
    if kind in ("ties", "magnitude_prune"):
        tensors = [_magnitude_prune(t, density) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [_random_prune(t, density) for t in tensors]
    weighted = _weighted(torch.stack(tensors), weights.to(tensors[0]))
    if kind in ("ties", "dare_ties"):
        return _sign_agreeing_mean(weighted, sign)
    return weighted.sum(dim=0)


# --- per layer ----------------------------------------------------------------------------------
def _factors(layer: LoraLinear | LoraEmbedding, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of adapter ``name``, oriented so that B·A has the shape of the delta (out×in; for an
    embedding dim×num)."""
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def _exact(layer: Any, names: list[str], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.cat([_factors(layer, n)[0] * w * layer.scaling[n] for n, w in zip(names, weights, strict=True)])
    b = torch.cat([_factors(layer, n)[1] for n in names], dim=1)
    return a, b


def _factor_wise(layer: Any, names: list[str], weights: list[float], kind: str, density: float, sign: str):
    scaled = [w * layer.scaling[n] for n, w in zip(names, weights, strict=True)]
    wa = torch.tensor([math.copysign(math.sqrt(abs(s)), s) for s in scaled])
    wb = torch.tensor([math.sqrt(abs(s)) for s in scaled])
    a = _combine(kind, [_factors(layer, n)[0] for n in names], wa, density, sign)
    b = _combine(kind, [_factors(layer, n)[1] for n in names], wb, density, sign)
    return a, b


def _svd(layer: Any, names: list[str], weights: list[float], kind: str, rank: int, density: float, sign: str,
         clamp: float | None, driver: str | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    # The heuristics see each delta in the weight's own layout (as peft: the same random drops on
    # the same seed), the SVD the B·A layout.
    deltas = [layer.delta_weight(n) for n in names]
    base_kind = kind.removesuffix("_svd")
    delta = _combine("linear" if base_kind == "svd" else base_kind, deltas, torch.tensor(weights), density, sign)
    if isinstance(layer, LoraEmbedding) or layer.transposed:
        delta = delta.T
    u, s, vh = torch.linalg.svd(delta, full_matrices=False, driver=driver)
    b, a = u[:, :rank] * s[:rank], vh[:rank]
    if clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    return a, b


def _fill(layer: Any, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """Write (a, b) into the new adapter's (larger or equal) factors, zero elsewhere."""
    target_a, target_b = _factors(layer, name)
    with torch.no_grad():
        target_a.zero_()
        target_b.zero_()
        target_a[: a.shape[0]] = a.to(target_a.dtype)
        target_b[:, : b.shape[1]] = b.to(target_b.dtype)


# --- the model-level operation ------------------------------------------------------------------
def _check(host: Any, adapters: list[str], weights: list[float], kind: str, svd_rank: int | None) -> list[LoraConfig]:
    if kind not in COMBINATIONS:
        raise ConfigError(f"combination_type must be one of {', '.join(COMBINATIONS)}; got {kind!r}")
    if not adapters or len(weights) != len(adapters):
        raise ValueError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights")
    configs = []
    for name in adapters:
        host.check_adapter(name)
        config = host.peft_config[name]
        if not isinstance(config, LoraConfig):
            raise ConfigError(f"adapter {name!r} is {type(config).__name__}: only LoRA adapters combine")
        if config.use_dora:
            raise ConfigError(f"adapter {name!r} uses DoRA: its magnitude rescales W0, which no LoRA delta expresses")
        configs.append(config)
    if svd_rank is not None and not kind.endswith("svd"):
        raise ConfigError(f"svd_rank applies to the svd combinations, not {kind!r}")
    ranks = [max([c.r, *c.rank_pattern.values()]) for c in configs]
    if kind in FACTOR_WISE and len(set(ranks)) > 1:
        raise ConfigError(f"{kind} combines A and B entry by entry, so every adapter needs the same r; got {ranks}")
    return configs


def _new_rank(kind: str, configs: list[LoraConfig], svd_rank: int | None) -> int:
    ranks = [max([c.r, *c.rank_pattern.values()]) for c in configs]
    if kind in EXACT:
        return sum(ranks)
    return svd_rank or max(ranks) if kind.endswith("svd") else ranks[0]


def _union_targets(configs: list[LoraConfig]) -> list[str] | str:
    targets = [c.target_modules for c in configs]
    if all(isinstance(t, list) for t in targets):
        return sorted({m for t in targets for m in t})
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets)
    raise ConfigError("adapters to combine must all list target_modules, or all give a regex; not a mix")


def add_weighted_adapter(
    host: Any,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> None:
    """Add ``adapter_name``: the ``adapters`` combined with ``weights`` (see the module docstring)."""
    kind = "linear" if len(adapters) == 1 and combination_type in FACTOR_WISE else combination_type
    configs = _check(host, adapters, list(weights), kind, svd_rank)
    needs_density = kind.removesuffix("_svd") in FACTOR_WISE and kind != "linear"
    if needs_density and (density is None or not 0 <= density <= 1):
        raise ConfigError(f"{kind} needs density in [0, 1] (the share of entries kept), got {density!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise ConfigError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    rank = _new_rank(kind, configs, svd_rank)
    config = dataclasses.replace(
        configs[0], r=rank, lora_alpha=rank, target_modules=_union_targets(configs), rank_pattern={},
        alpha_pattern={}, init_lora_weights=True, use_dora=False, use_rslora=False,
    )  # fmt: skip
    host.add_adapter(adapter_name, config)
    combine: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
        "exact": lambda layer, names, ws: _exact(layer, names, ws),
        "factor": lambda layer, names, ws: _factor_wise(layer, names, ws, kind, density or 1.0, majority_sign_method),
        "svd": lambda layer, names, ws: _svd(
            layer, names, ws, kind, rank, density or 1.0, majority_sign_method, svd_clamp, svd_driver
        ),
    }
    how = combine["exact" if kind in EXACT else "svd" if kind.endswith("svd") else "factor"]
    for _, layer in host.delta_layers():
        if not isinstance(layer, (LoraLinear, LoraEmbedding)) or adapter_name not in layer.scaling:
            continue
        held = [(n, w) for n, w in zip(adapters, weights, strict=True) if n in layer.scaling]
        if not held:
            _fill(layer, adapter_name, torch.zeros(0, 1), torch.zeros(1, 0))
            continue
        a, b = how(layer, [n for n, _ in held], [w for _, w in held])
        _fill(layer, adapter_name, a, b)
