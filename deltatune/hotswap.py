"""Swap an adapter's weights in place, so a ``torch.compile``d model serves another adapter
without recompiling (peft's ``hotswap_adapter`` and ``prepare_model_for_compiled_hotswap``).

A compiled graph reads the adapter's tensors as inputs but specialises on their shapes and on
Python numbers such as LoRA's scale alpha/r. So, once, before compiling:

    prepare_model_for_compiled_hotswap(model, target_rank=64)   # pad every A and B to rank 64
                                                                # (zeros: outputs unchanged) and
                                                                # hold each scale in a tensor
    model = torch.compile(model)
    hotswap_adapter(model, "adapters/other", "default")         # copy in; no recompilation

``hotswap_adapter`` copies the new factors into the live tensors (zero-padding a smaller rank)
and writes the new scale into the scale tensor. The new adapter must target the same modules
(and use DoRA if the old one does); a rank above the padded one is refused. Without the
preparation it still swaps (eagerly, or with a recompile when the rank or scale changed).
How a method swaps is its record's ``hotswap`` (deltatune.methods.contract.HotSwap); LoRA's is
in deltatune.methods.lora_hotswap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from deltatune import methods
from deltatune.config import ConfigError, DeltaConfig

__all__ = ["hotswap_adapter", "prepare_model_for_compiled_hotswap"]


def _delta_model(model: nn.Module) -> Any:
    """The DeltaModel, also when ``model`` is its torch.compile wrapper."""
    inner = getattr(model, "_orig_mod", model)
    if not hasattr(inner, "peft_config") or not hasattr(inner, "delta_layers"):
        raise TypeError(f"expected a DeltaModel (or a torch.compile of one), got {type(model).__name__}")
    return inner


def _swapping() -> str:
    return methods.describe([m for m in methods.registered() if m.hotswap is not None])


def prepare_model_for_compiled_hotswap(
    model: nn.Module, *, target_rank: int | None = None, config: Any = None, check_compiled: str = "error"
) -> None:
    """Before ``torch.compile``: pad every LoRA adapter to ``target_rank`` (the largest rank you
    will swap in; None: keep the ranks) and hold every scale in a tensor, so later swaps change
    neither a shape nor a constant of the compiled graph. ``config`` is accepted for peft's
    signature; the model's own configs are updated to the padded ranks."""
    if hasattr(model, "_orig_mod"):
        message = "prepare_model_for_compiled_hotswap must run before torch.compile, not after"
        if check_compiled == "error":
            raise ValueError(message)
        if check_compiled == "warn":
            import warnings

            warnings.warn(message, stacklevel=2)
    host = _delta_model(model)
    for adapter_name, adapter_config in list(host.peft_config.items()):
        swap = methods.method_for(adapter_config).hotswap
        if swap is not None:
            swap.prepare(host, adapter_name, target_rank)


def hotswap_adapter(model: nn.Module, model_name_or_path: str | Path, adapter_name: str = "default", **_: Any) -> None:
    """Replace adapter ``adapter_name``'s weights by those saved at ``model_name_or_path``, in place."""
    host = _delta_model(model)
    host.check_adapter(adapter_name)
    method = methods.method_for(host.peft_config[adapter_name])
    if method.hotswap is None:
        raise ConfigError(
            f"hot-swapping is for {_swapping()} adapters; {adapter_name!r} is "
            f"{type(host.peft_config[adapter_name]).__name__}"
        )
    new_config = DeltaConfig.load(model_name_or_path)
    if methods.method_for(new_config) is not method:
        raise ConfigError(
            f"{model_name_or_path} holds a {type(new_config).__name__}; only {method.name} adapters hot-swap into "
            f"{adapter_name!r}"
        )
    method.hotswap.swap(host, adapter_name, model_name_or_path, new_config)
