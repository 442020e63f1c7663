"""A quantized base loaded one tensor at a time: the float model is never in memory.

The architecture is built on the meta device; each checkpoint tensor is read, quantized if it is the
weight of a linear layer that ``quantize_base`` would quantize, put in place, and released before the next
is read. Peak memory is the quantized model plus one float tensor. Before anything loads,
:func:`check_memory` compares an estimate of what the load needs with the memory available and refuses a
load that cannot fit, naming a ``quantize`` that would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.config import ConfigError
from deltatune.loading.streaming import checkpoint_tensor_bytes, iter_checkpoint_tensors, meta_skeleton
from deltatune.quantization.memory import release_freed_memory, return_large_blocks

# stored bytes per weight of a quantized linear layer (codes and scales), by kind
BYTES_PER_WEIGHT = {None: 4.0, "int8": 1.0, "nf4": 0.5 + 4 / 64, "gguf": 0.625}
OVERHEAD = 1.2  # what the estimate leaves for the interpreter, allocator slack and the first batch


def available_memory() -> int:
    """Bytes this process can still take (psutil's ``available``: free + reclaimable)."""
    import psutil

    return int(psutil.virtual_memory().available)


def estimate_bytes(path: str | Path, quantize: str | None, linear_names: set[str] | None = None) -> int:
    """Bytes a load of ``path`` needs: linear weights at ``quantize``'s bytes per weight (every 2-d tensor
    but the embeddings when ``linear_names`` is not given), the rest in float32, plus the largest tensor
    once more in float32 (the one being quantized), times :data:`OVERHEAD`."""
    total, largest = 0.0, 0
    for name, (shape, _) in checkpoint_tensor_bytes(path).items():
        numel = int(torch.Size(shape).numel())
        largest = max(largest, 4 * numel)
        is_linear = (
            name in linear_names
            if linear_names is not None
            else len(shape) == 2 and "embed" not in name and "token_embd" not in name  # (GGUF's name)
        )
        total += numel * (BYTES_PER_WEIGHT[quantize] if is_linear else 4.0)
    return int((total + largest) * OVERHEAD)


def check_memory(path: str | Path, quantize: str | None, available: int | None = None) -> None:
    """Refuse a load that needs more memory than the machine has, naming the estimate and an option that fits."""
    available = available_memory() if available is None else available
    need = estimate_bytes(path, quantize)
    if need <= available:
        return
    order = [None, "int8", "nf4"]
    smaller = [k for k in order[order.index(quantize) + 1 :] if estimate_bytes(path, k) <= available] if (
        quantize in order) else []  # fmt: skip
    fix = f"use --quantize {smaller[0]} (about {estimate_bytes(path, smaller[0]) / 2**30:.1f} GiB)" if smaller else (
        "no quantization fits: free memory or use a machine with more")  # fmt: skip
    raise MemoryError(
        f"loading {path} {'in float32' if quantize is None else f'with --quantize {quantize}'} needs about "
        f"{need / 2**30:.1f} GiB, but only {available / 2**30:.1f} GiB is available: {fix}"
    )


def quantize_targets(model: nn.Module, quantize_head: bool = False) -> dict[str, nn.Module]:
    """The linear layers ``quantize_base`` would quantize, by name."""
    from transformers.pytorch_utils import Conv1D

    from deltatune.quantization import _head_names

    skip = set() if quantize_head else _head_names(model)
    return {n: m for n, m in model.named_modules() if type(m) in (nn.Linear, Conv1D) and n not in skip}


def _resolve(model: nn.Module, name: str, prefix: str) -> tuple[nn.Module, str] | None:
    """The module and attribute a checkpoint name stands for (with or without the base model's prefix)."""
    for candidate in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")):
        module_name, _, attr = candidate.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            continue
        if attr in module._parameters or attr in module._buffers:
            return module, module_name
    return None


def _quantizer(layer_cls: Any) -> Any:
    """make_layer for int8/nf4: the float weight put on the meta-device linear, then quantized."""
    from deltatune.quantization import _as_linear

    def make(module: nn.Module, tensor: torch.Tensor) -> nn.Module:
        from deltatune.quantization.int8 import Int8Embedding

        current = module._parameters["weight"]
        module._parameters["weight"] = nn.Parameter(tensor.to(current.dtype), requires_grad=False)
        try:
            return Int8Embedding(module) if isinstance(module, nn.Embedding) else layer_cls(_as_linear(module))
        finally:
            module._parameters["weight"] = current  # the float tensor dies with the caller's frame

    return make


def _place(model: nn.Module, module: nn.Module, module_name: str, attr: str, item: Any, make_layer: Any) -> None:
    """Put one checkpoint tensor in place; a target's weight becomes ``make_layer``'s quantized layer."""
    layer = make_layer(module, item) if make_layer is not None and attr == "weight" else None
    if layer is not None:
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        return
    if attr in module._buffers:
        module._buffers[attr] = item.to(module._buffers[attr].dtype)
        return
    current = module._parameters[attr]
    module._parameters[attr] = nn.Parameter(item.to(current.dtype) if item.is_floating_point() else item, False)


def load_streamed(
    path: str | Path,
    task: str,
    quantize: str,
    config: Any = None,
    layer_cls: Any = None,
    tensors: Any = None,
    **kwargs: Any,
) -> nn.Module:
    """The model at ``path`` with its linear layers quantized as each is read (``layer_cls`` builds a
    quantized layer from a float ``nn.Linear``; ``quantize_base``'s class for ``quantize`` by default).
    ``tensors`` replaces the checkpoint reader (GGUF blocks: deltatune.quantization.gguf)."""
    from deltatune.quantization import _layer_class

    if quantize == "gguf":
        from deltatune.quantization.gguf import make_layer
    else:
        make_layer = _quantizer(layer_cls or _layer_class(quantize))
    return_large_blocks()  # the steps' dequantized blocks must not fragment the heap (quantization/memory.py)
    model = meta_skeleton(config if config is not None else path, task, **kwargs)
    targets = {id(m) for m in quantize_targets(model).values()}
    embedding = model.get_input_embeddings()
    if quantize == "gguf" or (type(embedding) is nn.Embedding and embedding.max_norm is None):
        targets.add(id(embedding))  # gguf: its own blocks; else int8 rows (and a head tied to it: the same codes)
    prefix = getattr(model, "base_model_prefix", "")
    for name, item in tensors if tensors is not None else iter_checkpoint_tensors(path):
        found = _resolve(model, name, prefix)
        if found is None:
            continue
        module, module_name = found
        attr = name.rpartition(".")[2]
        _place(model, module, module_name, attr, item, make_layer if id(module) in targets else None)
        del item
        if tensors is None and id(module) in targets and attr == "weight":
            _record_source(model.get_submodule(module_name), module, path, name)
        release_freed_memory()  # the float tensor just freed (glibc keeps it otherwise)
    _finish(model, quantize)
    return model


def _record_source(layer: nn.Module, float_module: nn.Module, path: str | Path, name: str) -> None:
    """Where a quantized layer's float weight is in the checkpoint (LoftQ reads it again)."""
    from transformers.pytorch_utils import Conv1D

    from deltatune.quantization import QuantizedLinear

    if isinstance(layer, QuantizedLinear):
        layer.float_source = (str(path), name, type(float_module) is Conv1D)


def _finish(model: nn.Module, quantize: str) -> None:
    """Tie shared weights, initialise what the checkpoint does not hold (a fresh classification head,
    as from_pretrained does), quantize it, freeze everything."""
    if quantize == "gguf":
        from deltatune.quantization.gguf import tie_head
    else:
        from deltatune.quantization.int8 import tie_head
    blocks = tie_head(model)  # a head tied to a quantized embedding shares its stored form
    if hasattr(model, "tie_weights") and not blocks:
        model.tie_weights()
    missing = [(n, m) for n, m in model.named_modules() if any(p.is_meta for p in m.parameters(recurse=False))]
    for name, module in missing:
        for attr, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                module._parameters[attr] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=False)
        model._init_weights(module)
        if not any(name.endswith(h) for h in ("classifier", "score", "classifier.out_proj", "qa_outputs")):
            raise ConfigError(f"the checkpoint has no weights for {name!r}: it does not match its config.json")
    if missing and quantize in ("int8", "nf4"):
        from deltatune.quantization import quantize_base

        quantize_base(model, quantize)  # the fresh head, if it is a target; quantized layers are left alone
    for p in model.parameters():
        p.requires_grad_(False)
