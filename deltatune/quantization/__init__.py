"""A quantized frozen base: the model's linear layers stored in int8 or 4-bit NF4, for LoRA to train on.

``quantize_base(model, "int8" | "nf4")`` swaps every ``nn.Linear`` of any transformers model
(the output head only if asked) for a :class:`QuantizedLinear` in place, and returns the model.
Methods that leave the base weights frozen work on it unchanged; the float weights are gone.
A floor below the methods: it imports only deltatune.config.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.config import ConfigError
from deltatune.quantization.base import QuantizedLinear, QuantizedWeight, product_dtype
from deltatune.quantization.memory import return_large_blocks

KINDS = ("int8", "nf4")  # what quantize_base makes from a float model
LOAD_KINDS = (*KINDS, "gguf")  # what load_base can load: also a GGUF file's own blocks
MATMUL_DTYPES = ("auto", "float32", "bfloat16")  # what the frozen base's products may multiply in
INSTALL = {"bitsandbytes": "pip install 'deltatune[quant]'  (or: pip install --no-deps bitsandbytes==0.50.2)"}

__all__ = [
    "KINDS",
    "LOAD_KINDS",
    "QuantizedLinear",
    "QuantizedWeight",
    "base_storage",
    "dequantize_base",
    "is_quantized",
    "quantize_base",
    "require",
    "set_matmul_dtype",
]


def require(package: str) -> Any:
    """Import an optional package, or say which one is missing and the command that installs it."""
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise ModuleNotFoundError(
            f"the {package!r} package is needed for this quantized base but is not installed: run `{INSTALL[package]}`",
            name=package,
        ) from err


def _layer_class(kind: str) -> type[QuantizedLinear]:
    if kind == "int8":
        from deltatune.quantization.int8 import Int8Linear

        return Int8Linear
    if kind == "nf4":
        require("bitsandbytes")
        from deltatune.quantization.nf4 import NF4Linear

        return NF4Linear
    raise ConfigError(f"unknown quantization {kind!r}: choose one of {', '.join(KINDS)}")


def _head_names(model: nn.Module) -> set[str]:
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def quantize_base(
    model: nn.Module, kind: str, quantize_head: bool = False, double_quant: bool = False,
    quantize_embedding: bool = False, matmul_dtype: str = "auto",
) -> nn.Module:  # fmt: skip
    """Quantize ``model``'s linear layers in place (``kind``: ``int8`` or ``nf4``) and return it.

    The output head stays float unless ``quantize_head`` (it shares its weight with the embeddings
    in tied models, which stay float). ``double_quant`` (nf4 only) also quantizes the block scales.
    ``quantize_embedding``: the token embedding becomes int8 rows (a head tied to it shares them), as
    ``load_base(..., quantize=...)`` does. ``matmul_dtype``: see :func:`set_matmul_dtype`. Call it before
    adding adapters: a wrapped layer is refused.
    """
    cls = _layer_class(kind)
    check_matmul_dtype(matmul_dtype)
    if any(hasattr(m, "base_layer") for m in model.modules()):
        raise ConfigError("quantize_base the model before adding adapters (it already carries some)")
    if quantize_embedding:
        from deltatune.quantization.int8 import quantize_embedding as to_int8

        to_int8(model)  # before the head is looked at: a tied head is now the embedding's Int8Linear
    skip = set() if quantize_head else _head_names(model)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) in (nn.Linear, Conv1D) and name not in skip
    ]
    options = {"double_quant": double_quant} if kind == "nf4" else {}
    return_large_blocks()  # freed dequantized blocks go back to the system (see quantization/memory.py)
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, cls(_as_linear(module), **options))
    for p in model.parameters():
        p.requires_grad_(False)
    return set_matmul_dtype(model, matmul_dtype)


def _as_linear(module: nn.Module) -> nn.Linear:
    """GPT-2's Conv1D (weight stored in×out) as the nn.Linear it computes."""
    if type(module) is nn.Linear:
        return module
    linear = nn.Linear(*module.weight.shape, device="meta")
    linear.weight = nn.Parameter(module.weight.detach().T, requires_grad=False)
    linear.bias = module.bias
    return linear


def check_matmul_dtype(matmul_dtype: str) -> None:
    if matmul_dtype not in MATMUL_DTYPES:
        raise ConfigError(f"unknown matmul_dtype {matmul_dtype!r}: choose one of {', '.join(MATMUL_DTYPES)}")


def set_matmul_dtype(model: nn.Module, matmul_dtype: str = "auto") -> nn.Module:
    """Choose the dtype the quantized layers' products multiply in, and return the model.

    ``bfloat16``: activations and weight blocks are cast to bfloat16 for the product, the result comes back in
    the activations' dtype; int8 codes are exact in bfloat16 and their scales are applied in float32 afterwards,
    so only the activations' rounding is added (SmolLM2: relative logits error 0.032 -> 0.036). ``float32``:
    the products run in float32. ``auto`` (every quantized layer's default): bfloat16 for float32 activations on
    a device that multiplies it in hardware (``base.native_bfloat16``, decided at each call, so moving the model
    to another device follows), else the activations' own dtype.
    The adapters (LoRA's A and B, ...) are not quantized layers and keep their own dtype.
    """
    check_matmul_dtype(matmul_dtype)
    for layer in model.modules():
        if isinstance(layer, QuantizedLinear):
            layer.matmul_dtype = matmul_dtype
    return model


def base_kind(model: nn.Module) -> str:
    """How the frozen base is stored and multiplied, for reports: ``int8, products in bfloat16`` (what float32
    activations multiply in on the layers' device), or ``not quantized``."""
    layer = next((m for m in model.modules() if isinstance(m, QuantizedLinear)), None)
    if layer is None:
        return "not quantized"
    dtype = product_dtype(layer, torch.empty(0, device=layer.storage_device()))
    return f"{layer.kind}, products in {str(dtype).removeprefix('torch.')}"


def is_quantized(model: nn.Module) -> str | None:
    """The kind of the model's quantized layers (``int8``/``nf4``), or None for a float model."""
    return next((m.kind for m in model.modules() if isinstance(m, QuantizedLinear)), None)


def base_storage(model: nn.Module) -> tuple[int, int]:
    """(bytes, weights) of the model's frozen base: quantized layers at their stored size (codes,
    scales, bias), every other tensor at its own size. Adapter parameters are left out."""
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    skip = {id(t) for m in quantized for t in m.quantized_tensors()}
    for module in model.modules():  # adapters (a DeltaLayer's adapter_attrs stores) are not the base
        for attr in getattr(module, "adapter_attrs", ()):
            skip |= {id(p) for p in getattr(module, attr).parameters()}
    size = sum(m.storage_bytes() for m in quantized)
    weights = sum(m.in_features * m.out_features for m in quantized)
    for tensor in model.parameters():
        if id(tensor) not in skip:
            size += tensor.numel() * tensor.element_size()
            weights += tensor.numel()
    return size, weights


def dequantize_base(model: nn.Module) -> nn.Module:
    """Replace every quantized layer (wrapped or not) with a float ``nn.Linear`` of its dequantized
    weight, and a quantized embedding (GGUF blocks, int8 rows) with a float ``nn.Embedding``, in place (a head
    tied to that embedding is tied again to the float one); returns the model."""
    from deltatune.quantization.gguf import GGUFEmbedding
    from deltatune.quantization.int8 import Int8Embedding

    embedding_types = (GGUFEmbedding, Int8Embedding)
    embeddings = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, (QuantizedLinear, *embedding_types)):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.to_float())
            embeddings += isinstance(module, embedding_types)
    top = next((m for m in model.modules() if hasattr(m, "tie_weights") and hasattr(m, "config")), None)
    if embeddings and top is not None and getattr(top.config, "tie_word_embeddings", False):
        top.tie_weights()
    return model
