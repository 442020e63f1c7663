"""Adapter files in Hugging Face peft's layout: ``adapter_model.safetensors`` + ``adapter_config.json``.

Tensor keys are the module path inside the transformers model, prefixed with
``base_model.model.`` and without the adapter name (``...q_proj.lora_A.weight``), so peft reads
our files and we read theirs. Only safetensors are read: nothing is ever unpickled.

A method whose checkpoint holds only the inference form of an adapter (peft's prompt-learning
methods store the virtual tokens an encoder computed, not the encoder) keeps what training needs
to resume in a second file beside it, ``adapter_training_state.safetensors``, which peft ignores.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from deltatune.atomic import atomic_write
from deltatune.config import CONFIG_NAME, ConfigError, DeltaConfig

WEIGHTS_NAME = "adapter_model.safetensors"
TRAINING_STATE_NAME = "adapter_training_state.safetensors"
KEY_PREFIX = "base_model.model."


def save_tensors(
    directory: str | Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    name: str = WEIGHTS_NAME,
) -> Path:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(Path(directory) / name, lambda tmp: save_file(tensors, str(tmp), metadata))


def save_training_state(directory: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write the training-only tensors, or remove a stale file when there are none."""
    if tensors:
        save_tensors(directory, tensors, {"format": "pt"}, TRAINING_STATE_NAME)
    else:
        (Path(directory) / TRAINING_STATE_NAME).unlink(missing_ok=True)


def load_training_state(directory: str | Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / TRAINING_STATE_NAME
    return _load_file(path) if path.is_file() else {}


def load_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    return _load_file(_weights_path(directory))


def _weights_path(directory: str | Path) -> Path:
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        pickled = [p.name for p in Path(directory).glob("adapter_model.bin")]
        hint = (
            " (found adapter_model.bin: deltatune never unpickles; re-save it as safetensors)"
            if pickled
            else ": point at the folder save_pretrained wrote, or save the adapter again"
        )
        raise FileNotFoundError(f"No {WEIGHTS_NAME} in {directory}{hint}")
    return path


def _damaged(path: Path, err: Exception) -> ConfigError:
    """safetensors' own message names neither the file nor a fix; this one names both."""
    return ConfigError(
        f"{path} is damaged or not a safetensors file ({err}); it was probably cut short while being copied or "
        "saved: copy or save the adapter again"
    )


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(str(path))
    except SafetensorError as err:
        raise _damaged(path, err) from None
    for key, tensor in tensors.items():
        check_values(path, key, tensor)
    return tensors


def check_values(path: Path, key: str, tensor: torch.Tensor) -> None:
    """Adapter tensors are finite floating-point numbers. An integer tensor would be cast without a
    word into a float parameter, and a NaN or infinity poisons every output the adapter touches:
    both are refused here, naming the tensor, rather than found later as garbage text or a NaN loss."""
    if not tensor.is_floating_point():
        raise ConfigError(
            f"{path}: tensor {key!r} has dtype {tensor.dtype}, but adapter tensors are floating point; the file "
            "was not written by save_pretrained (deltatune or peft) or was altered: save the adapter again"
        )
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise ConfigError(
            f"{path}: tensor {key!r} holds {bad} NaN or infinite value(s) of {tensor.numel()}; the training that "
            "wrote it diverged: use an earlier checkpoint, or train again with a lower learning rate"
        )


def check_adapter_dir(directory: str | Path, flag: str = "--adapter") -> DeltaConfig:
    """Check a saved adapter as far as it can be without a base model, and return its config.

    The folder, a parseable ``adapter_config.json`` of a known method, and safetensors files whose
    header and size agree (``safe_open`` reads only the header), so that a typo or a truncated copy
    is reported in a second rather than after the base model's load.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(
            f"{flag} {directory}: no such directory; point it at a folder save_pretrained wrote (deltatune or peft)"
        )
    config_path = directory / CONFIG_NAME
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"no {CONFIG_NAME} in {directory}: point {flag} at a folder written by save_pretrained (deltatune or peft)"
        ) from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"{config_path} is not valid JSON ({err}); save the adapter again") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{config_path} must hold a JSON object of options; save the adapter again")
    config = DeltaConfig.from_dict(data)
    for path in (_weights_path(directory), directory / TRAINING_STATE_NAME):
        if path.is_file():
            try:
                with safe_open(str(path), "pt") as f:
                    f.keys()
            except SafetensorError as err:
                raise _damaged(path, err) from None
    return config


def split_by_module(
    tensors: dict[str, torch.Tensor],
    module_names: list[str],
    prefix: str = KEY_PREFIX,
    top_level: str | None = None,
) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Group checkpoint keys by the adapted module they belong to (longest module name wins).

    Keys without ``prefix`` belong to module ``top_level`` when one is given: the module whose
    keys are bare names (peft's ``prompt_embeddings``). Returns ``{module_name: {relative_key:
    tensor}}`` and the keys that belong to no module.
    """
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    unmatched = []
    ordered = sorted(module_names, key=len, reverse=True)
    for key, value in tensors.items():
        if top_level is not None and not key.startswith(prefix):
            by_module.setdefault(top_level, {})[key] = value
            continue
        path = key.removeprefix(prefix)
        owner = next((m for m in ordered if path.startswith(m + ".")), None)
        if owner is None:
            unmatched.append(key)
        else:
            by_module.setdefault(owner, {})[path[len(owner) + 1 :]] = value
    return by_module, unmatched
