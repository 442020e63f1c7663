"""The methods, one small file each, registered by their peft type and their CLI name.

A method is a module with a config class (a :class:`~deltatune.config.DeltaConfig`) and an
``inject(model, adapter_name, config) -> list[str]`` function that adds the adapter to the
modules it selects through :func:`deltatune.targeting.find_targets`. It may also define
``finalize_merged(model)``, run on the plain model ``merge_and_unload`` returns, and
``prepare_inputs(delta_model, adapter_name, kwargs) -> kwargs`` /
``generate(delta_model, adapter_name, *args, **kwargs)`` for methods that change a forward's
inputs rather than (or besides) weights: virtual tokens, prefix caches, task ids. Forward
arguments only such a method understands are listed in ``INPUT_KEYS``, so that they are dropped
rather than passed to the base model while adapters are disabled.
"""

from __future__ import annotations

import sys
from types import ModuleType

from deltatune.config import ConfigError, DeltaConfig
from deltatune.methods import (
    adapter,
    bitfit,
    hyperformer,
    llama_adapter,
    lora,
    p_tuning,
    partial,
    prefix_tuning,
    prompt_tuning,
)

# CLI name -> config class. The module that defines a config class is its method.
CONFIGS: dict[str, type[DeltaConfig]] = {
    "lora": lora.LoraConfig,
    "adapter": adapter.AdapterConfig,
    "bitfit": bitfit.BitFitConfig,
    "partial": partial.PartialConfig,
    "prompt_tuning": prompt_tuning.PromptTuningConfig,
    "p_tuning": p_tuning.PTuningConfig,
    "prefix_tuning": prefix_tuning.PrefixTuningConfig,
    "llama_adapter": llama_adapter.LlamaAdapterConfig,
    "hyperformer": hyperformer.HyperAdapterConfig,
}


def method_module(config: DeltaConfig) -> ModuleType:
    return sys.modules[type(config).__module__]


def config_class_for(peft_type: str | None) -> type[DeltaConfig]:
    by_type = {cls.peft_type: cls for cls in CONFIGS.values()}
    if peft_type not in by_type:
        raise ConfigError(
            f"adapter method {peft_type!r} is not supported by deltatune; supported: {', '.join(by_type)}"
        )
    return by_type[peft_type]


def config_class_for_name(name: str) -> type[DeltaConfig]:
    if name not in CONFIGS:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(CONFIGS)}")
    return CONFIGS[name]


def inject(model, adapter_name: str, config: DeltaConfig) -> list[str]:
    return method_module(config).inject(model, adapter_name, config)


def hook(config: DeltaConfig, name: str):
    """The method's optional function ``name`` (see the module docstring), or None."""
    return getattr(method_module(config), name, None)


def finalize_merged(config: DeltaConfig, model) -> None:
    finalize = hook(config, "finalize_merged")
    if finalize is not None:
        finalize(model)
