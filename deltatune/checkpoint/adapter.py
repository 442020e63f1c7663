"""Adapter files in Hugging Face peft's layout: ``adapter_model.safetensors`` + ``adapter_config.json``.

Tensor keys are the module path inside the transformers model, prefixed with
``base_model.model.`` and without the adapter name (``...q_proj.lora_A.weight``), so peft reads
our files and we read theirs. Only safetensors are read: nothing is ever unpickled.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from deltatune.checkpoint.atomic import atomic_write

WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."


def save_tensors(
    directory: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(Path(directory) / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata))


def load_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        pickled = [p.name for p in Path(directory).glob("adapter_model.bin")]
        hint = " (found adapter_model.bin: deltatune never unpickles; re-save it as safetensors)" if pickled else ""
        raise FileNotFoundError(f"No {WEIGHTS_NAME} in {directory}{hint}")
    return load_file(str(path))


def split_by_module(
    tensors: dict[str, torch.Tensor], module_names: list[str]
) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Group checkpoint keys by the adapted module they belong to (longest module name wins).

    Returns ``{module_name: {relative_key: tensor}}`` and the keys that belong to no module.
    """
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    unmatched = []
    ordered = sorted(module_names, key=len, reverse=True)
    for key, value in tensors.items():
        path = key.removeprefix(KEY_PREFIX)
        owner = next((m for m in ordered if path.startswith(m + ".")), None)
        if owner is None:
            unmatched.append(key)
        else:
            by_module.setdefault(owner, {})[path[len(owner) + 1 :]] = value
    return by_module, unmatched
