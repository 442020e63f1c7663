"""Export adapters and merged models for other runtimes: llama.cpp's GGUF (deltatune.export.gguf)."""

from deltatune.export.gguf import export_lora, export_merged

__all__ = ["export_lora", "export_merged"]
