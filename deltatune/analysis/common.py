"""What both analyses share: reading LoRA factors from adapter folders, checking the adapters fit one
base model, and grouping modules by type and layer."""

from __future__ import annotations

from pathlib import Path

import torch

from deltatune import methods
from deltatune.checkpoint.adapter import KEY_PREFIX, check_adapter_dir, load_tensors
from deltatune.config import ConfigError, DeltaConfig
from deltatune.targeting import layer_index


def lora_factors(adapter: str | Path, flag: str = "ADAPTER") -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
    """The adapter's config and its A matrices ``{module name: A (r x in)}``, read from the folder alone
    (the method's ``low_rank_factors`` says which of its tensors they are)."""
    config = check_adapter_dir(adapter, flag)
    read = methods.method_for(config).low_rank_factors
    if read is None:
        low_rank = methods.describe([m for m in methods.registered() if m.low_rank_factors is not None])
        raise ConfigError(
            f"{flag} {adapter} is a {config.peft_type} adapter; subspace analysis compares the A matrices of "
            f"low-rank adapters ({low_rank}; use `deltatune analyze delta` for the weight delta of other methods)"
        )
    factors = read({key.removeprefix(KEY_PREFIX): value for key, value in load_tensors(adapter).items()})
    if not factors:
        raise ConfigError(f"{flag} {adapter} holds no LoRA A matrices; save the adapter again")
    return config, factors


def base_label(name: str | None) -> str | None:
    """A base model's name for comparison: the last path component, so that one model in two cache roots (or
    given by a relative and an absolute path) counts as the same model, while different models do not."""
    if not name:
        return None
    return Path(str(name).rstrip("/\\")).name or None


def check_same_base(first: tuple[str, DeltaConfig], second: tuple[str, DeltaConfig]) -> None:
    """Refuse adapters whose configs name different base models (when both name one)."""
    (path1, c1), (path2, c2) = first, second
    n1, n2 = base_label(c1.base_model_name_or_path), base_label(c2.base_model_name_or_path)
    if n1 and n2 and n1 != n2:
        raise ConfigError(
            f"{path1} was trained on base model {c1.base_model_name_or_path!r} but {path2} on "
            f"{c2.base_model_name_or_path!r}: subspaces of different base models are not comparable; compare "
            "adapters of one base model (if both are the same model saved under two names, pass --same-base)"
        )


def common_modules(
    first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], names: tuple[str, str]
) -> list[str]:
    """Modules both adapters adapt, by layer; input sizes must agree (else the bases differ)."""
    shared = sorted((m for m in first if m in second), key=lambda m: (layer_of(m), m))
    if not shared:
        raise ConfigError(
            f"{names[0]} and {names[1]} adapt no module in common ({', '.join(sorted(first)[:4])} ... vs "
            f"{', '.join(sorted(second)[:4])} ...); train both on the same target modules"
        )
    for module in shared:
        if first[module].shape[1:] != second[module].shape[1:]:
            raise ConfigError(
                f"{module}: input size {first[module].shape[1]} in {names[0]} but {second[module].shape[1]} in "
                f"{names[1]}: the adapters were made for different base models; compare adapters of one base model"
            )
    return shared


def module_type(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``q_proj``: what results are averaged over layers by."""
    return name.rsplit(".", 1)[-1]


def by_type(names: list[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(module_type(name), []).append(name)
    return groups


def layer_of(name: str) -> int:
    index = layer_index(name)
    return -1 if index is None else index


def text_table(rows: list[tuple[str, ...]]) -> str:
    """Rows of cells as aligned text columns, a rule under the header row."""
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
