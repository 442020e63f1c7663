"""What ``deltatune serve`` needs to know. Its flags and their help come from this dataclass (as ``deltatune
train``'s come from TrainConfig), and its checks run when it is made, before a model loads."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from deltatune.config import ConfigError

QUANTIZE_FORMS = ("int8", "nf4", "gguf")


@dataclass
class ServeConfig:
    """Every option of ``deltatune serve``: the base model, the adapters, the address and the engine's limits."""

    base: str = "smollm2-135m"
    """base model: smollm2-135m or a local model dir"""
    quantize: Literal["int8", "nf4", "gguf"] | None = None
    """store the frozen base quantized: int8 (weight-only), nf4 (4-bit, needs bitsandbytes) or gguf (a GGUF
    file's own Q4_0/Q4_1/Q8_0 blocks)"""
    adapters: str | None = None
    """a directory of adapters (each sub-directory with adapter_config.json)"""
    host: str = "127.0.0.1"
    """address to bind (default: this machine only)"""
    port: int = 8000
    """port to listen on"""
    api_key: str | None = None
    """required as 'Authorization: Bearer KEY' on every request when set (default: $DELTATUNE_API_KEY)"""
    max_batch: int = 16
    """most requests generated together"""
    max_queue: int = 256
    """most requests held; more get 429"""
    max_tokens_limit: int = 4096
    """largest max_tokens a request may ask"""
    max_loaded_adapters: int | None = None
    """most adapters loaded at once; others load on demand, evicting the least recently used idle one (default:
    load every adapter at start)"""
    max_lora_rank: int | None = None
    """with --max-loaded-adapters: keep LoRA factors in preallocated slots padded to this rank (a step gathers by
    slot id); adapters of a higher rank are refused (default: no slots)"""
    prefill_chunk: int = 512
    """prompt tokens prefilled per step"""
    drain_timeout: float = 30.0
    """seconds SIGTERM waits for open requests"""
    max_body_bytes: int = 1 << 20
    """largest request body in bytes (default: 1 MiB)"""
    max_prompt_tokens: int | None = None
    """longest prompt in tokens (default: the context)"""
    max_streams_per_key: int | None = None
    """most streams open at once per API key (default: no limit)"""

    def __post_init__(self) -> None:
        if self.api_key is None:
            self.api_key = os.environ.get("DELTATUNE_API_KEY")
        _check_choice("quantize", self.quantize, QUANTIZE_FORMS, allow_none=True)
        counts = ("max_batch", "max_queue", "max_tokens_limit", "max_loaded_adapters", "max_lora_rank")
        for name in (*counts, "prefill_chunk", "max_body_bytes", "max_prompt_tokens", "max_streams_per_key"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{_flag(name)} must be at least 1, got {value}: give a positive count or omit it")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be between 1 and 65535, got {self.port}")
        if self.drain_timeout < 0:
            raise ConfigError(f"--drain-timeout must be 0 or more seconds, got {self.drain_timeout}")
        if self.max_lora_rank is not None and self.max_loaded_adapters is None:
            raise ConfigError("--max-lora-rank sizes the adapter slots: give --max-loaded-adapters (the slots) too")
        if self.adapters and not Path(self.adapters).is_dir():
            raise ConfigError(f"--adapters {self.adapters} is not a directory: give a folder of adapter folders")

    @property
    def model_name(self) -> str:
        """The name clients ask for the base model by: a local folder's name, else the built-in name."""
        return Path(self.base).name if Path(self.base).is_dir() else self.base


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_choice(name: str, value: object, choices: tuple[str, ...], allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value not in choices:
        raise ConfigError(f"{_flag(name)} must be one of {', '.join(choices)}, got {value!r}")
