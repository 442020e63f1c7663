"""Loading without ever holding the float model: a skeleton on the meta device, then the checkpoint one tensor
at a time.

``meta_skeleton`` builds the architecture with every parameter on the meta device (no memory, no random
draws); buffers computed in ``__init__`` (rotary frequencies) stay real, since no checkpoint holds them.
``iter_checkpoint_tensors`` yields ``(name, tensor)`` pairs in transformers' names, reading one tensor at a
time from safetensors (one file or shards listed by ``model.safetensors.index.json``) or from a GGUF file
(dequantized to float32 with gguf's own reader, llama's q/k rows un-permuted as transformers does).
``checkpoint_tensor_bytes`` gives each tensor's size without reading any weights (for memory estimates).
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "checkpoint_files",
    "checkpoint_tensor_bytes",
    "iter_checkpoint_tensors",
    "meta_skeleton",
    "read_checkpoint_tensor",
]


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Parameters registered inside go to the meta device; buffers stay real (some are computed in
    ``__init__`` and are in no checkpoint)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def meta_skeleton(config: Any, task: str = "causal-lm", dtype: torch.dtype | None = None, **kwargs: Any) -> nn.Module:
    """The model for ``config`` (a transformers config, or a directory with config.json) with its
    parameters on the meta device: it costs no memory whatever the model's size."""
    from transformers import AutoConfig

    from deltatune.loading.base_models import _auto_class

    if not hasattr(config, "model_type"):
        config = AutoConfig.from_pretrained(config)
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.random.fork_rng(), _parameters_on_meta():
        return _auto_class(task).from_config(config, dtype=dtype, **kwargs)


def checkpoint_files(path: str | Path) -> list[Path]:
    """The weight files of a checkpoint: a .safetensors or .gguf file, or a directory holding
    model.safetensors, a sharded index, or one .gguf file."""
    path = Path(path)
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / f for f in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs
    raise FileNotFoundError(
        f"{path} holds no streamable checkpoint: expected model.safetensors, model.safetensors.index.json "
        "with its shards, or a single .gguf file (a PyTorch .bin checkpoint cannot be read one tensor at a time: "
        "convert it with save_pretrained(..., safe_serialization=True))"
    )


def iter_checkpoint_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of the checkpoint at ``path`` with its transformers name, read one at a time: only the
    tensor being yielded is in memory (the caller drops it before asking for the next)."""
    for file in checkpoint_files(path):
        if file.suffix == ".gguf":
            yield from _iter_gguf(file)
        else:
            yield from _iter_safetensors(file)


def _iter_safetensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor read into its own memory with plain file reads. safetensors' ``safe_open`` memory-maps
    the file, and every page a conversion touches stays in the process's resident memory until the file
    closes: measured, a sharded load then peaked at several times the quantized model."""
    with open(file, "rb") as handle:
        header, start = _header(handle)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            yield name, _read_tensor(handle, file, start, name, info)


def _header(handle: Any) -> tuple[dict, int]:
    """A safetensors file's JSON header and the offset where its data starts."""
    size = int.from_bytes(handle.read(8), "little")
    return json.loads(handle.read(size)), 8 + size


def read_checkpoint_tensor(path: str | Path, name: str) -> torch.Tensor:
    """One tensor of the checkpoint at ``path`` by its transformers name, read alone (LoftQ reads a weight
    again after the load has quantized it)."""
    for file in checkpoint_files(path):
        if file.suffix == ".gguf":
            entry = gguf_tensor_map(file).get(name)
            if entry is not None:
                from gguf.quants import dequantize

                return _gguf_float(*entry, dequantize)
            continue
        with open(file, "rb") as handle:
            header, start = _header(handle)
            if name in header:
                return _read_tensor(handle, file, start, name, header[name])
    raise KeyError(f"{path} holds no tensor {name!r} (was the checkpoint changed after loading?)")


def _read_tensor(handle: Any, file: Path, start: int, name: str, info: dict) -> torch.Tensor:
    """One tensor into fresh memory (a function of its own, so that no generator frame keeps it alive
    after the caller has dropped it)."""
    begin, end = info["data_offsets"]
    data = torch.empty(end - begin, dtype=torch.uint8)
    handle.seek(start + begin)
    if handle.readinto(data.numpy()) != end - begin:
        raise OSError(f"{file} is truncated: tensor {name!r} ends past the end of the file")
    return data.view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


def checkpoint_tensor_bytes(path: str | Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """name -> (shape, bytes as stored) for every tensor, read from the headers only."""
    sizes: dict[str, tuple[tuple[int, ...], int]] = {}
    for file in checkpoint_files(path):
        if file.suffix == ".gguf":
            for name, (_, tensor) in gguf_tensor_map(file).items():
                shape = tuple(int(d) for d in reversed(tensor.shape))
                sizes[name] = (shape, int(tensor.n_bytes))
            continue
        from safetensors import safe_open

        with safe_open(file, framework="pt") as reader:
            for name in reader.keys():  # noqa: SIM118 (a safetensors reader, not a dict)
                piece = reader.get_slice(name)
                shape = tuple(piece.get_shape())
                itemsize = torch.empty((), dtype=_SAFETENSORS_DTYPES[piece.get_dtype()]).element_size()
                sizes[name] = (shape, itemsize * int(torch.Size(shape).numel()))
    return sizes


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


# --- GGUF -----------------------------------------------------------------------------------------
def gguf_config(file: Path) -> Any:
    """The transformers config of a GGUF file, read from its metadata (no weights)."""
    return _gguf_names(str(file), file.stat().st_mtime_ns)[0]


@functools.lru_cache(maxsize=4)
def _gguf_names(file: str, mtime: int) -> tuple[Any, dict[str, str]]:
    """(config, gguf name -> transformers name): parsing them takes tens of seconds, so once per file."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    path = Path(file)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    processor = TENSOR_PROCESSORS.get(config.model_type, TensorProcessor)(config=config.to_dict())
    return config, get_gguf_hf_weights_map(meta_skeleton(config), processor)


def gguf_tensor_map(file: Path) -> dict[str, tuple[Any, Any]]:
    """transformers name -> (tensor processor, gguf ReaderTensor) for every tensor of ``file``; the
    reader memory-maps the file, so nothing is read until a tensor's ``data`` is touched."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    config, names = _gguf_names(str(file), file.stat().st_mtime_ns)
    processor = TENSOR_PROCESSORS.get(config.model_type, TensorProcessor)(config=config.to_dict())
    reader = GGUFReader(file)
    return {names[t.name]: (processor, t) for t in reader.tensors if t.name in names}


def _iter_gguf(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf.quants import dequantize

    for name, (processor, tensor) in gguf_tensor_map(file).items():
        yield name, _gguf_float(processor, tensor, dequantize)


def _gguf_float(processor: Any, tensor: Any, dequantize: Any) -> torch.Tensor:
    weights = dequantize(tensor.data, tensor.tensor_type)
    result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping={}, parsed_parameters={})
    return torch.from_numpy(result.weights.copy())
