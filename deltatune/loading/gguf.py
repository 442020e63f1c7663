"""Reading a GGUF file into a model whose target linears (and token embedding) keep the file's own blocks
(``load_base(..., quantize="gguf")``); the block formats themselves live in :mod:`deltatune.quantization.gguf`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deltatune.config import ConfigError
from deltatune.loading.quantized import load_streamed, quantize_targets
from deltatune.loading.streaming import gguf_data, gguf_tensor_map, meta_skeleton
from deltatune.quantization import gguf as formats


def gguf_tensors(file: Path, targets: set[str], embeddings: set[str] = frozenset(), config: Any = None) -> Any:
    """(name, float tensor) for every tensor, or (name, (raw blocks, type)) for a target linear weight or an
    embedding in a supported block type; a target in another block type is refused, naming the supported
    ones (an embedding in another type is dequantized, as before)."""
    from gguf.quants import dequantize

    for name, (processor, tensor) in gguf_tensor_map(file, config).items():
        qtype = tensor.tensor_type.name
        blocks = (name in targets or name in embeddings) and qtype in formats.SUPPORTED
        if name in targets and not blocks and qtype not in formats.FLOAT_TYPES:
            raise ConfigError(
                f"{file.name}: {name} is stored as {qtype}, which --quantize gguf cannot keep: supported block "
                f"types are {', '.join(formats.SUPPORTED)} (or use --quantize int8/nf4, which dequantize the file "
                "first)"
            )
        yield name, _item(processor, tensor, qtype if blocks else None, dequantize)


def _item(processor: Any, tensor: Any, qtype: str | None, dequantize: Any) -> Any:
    raw = gguf_data(tensor)  # a plain read: no page of the memory-mapped file stays resident
    weights = dequantize(raw, tensor.tensor_type) if qtype is None else raw
    result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping={}, parsed_parameters={})
    data = torch.from_numpy(np.ascontiguousarray(result.weights))  # a copy only if processing left a view
    return data if qtype is None else (data.view(torch.uint8), qtype)


def load_gguf(file: Path, task: str, config: Any, **kwargs: Any) -> nn.Module:
    """The model of ``file`` with its Q4_0/Q4_1/Q8_0 linear weights kept as GGUF blocks."""
    skeleton = meta_skeleton(config, task)
    embedding = next(n for n, m in skeleton.named_modules() if m is skeleton.get_input_embeddings())
    names = {f"{n}.weight" for n in quantize_targets(skeleton)}
    tensors = gguf_tensors(Path(file), names, {f"{embedding}.weight"}, config)
    return load_streamed(file, task, "gguf", config=config, tensors=tensors, **kwargs)
