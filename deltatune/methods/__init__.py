"""The methods, one small file each. Each file ends with one ``register(Method(...))`` line: the
method's record, which says what it is called, its config class, how it injects, its layer
classes, whether it merges, how (or whether) it mixes in a batch, and its optional hooks. The
record and the interfaces it names are in :mod:`deltatune.methods.contract`.

Importing this package imports (and so registers) the built-in methods; the lookups below read
the registry, and so do the error messages that list the methods.
"""

from __future__ import annotations

from torch import nn

from deltatune.config import DeltaConfig, config_class_for

# isort: off
# The built-in methods, each registered by its import, in the order the command line lists them.
from deltatune.methods import lora  # noqa: F401
from deltatune.methods import adapter  # noqa: F401
from deltatune.methods import bitfit  # noqa: F401
from deltatune.methods import partial  # noqa: F401
from deltatune.methods import prompt_tuning  # noqa: F401
from deltatune.methods import p_tuning  # noqa: F401
from deltatune.methods import prefix_tuning  # noqa: F401
from deltatune.methods import llama_adapter  # noqa: F401
from deltatune.methods import hyperformer  # noqa: F401
from deltatune.methods import ia3  # noqa: F401
from deltatune.methods import lokr  # noqa: F401

# isort: on
from deltatune.methods.contract import (
    AdapterHost,
    Method,
    MixesRows,
    describe,
    method_for,
    method_named,
    register,
    register_layer,
    registered,
    unregister_layer,
)
from deltatune.methods.contract import ConfigClasses as _ConfigClasses

__all__ = [
    "CONFIGS",
    "AdapterHost",
    "Method",
    "MixesRows",
    "check_several_active",
    "config_class_for",
    "config_class_for_name",
    "describe",
    "finalize_merged",
    "inject",
    "method_for",
    "method_named",
    "register",
    "register_layer",
    "registered",
    "unregister_layer",
]

# CLI name -> config class: a live view of the registry.
CONFIGS = _ConfigClasses()


def config_class_for_name(name: str) -> type[DeltaConfig]:
    return method_named(name).config_class


def inject(model: nn.Module, adapter_name: str, config: DeltaConfig) -> list[str]:
    return method_for(config).inject(model, adapter_name, config)


def check_several_active(host: AdapterHost, names: list[str]) -> None:
    """Refuse ``set_adapter([...])`` unless every layer the adapters reach sums several of them."""
    for layer_name, layer in host.delta_layers():
        held = [n for n in names if n in layer.adapter_names]
        if len(held) > 1 and not layer.sums_active:
            raise ValueError(
                f"adapters {', '.join(held)} cannot be active at once: {layer_name} ({type(layer).__name__}) runs one "
                "adapter at a time (several active: lora, lokr, ia3); merge them with add_weighted_adapter instead"
            )


def finalize_merged(config: DeltaConfig, model: nn.Module) -> None:
    finalize = method_for(config).finalize_merged
    if finalize is not None:
        finalize(model)
