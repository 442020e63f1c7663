"""deltatune: parameter-efficient fine-tuning of Hugging Face transformers, natively in PyTorch."""

from typing import Any

from deltatune.config import ConfigError, DeltaConfig
from deltatune.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from deltatune.loading import load_base
from deltatune.methods.adapter import AdapterConfig
from deltatune.methods.bitfit import BitFitConfig
from deltatune.methods.hyperformer import HyperAdapterConfig
from deltatune.methods.ia3 import IA3Config
from deltatune.methods.llama_adapter import LlamaAdapterConfig
from deltatune.methods.lokr import LoKrConfig
from deltatune.methods.lora import LoraConfig
from deltatune.methods.p_tuning import PTuningConfig
from deltatune.methods.partial import PartialConfig
from deltatune.methods.prefix_tuning import PrefixTuningConfig
from deltatune.methods.prompt_tuning import PromptTuningConfig
from deltatune.model import BASE_ADAPTER, DeltaModel, wrap
from deltatune.quantization import quantize_base
from deltatune.training.loraplus import create_loraplus_optimizer

__version__ = "0.1.0"
__all__ = [
    "BASE_ADAPTER",
    "AdapterConfig",
    "BitFitConfig",
    "ConfigError",
    "DeltaConfig",
    "DeltaModel",
    "HyperAdapterConfig",
    "IA3Config",
    "LlamaAdapterConfig",
    "LoKrConfig",
    "LoraConfig",
    "PTuningConfig",
    "PartialConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "create_loraplus_optimizer",
    "hotswap_adapter",
    "load_base",
    "prepare_model_for_compiled_hotswap",
    "quantize_base",
    "set_attention",
    "wrap",
]


def __getattr__(name: str) -> Any:
    """``deltatune.set_attention`` loads the attention patterns (1.4k lines) on first use, not on ``import
    deltatune``."""
    if name == "set_attention":
        from deltatune.attention import set_attention

        return set_attention
    raise AttributeError(f"module 'deltatune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "set_attention"])
