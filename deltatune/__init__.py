"""deltatune: parameter-efficient fine-tuning of Hugging Face transformers, natively in PyTorch."""

from deltatune.config import ConfigError, DeltaConfig
from deltatune.loading import load_base
from deltatune.methods.lora import LoraConfig
from deltatune.model import DeltaModel, wrap

__version__ = "0.1.0"
__all__ = ["ConfigError", "DeltaConfig", "DeltaModel", "LoraConfig", "load_base", "wrap"]
