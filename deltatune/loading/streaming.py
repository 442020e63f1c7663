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


TASKS = ("causal-lm", "classification", "feature-extraction")


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


def auto_class(task: str) -> Any:
    """The transformers Auto class that builds a model for ``task``."""
    import transformers

    classes = {
        "causal-lm": transformers.AutoModelForCausalLM,
        "classification": transformers.AutoModelForSequenceClassification,
        "feature-extraction": transformers.AutoModel,
    }
    if task not in classes:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return classes[task]


def meta_skeleton(config: Any, task: str = "causal-lm", dtype: torch.dtype | None = None, **kwargs: Any) -> nn.Module:
    """The model for ``config`` (a transformers config, or a directory with config.json) with its
    parameters on the meta device: it costs no memory whatever the model's size."""
    from transformers import AutoConfig

    if not hasattr(config, "model_type"):
        config = AutoConfig.from_pretrained(config)
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.random.fork_rng(), _parameters_on_meta():
        return auto_class(task).from_config(config, dtype=dtype, **kwargs)


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
        if file.suffix == ".gguf":  # the file's own names (token_embd.weight...): no metadata parse
            for tensor in gguf_file_tensors(file):
                shape = tuple(int(d) for d in reversed(tensor.shape))
                sizes[tensor.name] = (shape, int(tensor.n_bytes))
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


def gguf_tensor_map(file: Path, config: Any = None) -> dict[str, tuple[Any, Any]]:
    """transformers name -> (tensor processor, gguf ReaderTensor) for every tensor of ``file``. The tensors
    are views of the memory-mapped file, so nothing is read until a tensor's ``data`` is touched. ``config``
    (the model's transformers config, as deltatune.quantization.gguf passes it) spares parsing the file's
    metadata for it."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    if config is None:
        config, names = _gguf_names(str(file), file.stat().st_mtime_ns)
    else:
        processor = TENSOR_PROCESSORS.get(config.model_type, TensorProcessor)(config=config.to_dict())
        names = get_gguf_hf_weights_map(meta_skeleton(config), processor)
    processor = TENSOR_PROCESSORS.get(config.model_type, TensorProcessor)(config=config.to_dict())
    return {names[t.name]: (processor, t) for t in gguf_file_tensors(file) if t.name in names}


_GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # by value type
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _Cursor:
    """Reads a GGUF header from a memory map, touching only the header's pages."""

    def __init__(self, buffer: memoryview) -> None:
        self.buffer, self.pos = buffer, 0

    def uint(self, size: int) -> int:
        self.pos += size
        return int.from_bytes(self.buffer[self.pos - size : self.pos], "little")

    def string(self) -> str:
        size = self.uint(8)
        self.pos += size
        return bytes(self.buffer[self.pos - size : self.pos]).decode("utf-8")

    def skip(self, value_type: int) -> None:
        if value_type == _GGUF_STRING:
            size = self.uint(8)  # read first: `self.pos += self.uint(8)` would add to the old position
            self.pos += size
        elif value_type == _GGUF_ARRAY:
            item, count = self.uint(4), self.uint(8)
            if item in _GGUF_SCALAR_BYTES:
                self.pos += count * _GGUF_SCALAR_BYTES[item]
            else:
                for _ in range(count):
                    self.skip(item)
        else:
            self.pos += _GGUF_SCALAR_BYTES[value_type]


def gguf_file_tensors(file: Path) -> list[Any]:
    """The tensors of a GGUF file, as ``gguf.GGUFReader(file).tensors`` gives them (the same names, types,
    shapes and data views), without building the metadata: GGUFReader makes a numpy view per metadata item,
    and a tokenizer's tens of thousands of strings cost ~160 MB while loading SmolLM2 (measured)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.gguf_reader import ReaderTensor
    from gguf.quants import quant_shape_to_byte_shape

    data = np.memmap(file, mode="r")
    cursor = _Cursor(memoryview(data))
    if bytes(cursor.buffer[:4]) != b"GGUF" or cursor.buffer[4] == 0:  # not little-endian GGUF: gguf's reader
        from gguf import GGUFReader

        return list(GGUFReader(file).tensors)
    cursor.pos = 8
    n_tensors, n_kv, alignment = cursor.uint(8), cursor.uint(8), 32
    for _ in range(n_kv):
        key, value_type = cursor.string(), cursor.uint(4)
        if key == "general.alignment" and value_type == 4:
            alignment = cursor.uint(4)
        else:
            cursor.skip(value_type)
    infos = []
    for _ in range(n_tensors):
        name, n_dims = cursor.string(), cursor.uint(4)
        dims = [cursor.uint(8) for _ in range(n_dims)]
        infos.append((name, dims, GGMLQuantizationType(cursor.uint(4)), cursor.uint(8)))
    start = -(-cursor.pos // alignment) * alignment
    plain = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
             "I32": np.int32, "I64": np.int64}  # fmt: skip
    tensors = []
    for name, dims, qtype, offset in infos:
        n_elements = int(np.prod(dims))
        block, type_size = GGML_QUANT_SIZES[qtype]
        n_bytes, shape = n_elements * type_size // block, tuple(reversed(dims))
        dtype = plain.get(qtype.name, np.uint8)
        shape = shape if qtype.name in plain else quant_shape_to_byte_shape(shape, qtype)
        view = data[start + offset : start + offset + n_bytes].view(dtype).reshape(shape)
        tensors.append(ReaderTensor(name, qtype, np.array(dims, dtype=np.uint64), n_elements, n_bytes,
                                    start + offset, view, None))  # fmt: skip
    return tensors


def _iter_gguf(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf.quants import dequantize

    for name, (processor, tensor) in gguf_tensor_map(file).items():
        yield name, _gguf_float(processor, tensor, dequantize)


def gguf_data(tensor: Any) -> Any:
    """A GGUF tensor's data (as ``tensor.data`` holds it) read into fresh memory with a plain file read. Reading
    through the memory map would leave every page touched resident in the process while the map lives (the
    whole load): measured, about the file's size on top of the loaded model."""
    import numpy as np

    view = tensor.data
    filename = getattr(view, "filename", None)
    if filename is None:  # not memory-mapped: copy it
        return np.array(view)
    out = np.fromfile(filename, dtype=view.dtype, count=view.size, offset=tensor.data_offset)
    return out.reshape(view.shape)


def _gguf_float(processor: Any, tensor: Any, dequantize: Any) -> torch.Tensor:
    weights = dequantize(gguf_data(tensor), tensor.tensor_type)
    result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping={}, parsed_parameters={})
    return torch.from_numpy(result.weights.copy())
