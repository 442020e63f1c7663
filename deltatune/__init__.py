"""deltatune: parameter-efficient fine-tuning of Hugging Face transformers, natively in PyTorch."""

from deltatune.config import ConfigError, DeltaConfig
from deltatune.loading import load_base
from deltatune.methods.adapter import AdapterConfig
from deltatune.methods.bitfit import BitFitConfig
from deltatune.methods.lora import LoraConfig
from deltatune.methods.partial import PartialConfig
from deltatune.model import DeltaModel, wrap

__version__ = "0.1.0"
__all__ = [
    "AdapterConfig",
    "BitFitConfig",
    "ConfigError",
    "DeltaConfig",
    "DeltaModel",
    "LoraConfig",
    "PartialConfig",
    "load_base",
    "wrap",
]
