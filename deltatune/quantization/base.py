"""What every quantized frozen linear layer shares, whatever its number format.

A :class:`QuantizedLinear` is an ``nn.Linear`` (so targeting, ``all-linear`` and LoRA find it)
whose ``weight`` is a :class:`QuantizedWeight` handle instead of a float tensor: it has the shape,
device and compute dtype of the float weight, so methods size their own tensors from it, and
``weight += delta`` (how a DeltaLayer merges) dequantizes, adds and requantizes. The float
weight is never stored; its quantized form lives in the subclass's own parameters.
"""

from __future__ import annotations

import threading
from typing import Any, ClassVar

import torch
from torch import nn

CHUNK_WEIGHTS = 1 << 22  # weights dequantized at once by chunked_matmul: a 16 MB float32 temporary at most


def _row_chunks(layer: QuantizedLinear) -> list[tuple[int, int]]:
    step = max(1, CHUNK_WEIGHTS // layer.in_features)
    return [(i, min(i + step, layer.out_features)) for i in range(0, layer.out_features, step)]


_SCRATCH = threading.local()  # per thread: {(device, dtype): the float block buffer}


def _block(layer: QuantizedLinear, start: int, end: int, like: torch.Tensor) -> torch.Tensor:
    """Rows ``start:end`` of the float weight in ``like``'s dtype, written into this thread's reused buffer (valid
    until the next call): a fresh block per matmul would cost page faults, hundreds of times per step."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    key, numel = (like.device, like.dtype), (end - start) * layer.in_features
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[key] = torch.empty(max(numel, CHUNK_WEIGHTS), dtype=like.dtype, device=like.device)
    out = buffer[:numel].view(end - start, layer.in_features)
    layer.dequantize_rows_into(start, end, out)
    return out


def _forward(x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
    parts = [x @ _block(layer, i, j, x).T for i, j in _row_chunks(layer)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


class _ChunkedMatmul(torch.autograd.Function):
    """x·Wᵀ with W dequantized a block of output rows at a time, in the forward and in the input-gradient
    backward: the stored form is the only copy of the weight, and each float block is a temporary."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        return _forward(x, layer)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return times_weight(grad, ctx.layer), None


def times_weight(grad: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
    """``grad @ layer.dequantize()`` (the input gradient of x·Wᵀ), a block of rows of W at a time."""
    dx = None
    for i, j in _row_chunks(layer):
        part = grad[..., i:j] @ _block(layer, i, j, grad)
        dx = part if dx is None else dx.add_(part)
    return dx


def chunked_matmul(x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
    """``x @ layer.dequantize().T`` (no bias) without ever holding the whole float weight."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _ChunkedMatmul.apply(x, layer)
    return _forward(x, layer)


class QuantizedWeight:
    """Stands where ``layer.weight`` stands: shape, dtype and device, ``dequantize()``, and ``+=``/``-=``
    that requantize (merge/unmerge: each rounds, so unmerge is not an exact inverse)."""

    def __init__(self, layer: QuantizedLinear) -> None:
        self.layer = layer

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.layer.out_features, self.layer.in_features))

    @property
    def dtype(self) -> torch.dtype:
        return self.layer.compute_dtype

    @property
    def device(self) -> torch.device:
        return self.layer.storage_device()

    requires_grad = False

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dequantize(self) -> torch.Tensor:
        return self.layer.dequantize()

    def __iadd__(self, delta: torch.Tensor) -> QuantizedWeight:
        self.layer.requantize_(self.layer.dequantize() + delta.to(self.layer.compute_dtype))
        return self

    def __isub__(self, delta: torch.Tensor) -> QuantizedWeight:
        self.layer.requantize_(self.layer.dequantize() - delta.to(self.layer.compute_dtype))
        return self

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.layer.kind}, shape={tuple(self.shape)})"


class QuantizedLinear(nn.Linear):
    """A frozen linear layer in ``kind``'s format; subclasses store it and multiply by it."""

    kind: ClassVar[str] = ""
    bits: ClassVar[float] = 32.0  # storage bits per weight, scales included (see storage_bytes)
    # (checkpoint path, tensor name, stored in×out) of the float weight, set by the streamed loader: LoftQ
    # reads it again (deltatune.methods.lora_loftq); None for a layer quantized in memory
    float_source: tuple[str, str, bool] | None = None

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)  # nn.Linear's own __init__ would allocate a float weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = linear.weight.dtype
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> QuantizedWeight:  # type: ignore[override]
        return QuantizedWeight(self)

    @weight.setter
    def weight(self, value: QuantizedWeight) -> None:
        if not (isinstance(value, QuantizedWeight) and value.layer is self):  # `weight += d` sets it back
            raise TypeError(f"{type(self).__name__}.weight is quantized: use requantize_(float_weight) to replace it")

    def storage_device(self) -> torch.device:
        return next(iter(self.parameters())).device

    def dequantize(self) -> torch.Tensor:
        return self.dequantize_rows(0, self.out_features)

    def dequantize_rows(self, start: int, end: int) -> torch.Tensor:
        """Rows ``start:end`` of the float weight (what chunked_matmul multiplies by)."""
        raise NotImplementedError

    def dequantize_rows_into(self, start: int, end: int, out: torch.Tensor) -> None:
        """Write rows ``start:end`` of the float weight into ``out`` (any float dtype: cast as ``.to`` would)."""
        out.copy_(self.dequantize_rows(start, end))

    def requantize_(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def storage_bytes(self) -> int:
        """Bytes the quantized weight takes (codes and scales; the bias is counted as float by callers)."""
        return sum(t.numel() * t.element_size() for t in self.quantized_tensors())

    def quantized_tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def to_float(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the dequantized weight (what a float merge starts from)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.dequantize(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"
