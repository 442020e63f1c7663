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

# CLI name -> method module. Each later method adds one line here.
METHODS: dict[str, ModuleType] = {
    "lora": lora,
    "bitfit": bitfit,
    "partial": partial,
    "adapter": adapter,
    "llama_adapter": llama_adapter,
    "hyperformer": hyperformer,
    "prompt_tuning": prompt_tuning,
    "p_tuning": p_tuning,
    "prefix_tuning": prefix_tuning,
}
_CONFIGS = {
    "lora": lora.LoraConfig,
    "bitfit": bitfit.BitFitConfig,
    "partial": partial.PartialConfig,
    "adapter": adapter.AdapterConfig,
    "llama_adapter": llama_adapter.LlamaAdapterConfig,
    "hyperformer": hyperformer.HyperAdapterConfig,
    "prompt_tuning": prompt_tuning.PromptTuningConfig,
    "p_tuning": p_tuning.PTuningConfig,
    "prefix_tuning": prefix_tuning.PrefixTuningConfig,
}


def _by_peft_type() -> dict[str, str]:
    return {cfg.peft_type: name for name, cfg in _CONFIGS.items()}


def method_name(config: DeltaConfig) -> str:
    return _by_peft_type()[config.peft_type]


def config_class_for(peft_type: str | None) -> type[DeltaConfig]:
    names = _by_peft_type()
    if peft_type not in names:
        raise ConfigError(f"adapter method {peft_type!r} is not supported by deltatune; supported: {', '.join(names)}")
    return _CONFIGS[names[peft_type]]


def config_class_for_name(name: str) -> type[DeltaConfig]:
    if name not in _CONFIGS:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(_CONFIGS)}")
    return _CONFIGS[name]


def inject(model, adapter_name: str, config: DeltaConfig) -> list[str]:
    return METHODS[method_name(config)].inject(model, adapter_name, config)


def hook(config: DeltaConfig, name: str):
    """The method's optional function ``name`` (see the module docstring), or None."""
    return getattr(METHODS[method_name(config)], name, None)


def finalize_merged(config: DeltaConfig, model) -> None:
    finalize = hook(config, "finalize_merged")
    if finalize is not None:
        finalize(model)
