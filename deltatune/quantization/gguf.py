"""A GGUF file's own quantized blocks as the frozen base (``load_base(..., quantize="gguf")``).

Each linear weight stored as Q4_0, Q4_1 or Q8_0 stays in those bytes (one uint8 row of blocks per output
row: no dequantize-and-requantize round trip), so LoRA trains on exactly the weights llama.cpp serves.
A block is 32 weights: Q8_0 = float16 scale d + 32 int8 (w = d·q); Q4_0 = d + 16 bytes of 4-bit codes
(w = d·(q − 8)); Q4_1 = d, float16 minimum m + codes (w = d·q + m); low nibbles are the block's first 16
weights, high nibbles its last 16 (ggml's layout). The arithmetic is float32, in the order of gguf's own
``gguf.quants.dequantize``, so the two agree bit for bit. The token embedding stays in its blocks too
(:class:`GGUFEmbedding`: a lookup dequantizes only the rows it gathers), and a head tied to it is a GGUFLinear
on the same blocks. Other tensors (norms) are dequantized to float as transformers does. Merging requantizes
with gguf's own quantizer where it has one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from deltatune.config import ConfigError
from deltatune.quantization.base import QuantizedLinear, QuantizedWeight, chunked_matmul

BLOCK = 32
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
SUPPORTED = tuple(BLOCK_BYTES)
FLOAT_TYPES = ("F32", "F16", "BF16")  # linear weights stored unquantized stay float


def _half(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    return blocks[..., offset : offset + 2].contiguous().view(torch.float16).float()


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    return torch.cat([codes & 0x0F, codes >> 4], dim=-1).float()


def dequantize_blocks(raw: torch.Tensor, qtype: str) -> torch.Tensor:
    """float32 weights of ``raw`` (rows × bytes of blocks) in ``qtype``: rows × (blocks · 32)."""
    blocks = raw.reshape(raw.shape[0], -1, BLOCK_BYTES[qtype])
    d = _half(blocks, 0)
    if qtype == "Q8_0":
        values = d * blocks[..., 2:].contiguous().view(torch.int8).float()
    elif qtype == "Q4_0":
        values = d * (_nibbles(blocks[..., 2:]) - 8)
    else:
        values = d * _nibbles(blocks[..., 4:]) + _half(blocks, 2)
    return values.reshape(raw.shape[0], -1)


class GGUFLinear(QuantizedLinear):
    """A frozen ``nn.Linear`` stored as a GGUF tensor's blocks (a frozen uint8 parameter), nothing else."""

    kind = "gguf"
    bits = 5.0  # Q4_1; storage_bytes counts the real bytes of each type

    def __init__(self, linear: nn.Linear, raw: torch.Tensor, qtype: str) -> None:
        super().__init__(linear)
        self.qtype = qtype
        self.weight_blocks = nn.Parameter(raw, requires_grad=False)

    def quantized_tensors(self) -> list[torch.Tensor]:
        return [self.weight_blocks]

    def dequantize_rows(self, start: int, end: int) -> torch.Tensor:
        return dequantize_blocks(self.weight_blocks[start:end], self.qtype).to(self.compute_dtype)

    def requantize_(self, weight: torch.Tensor) -> None:
        _requantize(self.weight_blocks, weight, self.qtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = chunked_matmul(x, self)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qtype={self.qtype}"


def _requantize(blocks: nn.Parameter, weight: torch.Tensor, qtype: str) -> None:
    """Write ``weight`` into ``blocks`` with gguf's own quantizer (merge/unmerge)."""
    from gguf.quants import quantize

    try:
        raw = quantize(weight.detach().float().numpy(), _gguf_type(qtype))
    except NotImplementedError as err:
        raise ConfigError(f"gguf has no quantizer for {qtype}: merge into a float model instead") from err
    with torch.no_grad():
        blocks.copy_(torch.from_numpy(np.ascontiguousarray(raw)).view(torch.uint8))


class GGUFEmbedding(nn.Embedding):
    """A frozen token embedding kept in its GGUF blocks: a lookup gathers the rows of blocks it needs and
    dequantizes only those (a row of blocks is a row of the table). A tied output head is a
    :class:`GGUFLinear` on the same blocks (see :func:`tie_head`), as llama.cpp serves it."""

    def __init__(self, embedding: nn.Embedding, raw: torch.Tensor, qtype: str) -> None:
        nn.Module.__init__(self)  # nn.Embedding's own __init__ would allocate a float table
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = embedding.padding_idx, None, 2.0
        self.scale_grad_by_freq, self.sparse = False, False
        self.compute_dtype, self.qtype = embedding.weight.dtype, qtype
        self.weight_blocks = nn.Parameter(raw, requires_grad=False)

    # what QuantizedWeight reads: the table is out_features (tokens) x in_features (dimensions)
    @property
    def out_features(self) -> int:
        return self.num_embeddings

    @property
    def in_features(self) -> int:
        return self.embedding_dim

    kind = "gguf"

    @property
    def weight(self) -> QuantizedWeight:  # type: ignore[override]
        return QuantizedWeight(self)  # type: ignore[arg-type]

    def storage_device(self) -> torch.device:
        return self.weight_blocks.device

    def dequantize(self) -> torch.Tensor:
        return dequantize_blocks(self.weight_blocks, self.qtype).to(self.compute_dtype)

    def requantize_(self, weight: torch.Tensor) -> None:
        _requantize(self.weight_blocks, weight, self.qtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight_blocks[ids.reshape(-1)]
        return dequantize_blocks(rows, self.qtype).to(self.compute_dtype).reshape(*ids.shape, self.embedding_dim)

    def to_float(self) -> nn.Embedding:
        """A plain ``nn.Embedding`` with the dequantized table (what a float merge writes)."""
        embedding = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, device="meta")
        embedding.weight = nn.Parameter(self.dequantize(), requires_grad=False)
        return embedding

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype}"


def tie_head(model: nn.Module) -> bool:
    """For a model whose embedding is kept in blocks: an output head tied to it (not loaded: still on the meta
    device) becomes a GGUFLinear on the same block parameter. Returns whether the embedding is in blocks."""
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, GGUFEmbedding):
        return False
    head = model.get_output_embeddings()
    if head is not None and getattr(model.config, "tie_word_embeddings", False) and head.weight.is_meta:
        name = next(n for n, m in model.named_modules() if m is head)
        parent_name, _, child = name.rpartition(".")
        layer = GGUFLinear(head, embedding.weight_blocks.data, embedding.qtype)
        layer.weight_blocks = embedding.weight_blocks  # the same parameter: tied, stored once
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return True


def _gguf_type(name: str) -> Any:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name]


def make_layer(module: nn.Module, item: Any) -> nn.Module | None:
    """A GGUFLinear (GGUFEmbedding for the token embedding) for a (blocks, type) item; None (keep the float
    layer) for a float tensor."""
    if isinstance(item, torch.Tensor):
        return None
    raw, qtype = item
    return GGUFEmbedding(module, raw, qtype) if isinstance(module, nn.Embedding) else GGUFLinear(module, raw, qtype)
