"""What ``deltatune inspect`` shows: a model's adaptable modules, suggested targets, and a method's trainable
parameter count on it."""

from __future__ import annotations

from typing import Any

from torch import nn

from deltatune.config import ConfigError, DeltaConfig


def adaptable_modules(model: nn.Module) -> dict[str, tuple[str, int]]:
    """Leaf name -> (module type, count) of the linear and embedding layers a method can adapt."""
    from deltatune.targeting import LINEAR_TYPES

    counts: dict[str, list] = {}
    for name, module in model.named_modules():
        if isinstance(module, LINEAR_TYPES) or type(module).__name__ == "Embedding":
            leaf = name.rsplit(".", 1)[-1]
            counts.setdefault(leaf, [type(module).__name__, 0])[1] += 1
    return {leaf: (kind, count) for leaf, (kind, count) in counts.items()}


def lora_default_targets(model: nn.Module) -> list[str] | str:
    """LoRA's own default targets for this architecture (the attention projections), else 'all-linear'."""
    from deltatune.methods import lora

    try:
        return list(lora.default_targets(model))
    except ConfigError:
        return "all-linear"


def inspect_report(model: nn.Module, method: str, method_config: DeltaConfig, options: dict[str, Any]) -> str:
    """The text of ``deltatune inspect``; wraps ``model`` with ``method_config`` to count trainable parameters."""
    from deltatune.model import wrap
    from deltatune.quantization import base_kind, base_storage
    from deltatune.targeting import find_targets, output_head_names

    modules = adaptable_modules(model)
    size, weights = base_storage(model)
    lines = [f"{type(model).__name__}: {weights:,} parameters"]
    lines.append(
        f"base size: {size / 2**20:,.1f} MiB, {size / max(weights, 1):.2f} bytes per weight ({base_kind(model)})"
    )
    lines.append("adaptable modules (leaf name, type, count):")
    lines += [f"  {leaf:<24} {kind:<10} x{count}" for leaf, (kind, count) in modules.items()]
    heads = output_head_names(model)
    lines.append("suggested targets:")
    lines.append(f"  lora (attention, as in the LoRA paper): {lora_default_targets(model)}")
    linear = len(find_targets(model, "all-linear"))
    lines.append(f"  lora all-linear: {linear} modules (skips {', '.join(sorted(heads))})")
    delta = wrap(model, method_config)
    trainable, total = delta.trainable_parameters()
    lines.append(f"{method} with {options}:")
    lines.append(f"  trainable {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)")
    return "\n".join(lines)
